"""What a policy sees (a View), what it must do (decide), and the registry of names."""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from abm.game import PayoffMatrix
from abm.validation import did_you_mean


@dataclass(frozen=True)
class View:
    """A batch of decisions to make: one row per deciding side.

    ``mine`` and ``theirs`` hold the remembered actual actions (0 = C, 1 = D),
    right-aligned so that column -1 is the most recent round; unused columns on
    the left are -1 and ``length`` says how many columns are filled. ``round``
    is the 0-based round of the current match, ``rounds_total`` the match length
    (-1 when it is geometric and so unknown) and ``score`` this side's payoff so
    far in the match. The id arrays say who decides against whom (``side`` is 0
    or 1, telling the two copies in self-play apart), for policies that record
    what they do.
    """

    mine: np.ndarray
    theirs: np.ndarray
    length: np.ndarray
    round: np.ndarray
    agent: np.ndarray
    opponent: np.ndarray
    match: np.ndarray
    step: int
    side: np.ndarray | None = None
    score: np.ndarray | None = None
    rounds_total: np.ndarray | None = None

    def __post_init__(self) -> None:
        """Make every array field a read-only view."""
        _freeze(self)

    def __len__(self) -> int:
        """The number of deciding sides (rows)."""
        return int(self.length.shape[0])


class Policy(Protocol):
    """Anything that turns a batch of views into a batch of actions."""

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray | Decisions:
        """Return one int8 action (0 = C, 1 = D) per row of ``view``, or Decisions."""
        ...


@dataclass(frozen=True)
class Decisions:
    """What a policy whose decisions can fail (an LLM) returns instead of a bare array.

    ``actions`` holds 0 = C, 1 = D or ``abm.game.INVALID`` (the answer could not be
    read: the engine plays nothing for it and stops that match there);
    ``fallback`` is True where the action was chosen by the scenario's fallback
    rule rather than read from the model's answer, so the tables can mark it.
    """

    actions: np.ndarray
    fallback: np.ndarray


@dataclass(frozen=True)
class Outcome:
    """What happened in one round to a batch of sides, for policies that keep notes.

    The engine passes it to a policy's ``observe`` method, if it has one (an LLM
    reflecting on the round). Arrays line up with the decisions' views; ``mine`` and
    ``theirs`` are the actual actions (after noise), EMPTY (-1) where the match
    stopped at this round because a decision in it could not be read, so nothing
    was played.
    """

    step: int
    round: int
    match: np.ndarray
    side: np.ndarray
    agent: np.ndarray
    opponent: np.ndarray
    intended: np.ndarray
    mine: np.ndarray
    theirs: np.ndarray
    payoff: np.ndarray

    def __post_init__(self) -> None:
        """Make every array field a read-only view."""
        _freeze(self)


def _freeze(record: View | Outcome) -> None:
    """Hold each array field as a read-only view (no copy).

    The arrays are often views of the engine's own, which a policy writing into them
    would corrupt; a write now raises ValueError instead.
    """
    for name, value in vars(record).items():
        if isinstance(value, np.ndarray) and value.flags.writeable:
            view = value.view()
            view.flags.writeable = False
            object.__setattr__(record, name, view)


class NoParams(BaseModel):
    """The parameters of a policy that takes none: any key given is refused."""

    model_config = ConfigDict(extra="forbid")


@dataclass(frozen=True)
class PolicyInfo:
    """Registry entry: how to build a policy and what is known about it."""

    name: str
    factory: Callable[..., Policy]
    description: str
    memory_depth: float = math.inf
    stochastic: bool = False
    uses_llm: bool = False
    params: type[BaseModel] = NoParams
    aliases: tuple[str, ...] = field(default=())


REGISTRY: dict[str, PolicyInfo] = {}
_ALIASES: dict[str, str] = {}


