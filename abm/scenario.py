"""The scenario schema: TOML in, a validated frozen config out, or one clear error."""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)

from abm.errors import ScenarioError
from abm.evolution import UPDATE_RULES
from abm.game import PayoffMatrix
from abm.graph_kinds import (  # noqa: F401
    GRAPH_KINDS,
    BarabasiAlbertGraph,
    CompleteGraph,
    ErdosRenyiGraph,
    FileGraph,
    GridGraph,
    RandomRegularGraph,
    RingGraph,
    WattsStrogatzGraph,
)
from abm.policies import lookup
from abm.policies.base import validate_params
from abm.validation import explain, read_toml

# A run name is a file name: it names the output folder (outputs/<name>-<time>), so it
# may not climb out of outputs/ (".."), nest folders ("a/b") or be hidden (".x").
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
NAME_RULE = (
    "a file name (it names the output folder): letters, digits, '.', '_' and '-', "
    "not starting with '.', at most 100 characters"
)


def name_problem(name: object) -> str | None:
    """Why ``name`` cannot name an output folder, or None when it can."""
    if not isinstance(name, str) or not NAME_PATTERN.fullmatch(name):
        return f"must be {NAME_RULE}"
    return None


def safe_name(text: str) -> str:
    """A file stem turned into a valid name (the default name of a scenario)."""
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", text).lstrip(".")[:100].strip("-")
    return name if NAME_PATTERN.fullmatch(name) else "scenario"


class _Strict(BaseModel):
    # strict: TOML says what type a value is, so true is no integer and "yes" no boolean
    # (floats still take integers); no NaN or infinity anywhere. The docstring under each
    # field is its description, which the generated scenario reference prints.
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )


