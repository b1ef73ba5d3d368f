"""Any strategy of the Axelrod library as an abm policy.

A scenario names one as ``{ name = "axelrod", strategy = "Tester" }``. Axelrod
strategies are Python objects with their own per-match history, so this adapter
keeps one Axelrod player per match side and asks each one in a loop: the slow
path, for breadth rather than speed. The player sees its whole current match,
whatever ``[memory]`` says, as in Axelrod itself.
"""

from __future__ import annotations

from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict, model_validator

from abm.game import EMPTY, PayoffMatrix
from abm.policies.base import Outcome, View, register
from abm.validation import did_you_mean


class AxelrodParams(BaseModel):
    """Scenario parameters of the ``axelrod`` policy.

    ``strategy`` is an Axelrod class name (``TitForTat``) or display name
    (``"Tit For Tat"``); any other key goes to the strategy's constructor.
    """

    model_config = ConfigDict(extra="allow")
    strategy: str

    @model_validator(mode="after")
    def _strategy_takes_them(self) -> AxelrodParams:
        # when the scenario loads, so that the error names the player's field
        check_strategy(self.strategy, dict(self.model_extra or {}))
        return self


def _library() -> Any:
    try:
        import axelrod
    except ImportError as exc:
        if exc.name not in (None, "axelrod"):  # installed, but a package it imports is not
            raise ValueError(
                f"the axelrod policy needs the Axelrod library, which is installed "
                f"but cannot import {exc.name!r}; install that package, or Axelrod "
                f'4.13 (pip install "axelrod>=4.13,<4.14"), which does not '
                f"need it"
            ) from None
        raise ValueError(
            "the axelrod policy needs the Axelrod library: pip install "
            '"axelrod>=4.13,<4.14" (or, from the clone, pip install -e '
            '".[bench]")'
        ) from None
    return axelrod


def _is_probability(name: str) -> bool:
    """Whether a parameter name holds a probability in Axelrod.

    Such names are p, q, ep, four_vector, any name containing "prob" (c_prob,
    forget_probability) and any starting with "p_" (p_memory_delete).
    """
    return name in ("p", "q", "ep", "four_vector") or "prob" in name or name.startswith("p_")


def check_strategy(strategy: str, options: dict[str, Any]) -> type:
    """Find an Axelrod strategy and check that it can be built with ``options``.

    Args:
        strategy: Axelrod class name or display name.
        options: Keyword arguments for the strategy's constructor.

    Returns:
        The strategy's class.

    Raises:
        ValueError: The library is missing, the name is unknown, the strategy reads or
            changes its opponent's code or state, a probability parameter is outside
            [0, 1] (or ``four_vector`` does not hold four), or the constructor refuses
            the parameters.
    """
    cls = find_strategy(strategy)
    classifier = getattr(cls, "classifier", {})
    if any(
        classifier.get(k) for k in ("inspects_source", "manipulates_source", "manipulates_state")
    ):
        raise ValueError(
            f"Axelrod strategy {strategy!r} reads or changes its opponent's "
            "code or state, which an abm opponent does not have"
        )
    for key, value in options.items():
        if not _is_probability(key):
            continue
        values = value if isinstance(value, (list, tuple)) else [value]
        if key == "four_vector" and len(values) != 4:
            raise ValueError(
                f"Axelrod strategy {strategy!r}: four_vector holds four "
                "probabilities (of C after CC, CD, DC, DD); got "
                f"{len(values)} values"
            )
        for v in values:
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v <= 1:
                raise ValueError(
                    f"Axelrod strategy {strategy!r}: parameter {key!r} is a "
                    f"probability, a number from 0 to 1; got {value!r}"
                )
    try:
        cls(**options)
    except (TypeError, ValueError) as exc:
        shown = ", ".join(f"{k} = {v!r}" for k, v in options.items()) or "none"
        raise ValueError(
            f"Axelrod strategy {strategy!r} does not take these parameters ({shown}): {exc}"
        ) from None
    return cls


