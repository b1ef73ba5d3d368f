"""The scenario schema: TOML in, a validated frozen config out, or one clear error."""

from __future__ import annotations

import difflib
import math
import re
import tomllib
import types
import typing
from pathlib import Path
from typing import Annotated, Any, Literal, Union

from pydantic import (BaseModel, ConfigDict, Field, ValidationError, field_validator,
                      model_validator)

from abm.errors import ScenarioError
from abm.game import PayoffMatrix
from abm.policies import lookup
from abm.policies.base import validate_params


# A run name is a file name: it names the output folder (outputs/<name>-<time>), so it
# may not climb out of outputs/ (".."), nest folders ("a/b") or be hidden (".x").
NAME_PATTERN = re.compile(r"[A-Za-z0-9_-][A-Za-z0-9._-]{0,99}")
NAME_RULE = ("a file name (it names the output folder): letters, digits, '.', '_' and '-', "
             "not starting with '.', at most 100 characters")


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
    # (floats still take integers); no NaN or infinity anywhere
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True, allow_inf_nan=False)


class PolicySpec(BaseModel):
    """A policy by registered name, its parameters, and an optional display label.

    In TOML either a bare name (``"tit_for_tat"``) or a table
    (``{ name = "random", p = 0.3, label = "Coin" }``).
    """

    model_config = ConfigDict(frozen=True, strict=True)
    name: str
    label: str | None = None
    params: dict[str, Any] = Field(default_factory=dict)

    @model_validator(mode="before")
    @classmethod
    def _from_toml(cls, value: Any) -> Any:
        if isinstance(value, str):
            value = {"name": value}
        if not isinstance(value, dict):
            raise ValueError("a policy is a name such as \"tit_for_tat\" or a table such as "
                             "{ name = \"random\", p = 0.3 }")
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
        return f"{self.name}({', '.join(f'{k}={v:g}' if isinstance(v, float) else f'{k}={v}' for k, v in shown.items())})"

    def to_toml(self) -> str | dict[str, Any]:
        table = {k: v for k, v in self.params.items() if v is not None}
        if self.label:
            table["label"] = self.label
        return {"name": self.name, **table} if table else self.name


class GameConfig(_Strict):
    kind: Literal["prisoners_dilemma", "custom", "donation"] = "prisoners_dilemma"
    R: float = 9.0
    S: float = 0.0
    T: float = 10.0
    P: float = 5.0
    # donation game: giving costs the giver c and brings the other b
    b: float | None = None
    c: float | None = None
    noise: float = Field(0.0, ge=0.0, le=1.0)

    @model_validator(mode="after")
    def _is_a_game(self) -> GameConfig:
        if self.kind == "donation":
            given = sorted({"R", "S", "T", "P"} & self.model_fields_set)
            if given:
                raise ValueError(f"kind = \"donation\" sets R, S, T, P from b and c; leave out "
                                 f"{', '.join(given)}")
            if self.b is None or self.c is None or not self.b > self.c > 0:
                raise ValueError("kind = \"donation\" needs a benefit b and a cost c with "
                                 f"b > c > 0; got b = {self.b}, c = {self.c}")
            for name, value in (("R", self.b - self.c), ("S", -self.c), ("T", self.b),
                                ("P", 0.0)):
                object.__setattr__(self, name, value)
        elif self.b is not None or self.c is not None:
            raise ValueError("b and c belong to kind = \"donation\"; for other games give "
                             "R, S, T and P")
        self.payoffs  # PayoffMatrix raises ValueError naming the broken ordering
        return self

    @property
    def payoffs(self) -> PayoffMatrix:
        kind = "prisoners_dilemma" if self.kind == "donation" else self.kind
        return PayoffMatrix(self.R, self.S, self.T, self.P, kind)


class MatchConfig(_Strict):
    rounds: int | None = Field(None, ge=1, le=1_000_000)
    continuation_probability: float | None = Field(None, ge=0.0, lt=1.0)

    @model_validator(mode="after")
    def _one_length(self) -> MatchConfig:
        if self.rounds is not None and self.continuation_probability is not None:
            raise ValueError("give either rounds (fixed length) or continuation_probability "
                             "(geometric length), not both")
        if self.rounds is None and self.continuation_probability is None:
            object.__setattr__(self, "rounds", 5)
        return self


