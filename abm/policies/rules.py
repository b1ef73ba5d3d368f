"""Rule-based strategies, each deciding for a whole batch of views with NumPy.

The strategies that look at history read only their memory window (``View.mine``
and ``View.theirs``, the actions actually played, noise included), so "while its
memory is empty" below means the first round of a match under the default memory
scope ``"match"``, but possibly a later round, or none, under the scopes
``"opponent"`` and ``"all"``, which carry rounds over from earlier matches. Defect
Once is the exception: it reads the round number of the match, not the window.

Each class docstring names the strategy's sources, in the manner of the Axelrod
library's strategy index; the library's twin, where there is one, is named too
(benchmarks/vs_axelrod.py plays them against each other).
"""

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
    """All-C, the unconditional cooperator: plays C in every round, whatever happened.

    One of the two unconditional baselines of the round robin.

    Names:

    - Cooperator: Axelrod, R. (1984). The Evolution of Cooperation. Basic Books.
    - ALLC: Press, W. H. & Dyson, F. J. (2012). Iterated Prisoner's Dilemma contains
      strategies that dominate any evolutionary opponent. PNAS, 109(26), 10409-10413.

    Axelrod library twin: ``Cooperator``.
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return C for every row."""
        return np.full(len(view), C, np.int8)


@register("all_d", description="Always defects.", memory_depth=0)
class AllD(_Rule):
    """All-D, the unconditional defector: plays D in every round, whatever happened.

    The other unconditional baseline; in a finitely repeated game of known length it
    is the only subgame-perfect equilibrium play.

    Names:

    - Defector, ALL D: Axelrod, R. (1984). The Evolution of Cooperation. Basic Books.
    - ALLD: Press, W. H. & Dyson, F. J. (2012). Iterated Prisoner's Dilemma contains
      strategies that dominate any evolutionary opponent. PNAS, 109(26), 10409-10413.

    Axelrod library twin: ``Defector``.
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return D for every row."""
        return np.full(len(view), D, np.int8)


@register(
    "defect_once",
    description="Defects in the first round of a match, then cooperates.",
    memory_depth=0,
)
class DefectOnce(_Rule):
    """Defect Once: plays D in the first round of every match, then C for the rest of it.

    The strategy comes from the experiment this project reproduces (the research
    group's round robin against All-D, All-C, Defect Once, Trigger and Tit-for-tat,
    the seed experiment of docs/tutorial-round-robin.md), whose description defines it
    as "D in round 1, then C for ever".
    It reads the match's round number (``View.round``), not the memory window, so it
    opens every match with D whatever the memory scope, and it ignores what the
    opponent does. The Axelrod library has no twin (benchmarks/vs_axelrod.py writes
    one as a small Axelrod player).
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return D for rows in round 0 of their match, C for all others."""
        return np.where(view.round == 0, D, C).astype(np.int8)


@register(
    "trigger",
    aliases=("grim",),
    description=(
        "Grim trigger: cooperates until the opponent defects once, then defects for as long as "
        "it remembers that defection (for ever when the memory window covers the match)."
    ),
)
class Trigger(_Rule):
    """Grim trigger: plays C until it sees the opponent defect, then D while it remembers that D.

    It defects exactly when any remembered opponent action is D, so with a memory
    window that covers the match (the default) one defection, noise-made or not, turns
    it to D for the rest of the match; with a window of w rounds it plays D for the w
    rounds after the opponent's last D, then C again.

    Names:

    - Trigger strategy: Friedman, J. W. (1971). A Non-cooperative Equilibrium for
      Supergames. Review of Economic Studies, 38(1), 1-12.
    - Friedman's strategy (7th in Axelrod's first tournament): Axelrod, R. (1980).
      Effective Choice in the Prisoner's Dilemma. Journal of Conflict Resolution,
      24(1), 3-25.
    - Grim Trigger: Banks, J. S. & Sundaram, R. K. (1990). Repeated games, finite
      automata, and complexity. Games and Economic Behavior, 2(2), 97-117.

    Axelrod library twin: ``Grudger``.
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return D for rows whose window holds an opponent D, C for the others."""
        return (view.theirs == D).any(axis=1).astype(np.int8)


@register(
    "tit_for_tat",
    memory_depth=1,
    description="Cooperates first, then copies the opponent's previous action.",
)
class TitForTat(_Rule):
    """Tit For Tat: plays C while its memory is empty, then the opponent's last action.

    The action copied is the last one remembered in the window, as played (after
    noise). Under the memory scopes ``"opponent"`` and ``"all"`` that may come from an
    earlier match, so the first round of a match need not be C.

    Names:

    - Tit For Tat, Anatol Rapoport's entry and winner of Axelrod's first tournament:
      Axelrod, R. (1980). Effective Choice in the Prisoner's Dilemma. Journal of
      Conflict Resolution, 24(1), 3-25.

    Axelrod library twin: ``TitForTat``.

    Attributes:
        first: The action played while the memory window is empty (C here).
    """

    first = C

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return ``first`` for rows with an empty window, else the opponent's last action."""
        return np.where(view.length == 0, self.first, _last(view.theirs)).astype(np.int8)


