"""Rule-based strategies, each deciding for a whole batch of views with NumPy."""

from __future__ import annotations

import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from abm.game import C, D, PayoffMatrix
from abm.policies.base import View, register


def _last(columns: np.ndarray) -> np.ndarray:
    return columns[:, -1] if columns.shape[1] else np.full(columns.shape[0], -1, np.int8)


class _Rule:
    """Shared constructor: rule strategies ignore the game unless they need it."""

    def __init__(self, game: PayoffMatrix) -> None:
        self.game = game


@register("all_c", description="Always cooperates.", memory_depth=0)
class AllC(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return np.full(len(view), C, np.int8)


@register("all_d", description="Always defects.", memory_depth=0)
class AllD(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return np.full(len(view), D, np.int8)


@register("defect_once", description="Defects in the first round of a match, then cooperates.",
          memory_depth=0)
class DefectOnce(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return np.where(view.round == 0, D, C).astype(np.int8)


@register("trigger", aliases=("grim",), description=(
    "Grim trigger: cooperates until the opponent defects once, then defects for as long as "
    "it remembers that defection (for ever when the memory window covers the match)."))
class Trigger(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return (view.theirs == D).any(axis=1).astype(np.int8)


@register("tit_for_tat", memory_depth=1,
          description="Cooperates first, then copies the opponent's previous action.")
class TitForTat(_Rule):
    first = C

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return np.where(view.length == 0, self.first, _last(view.theirs)).astype(np.int8)


@register("suspicious_tit_for_tat", memory_depth=1,
          description="Defects first, then copies the opponent's previous action.")
class SuspiciousTitForTat(TitForTat):
    first = D


@register("tit_for_two_tats", memory_depth=2,
          description="Defects only after two defections in a row by the opponent.")
class TitForTwoTats(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        if view.theirs.shape[1] < 2:
            return np.full(len(view), C, np.int8)
        return ((view.theirs[:, -1] == D) & (view.theirs[:, -2] == D)).astype(np.int8)


class GenerosityParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    g: float | None = Field(
        None, ge=0, le=1,
        description="probability of forgiving a defection; default from the payoffs",
    )


def default_generosity(game: PayoffMatrix) -> float | None:
    """Generous tit-for-tat's forgiveness for these payoffs, min(1 - (T-R)/(R-S),
    (R-P)/(T-P)) (Nowak & Sigmund 1992), in [0, 1]; None when R = S or T = P."""
    if game.R == game.S or game.T == game.P:
        return None
    g = min(1 - (game.T - game.R) / (game.R - game.S), (game.R - game.P) / (game.T - game.P))
    return float(np.clip(g, 0.0, 1.0))


@register("generous_tit_for_tat", memory_depth=1, stochastic=True, params=GenerosityParams,
          description=("Tit-for-tat that forgives a defection with probability g (default "
                       "min(1 - (T-R)/(R-S), (R-P)/(T-P)), Nowak & Sigmund 1992)."))
class GenerousTitForTat(_Rule):
    def __init__(self, game: PayoffMatrix, g: float | None = None) -> None:
        super().__init__(game)
        if g is None:
            g = default_generosity(game)
            if g is None:
                raise ValueError("generous_tit_for_tat cannot derive g from payoffs with R = S "
                                 "or T = P; give g (0 to 1) explicitly")
        self.g = float(np.clip(g, 0.0, 1.0))

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        forgive = rng.random(len(view)) < self.g
        provoked = (view.length > 0) & (_last(view.theirs) == D)
        return (provoked & ~forgive).astype(np.int8)


@register("win_stay_lose_shift", aliases=("pavlov",), memory_depth=1,
          description=("Cooperates first; keeps its action after R or T (the opponent "
                       "cooperated), switches after S or P."))
class WinStayLoseShift(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        same = _last(view.mine) == _last(view.theirs)
        return np.where((view.length == 0) | same, C, D).astype(np.int8)


@register("alternator", memory_depth=1,
          description="Cooperates first, then does the opposite of its own previous action.")
class Alternator(_Rule):
    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return np.where(view.length == 0, C, 1 - _last(view.mine)).astype(np.int8)


class CoinParams(BaseModel):
    model_config = ConfigDict(extra="forbid")
    p: float = Field(0.5, ge=0, le=1, description="probability of cooperating")


@register("random", memory_depth=0, stochastic=True, params=CoinParams,
          description="Cooperates with probability p (default 0.5), independently each round.")
class RandomPolicy(_Rule):
    def __init__(self, game: PayoffMatrix, p: float = 0.5) -> None:
        super().__init__(game)
        self.p = p

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        return (rng.random(len(view)) >= self.p).astype(np.int8)