class MemoryConfig(_Strict):
    window: int | None = Field(None, ge=1, le=100_000)
    scope: Literal["match", "opponent", "all"] = "match"

    @model_validator(mode="after")
    def _bounded_across_matches(self) -> MemoryConfig:
        if self.window is None and self.scope != "match":
            raise ValueError(f"scope = \"{self.scope}\" needs a finite window (an integer "
                             ">= 1); only scope = \"match\" may leave it out to remember the "
                             "whole match")
        return self


class _Graph(_Strict):
    self_loops: bool = False
    # independent copies of the graph side by side: an ensemble of replicates in one run
    copies: int = Field(1, ge=1, le=1_000_000)


class CompleteGraph(_Graph):
    kind: Literal["complete"]
    n: int | None = Field(None, ge=1)


class RingGraph(_Graph):
    kind: Literal["ring"]
    n: int = Field(ge=3)
    k: int = Field(1, ge=1)


class GridGraph(_Graph):
    kind: Literal["grid"]
    rows: int = Field(ge=1)
    cols: int = Field(ge=1)
    torus: bool = False
    neighbourhood: Literal["von_neumann", "moore"] = "von_neumann"


class WattsStrogatzGraph(_Graph):
    kind: Literal["watts_strogatz"]
    n: int = Field(ge=3)
    k: int = Field(ge=2)
    p: float = Field(ge=0.0, le=1.0)


class BarabasiAlbertGraph(_Graph):
    kind: Literal["barabasi_albert"]
    n: int = Field(ge=2)
    m: int = Field(ge=1)


class ErdosRenyiGraph(_Graph):
    kind: Literal["erdos_renyi"]
    n: int = Field(ge=1)
    p: float = Field(ge=0.0, le=1.0)


class RandomRegularGraph(_Graph):
    kind: Literal["random_regular"]
    n: int = Field(ge=1)
    d: int = Field(ge=0)


class FileGraph(_Graph):
    kind: Literal["file"]
    path: str
    format: Literal["auto", "edgelist", "graphml"] = "auto"


GraphConfig = Annotated[
    Union[CompleteGraph, RingGraph, GridGraph, WattsStrogatzGraph, BarabasiAlbertGraph,
          ErdosRenyiGraph, RandomRegularGraph, FileGraph],
    Field(discriminator="kind"),
]
GRAPH_KINDS = tuple(typing.get_args(m.model_fields["kind"].annotation)[0]
                    for m in typing.get_args(typing.get_args(GraphConfig)[0]))


class Share(_Strict):
    policy: PolicySpec
    share: float = Field(gt=0.0, le=1.0)


class PopulationConfig(_Strict):
    players: list[PolicySpec] | None = Field(None, min_length=1)
    mix: list[Share] | None = Field(None, min_length=1)
    attribute: str | None = None

    @model_validator(mode="after")
    def _one_source(self) -> PopulationConfig:
        given = [k for k in ("players", "mix", "attribute") if getattr(self, k) is not None]
        if len(given) != 1:
            raise ValueError("give exactly one of players (a policy per node), mix (shares "
                             "assigned at random) or attribute (a node attribute of a GraphML "
                             f"file); got {', '.join(given) or 'none'}")
        if self.mix is not None:
            total = sum(s.share for s in self.mix)
            if not math.isclose(total, 1.0, abs_tol=1e-6):
                raise ValueError(f"the shares in mix add up to {total:g}; they must add up to 1")
        return self


class PairingConfig(_Strict):
    scheme: Literal["all_edges", "random_matching", "round_robin"] = "all_edges"
    steps: int | None = Field(None, ge=1, le=10_000_000)
    repetitions: int = Field(1, ge=1, le=10_000_000)


class OutputConfig(_Strict):
    rounds: bool = True
    matches: bool = True
    charts: bool = True


class EvolutionConfig(_Strict):
    """Strategy updates between steps: agents adopt a neighbour's policy."""

    rule: Literal["imitate_best", "proportional", "fermi", "death_birth", "moran"]
    update: Literal["synchronous", "asynchronous"] = "synchronous"
    # asynchronous: the share of agents that update in a step; None = exactly one agent
    update_fraction: float | None = Field(None, gt=0.0, le=1.0)
    mutation: float = Field(0.0, ge=0.0, le=1.0)
    mutants: list[PolicySpec] | None = Field(None, min_length=1)
    payoff: Literal["accumulated", "average"] = "accumulated"
    temperature: float = Field(0.1, gt=0.0)
    intensity: float = Field(1.0, ge=0.0, le=1e6)
    average_last: int = Field(100, ge=1)
    snapshot_every: int | None = Field(None, ge=1)

    @model_validator(mode="after")
    def _fraction_is_asynchronous(self) -> EvolutionConfig:
        if self.update_fraction is not None and self.update == "synchronous":
            raise ValueError("update_fraction applies to update = \"asynchronous\" only; "
                             "synchronous updates move every agent each step")
        return self