@register(
    "suspicious_tit_for_tat",
    memory_depth=1,
    description="Defects first, then copies the opponent's previous action.",
)
class SuspiciousTitForTat(TitForTat):
    """Suspicious Tit For Tat: plays D while its memory is empty, then the opponent's last action.

    Tit For Tat with a defecting first move; it inherits Tit For Tat's ``decide``.

    Names:

    - Suspicious tit for tat (STFT): Boyd, R. & Lorberbaum, J. P. (1987). No pure
      strategy is evolutionarily stable in the repeated Prisoner's Dilemma game.
      Nature, 327, 58-59.
    - Mistrust: Beaufils, B., Delahaye, J.-P. & Mathieu, P. (1997). Our Meeting With
      Gradual: A Good Strategy For The Iterated Prisoner's Dilemma.
    - Suspicious Tit For Tat: Hilbe, C., Nowak, M. A. & Traulsen, A. (2013). Adaptive
      dynamics of extortion and compliance. PLoS ONE, 8(11), e77886.

    Axelrod library twin: ``SuspiciousTitForTat``.
    """

    first = D


@register(
    "tit_for_two_tats",
    memory_depth=2,
    description="Defects only after two defections in a row by the opponent.",
)
class TitForTwoTats(_Rule):
    """Tit for Two Tats: plays D only when the opponent's last two remembered actions were D.

    It plays C otherwise, so also while fewer than two rounds are remembered; a single
    D (a noise flip, say) goes unpunished.

    Names:

    - Tit for Two Tats: Axelrod, R. (1984). The Evolution of Cooperation. Basic Books
      (which notes it would have won Axelrod's first tournament had it been entered).
    - John Maynard Smith's entry (24th in Axelrod's second tournament): Axelrod, R. (1980).
      More Effective Choice in the Prisoner's Dilemma. Journal of Conflict
      Resolution, 24(3), 379-403.

    Axelrod library twin: ``TitFor2Tats``.
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return D for rows whose last two opponent actions are both D, C for the others."""
        if view.theirs.shape[1] < 2:
            return np.full(len(view), C, np.int8)
        return ((view.theirs[:, -1] == D) & (view.theirs[:, -2] == D)).astype(np.int8)


class GenerosityParams(BaseModel):
    """Scenario parameters of ``generous_tit_for_tat``."""

    model_config = ConfigDict(extra="forbid")
    g: float | None = Field(
        None,
        ge=0,
        le=1,
        description="probability of forgiving a defection; default from the payoffs",
    )


def default_generosity(game: PayoffMatrix) -> float | None:
    """Generous tit-for-tat's default probability of forgiving a defection.

    The value is min(1 - (T-R)/(R-S), (R-P)/(T-P)) (Nowak & Sigmund 1992), clipped
    to [0, 1]: 0.8 for the payoffs 9/0/10/5, 1/3 for Axelrod's 3/0/5/1. The Axelrod
    library's ``GTFT`` uses the same formula, but built without ``p`` it keeps the
    value of its default game 3/0/5/1 whatever game it then plays.

    Args:
        game: The payoffs R, S, T, P.

    Returns:
        The forgiveness probability, or None when R = S or T = P (the formula divides
        by zero).
    """
    if game.R == game.S or game.T == game.P:
        return None
    g = min(1 - (game.T - game.R) / (game.R - game.S), (game.R - game.P) / (game.T - game.P))
    return float(np.clip(g, 0.0, 1.0))


