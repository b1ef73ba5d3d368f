"""Any strategy of the Axelrod library as an abm policy (``{ name = "axelrod", strategy = "Tester" }``).

Axelrod strategies are Python objects with their own per-match history, so
this adapter keeps one Axelrod player per match side and asks each one in a
loop: the slow path, for breadth rather than speed. The player sees its whole
current match, whatever ``[memory]`` says, as in Axelrod itself.
"""

from __future__ import annotations

import difflib
from typing import Any

import numpy as np
from pydantic import BaseModel, ConfigDict

from abm.game import EMPTY, PayoffMatrix
from abm.policies.base import Outcome, View, register


class AxelrodParams(BaseModel):
    """``strategy`` is an Axelrod class name (``TitForTat``) or display name
    (``"Tit For Tat"``); any other key goes to the strategy's constructor."""

    model_config = ConfigDict(extra="allow")
    strategy: str


def _library() -> Any:
    try:
        import axelrod
    except ImportError:
        raise ValueError("the axelrod policy needs the Axelrod library: pip install "
                         "\"abm[bench]\" (or pip install axelrod)") from None
    return axelrod


def find_strategy(name: str) -> type:
    """The Axelrod class called ``name``; ValueError with the closest names otherwise."""
    axl = _library()
    found = getattr(axl, name, None)  # any class, even those all_strategies leaves out
    if isinstance(found, type) and issubclass(found, axl.Player) and found is not axl.Player:
        return found
    by_name = {cls.__name__: cls for cls in axl.all_strategies}
    by_name.update({cls.name: cls for cls in axl.all_strategies})
    if name in by_name:
        return by_name[name]
    close = difflib.get_close_matches(name, list(by_name), n=3)
    hint = f"; did you mean {', '.join(repr(c) for c in close)}?" if close else ""
    raise ValueError(f"unknown Axelrod strategy {name!r}{hint} (axelrod.all_strategies lists "
                     f"{len(axl.all_strategies)})")


@register("axelrod", stochastic=True, params=AxelrodParams,
          description="A strategy of the Axelrod library, played through an adapter.")
class AxelrodPolicy:
    """One Axelrod player per match side, asked one by one."""

    def __init__(self, game: PayoffMatrix, strategy: str, **options: Any) -> None:
        axl = _library()
        self.cls = find_strategy(strategy)
        classifier = getattr(self.cls, "classifier", {})
        if any(classifier.get(k) for k in ("inspects_source", "manipulates_source",
                                           "manipulates_state")):
            raise ValueError(f"Axelrod strategy {strategy!r} reads or changes its opponent's "
                             "code or state, which an abm opponent does not have")
        try:
            self.cls(**options)
        except TypeError as exc:
            raise ValueError(f"Axelrod strategy {strategy!r} does not take these parameters: "
                             f"{exc}") from None
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
            player.set_match_attributes(length=length if length > 0 else float("inf"),
                                        game=self.game, noise=0)
            if self.stochastic:
                player.set_seed(int(rng.integers(2**31 - 1)))
            self._players[key] = (player, shadow)
        return self._players[key]

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        if view.step != self._step:  # matches never span steps: forget the old players
            self._players, self._step = {}, view.step
        sides = view.side if view.side is not None else np.zeros(len(view), np.int8)
        totals = view.rounds_total if view.rounds_total is not None else np.full(len(view), -1)
        out = np.empty(len(view), np.int8)
        for i in range(len(view)):
            player, shadow = self._pair((view.step, int(view.match[i]), int(sides[i])),
                                        int(totals[i]), rng)
            out[i] = 0 if player.strategy(shadow) == self.actions[0] else 1
        return out

    def observe(self, outcome: Outcome) -> None:
        """Give each player the round as it happened (after noise), like axelrod.Match."""
        for match, side, mine, theirs in zip(outcome.match, outcome.side, outcome.mine,
                                             outcome.theirs):
            if mine == EMPTY:  # the match stopped before this round was played
                continue
            player, shadow = self._players[(outcome.step, int(match), int(side))]
            own, other = self.actions[int(mine)], self.actions[int(theirs)]
            player.update_history(own, other)
            shadow.update_history(other, own)