class PolicySpec(BaseModel):
    """A policy by registered name, its parameters, and an optional display label.

    In TOML either a bare name (``"tit_for_tat"``) or a table
    (``{ name = "random", p = 0.3, label = "Coin" }``).
    """

    model_config = ConfigDict(frozen=True, strict=True, use_attribute_docstrings=True)
    name: str
    """A registered policy name or alias (see the policies below)."""
    label: str | None = None
    """The player's name in tables and charts; players with the same name share a row and
    a column of the matrices. Default: the policy's name with its parameters, as in
    `random(p=0.3)`."""
    params: dict[str, Any] = Field(default_factory=dict)
    """The policy's own parameters: in TOML, the table's other keys."""

    @model_validator(mode="before")
    @classmethod
    def _from_toml(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError(
                'a policy is a name such as "tit_for_tat" or a table such as '
                '{ name = "random", p = 0.3 }'
            )
        if "name" not in value:
            raise ValueError("a policy table needs a 'name' key")
        value = dict(value)
        name, label = value.pop("name"), value.pop("label", None)
        if not isinstance(name, str):
            raise ValueError("'name' must be a string")
        info = lookup(name)
        return {"name": info.name, "label": label, "params": validate_params(info.name, value)}

    @property
    def display(self) -> str:
        """The player's name in tables and charts."""
        if self.label:
            return self.label
        shown = {k: v for k, v in self.params.items() if v is not None}
        if not shown:
            return self.name
        parts = (f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in shown.items())
        return f"{self.name}({', '.join(parts)})"

    def to_toml(self) -> str | dict[str, Any]:
        """The policy as a scenario file writes it: a bare name, or a table with parameters."""
        table = {k: v for k, v in self.params.items() if v is not None}
        if self.label:
            table["label"] = self.label
        return {"name": self.name, **table} if table else self.name


class GameConfig(_Strict):
    """The 2x2 game every match repeats, and the noise on its actions.

    Noise is applied by the engine with its own random stream after the policy has
    chosen; memories, payoffs and the opponent see the actual (possibly flipped) action.
    """

    kind: Literal["prisoners_dilemma", "custom", "donation"] = "prisoners_dilemma"
    """`"prisoners_dilemma"` requires T > R > P > S; `"custom"` takes any order (stag hunt,
    snowdrift, the weak dilemma R = 1, T = b, S = P = 0); `"donation"` sets R, S, T, P from
    `b` and `c`."""
    R: float = PayoffMatrix.R  # the standard game's payoffs are the matrix's defaults
    """Payoff when both cooperate (reward)."""
    S: float = PayoffMatrix.S
    """Payoff for cooperating against a defector (sucker's payoff)."""
    T: float = PayoffMatrix.T
    """Payoff for defecting against a cooperator (temptation)."""
    P: float = PayoffMatrix.P
    """Payoff when both defect (punishment)."""
    # donation game: giving costs the giver c and brings the other b
    b: float | None = None
    """`kind = "donation"` only, b > c > 0: the benefit a cooperator gives the other player
    (R = b − c, S = −c, T = b, P = 0)."""
    c: float | None = None
    """`kind = "donation"` only: the cost a cooperator pays."""
    noise: float = Field(0.0, ge=0.0, le=1.0)
    """Probability that an intended action is flipped; both the intended and the actual
    action are recorded."""

    @model_validator(mode="after")
    def _is_a_game(self) -> GameConfig:
        if self.kind == "donation":
            given = sorted({"R", "S", "T", "P"} & self.model_fields_set)
            if given:
                raise ValueError(
                    f'kind = "donation" sets R, S, T, P from b and c; leave out {", ".join(given)}'
                )
            if self.b is None or self.c is None or not self.b > self.c > 0:
                raise ValueError(
                    'kind = "donation" needs a benefit b and a cost c with '
                    f"b > c > 0; got b = {self.b}, c = {self.c}"
                )
            for name, value in (("R", self.b - self.c), ("S", -self.c), ("T", self.b), ("P", 0.0)):
                object.__setattr__(self, name, value)
        elif self.b is not None or self.c is not None:
            raise ValueError(
                'b and c belong to kind = "donation"; for other games give R, S, T and P'
            )
        _ = self.payoffs  # PayoffMatrix raises ValueError naming the broken ordering
        return self

    @property
    def payoffs(self) -> PayoffMatrix:
        """The payoff matrix; a donation game is checked as a Prisoner's Dilemma."""
        kind = "prisoners_dilemma" if self.kind == "donation" else self.kind
        return PayoffMatrix(self.R, self.S, self.T, self.P, kind)


class MatchConfig(_Strict):
    """How long a match lasts: a fixed number of rounds or a geometric length.

    Give one of the two, not both.
    """

    rounds: int | None = Field(None, ge=1, le=1_000_000)
    """Fixed match length; 5 when `continuation_probability` is not given either."""
    continuation_probability: float | None = Field(None, ge=0.0, lt=1.0)
    """δ of a geometric length instead: P(L = l) = δ^(l−1)(1 − δ), mean 1/(1 − δ)."""

    @model_validator(mode="after")
    def _one_length(self) -> MatchConfig:
        if self.rounds is not None and self.continuation_probability is not None:
            raise ValueError(
                "give either rounds (fixed length) or continuation_probability "
                "(geometric length), not both"
            )
        if self.rounds is None and self.continuation_probability is None:
            object.__setattr__(self, "rounds", 5)
        return self


class MemoryConfig(_Strict):
    """What the players (and the LLM prompts) remember: policies see only this window."""

    window: int | None = Field(None, ge=1, le=100_000)
    """Rounds remembered; none means the whole match. A window shorter than a policy's
    memory depth (2 for `tit_for_two_tats`) is an error."""
    scope: Literal["match", "opponent", "all"] = "match"
    """`"match"`: the current match only; `"opponent"`: the last rounds with this opponent,
    across matches; `"all"`: the last rounds with anyone (both need a finite `window`)."""

    @model_validator(mode="after")
    def _bounded_across_matches(self) -> MemoryConfig:
        if self.window is None and self.scope != "match":
            raise ValueError(
                f'scope = "{self.scope}" needs a finite window (an integer '
                '>= 1); only scope = "match" may leave it out to remember the '
                "whole match"
            )
        return self


# the graph kinds live in abm.graph_kinds: each builds its own graph; the union is
# built from their registry, so a kind added there is a kind a scenario may name
# Union[...] of a tuple spells the union of the registry's classes; `X | Y` cannot
GraphConfig = Annotated[Union[tuple(GRAPH_KINDS.values())], Field(discriminator="kind")]  # noqa: UP007


class Share(_Strict):
    """One entry of a population mix: a policy and the share of nodes that get it."""

    policy: PolicySpec
    """The policy, as in `players`."""
    share: float = Field(gt=0.0, le=1.0)
    """Its share of the nodes; the shares of a mix add up to 1."""


class PopulationConfig(_Strict):
    """Which policy plays at each node: give exactly one of `players`, `mix`, `attribute`."""

    players: list[PolicySpec] | None = Field(None, min_length=1)
    """One policy per node, in node order: `["all_d", { name = "random", p = 0.3,
    label = "Coin" }]`."""
    mix: list[Share] | None = Field(None, min_length=1)
    """Shares assigned at random with the seed: `[{ policy = "tit_for_tat", share = 0.6 },
    { policy = "all_d", share = 0.4 }]`; counts are exact (largest remainder)."""
    attribute: str | None = None
    """The name of a node attribute of a GraphML graph file that holds a policy name per
    node."""

    @model_validator(mode="after")
    def _one_source(self) -> PopulationConfig:
        given = [k for k in ("players", "mix", "attribute") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError(
                "give exactly one of players (a policy per node), mix (shares "
                "assigned at random) or attribute (a node attribute of a GraphML "
                f"file); got {', '.join(given) or 'none'}"
            )
        if self.mix is not None:
            total = sum(s.share for s in self.mix)
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"the shares in mix add up to {total:g}; they must add up to 1")
        return self


class PairingConfig(_Strict):
    """Who meets whom in each step, and for how many steps."""

    scheme: Literal["all_edges", "random_matching", "round_robin"] = "all_edges"
    """`"all_edges"`: every edge (self-loops included) plays one match every step;
    `"random_matching"`: a uniformly random greedy maximal matching each step (a self-loop
    occupies its node); `"round_robin"`: each step a matching, every edge played exactly
    once per cycle."""
    steps: int | None = Field(None, ge=1, le=10_000_000)
    """Steps to run; default one cycle for `round_robin`, else 1."""
    repetitions: int = Field(1, ge=1, le=10_000_000)
    """Each match of a step is played this many times, independently and at once
    (tournament repetitions in one lockstep batch); needs memory `scope = "match"`."""


class OutputConfig(_Strict):
    """Which of the optional output files a run writes."""

    rounds: bool = True
    """Write `rounds.parquet`: one row per decision, the largest file."""
    matches: bool = True
    """Write `matches.csv`: one row per match side (long evolutionary runs turn it off)."""
    charts: bool = True
    """Write the Altair charts (HTML and PNG)."""


UpdateRuleName = Literal[tuple(UPDATE_RULES)]
# the keys that belong to one rule or another: a rule that does not use one refuses it
RULE_PARAMS = tuple(dict.fromkeys(k for rule in UPDATE_RULES.values() for k in rule.params))


class EvolutionConfig(_Strict):
    """Strategy updates between steps: agents adopt a neighbour's policy."""

    rule: UpdateRuleName
    """How agents adopt policies: one of abm.evolution.UPDATE_RULES."""
    update: Literal["synchronous", "asynchronous"] = "synchronous"
    """synchronous: every agent updates each step; asynchronous: a random share does."""
    update_fraction: float | None = Field(None, gt=0.0, le=1.0)
    """Asynchronous updates: the share of agents that update in a step (none: exactly one)."""
    mutation: float = Field(0.0, ge=0.0, le=1.0)
    """The probability that an updating agent takes a random policy of the mutant set."""
    mutants: list[PolicySpec] | None = Field(None, min_length=1)
    """The policies mutation draws from (none: the initial population's policies)."""
    payoff: Literal["accumulated", "average"] = "accumulated"
    """Fitness: the step's payoff summed over an agent's matches, or averaged over them."""
    temperature: float | None = Field(None, gt=0.0)
    """rule = "fermi" only: the noise K of the Fermi function (default 0.1)."""
    intensity: float | None = Field(None, ge=0.0, le=1e6)
    """rule = "death_birth" or "moran" only: the selection intensity w in fitness
    1 - w + w * payoff (default 1)."""
    average_last: int = Field(100, ge=1)
    """summary.json averages the policy shares over this many last steps."""
    snapshot_every: int | None = Field(None, ge=1)
    """On a lattice: record who holds what every this many steps (none: start and end)."""

    @field_validator(*RULE_PARAMS)
    @classmethod
    def _belongs_to_the_rule(cls, value: Any, info: ValidationInfo) -> Any:
        rule = info.data.get("rule")  # absent when the rule itself is invalid
        if (
            value is not None
            and rule is not None
            and info.field_name not in UPDATE_RULES[rule].params
        ):
            owners = " or ".join(
                f'rule = "{name}"'
                for name, r in UPDATE_RULES.items()
                if info.field_name in r.params
            )
            own = ", ".join(UPDATE_RULES[rule].params) or "no parameter of its own"
            raise ValueError(
                f'{info.field_name} is a parameter of {owners} only; rule = "{rule}" takes {own}'
            )
        return value

    @model_validator(mode="after")
    def _fraction_is_asynchronous(self) -> EvolutionConfig:
        if self.update_fraction is not None and self.update == "synchronous":
            raise ValueError(
                'update_fraction applies to update = "asynchronous" only; '
                "synchronous updates move every agent each step"
            )
        return self

    @model_validator(mode="after")
    def _rule_defaults(self) -> EvolutionConfig:
        for name, default in UPDATE_RULES[self.rule].params.items():
            if getattr(self, name) is None:  # the rule's default, where none is given
                object.__setattr__(self, name, default)
        return self


class Scenario(_Strict):
    """A whole simulation, as read from a scenario TOML file."""

    name: str = "scenario"
    """Names the output folder: letters, digits, `.`, `_` and `-`, not starting with `.`,
    at most 100 characters. Read from a file, the default is the file name without `.toml`
    (other characters replaced by `-`)."""
    description: str = ""
    """Free text: what the scenario is for."""
    seed: int | None = Field(None, ge=0, lt=2**63)
    """Master seed: the same seed gives the same tables. Default: drawn from the operating
    system and recorded in `config.toml`."""
    game: GameConfig = GameConfig()
    """The game and its noise."""
    match: MatchConfig = MatchConfig()
    """The match length."""
    memory: MemoryConfig = MemoryConfig()
    """What the players remember."""
    graph: GraphConfig
    """Who can meet whom: the graph, by `kind`."""
    population: PopulationConfig
    """Which policy plays at each node."""
    pairing: PairingConfig = PairingConfig()
    """Which edges play in each step."""
    output: OutputConfig = OutputConfig()
    """Which optional files a run writes."""
    evolution: EvolutionConfig | None = None
    """Strategy updates between steps; off unless the table is there."""

    @field_validator("name")
    @classmethod
    def _is_a_file_name(cls, value: str) -> str:
        problem = name_problem(value)
        if problem:
            raise ValueError(problem)
        return value

    @model_validator(mode="after")
    def _repetitions_need_match_memory(self) -> Scenario:
        if self.pairing.repetitions > 1 and self.memory.scope != "match":
            raise ValueError(
                "pairing.repetitions > 1 plays the same pair several times at "
                'once, which only memory scope = "match" can keep apart'
            )
        return self

    def to_toml_dict(self) -> dict[str, Any]:
        """The resolved scenario as a TOML-ready dict (no None values)."""
        data = self.model_dump(exclude_none=True, exclude={"population", "evolution"})
        if self.game.kind == "donation":  # R, S, T, P follow from b and c
            data["game"] = {k: v for k, v in data["game"].items() if k not in {"R", "S", "T", "P"}}
        pop = self.population
        if pop.players is not None:
            data["population"] = {"players": [p.to_toml() for p in pop.players]}
        elif pop.mix is not None:
            data["population"] = {
                "mix": [{"policy": s.policy.to_toml(), "share": s.share} for s in pop.mix]
            }
        else:
            data["population"] = {"attribute": pop.attribute}
        if self.evolution is not None:
            evo = self.evolution.model_dump(exclude_none=True, exclude={"mutants"})
            if self.evolution.mutants:
                evo["mutants"] = [p.to_toml() for p in self.evolution.mutants]
            data["evolution"] = evo
        return data

    def policies(self) -> list[PolicySpec]:
        """Every policy the scenario names (in order, with repeats)."""
        pop = self.population
        if pop.players is not None:
            return list(pop.players)
        if pop.mix is not None:
            return [s.policy for s in pop.mix]
        return []

    def mutants(self) -> list[PolicySpec]:
        """The policies that evolution may introduce beyond the initial population."""
        return list(self.evolution.mutants or []) if self.evolution else []


# ---------------------------------------------------------------- loading


def parse_override(text: str, source: str | None = None) -> tuple[list[str], Any]:
    """Split one ``--set`` override into its key segments and its value.

    ``"game.noise=0.05"`` becomes ``(["game", "noise"], 0.05)``; values are read as TOML,
    and a value that is no TOML (a bare word such as ``ring``) as a string. Keys are the
    key paths of sweep files: ``population.players[5].model`` picks a list element (the
    segments keep their ``[i]``; ``abm.batch.keys.parse_key`` of the joined segments gives
    the path with indices).

    Args:
        text: The override, ``KEY.PATH=VALUE``.
        source: The scenario file, named in errors.

    Returns:
        The key's dot-separated segments and the value.

    Raises:
        ScenarioError: When ``text`` has no ``=`` or its key is no key path.
    """
    from abm.batch.keys import parse_key

    where = f"{source}: --set {text!r}" if source else f"--set {text!r}"
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.strip().split(".")]
    if not sep or not all(path):
        raise ScenarioError(
            f"{where}: expected KEY.PATH=VALUE, e.g. --set game.noise=0.05 "
            'or --set population.players[5].model="./my-model"'
        )
    parse_key(".".join(path), where)  # raises naming the key when it is no key path
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as ring is meant as a string
    return path, value