def register(
    name: str,
    *,
    description: str,
    memory_depth: float = math.inf,
    stochastic: bool = False,
    uses_llm: bool = False,
    params: type[BaseModel] = NoParams,
    aliases: tuple[str, ...] = (),
) -> Callable[[Callable[..., Policy]], Callable[..., Policy]]:
    """Decorator that makes a policy factory available under ``name`` in scenarios.

    The factory (usually a class) is called with ``game=`` and the validated
    parameters, and returns a ``Policy``.

    Args:
        name: The name scenarios use.
        description: One sentence on how the policy plays, for the scenario reference.
        memory_depth: How many past rounds it reads (``math.inf``: all it is shown);
            a shorter memory window is refused.
        stochastic: Whether it draws from the policy stream.
        uses_llm: Whether it asks a language model.
        params: The pydantic model of its parameters.
        aliases: Other names for it.

    Raises:
        ValueError: At decoration, when the name or an alias is already taken.
    """

    def add(factory: Callable[..., Policy]) -> Callable[..., Policy]:
        for key in (name, *aliases):
            if key in REGISTRY or key in _ALIASES:
                raise ValueError(f"policy name {key!r} is registered twice")
        REGISTRY[name] = PolicyInfo(
            name, factory, description, memory_depth, stochastic, uses_llm, params, aliases
        )
        for alias in aliases:
            _ALIASES[alias] = name
        return factory

    return add


def lookup(name: str) -> PolicyInfo:
    """The registry entry for a name or alias.

    Raises:
        ValueError: An unknown name; the message lists the known names.
    """
    canonical = _ALIASES.get(name, name)
    if canonical in REGISTRY:
        return REGISTRY[canonical]
    known = sorted([*REGISTRY, *_ALIASES])
    raise ValueError(
        f"unknown policy {name!r}{did_you_mean(name, known)}; known policies: {', '.join(known)}"
    )


def validate_params(name: str, params: dict[str, Any]) -> dict[str, Any]:
    """Check a policy's parameters against its schema; return them with defaults filled.

    Raises:
        ValueError: An unknown policy, or parameters its schema refuses; the message
            names each bad parameter and the ones allowed.
    """
    info = lookup(name)
    try:
        # strict, as TOML types come in: true is no number, "yes" no boolean (an
        # integer still fills a float); a TOML array may fill a tuple
        return info.params.model_validate(
            _arrays_as_tuples(info.params, params), strict=True
        ).model_dump()
    except ValidationError as exc:
        allowed = ", ".join(info.params.model_fields) or "none"
        problems = "; ".join(
            (f"{'.'.join(map(str, e['loc']))}: " if e["loc"] else "")
            + e["msg"].removeprefix("Value error, ")
            + (f" (got {e['input']!r})" if e["loc"] and not isinstance(e["input"], dict) else "")
            for e in exc.errors()
        )
        # a check of the parameters together (no loc) says itself what is allowed
        hint = f" (parameters allowed: {allowed})" if any(e["loc"] for e in exc.errors()) else ""
        raise ValueError(f"bad parameters for policy {info.name!r}: {problems}{hint}") from None


def _arrays_as_tuples(model: type[BaseModel], params: dict[str, Any]) -> dict[str, Any]:
    """A list given for a tuple field, as a tuple.

    TOML has arrays, not tuples, and strict validation takes only tuples there.
    """
    out = dict(params)
    for key, value in params.items():
        field = model.model_fields.get(key)
        if field is None or not isinstance(value, list):
            continue
        annotation = field.annotation
        kinds = (
            typing.get_args(annotation)
            if typing.get_origin(annotation) in (typing.Union, types.UnionType)
            else (annotation,)
        )
        if any(k is tuple or typing.get_origin(k) is tuple for k in kinds):
            out[key] = tuple(value)
    return out


def make(name: str, params: dict[str, Any], game: PayoffMatrix) -> Policy:
    """Build the policy registered as ``name`` with validated ``params``.

    Raises:
        ValueError: An unknown policy or bad parameters (see ``validate_params``).
    """
    info = lookup(name)
    return info.factory(game=game, **validate_params(name, params))
