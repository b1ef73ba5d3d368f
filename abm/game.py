"""Actions, the payoff matrix and the noise channel of a 2x2 social dilemma."""

from __future__ import annotations

import math
import numbers
from dataclasses import dataclass

import numpy as np

# Actions are int8 codes everywhere in the engine; -1 marks an empty memory slot.
C: int = 0
D: int = 1
EMPTY: int = -1
# A decision that could not be read (an LLM answer naming no option): it is
# recorded as such and nothing is played for it, so no move is ever invented.
INVALID: int = 2
ACTION_LABELS = ("C", "D")
INTENDED_LABELS = ("C", "D", "invalid")


@dataclass(frozen=True)
class PayoffMatrix:
    """Row player's payoffs R (C,C), S (C,D), T (D,C), P (D,D) of a symmetric 2x2 game.

    ``kind="prisoners_dilemma"`` insists on T > R > P > S; ``kind="custom"``
    accepts any order (stag hunt, snowdrift, donation game with S = P = 0 ...).
    The defaults (9, 0, 10, 5) are also the game of a scenario that gives no payoffs
    (``abm.scenario.GameConfig`` takes them from here).
    """

    R: float = 9.0
    S: float = 0.0
    T: float = 10.0
    P: float = 5.0
    kind: str = "prisoners_dilemma"

    def __post_init__(self) -> None:
        """Refuse numbers that are not a game of ``kind``.

        Raises:
            ValueError: Saying why, as ``problem`` words it.
        """
        problem = self.problem()
        if problem:
            raise ValueError(problem)

    def problem(self) -> str | None:
        """Why these numbers are not a game of ``kind``, or None when they are."""
        if self.kind not in ("prisoners_dilemma", "custom"):
            return f"kind must be 'prisoners_dilemma' or 'custom', not {self.kind!r}"
        values = (self.R, self.S, self.T, self.P)
        if not all(
            isinstance(v, numbers.Real) and not isinstance(v, bool) and math.isfinite(v)
            for v in values
        ):
            return (
                "R, S, T and P must be finite numbers (NaN or infinity would make every "
                f"payoff NaN); got R={self.R!r}, S={self.S!r}, T={self.T!r}, P={self.P!r}"
            )
        if self.kind == "prisoners_dilemma" and not (self.T > self.R > self.P > self.S):
            return (
                f"R={self.R:g}, S={self.S:g}, T={self.T:g}, P={self.P:g} is not a Prisoner's "
                'Dilemma, which needs T > R > P > S; set kind = "custom" for other games '
                "(stag hunt, snowdrift, ...)"
            )
        return None

    @property
    def table(self) -> np.ndarray:
        """``table[my_action, their_action]`` is my payoff."""
        return np.array([[self.R, self.S], [self.T, self.P]], dtype=np.float64)

    def payoffs(self, mine: np.ndarray, theirs: np.ndarray) -> np.ndarray:
        """Vectorised payoff of every side given both actual actions."""
        return self.table[mine, theirs]


def apply_noise(intended: np.ndarray, noise: float, rng: np.random.Generator) -> np.ndarray:
    """Flip each intended action independently with probability ``noise``.

    One draw per entry, even when ``noise`` is 0 and for EMPTY or INVALID entries
    (which stay as they are), so the noise stream stays aligned across runs that
    differ only in the noise level or in which matches are still running.
    """
    flips = (rng.random(intended.shape[0]) < noise) & ((intended == C) | (intended == D))
    return np.where(flips, 1 - intended, intended).astype(np.int8)
