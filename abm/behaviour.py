"""What a player did, round by round, and the memory-one strategy that fits it best.

Everything here reads a run's tables (rounds.parquet, optionally the LLM's
transcripts for probabilities), so it works on any run folder and for rule
players too. A decision is the player's own *intended* action (``choice``: C or D),
or "invalid" / "fallback" when an LLM's answer could not be read (a fallback
rule's move is not the model's and never counts as its choice);
the situation a decision answers is the previous round of the same match as
it was played (after noise), which is what the player saw.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

CONDITIONS = ("first", "CC", "CD", "DC", "DD")
Z95 = 1.959963984540054


def wilson(k: int, n: int, z: float = Z95) -> tuple[float, float]:
    """Wilson score interval for k successes in n trials; (nan, nan) when n = 0."""
    if n == 0:
        return math.nan, math.nan
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    # at k = 0 and k = n the bound is exactly 0 or 1 (rounding would leave 1e-18)
    return (0.0 if k == 0 else max(0.0, centre - half), 1.0 if k == n else min(1.0, centre + half))


def classic_strategies(g: float = 1 / 3) -> dict[str, tuple[float, ...]]:
    """The classic strategies as memory-one vectors, to compare fingerprints with.

    Each vector is (P(C) first, P(C | CC), P(C | CD), P(C | DC), P(C | DD)), the
    condition being (my last move, the opponent's last move).

    Args:
        g: Generous tit-for-tat's probability of forgiving a D; runs pass
            ``abm.policies.rules.default_generosity`` of their payoffs (1/3 is its
            value for Axelrod's 3/0/5/1).

    Returns:
        Vectors by display name.
    """
    return {
        "All-C": (1, 1, 1, 1, 1),
        "All-D": (0, 0, 0, 0, 0),
        "Tit-for-tat": (1, 1, 0, 1, 0),
        "Suspicious TFT": (0, 1, 0, 1, 0),
        "Grim trigger": (1, 1, 0, 0, 0),
        "Win-stay lose-shift": (1, 1, 0, 0, 1),
        "Generous TFT": (1, 1, g, 1, g),
        "Alternator": (1, 0, 0, 1, 1),
    }


def with_sides(rounds: pd.DataFrame) -> pd.DataFrame:
    """Add the engine's ``side`` (0/1) and the partner's actual action to rounds.parquet rows.

    The table lists each round's two sides in order, so the side is the row's
    position within its (step, match, round).

    Args:
        rounds: The rows of rounds.parquet.

    Returns:
        A copy with the columns ``side`` and ``their_actual`` added.
    """
    frame = rounds.reset_index(drop=True).copy()
    for column in ("intended", "actual"):
        frame[column] = frame[column].astype(object)
    frame["side"] = frame.groupby(["step", "match", "round"], sort=False).cumcount()
    partner = frame[["step", "match", "round", "side", "actual"]].copy()
    partner["side"] = 1 - partner["side"]
    return frame.merge(
        partner.rename(columns={"actual": "their_actual"}),
        on=["step", "match", "round", "side"],
        how="left",
    )


def decisions(rounds: pd.DataFrame, transcripts: pd.DataFrame | None = None) -> pd.DataFrame:
    """One row per decision, with the situation it answers and what was chosen.

    Args:
        rounds: The rows of rounds.parquet (rounds numbered from 1).
        transcripts: Rows with step, match, round, side and ``p_cooperate``, the
            model's probability of C (score mode); None when there are none.

    Returns:
        The rows of ``with_sides`` with ``situation`` ("first" in round 1, else the
        previous round's actual moves, mine then theirs, as in "CD"), ``choice``
        (the intended action, "invalid", or "fallback" where the fallback rule
        played) and, given transcripts, ``p_cooperate``.
    """
    frame = with_sides(rounds).sort_values(["step", "match", "side", "round"])
    track = frame.groupby(["step", "match", "side"], sort=False)
    previous = track["actual"].shift(1).fillna("") + track["their_actual"].shift(1).fillna("")
    frame["situation"] = np.where(frame["round"] == 1, "first", previous)
    ruled = frame["fallback"].fillna(False).astype(bool) if "fallback" in frame else False
    frame["choice"] = np.where(ruled, "fallback", frame["intended"])
    if transcripts is not None and "p_cooperate" in transcripts:
        probs = transcripts[["step", "match", "round", "side", "p_cooperate"]]
        frame = frame.merge(probs, on=["step", "match", "round", "side"], how="left")
    return frame.reset_index(drop=True)


_PROBABILITY_KEYS = ("step", "match", "round", "side", "p_cooperate")


def run_decisions(folder: Path) -> pd.DataFrame:
    """``decisions()`` of a run folder, with the model's probabilities where it has them.

    transcripts.jsonl, when present, is read line by line keeping only the fields
    joined, since a long run's transcripts are large.

    Args:
        folder: A finished run's folder.

    Returns:
        The decisions of the run.

    Raises:
        FileNotFoundError: The folder has no rounds.parquet.
    """
    rounds = pd.read_parquet(folder / "rounds.parquet")
    path = folder / "transcripts.jsonl"
    if not path.is_file():
        return decisions(rounds)
    rows = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            record = json.loads(line)
            if record.get("p_cooperate") is not None:
                rows.append([record.get(k) for k in _PROBABILITY_KEYS])
    probabilities = pd.DataFrame(rows, columns=list(_PROBABILITY_KEYS)) if rows else None
    return decisions(rounds, probabilities)


@dataclass(frozen=True)
class Fingerprint:
    """An estimated memory-one strategy.

    Attributes:
        table: One row per condition of ``CONDITIONS``: decisions ``n``, cooperations
            ``cooperate``, their share ``p`` with its Wilson 95 % interval ``low`` and
            ``high``, and the mean model probability ``p_model`` (score mode).
        invalid: Decisions not read from the model (invalid answers and fallback moves),
            left out of the table.
    """

    table: pd.DataFrame  # index CONDITIONS; n, cooperate, p, low, high, p_model
    invalid: int

    @property
    def vector(self) -> tuple[float, ...]:
        """The share of C per condition, in the order of ``CONDITIONS`` (NaN where unseen)."""
        return tuple(float(v) for v in self.table["p"])

    def nearest(self, strategies: dict[str, tuple[float, ...]]) -> list[dict]:
        """Rank strategies by root-mean-square difference over the conditions observed.

        Args:
            strategies: Memory-one vectors by name, as ``classic_strategies`` gives.

        Returns:
            ``{"strategy", "distance"}`` records, closest first; empty when no
            condition was observed.
        """
        seen = self.table["n"].to_numpy() > 0
        if not seen.any():
            return []
        mine = self.table["p"].to_numpy()[seen]
        out = [
            {
                "strategy": name,
                "distance": float(np.sqrt(np.mean((np.asarray(vec, float)[seen] - mine) ** 2))),
            }
            for name, vec in strategies.items()
        ]
        return sorted(out, key=lambda r: r["distance"])

    def to_dict(self, strategies: dict[str, tuple[float, ...]]) -> dict:
        """The fingerprint as JSON-ready data, with the three nearest ``strategies``.

        NaN shares and probabilities become None.
        """
        rows = {}
        for situation, row in self.table.iterrows():
            rows[situation] = {
                "n": int(row["n"]),
                "cooperate": int(row["cooperate"]),
                "p": _num(row["p"]),
                "ci95": [_num(row["low"]), _num(row["high"])],
                "p_model": _num(row["p_model"]),
            }
        return {
            "situations": rows,
            "invalid": self.invalid,
            "nearest": self.nearest(strategies)[:3],
            "distance": "root-mean-square difference of P(C) over observed situations",
        }


def _num(value: float) -> float | None:
    return None if value is None or not np.isfinite(value) else float(value)


def fingerprint(frame: pd.DataFrame) -> Fingerprint:
    """The memory-one fingerprint of the decisions in ``frame`` (rows of ``decisions()``)."""
    valid = frame[frame["choice"].isin(["C", "D"])]
    rows = []
    for condition in CONDITIONS:
        part = valid[valid["situation"] == condition]
        n, k = len(part), int((part["choice"] == "C").sum())
        low, high = wilson(k, n)
        p_model = (
            float(part["p_cooperate"].mean())
            if "p_cooperate" in part and part["p_cooperate"].notna().any()
            else math.nan
        )
        rows.append(
            {
                "n": n,
                "cooperate": k,
                "p": k / n if n else math.nan,
                "low": low,
                "high": high,
                "p_model": p_model,
            }
        )
    table = pd.DataFrame(rows, index=pd.Index(CONDITIONS, name="situation"))
    return Fingerprint(table, int(frame["choice"].isin(["invalid", "fallback"]).sum()))


def round_by_round(frame: pd.DataFrame, player: str) -> pd.DataFrame:
    """A player's decisions per opponent and round.

    Args:
        frame: Rows of ``decisions()`` with ``player`` and ``opponent_player`` columns.
        player: The player's name.

    Returns:
        One row per opponent and round, sorted by both: ``decisions``, ``cooperate``,
        ``invalid`` (invalid answers and fallback moves), ``p_cooperate`` (the
        share of C among the readable decisions) and ``p_model`` (the mean model
        P(C), score mode). ``sequences`` gives the moves as text.
    """
    mine = frame[frame["player"] == player]
    out = []
    for (opponent, rnd), part in mine.groupby(["opponent_player", "round"], sort=False):
        valid = part[part["choice"].isin(["C", "D"])]
        out.append(
            {
                "player": player,
                "opponent": opponent,
                "round": int(rnd),
                "decisions": len(part),
                "cooperate": int((valid["choice"] == "C").sum()),
                "invalid": int(part["choice"].isin(["invalid", "fallback"]).sum()),
                "p_cooperate": (valid["choice"] == "C").mean() if len(valid) else math.nan,
                "p_model": (part["p_cooperate"].mean() if "p_cooperate" in part else math.nan),
            }
        )
    columns = [
        "player",
        "opponent",
        "round",
        "decisions",
        "cooperate",
        "invalid",
        "p_cooperate",
        "p_model",
    ]
    table = pd.DataFrame(out, columns=columns)
    return table.sort_values(["opponent", "round"], kind="stable").reset_index(drop=True)


def sequences(frame: pd.DataFrame, player: str) -> dict[str, str]:
    """The player's moves against each opponent it met in exactly one match.

    Args:
        frame: Rows of ``decisions()``.
        player: The player's name.

    Returns:
        The moves by opponent name, as "CDDCC" ("X" for an unreadable answer, "F"
        for one the fallback rule played); self-play shows both copies
        ("CCCCC / CCCCC"). Opponents met in several matches are left out.
    """
    mine = frame[frame["player"] == player].sort_values(["step", "match", "side", "round"])
    letters = {"C": "C", "D": "D", "invalid": "X", "fallback": "F"}
    out = {}
    for opponent, part in mine.groupby("opponent_player", sort=False):
        tracks = [
            ("".join(letters.get(a, "?") for a in t["choice"]))
            for _, t in part.groupby(["step", "match", "side"], sort=False)
        ]
        own = part["opponent"].iloc[0] == part["agent"].iloc[0]
        if len(tracks) == 1 or (own and len(tracks) == 2):
            out[str(opponent)] = " / ".join(tracks)
    return out