def apply_overrides(
    data: dict[str, Any], overrides: list[str], source: str | None = None
) -> dict[str, Any]:
    """Set key paths (``game.noise``, ``population.players[5].model``) in a raw scenario.

    The overrides apply before validation, so the schema checks their values.

    Args:
        data: The scenario as read from TOML; changed in place.
        overrides: ``KEY.PATH=VALUE`` strings, applied in order.
        source: The scenario file, named in errors.

    Returns:
        ``data``.

    Raises:
        ScenarioError: For a malformed override, an index out of range or a key into
            something that is not a table.
    """
    from abm.batch.keys import _set_path, parse_key

    for text in overrides:
        path, value = parse_override(text, source)
        where = f"{source}: --set {text!r}" if source else f"--set {text!r}"
        _set_path(data, parse_key(".".join(path), where), value, where)
    return data


def load_scenario(
    path: str | Path, overrides: list[str] | None = None, seed: int | None = None
) -> Scenario:
    """Read, override and validate a scenario file.

    Graph files, LLM template files and local model paths are resolved relative to the
    scenario file.

    Args:
        path: The scenario TOML file.
        overrides: ``KEY.PATH=VALUE`` strings, as given to ``--set``.
        seed: Replaces the file's seed when given.

    Returns:
        The validated scenario.

    Raises:
        ScenarioError: One paragraph naming the file, the field and what is allowed.
    """
    path = Path(path)
    data, _ = read_toml(path, "scenario file")
    data.setdefault("name", safe_name(path.stem))  # a name given is checked by the schema
    apply_overrides(data, list(overrides or []), str(path))
    if seed is not None:
        data["seed"] = seed
    graph = data.get("graph")
    if (
        isinstance(graph, dict)
        and graph.get("kind") == "file"
        and isinstance(graph.get("path"), str)
    ):
        graph["path"] = str((path.parent / graph["path"]).resolve())
    _resolve_templates(data, path.parent)
    return validate_scenario(
        data, source=str(path), set_keys=[_set_key(o) for o in overrides or []]
    )