def find_strategy(name: str) -> type:
    """The Axelrod strategy class whose class name or display name is ``name``.

    Raises:
        ValueError: The library is missing, or no strategy has that name (the message
            offers the closest names).
    """
    axl = _library()
    found = getattr(axl, name, None)  # any class, even those all_strategies leaves out
    if isinstance(found, type) and issubclass(found, axl.Player) and found is not axl.Player:
        return found
    by_name = {cls.__name__: cls for cls in axl.all_strategies}
    by_name.update({cls.name: cls for cls in axl.all_strategies})
    if name in by_name:
        return by_name[name]
    raise ValueError(
        f"unknown Axelrod strategy {name!r}{did_you_mean(name, by_name, n=3)}; "
        f"axelrod.all_strategies lists {len(axl.all_strategies)}"
    )


@register(
    "axelrod",
    stochastic=True,
    params=AxelrodParams,
    description="A strategy of the Axelrod library, played through an adapter.",
)
class AxelrodPolicy:
    """Any Axelrod library strategy: one Axelrod player per match side, asked one by one.

    Each side of each match gets a fresh player of the strategy (seeded from the
    engine's generator when the strategy is stochastic) and a stand-in opponent
    (an Axelrod ``Cooperator``, never asked to play) that holds the opponent's side
    of the history; both learn every round as played, noise included, through
    ``observe``. The player is told the match length when it is fixed (infinity
    when it is geometric) and the payoffs, and plays with Axelrod's own noise off,
    since abm applies the scenario's. A strategy
    that derives a parameter from the game when it is built keeps the value for the
    library's default game 3/0/5/1 (``GTFT`` without ``p`` forgives with 1/3 whatever
    the payoffs), so such parameters are best given explicitly.

    The strategies themselves, and the sources each cites, are those of the library:
    Knight, V. et al. (2016). An open framework for the reproducible study of the
    iterated prisoner's dilemma. Journal of Open Research Software, 4(1), e35.
    """

    def __init__(self, game: PayoffMatrix, strategy: str, **options: Any) -> None:
        """Check the strategy and its parameters for a game.

        Args:
            game: The payoffs, handed to every Axelrod player.
            strategy: Axelrod class name or display name.
            **options: Parameters for the strategy's constructor.

        Raises:
            ValueError: As ``check_strategy``.
        """
        axl = _library()
        self.cls = check_strategy(strategy, options)
        classifier = getattr(self.cls, "classifier", {})
        self.options = options
        self.game = axl.Game(r=game.R, s=game.S, t=game.T, p=game.P)
        self.actions = (axl.Action.C, axl.Action.D)
        self.stochastic = bool(classifier.get("stochastic", True))
        self._players: dict[tuple[int, int, int], tuple[Any, Any]] = {}
        self._step = -1

    def _pair(self, key: tuple[int, int, int], length: int, rng: np.random.Generator) -> tuple:
        if key not in self._players:
            axl = _library()
            player, shadow = self.cls(**self.options), axl.Cooperator()
            player.set_match_attributes(
                length=length if length > 0 else float("inf"), game=self.game, noise=0
            )
            if self.stochastic:
                player.set_seed(int(rng.integers(2**31 - 1)))
            self._players[key] = (player, shadow)
        return self._players[key]

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        """Ask each row's Axelrod player for its next action (0 = C, 1 = D).

        The memory window in ``view`` is not read: a player knows its match from
        ``observe``. Players of earlier steps are dropped, as matches never span steps.
        """
        if view.step != self._step:  # matches never span steps: forget the old players
            self._players, self._step = {}, view.step
        sides = view.side if view.side is not None else np.zeros(len(view), np.int8)
        totals = view.rounds_total if view.rounds_total is not None else np.full(len(view), -1)
        out = np.empty(len(view), np.int8)
        for i in range(len(view)):
            player, shadow = self._pair(
                (view.step, int(view.match[i]), int(sides[i])), int(totals[i]), rng
            )
            out[i] = 0 if player.strategy(shadow) == self.actions[0] else 1
        return out

    def observe(self, outcome: Outcome) -> None:
        """Give each player the round as it happened (after noise), like axelrod.Match."""
        for match, side, mine, theirs in zip(
            outcome.match, outcome.side, outcome.mine, outcome.theirs, strict=True
        ):
            if mine == EMPTY:  # the match stopped before this round was played
                continue
            player, shadow = self._players[(outcome.step, int(match), int(side))]
            own, other = self.actions[int(mine)], self.actions[int(theirs)]
            player.update_history(own, other)
            shadow.update_history(other, own)
