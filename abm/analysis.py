"""Running totals over a run: payoff and defection matrices, cooperation, ranking."""

from __future__ import annotations

import numpy as np
import pandas as pd

from abm.engine import StepResult


class Tally:
    """Sums per (player label, opponent label) and per step, updated after every step,
    so a run of any length needs memory only for the label tables."""

    def __init__(self, labels: list[str], label_of_node: np.ndarray,
                 track_shares: bool = False) -> None:
        self.labels = labels
        self.track_shares = track_shares
        self.label_of_node = label_of_node
        k = len(labels)
        self.pair_matches = np.zeros(k * k, np.int64)
        self.pair_payoff = np.zeros(k * k)
        self.pair_defections = np.zeros(k * k)
        self.rank_matches = np.zeros(k, np.int64)
        self.rank_payoff = np.zeros(k)
        self.steps: list[dict[str, float]] = []

    def add(self, result: StepResult) -> dict[str, np.ndarray]:
        """Fold one step in; return the per-side totals for whoever wants them."""
        totals = result.totals()
        k = len(self.labels)
        row = self.label_of_node[result.agent]
        pair = row * k + self.label_of_node[result.opponent]
        self.pair_matches += np.bincount(pair, minlength=k * k)
        self.pair_payoff += np.bincount(pair, totals["payoff"], minlength=k * k)
        self.pair_defections += np.bincount(pair, totals["intended_defections"], minlength=k * k)
        other = result.agent != result.opponent
        self.rank_matches += np.bincount(row[other], minlength=k)
        self.rank_payoff += np.bincount(row[other], totals["payoff"][other], minlength=k)
        decisions = int(result.side_length.sum())
        shares = {}
        if self.track_shares:  # who played this step, before any strategy update
            counts = np.bincount(self.label_of_node, minlength=k) / len(self.label_of_node)
            shares = {f"share:{label}": float(c) for label, c in zip(self.labels, counts)}
        self.steps.append({
            "step": result.step,
            "matches": result.n_matches,
            "decisions": decisions,
            "cooperation_rate": float(totals["cooperations"].sum() / decisions) if decisions else float("nan"),
            "mean_payoff": float(totals["payoff"].sum() / decisions) if decisions else float("nan"),
            **shares,
        })
        return totals

    def _matrix(self, sums: np.ndarray) -> pd.DataFrame:
        k = len(self.labels)
        with np.errstate(invalid="ignore", divide="ignore"):
            mean = (sums / self.pair_matches).reshape(k, k)
        frame = pd.DataFrame(mean, index=pd.Index(self.labels, name="player"), columns=self.labels)
        return frame

    def payoff_matrix(self) -> pd.DataFrame:
        """Mean total payoff of the row player in a match against the column player."""
        return self._matrix(self.pair_payoff)

    def defection_matrix(self) -> pd.DataFrame:
        """Mean number of rounds in which the row player chose D against the column player."""
        return self._matrix(self.pair_defections)

    def ranking(self) -> list[dict[str, float]]:
        """Labels by mean match payoff against others (self-play excluded), best first."""
        rows = [{"player": label, "mean_payoff": float(self.rank_payoff[i] / n), "matches": int(n)}
                for i, (label, n) in enumerate(zip(self.labels, self.rank_matches)) if n]
        return sorted(rows, key=lambda r: -r["mean_payoff"])

    def cooperation_rate(self) -> float:
        """Share of all actual actions that were C."""
        decisions = sum(s["decisions"] for s in self.steps)
        coop = sum(s["cooperation_rate"] * s["decisions"] for s in self.steps if s["decisions"])
        return coop / decisions if decisions else float("nan")