def _set_key(override: str) -> str:
    """The key of a ``--set`` as error messages spell fields (``players[5].model``)."""
    return "".join(override.partition("=")[0].split())


def _policy_tables(data: dict[str, Any]) -> list[dict[str, Any]]:
    """Every policy table of a raw scenario: players, mix entries and mutants."""
    specs: list[Any] = []
    population = data.get("population")
    if isinstance(population, dict):
        players = population.get("players")
        specs += players if isinstance(players, list) else []
        mix = population.get("mix")
        specs += (
            [entry.get("policy") for entry in mix if isinstance(entry, dict)]
            if isinstance(mix, list)
            else []
        )
    evolution = data.get("evolution")
    if isinstance(evolution, dict) and isinstance(evolution.get("mutants"), list):
        specs += evolution["mutants"]
    return [spec for spec in specs if isinstance(spec, dict)]


def _relative_to(folder: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else folder / path).resolve())


def _local_model(folder: Path, value: str) -> bool:
    """Whether an LLM ``model`` value names a file or folder next to the scenario.

    Not a built-in name or a Hugging Face id: it does when it starts with "." or "~",
    ends with .gguf, or is a folder next to the scenario.
    """
    if value.startswith((".", "~")) or value.endswith(".gguf"):
        return True
    return not Path(value).is_absolute() and (folder / value).is_dir()


