"""Tables of a run, streamed to disk step by step: rounds.parquet, matches.csv, transcripts."""

from __future__ import annotations

import json
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from abm.engine import StepResult
from abm.game import EMPTY, INTENDED_LABELS
from abm.population import Population

_INTENDED = pa.array(INTENDED_LABELS)
CSV_BATCH_ROWS = 65_536


def _dictionary(codes: np.ndarray, values: pa.Array) -> pa.DictionaryArray:
    # EMPTY codes become nulls: a round that was decided but not played
    return pa.DictionaryArray.from_arrays(pa.array(codes.astype(np.int32), mask=codes < 0), values)


class TableWriter:
    """Appends each step's rows to ``rounds.parquet`` and ``matches.csv`` (each optional).

    The LLM records of a step go to ``transcripts.jsonl``, one JSON line each, with
    run-wide match ids and player names.

    Players and policies are stored as dictionary-encoded strings, so a table of
    millions of rows costs a few bytes a row. Rows name the labels that played the
    step (``Population.played_label_of_node``), also when evolution has updated the
    population since.

    Each step's rows are put together at once and written by one background thread
    while the next step plays (Arrow lets go of the GIL while it writes): at most one
    step's tables wait to be written, and a write that failed (a full disk) raises at
    the next ``add`` or at ``close``.

    Args:
        folder: where the files go.
        population: who plays what; read at every step.
        rounds: write rounds.parquet.
        matches: write matches.csv.
    """

    def __init__(
        self, folder: Path, population: Population, rounds: bool = True, matches: bool = True
    ) -> None:
        """Name the files; each is opened when its first rows come."""
        self.population = population
        self.labels = pa.array(population.labels)
        names = list(dict.fromkeys(population.policy_name_of_label))
        self.policy_names = pa.array(names)
        self.policy_name_code = np.array(
            [names.index(n) for n in population.policy_name_of_label], np.int32
        )
        self.write_matches = matches
        self.next_match = 0
        self.rounds_writer: pq.ParquetWriter | None = None
        self.rounds_path = folder / "rounds.parquet" if rounds else None
        self.matches_path = folder / "matches.csv"
        self.matches_writer: pacsv.CSVWriter | None = None
        self.transcripts_path = folder / "transcripts.jsonl"
        self.transcripts = None
        self._pool: ThreadPoolExecutor | None = None
        self._pending: Future | None = None

    def _who(
        self, agent: np.ndarray, opponent: np.ndarray, strings: bool = False
    ) -> dict[str, pa.Array]:
        """Who played each row.

        Names come as dictionary arrays, or as plain strings for the CSV file, which
        writes the strings.
        """
        played = self.population.played_label_of_node
        mine, theirs = played[agent], played[opponent]

        def names(codes: np.ndarray, values: pa.Array) -> pa.Array:
            return values.take(pa.array(codes)) if strings else _dictionary(codes, values)

        return {
            "agent": pa.array(agent.astype(np.int64)),
            "opponent": pa.array(opponent.astype(np.int64)),
            "player": names(mine, self.labels),
            "opponent_player": names(theirs, self.labels),
            "policy": names(self.policy_name_code[mine], self.policy_names),
            "opponent_policy": names(self.policy_name_code[theirs], self.policy_names),
        }

    def _write(self, writer: Any, table: pa.Table) -> None:
        """Hand ``table`` to the background writer, once the last one is written."""
        self._wait()
        if self._pool is None:
            self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="abm-tables")
        self._pending = self._pool.submit(writer.write_table, table)

    def _wait(self) -> None:
        """Wait for the table being written; raise what its write raised."""
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()

    def add(
        self,
        result: StepResult,
        totals: dict[str, np.ndarray],
        exchanges: list[dict[str, Any]] = (),
    ) -> None:
        """Queue one step's rows for writing.

        Args:
            result: The step just played.
            totals: Its per-side totals (``StepResult.totals``).
            exchanges: Its LLM records, one line each in transcripts.jsonl.

        Raises:
            OSError: The last step's background write failed (a full disk).
        """
        m = result.n_matches
        match = self.next_match + np.concatenate([np.arange(m), np.arange(m)])
        if exchanges:
            self._add_exchanges(exchanges)
        self.next_match += m
        if self.rounds_path is not None:
            self._add_rounds(result, match)
        if not self.write_matches:
            return
        sides = {
            "step": pa.array(np.full(2 * m, result.step + 1, np.int64)),
            "match": pa.array(match.astype(np.int64)),
            **self._who(result.agent, result.opponent, strings=True),
            "self_play": pa.array(result.agent == result.opponent),
            "rounds": pa.array(result.side_length.astype(np.int64)),
            "payoff": pa.array(totals["payoff"]),
            "cooperations": pa.array(totals["cooperations"].astype(np.int64)),
            "defections": pa.array(totals["defections"].astype(np.int64)),
            "intended_defections": pa.array(totals["intended_defections"].astype(np.int64)),
            "invalid": pa.array(totals["invalid"].astype(np.int64)),
            "fallbacks": pa.array(totals["fallbacks"].astype(np.int64)),
            "void": pa.array(
                np.concatenate([result.void, result.void])
                if result.void is not None
                else np.zeros(2 * m, bool)
            ),
        }
        table = pa.table(sides)
        if self.matches_writer is None:
            # rows formatted 64 K at a time, not 1 K: the same bytes, less overhead
            self.matches_writer = pacsv.CSVWriter(
                str(self.matches_path),
                table.schema,
                write_options=pacsv.WriteOptions(batch_size=CSV_BATCH_ROWS),
            )
        self._write(self.matches_writer, table)

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
        fallback = (
            order(result.fallback)[keep]
            if result.fallback is not None
            else np.zeros(len(played), bool)
        )
        side, rnd = order(side)[keep], order(rnd)[keep]
        table = pa.table(
            {
                "step": pa.array(np.full(len(side), result.step + 1, np.int64)),
                "match": pa.array(match[side].astype(np.int64)),
                "round": pa.array(rnd.astype(np.int32)),
                **self._who(result.agent[side], result.opponent[side]),
                "intended": _dictionary(order(result.intended)[keep], _INTENDED),
                # one dictionary for both columns, so that they compare as categoricals
                "actual": _dictionary(order(result.actual)[keep], _INTENDED),
                "payoff": pa.array(order(result.payoff)[keep], mask=~played),
                "fallback": pa.array(fallback),
            }
        )
        if self.rounds_writer is None:
            # statistics and dictionary pages only where they pay: the step (to filter
            # row groups) and the low-cardinality names; ids and payoffs are plain
            self.rounds_writer = pq.ParquetWriter(
                str(self.rounds_path),
                table.schema,
                compression="zstd",
                write_statistics=["step"],
                use_dictionary=[
                    "player",
                    "opponent_player",
                    "policy",
                    "opponent_policy",
                    "intended",
                    "actual",
                ],
            )
        self._write(self.rounds_writer, table)

    def _add_exchanges(self, exchanges: list[dict[str, Any]]) -> None:
        """One JSON line per LLM exchange, with run-wide match ids and player names."""
        if self.transcripts is None:
            # written line by line over the whole run, closed by close()
            self.transcripts = open(self.transcripts_path, "w", encoding="utf-8")  # noqa: SIM115
        labels, played = self.population.labels, self.population.played_label_of_node
        for record in exchanges:
            record = {
                **record,
                "match": self.next_match + record["match"],
                "player": labels[played[record["agent"]]],
                "opponent_player": labels[played[record["opponent"]]],
            }
            self.transcripts.write(json.dumps(record, ensure_ascii=False) + "\n")

    def close(self) -> None:
        """Close every file, even when closing one fails (a full disk fails at the last flush).

        Then raise the first error, if any (a failed background write first).
        """
        first: BaseException | None = None
        try:
            self._wait()
        except Exception as exc:  # noqa: BLE001 - the files must still be closed
            first = exc
        if self._pool is not None:
            self._pool.shutdown()
            self._pool = None
        files = [self.transcripts, self.rounds_writer, self.matches_writer]
        self.transcripts = self.rounds_writer = self.matches_writer = None
        for f in files:
            if f is None:
                continue
            try:
                f.close()
            except Exception as exc:  # noqa: BLE001 - the others must still be closed
                first = first or exc
        if first is not None:
            raise first
