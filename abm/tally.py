"""Running totals over a run: payoff and defection matrices, cooperation, ranking."""

from __future__ import annotations

import numpy as np
import pandas as pd

from abm.engine import StepResult
from abm.population import Population


class Tally:
    """Sums per (player label, opponent label) and per step, updated after every step.

    A run of any length needs memory only for the label tables and one row per step
    (``steps``: step, matches, decisions, cooperation_rate, mean_payoff and, with
    ``track_shares``, ``share:<label>``).

    Each step is counted under the labels the population holds when ``add`` is
    called (before any update the step leads to).

    Args:
        population: who plays what; read at every ``add``.
        track_shares: add each label's share of the nodes to every step's row.
    """

    def __init__(self, population: Population, track_shares: bool = False) -> None:
        """Start with empty tables for the population's labels."""
        self.population = population
        self.labels = population.labels
        self.track_shares = track_shares
        k = len(self.labels)
        self.pair_matches = np.zeros(k * k, np.int64)
        self.pair_payoff = np.zeros(k * k)
        self.pair_defections = np.zeros(k * k)
        # matches stopped by an unreadable answer are kept out of the tables' means
        # (their totals cover fewer rounds) and counted on their own
        self.pair_void = np.zeros(k * k, np.int64)
        self.pair_decisions = np.zeros(k * k, np.int64)
        self.pair_invalid = np.zeros(k * k, np.int64)
        self.pair_fallbacks = np.zeros(k * k, np.int64)
        self.rank_matches = np.zeros(k, np.int64)
        self.rank_payoff = np.zeros(k)
        self.steps: list[dict[str, float]] = []

    def add(self, result: StepResult) -> dict[str, np.ndarray]:
        """Fold one step in.

        Args:
            result: The step just played.

        Returns:
            The step's per-side totals (``StepResult.totals``), for whoever wants them.
        """
        totals = result.totals()
        k = len(self.labels)
        label_of_node = self.population.label_of_node
        row = label_of_node[result.agent]
        pair = row * k + label_of_node[result.opponent]
        void = (
            np.concatenate([result.void, result.void])
            if result.void is not None
            else np.zeros(len(pair), bool)
        )
        # without stopped matches (or self-play) the masks keep every side: a slice
        # then spares copying millions of entries, and the sums come out the same
        any_void = bool(void.any())
        whole = ~void if any_void else slice(None)
        self.pair_matches += np.bincount(pair[whole], minlength=k * k)
        self.pair_payoff += np.bincount(pair[whole], totals["payoff"][whole], minlength=k * k)
        self.pair_defections += np.bincount(
            pair[whole], totals["intended_defections"][whole], minlength=k * k
        )
        if any_void:
            self.pair_void += np.bincount(pair[void], minlength=k * k)
        self.pair_decisions += np.bincount(pair, totals["decided"], minlength=k * k).astype(
            np.int64
        )
        self.pair_invalid += np.bincount(pair, totals["invalid"], minlength=k * k).astype(np.int64)
        self.pair_fallbacks += np.bincount(pair, totals["fallbacks"], minlength=k * k).astype(
            np.int64
        )
        other = result.agent != result.opponent
        if any_void:
            other &= whole
        if other.all():
            other = slice(None)
        self.rank_matches += np.bincount(row[other], minlength=k)
        self.rank_payoff += np.bincount(row[other], totals["payoff"][other], minlength=k)
        decisions = int(result.side_length.sum())
        shares = {}
        if self.track_shares:  # who played this step, before any strategy update
            counts = self.population.shares()
            shares = {
                f"share:{label}": float(c) for label, c in zip(self.labels, counts, strict=True)
            }
        self.steps.append(
            {
                "step": result.step,
                "matches": result.n_matches,
                "decisions": decisions,
                "cooperation_rate": float(totals["cooperations"].sum() / decisions)
                if decisions
                else float("nan"),
                "mean_payoff": float(totals["payoff"].sum() / decisions)
                if decisions
                else float("nan"),
                **shares,
            }
        )
        return totals

    def _matrix(self, sums: np.ndarray) -> pd.DataFrame:
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._frame(sums / self.pair_matches)

    def payoff_matrix(self) -> pd.DataFrame:
        """Mean total payoff of the row player in a match against the column player.

        Matches stopped by an unreadable answer are left out; NaN where none is left.
        """
        return self._matrix(self.pair_payoff)

    def defection_matrix(self) -> pd.DataFrame:
        """Mean number of rounds in which the row player chose D against the column player."""
        return self._matrix(self.pair_defections)

    def _frame(self, values: np.ndarray) -> pd.DataFrame:
        k = len(self.labels)
        return pd.DataFrame(
            values.reshape(k, k), index=pd.Index(self.labels, name="player"), columns=self.labels
        )

    def unread_matrix(self) -> pd.DataFrame:
        """Share of the row player's decisions against the column player not read from a model.

        Those are the answers that could not be read, whether left unplayed or played
        by the fallback rule (NaN: no decision).
        """
        with np.errstate(invalid="ignore", divide="ignore"):
            return self._frame(self.pair_invalid / self.pair_decisions)

    def void_matrix(self) -> pd.DataFrame:
        """Matches of the row player against the column player stopped by an unreadable answer.

        An unreadable answer of either side counts; these matches are left out of the
        payoff and defection tables.
        """
        return self._frame(self.pair_void)

    def unread_counts(self) -> pd.DataFrame:
        """The counts behind ``unread_matrix`` and ``void_matrix``, one row per cell.

        Returns:
            One row per (player, opponent) pair with decisions: columns player,
            opponent, decisions, invalid, fallbacks, void_matches, complete_matches
            and invalid_rate.
        """
        k = len(self.labels)
        i, j = np.divmod(np.arange(k * k), k)
        frame = pd.DataFrame(
            {
                "player": np.array(self.labels)[i],
                "opponent": np.array(self.labels)[j],
                "decisions": self.pair_decisions,
                "invalid": self.pair_invalid,
                "fallbacks": self.pair_fallbacks,
                "void_matches": self.pair_void,
                "complete_matches": self.pair_matches,
            }
        )
        frame = frame[frame["decisions"] > 0].reset_index(drop=True)
        frame["invalid_rate"] = frame["invalid"] / frame["decisions"]
        return frame

    def ranking(self) -> list[dict[str, float]]:
        """Labels by mean match payoff against others (self-play excluded), best first."""
        rows = [
            {"player": label, "mean_payoff": float(self.rank_payoff[i] / n), "matches": int(n)}
            for i, (label, n) in enumerate(zip(self.labels, self.rank_matches, strict=True))
            if n
        ]
        return sorted(rows, key=lambda r: -r["mean_payoff"])

    def cooperation_rate(self) -> float:
        """Share of all actual actions that were C."""
        decisions = sum(s["decisions"] for s in self.steps)
        coop = sum(s["cooperation_rate"] * s["decisions"] for s in self.steps if s["decisions"])
        return coop / decisions if decisions else float("nan")