@register(
    "generous_tit_for_tat",
    memory_depth=1,
    stochastic=True,
    params=GenerosityParams,
    description=(
        "Tit-for-tat that forgives a defection with probability g (default "
        "min(1 - (T-R)/(R-S), (R-P)/(T-P)), Nowak & Sigmund 1992)."
    ),
)
class GenerousTitForTat(_Rule):
    """Generous Tit For Tat: Tit For Tat that forgives an opponent's D with probability g.

    It plays C while its memory is empty and after a remembered opponent C; after a
    remembered opponent D it plays D with probability 1 - g and C with probability g.
    g defaults to ``default_generosity`` of the payoffs.

    Names:

    - Generous tit for tat: Nowak, M. A. & Sigmund, K. (1992). Tit for tat in
      heterogeneous populations. Nature, 355, 250-253.
    - Generous Tit For Tat: Nowak, M. & Sigmund, K. (1993). A strategy of win-stay,
      lose-shift that outperforms tit-for-tat in the Prisoner's Dilemma game. Nature,
      364, 56-58.

    Axelrod library twin: ``GTFT``, given ``p = g`` (see ``default_generosity``).
    """

    def __init__(self, game: PayoffMatrix, g: float | None = None) -> None:
        """Build it for a game.

        Args:
            game: The payoffs, used for the default g.
            g: Probability of forgiving a defection, clipped to [0, 1]; None derives
                it from the payoffs.

        Raises:
            ValueError: g is None and the payoffs have R = S or T = P.
        """
        super().__init__(game)
        if g is None:
            g = default_generosity(game)
            if g is None:
                raise ValueError(
                    "generous_tit_for_tat cannot derive g from payoffs with R = S "
                    "or T = P; give g (0 to 1) explicitly"
                )
        self.g = float(np.clip(g, 0.0, 1.0))

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return D where the opponent's last action was D and the draw did not forgive it.

        One uniform number is drawn per row on every call, provoked or not, so the
        stream of draws does not depend on what the opponents did.
        """
        forgive = rng.random(len(view)) < self.g
        provoked = (view.length > 0) & (_last(view.theirs) == D)
        return (provoked & ~forgive).astype(np.int8)


@register(
    "win_stay_lose_shift",
    aliases=("pavlov",),
    memory_depth=1,
    description=(
        "Cooperates first; keeps its action after R or T (the opponent "
        "cooperated), switches after S or P."
    ),
)
class WinStayLoseShift(_Rule):
    """Win-Stay Lose-Shift (Pavlov): keeps its action after R or T, switches after S or P.

    It plays C while its memory is empty; afterwards it plays C when its own and the
    opponent's last remembered actions were the same (after CC it stays, after DD it
    shifts) and D when they differed (after DC it stays, after CD it shifts). The
    actions are those played, so a noise flip of its own action counts as its move.

    Names:

    - Win-Stay, Lose-Shift: Nowak, M. & Sigmund, K. (1993). A strategy of win-stay,
      lose-shift that outperforms tit-for-tat in the Prisoner's Dilemma game. Nature,
      364, 56-58.
    - Pavlov: Kraines, D. & Kraines, V. (1989). Pavlov and the prisoner's dilemma.
      Theory and Decision, 26(1), 47-79.

    Axelrod library twin: ``WinStayLoseShift``.
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return C for rows with an empty window or matching last actions, else D."""
        same = _last(view.mine) == _last(view.theirs)
        return np.where((view.length == 0) | same, C, D).astype(np.int8)


@register(
    "alternator",
    memory_depth=1,
    description="Cooperates first, then does the opposite of its own previous action.",
)
class Alternator(_Rule):
    """Alternator: plays C while its memory is empty, then the opposite of its own last action.

    It ignores the opponent. Its own last action is the one played, so a noise flip
    shifts its C, D, C, D ... cycle.

    Names:

    - Alternator: Axelrod, R. (1984). The Evolution of Cooperation. Basic Books.
    - Periodic player CD: Mittal, S. & Deb, K. (2009). Optimal strategies of the iterated
      prisoner's dilemma problem for multiple conflicting objectives. IEEE Transactions
      on Evolutionary Computation, 13(3), 554-565.

    Axelrod library twin: ``Alternator``.
    """

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return C for rows with an empty window, else the opposite of their own last action."""
        return np.where(view.length == 0, C, 1 - _last(view.mine)).astype(np.int8)


class CoinParams(BaseModel):
    """Scenario parameters of ``random``."""

    model_config = ConfigDict(extra="forbid")
    p: float = Field(0.5, ge=0, le=1, description="probability of cooperating")


@register(
    "random",
    memory_depth=0,
    stochastic=True,
    params=CoinParams,
    description="Cooperates with probability p (default 0.5), independently each round.",
)
class RandomPolicy(_Rule):
    """Random: plays C with probability p, independently in every round; it ignores history.

    With p = 0.5 it is the RANDOM entry of Axelrod's first tournament.

    Names:

    - Random (15th and last in Axelrod's first tournament): Axelrod, R. (1980).
      Effective Choice in the Prisoner's Dilemma. Journal of Conflict Resolution,
      24(1), 3-25.
    - Lunatic: Tzafestas, E. (2000). Toward adaptive cooperative behavior. From Animals
      to Animats 6 (SAB 2000), 2, 334-340.

    Axelrod library twin: ``Random``.
    """

    def __init__(self, game: PayoffMatrix, p: float = 0.5) -> None:
        """Build it for a game (which it ignores) and a probability of cooperating."""
        super().__init__(game)
        self.p = p

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Return C where a uniform draw (one per row) falls below p, else D."""
        return (rng.random(len(view)) >= self.p).astype(np.int8)