class Scenario(_Strict):
    """A whole simulation, as read from a scenario TOML file."""

    name: str = "scenario"
    description: str = ""
    seed: int | None = Field(None, ge=0, lt=2**63)
    game: GameConfig = GameConfig()
    match: MatchConfig = MatchConfig()
    memory: MemoryConfig = MemoryConfig()
    graph: GraphConfig
    population: PopulationConfig
    pairing: PairingConfig = PairingConfig()
    output: OutputConfig = OutputConfig()
    evolution: EvolutionConfig | None = None

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
            raise ValueError("pairing.repetitions > 1 plays the same pair several times at "
                             "once, which only memory scope = \"match\" can keep apart")
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
            data["population"] = {"mix": [{"policy": s.policy.to_toml(), "share": s.share}
                                          for s in pop.mix]}
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
    """``"game.noise=0.05"`` -> (["game", "noise"], 0.05); values are read as TOML.

    Keys are the key paths of sweep files: ``population.players[5].model`` picks a
    list element (the segments keep their ``[i]``; ``abm.batch.keys.parse_key`` of the
    joined segments gives the path with indices)."""
    from abm.batch.keys import parse_key

    where = f"{source}: --set {text!r}" if source else f"--set {text!r}"
    key, sep, raw = text.partition("=")
    path = [part.strip() for part in key.strip().split(".")]
    if not sep or not all(path):
        raise ScenarioError(f"{where}: expected KEY.PATH=VALUE, e.g. --set game.noise=0.05 "
                            "or --set population.players[5].model=\"./my-model\"")
    parse_key(".".join(path), where)  # raises naming the key when it is no key path
    try:
        value = tomllib.loads(f"v = {raw.strip()}")["v"]
    except tomllib.TOMLDecodeError:
        value = raw.strip()  # a bare word such as ring is meant as a string
    return path, value


def apply_overrides(data: dict[str, Any], overrides: list[str],
                    source: str | None = None) -> dict[str, Any]:
    """Set key paths (``game.noise``, ``population.players[5].model``) in the raw
    scenario dict before validation; ScenarioError for an index out of range or a key
    into something that is not a table."""
    from abm.batch.keys import _set_path, parse_key

    for text in overrides:
        path, value = parse_override(text, source)
        where = f"{source}: --set {text!r}" if source else f"--set {text!r}"
        _set_path(data, parse_key(".".join(path), where), value, where)
    return data


def load_scenario(path: str | Path, overrides: list[str] | None = None,
                  seed: int | None = None) -> Scenario:
    """Read, override and validate a scenario file; raise ScenarioError on any problem."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such scenario file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the scenario file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None
    data.setdefault("name", safe_name(path.stem))  # a name given is checked by the schema
    apply_overrides(data, list(overrides or []), str(path))
    if seed is not None:
        data["seed"] = seed
    graph = data.get("graph")
    if isinstance(graph, dict) and graph.get("kind") == "file" and isinstance(graph.get("path"), str):
        graph["path"] = str((path.parent / graph["path"]).resolve())
    _resolve_templates(data, path.parent)
    return validate_scenario(data, source=str(path), set_keys=[_set_key(o)
                                                             for o in overrides or []])


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
        specs += [entry.get("policy") for entry in mix if isinstance(entry, dict)] \
            if isinstance(mix, list) else []
    evolution = data.get("evolution")
    if isinstance(evolution, dict) and isinstance(evolution.get("mutants"), list):
        specs += evolution["mutants"]
    return [spec for spec in specs if isinstance(spec, dict)]


def _relative_to(folder: Path, value: str) -> str:
    path = Path(value).expanduser()
    return str((path if path.is_absolute() else folder / path).resolve())


def _local_model(folder: Path, value: str) -> bool:
    """Whether an LLM ``model`` value names a file or folder (not a built-in name or a
    Hugging Face id): it starts with "." or "~", ends with .gguf, or is a folder next to
    the scenario."""
    if value.startswith((".", "~")) or value.endswith(".gguf"):
        return True
    return not Path(value).is_absolute() and (folder / value).is_dir()


def _resolve_templates(data: dict[str, Any], folder: Path) -> None:
    """LLM template files, Jinja chat templates and local model paths are relative to the
    scenario file, like graph files, wherever a policy is given (players, mix, mutants)."""
    from abm.llm.chat_formats import NAMED as CHAT_FORMATS

    for spec in _policy_tables(data):
        if isinstance(spec.get("template"), str):
            spec["template"] = _relative_to(folder, spec["template"])
        chat = spec.get("chat_template")
        if isinstance(chat, str) and chat not in CHAT_FORMATS:  # a Jinja file, not a name
            spec["chat_template"] = _relative_to(folder, chat)
        model = spec.get("model")
        if spec.get("name") == "llm" and isinstance(model, str) and _local_model(folder, model):
            spec["model"] = _relative_to(folder, model)


def validate_scenario(data: dict[str, Any], source: str = "<scenario>",
                      set_keys: list[str] | None = None) -> Scenario:
    """Validate a raw scenario dict, turning pydantic's report into one paragraph."""
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ScenarioError(_explain(exc, source, set_keys or [])) from None