def _resolve_templates(data: dict[str, Any], folder: Path) -> None:
    """Resolve LLM template files, Jinja chat templates and local model paths in place.

    They are relative to the scenario file, like graph files, wherever a policy is given
    (players, mix, mutants).
    """
    from abm.llm.chat_formats import NAMED as CHAT_FORMATS

    for spec in _policy_tables(data):
        if isinstance(spec.get("template"), str):
            spec["template"] = _relative_to(folder, spec["template"])
        if isinstance(spec.get("adapter"), str):
            spec["adapter"] = _relative_to(folder, spec["adapter"])
        chat = spec.get("chat_template")
        if isinstance(chat, str) and chat not in CHAT_FORMATS:  # a Jinja file, not a name
            spec["chat_template"] = _relative_to(folder, chat)
        model = spec.get("model")
        # a server's model is the name it serves ("./llama-70b" if it was started so),
        # not a path on this machine
        served = spec.get("server") is not None
        if (
            spec.get("name") == "llm"
            and isinstance(model, str)
            and not served
            and _local_model(folder, model)
        ):
            spec["model"] = _relative_to(folder, model)


def validate_scenario(
    data: dict[str, Any], source: str = "<scenario>", set_keys: list[str] | None = None
) -> Scenario:
    """Validate a raw scenario dict, turning pydantic's report into one paragraph.

    Args:
        data: The scenario as read from TOML, overrides applied.
        source: The scenario file, named in errors.
        set_keys: The keys set with ``--set``, so that errors say so.

    Returns:
        The validated scenario.

    Raises:
        ScenarioError: One paragraph naming the file, the field and what is allowed.
    """
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(explain(exc, source, Scenario, set_keys or [])) from None
