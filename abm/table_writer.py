"""Tables of a run, streamed to disk step by step: rounds.parquet and matches.csv."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from abm.engine import StepResult
from abm.game import EMPTY, INTENDED_LABELS

_INTENDED = pa.array(INTENDED_LABELS)


def _dictionary(codes: np.ndarray, values: pa.Array) -> pa.DictionaryArray:
    # EMPTY codes become nulls: a round that was decided but not played
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32), mask=codes < 0),
                                          values)


class TableWriter:
    """Appends each step's rows to ``rounds.parquet`` (optional) and ``matches.csv``.

    Players and policies are stored as dictionary-encoded strings, so a table of
    millions of rows costs a few bytes a row.
    """

    def __init__(self, folder: Path, labels: list[str], label_of_node: np.ndarray,
                 name_of_label: list[str], rounds: bool = True, matches: bool = True) -> None:
        self.labels = pa.array(labels)
        # read at every step: evolution changes who plays what in place
        self.label_of_node = label_of_node
        names = list(dict.fromkeys(name_of_label))
        self.policies = pa.array(names)
        self.name_code = np.array([names.index(n) for n in name_of_label], np.int32)
        self.write_matches = matches
        self.next_match = 0
        self.rounds_writer: pq.ParquetWriter | None = None
        self.rounds_path = folder / "rounds.parquet" if rounds else None
        self.matches_path = folder / "matches.csv"
        self.matches_writer: pacsv.CSVWriter | None = None
        self.transcripts_path = folder / "transcripts.jsonl"
        self.transcripts = None
        self.label_names = labels

    def _who(self, agent: np.ndarray, opponent: np.ndarray) -> dict[str, pa.Array]:
        return {
            "agent": pa.array(agent.astype(np.int64)),
            "opponent": pa.array(opponent.astype(np.int64)),
            "player": _dictionary(self.label_of_node[agent], self.labels),
            "opponent_player": _dictionary(self.label_of_node[opponent], self.labels),
            "policy": _dictionary(self.name_code[self.label_of_node[agent]], self.policies),
            "opponent_policy": _dictionary(self.name_code[self.label_of_node[opponent]],
                                           self.policies),
        }

    def add(self, result: StepResult, totals: dict[str, np.ndarray],
            exchanges: list[dict[str, Any]] = ()) -> None:
        m = result.n_matches
        match = self.next_match + np.concatenate([np.arange(m), np.arange(m)])
        if exchanges:
            self._add_exchanges(exchanges)
        self.next_match += m
        if self.rounds_path is not None:
            self._add_rounds(result, match)
        if not self.write_matches:
            return
        sides = {"step": pa.array(np.full(2 * m, result.step + 1, np.int64)),
                 "match": pa.array(match.astype(np.int64)),
                 **self._who(result.agent, result.opponent),
                 "self_play": pa.array(result.agent == result.opponent),
                 "rounds": pa.array(result.side_length.astype(np.int64)),
                 "payoff": pa.array(totals["payoff"]),
                 "cooperations": pa.array(totals["cooperations"].astype(np.int64)),
                 "defections": pa.array(totals["defections"].astype(np.int64)),
                 "intended_defections": pa.array(totals["intended_defections"].astype(np.int64)),
                 "invalid": pa.array(totals["invalid"].astype(np.int64)),
                 "fallbacks": pa.array(totals["fallbacks"].astype(np.int64)),
                 "void": pa.array(np.concatenate([result.void, result.void])
                                  if result.void is not None else np.zeros(2 * m, bool))}
        table = pa.table(sides)
        for column in ("player", "opponent_player", "policy", "opponent_policy"):
            i = table.schema.get_field_index(column)
            table = table.set_column(i, column, table[column].cast(pa.string()))
        if self.matches_writer is None:
            self.matches_writer = pacsv.CSVWriter(str(self.matches_path), table.schema)
        self.matches_writer.write_table(table)

    def _add_rounds(self, result: StepResult, match: np.ndarray) -> None:
        n_rounds, n_sides = result.actual.shape
        m = n_sides // 2
        # rows ordered by match, then round, then side: (R, 2, M) -> (M, R, 2)
        def order(a: np.ndarray) -> np.ndarray:
            return a.reshape(n_rounds, 2, m).transpose(2, 0, 1).ravel()

        side = np.broadcast_to(np.arange(n_sides), (n_rounds, n_sides))
        rnd = np.broadcast_to(np.arange(1, n_rounds + 1)[:, None], (n_rounds, n_sides))
        # every decision made, including one that could not be read and the other
        # side's decision in the round that stopped the match (actual is null there)
        keep = order(result.intended != EMPTY)
        played = order(result.actual != EMPTY)[keep]
        fallback = (order(result.fallback)[keep] if result.fallback is not None
                    else np.zeros(len(played), bool))
        side, rnd = order(side)[keep], order(rnd)[keep]
        table = pa.table({
            "step": pa.array(np.full(len(side), result.step + 1, np.int64)),
            "match": pa.array(match[side].astype(np.int64)),
            "round": pa.array(rnd.astype(np.int32)),
            **self._who(result.agent[side], result.opponent[side]),
            "intended": _dictionary(order(result.intended)[keep], _INTENDED),
            # one dictionary for both columns, so that they compare as categoricals
            "actual": _dictionary(order(result.actual)[keep], _INTENDED),
            "payoff": pa.array(order(result.payoff)[keep], mask=~played),
            "fallback": pa.array(fallback),
        })
        if self.rounds_writer is None:
            # statistics and dictionary pages only where they pay: the step (to filter
            # row groups) and the low-cardinality names; ids and payoffs are plain
            self.rounds_writer = pq.ParquetWriter(
                str(self.rounds_path), table.schema, compression="zstd",
                write_statistics=["step"], use_dictionary=[
                    "player", "opponent_player", "policy", "opponent_policy", "intended", "actual"])
        self.rounds_writer.write_table(table)

    def _add_exchanges(self, exchanges: list[dict[str, Any]]) -> None:
        """One JSON line per LLM exchange, with run-wide match ids and player names."""
        if self.transcripts is None:
            self.transcripts = open(self.transcripts_path, "w", encoding="utf-8")
        for record in exchanges:
            record = {**record, "match": self.next_match + record["match"],
                      "player": self.label_names[self.label_of_node[record["agent"]]],
                      "opponent_player": self.label_names[self.label_of_node[record["opponent"]]]}
            self.transcripts.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Close every file, even when closing one fails (a full disk fails at the
        last flush); then raise the first error, if any."""
        files = [self.transcripts, self.rounds_writer, self.matches_writer]
        self.transcripts = self.rounds_writer = self.matches_writer = None
        first: BaseException | None = None
        for f in files:
            if f is None:
                continue
            try:
                f.close()
            except Exception as exc:  # noqa: BLE001 - the others must still be closed
                first = first or exc
        if first is not None:
            raise first