def _explain(exc: ValidationError, source: str, set_keys: list[str]) -> str:
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        field = _dotted(loc)
        where = " (set with --set)" if any(_within(field, k) or (field and _within(k, field))
                                           for k in set_keys) else ""
        if err["type"] == "extra_forbidden":
            allowed = _allowed_keys(loc[:-1])
            close = difflib.get_close_matches(str(loc[-1]), allowed, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            problems.append(f"unknown key '{field}'{where}{hint}; allowed keys here: "
                            f"{', '.join(allowed)}")
            continue
        if err["type"] == "missing":
            problems.append(f"field '{field}' is required{where}")
            continue
        if err["type"] == "union_tag_invalid":
            problems.append(f"field '{field}.kind'{where}: unknown graph kind "
                            f"{err['input'].get('kind')!r}; allowed: {', '.join(GRAPH_KINDS)}")
            continue
        if err["type"] == "union_tag_not_found":
            problems.append(f"field '{field}.kind' is required{where}; allowed: "
                            f"{', '.join(GRAPH_KINDS)}")
            continue
        msg = err["msg"].removeprefix("Value error, ")
        got = err.get("input")
        text = ("true" if got else "false") if isinstance(got, bool) else repr(got)  # as in TOML
        if len(text) > 80:  # a 300-character name need not be shown whole
            text = f"{text[:60]}... ({len(got) if isinstance(got, str) else len(text)} characters)"
        shown = "" if isinstance(got, dict) or got is None else f" (got {text})"
        name = f"field '{field}'" if field else "the scenario"
        problems.append(f"{name}{where}: {msg}{shown}")
    return f"{source}: " + "; ".join(problems)


def _within(field: str, key: str) -> bool:
    """Whether ``field`` is ``key`` or lies inside it (``a.b[2].c`` inside ``a.b``)."""
    return field == key or field.startswith((key + ".", key + "["))


def _dotted(loc: tuple[Any, ...]) -> str:
    out = ""
    for i, part in enumerate(loc):
        if i and loc[i - 1] == "graph" and part in GRAPH_KINDS:
            continue  # pydantic puts the union tag in the path; users never write it
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _allowed_keys(loc: tuple[Any, ...]) -> list[str]:
    model: Any = Scenario
    for part in loc:
        model = _step_into(model, part)
        if model is None:
            return []
    if isinstance(model, type) and issubclass(model, BaseModel):
        return list(model.model_fields)
    return []


def _step_into(model: Any, part: Any) -> Any:
    model = _unwrap(model)
    if isinstance(model, list):
        candidates = model
        for member in candidates:
            if "kind" in member.model_fields and part in typing.get_args(
                    member.model_fields["kind"].annotation):
                return member
        return None
    if isinstance(part, int):
        return model
    if isinstance(model, type) and issubclass(model, BaseModel) and part in model.model_fields:
        return _unwrap(model.model_fields[part].annotation)
    return None


def _unwrap(tp: Any) -> Any:
    """Strip Annotated/Optional/list down to a model class, or a list of union members."""
    while True:
        origin = typing.get_origin(tp)
        if origin is Annotated:
            tp = typing.get_args(tp)[0]
        elif origin in (Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            if len(members) == 1:
                tp = members[0]
            else:
                return members
        elif origin is list:
            tp = typing.get_args(tp)[0]
        else:
            return tp
