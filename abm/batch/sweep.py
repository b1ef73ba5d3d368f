"""Sweep files: a base scenario, a grid of dotted keys, replicates; expanded into runs.

A sweep file names a base scenario (relative to the sweep file) and a ``[sweep]``
table whose leaves are lists of values. Every run is the base scenario with some
``--set`` overrides and a seed, so each run is exactly ``python -m abm.run BASE
--seed SEED --set ...`` and is validated the same way before anything starts. The
file itself is checked by the pydantic model ``SweepFile``, and its errors read like a
scenario's (``FILE: field 'sweep.game.noise': ...``).
"""

from __future__ import annotations

import hashlib
import itertools
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
    model_validator,
)

from abm.batch.keys import (
    NOT_A_KEY_PATH,
    canonical,
    canonical_text,
    joined,
    key_path,
    label,
    overrides_for,
    toml_value,
)
from abm.errors import ScenarioError
from abm.scenario import Scenario, load_scenario, name_problem, parse_override, safe_name
from abm.validation import INLINE, did_you_mean, dotted, explain, field_error, read_toml

DEFAULT_METRICS = ("cooperation_rate", "mean_payoff")
MAX_REPLICATES = 1_000_000
SEED_RULE = Field(ge=0, lt=2**63)  # as a scenario's seed


def _slug(params: dict[str, Any], limit: int = 60) -> str:
    if not params:
        return "run"
    parts = []
    for key, value in params.items():
        short = re.sub(r"\[(\d+)\]", r"\1", key.rsplit(".", 1)[-1])
        shown = re.sub(r"[^A-Za-z0-9.=+-]+", "-", f"{short}={label(value)}").strip("-.")
        parts.append(shown)
    text = "_".join(parts)
    return text[:limit].rstrip("-._") or "run"


# ------------------------------------------------------------------ seeds


def derive_seed(master: int, point: dict[str, Any], replicate: int) -> int:
    """The seed of replicate ``replicate`` of a parameter point.

    It depends on the master seed, the point's values (by key, not by position in
    the grid) and the replicate index only, so adding a value to the grid, or
    reordering it, leaves every other run's seed as it was.
    """
    digest = hashlib.sha256(canonical_text(point).encode()).digest()
    words = tuple(int(w) for w in np.frombuffer(digest[:16], dtype="<u4"))
    seq = np.random.SeedSequence(entropy=master, spawn_key=(*words, replicate))
    return int(seq.generate_state(1, np.uint32)[0])


# ------------------------------------------------------------------ the file


def swept_key(text: str) -> str:
    """A key of ``[sweep]``, ``[set]`` or ``--set``, spelt canonically.

    Raises:
        ValueError: when ``text`` is no key path, names no scenario field, or is the
            seed (derived for each run, never set).
    """
    path = key_path(text)
    if path is None:
        raise ValueError(NOT_A_KEY_PATH)
    fields = list(Scenario.model_fields)
    if path[0] not in fields:
        raise ValueError(
            f"unknown key path '{dotted(path)}'{did_you_mean(path[0], fields)}; "
            f"a key path starts with one of: {', '.join(fields)}"
        )
    if path == ("seed",):
        raise ValueError(
            "'seed' cannot be swept or set: each run's seed is derived from the "
            "sweep's seed and the replicate; set the top-level seed and [sweep] "
            "replicates instead"
        )
    return dotted(path)


def _swept_values(value: Any) -> list[Any]:
    if not isinstance(value, list):
        raise ValueError(
            "expected a list of values to sweep, such as [0, 0.01, 0.05] (a "
            "single value goes in [set])"
        )
    if not value:
        raise ValueError("empty list; give at least one value")
    seen: set[str] = set()
    for v in value:
        text = canonical_text(v)
        if text in seen:
            raise ValueError(
                f"the value {toml_value(v)} is listed twice; each value must appear once"
            )
        seen.add(text)
    return value


def _joined(value: Any) -> Any:
    return joined(value) if isinstance(value, dict) else value  # else: "must be a table"


def _same_lengths(group: dict[str, list[Any]]) -> dict[str, list[Any]]:
    if not group:
        raise ValueError("empty table; give two or more lists of the same length")
    if len({len(values) for values in group.values()}) > 1:
        shown = ", ".join(f"{key}: {len(values)}" for key, values in group.items())
        raise ValueError(f"zipped lists must have the same length; got {shown}")
    return group


Key = Annotated[str, AfterValidator(swept_key)]
Values = Annotated[Any, AfterValidator(_swept_values)]
Grid = Annotated[dict[Key, Values], BeforeValidator(_joined)]


class _Table(BaseModel):
    # as a scenario's tables: TOML's types as they are (true is no integer), no unknown keys
    model_config = ConfigDict(extra="forbid", frozen=True, strict=True)


class SweepTable(_Table):
    """``[sweep]``: the grid, the zipped groups and the replicates of every point.

    The grid's ``key = [values]`` entries are written directly in the table.
    """

    replicates: int = Field(1, ge=1, le=MAX_REPLICATES)
    zip: list[Annotated[Grid, AfterValidator(_same_lengths)]] = Field(default_factory=list)
    grid: Grid = Field(default_factory=dict, json_schema_extra=INLINE)

    @model_validator(mode="before")
    @classmethod
    def _grid_keys(cls, value: Any) -> Any:
        if not isinstance(value, dict):
            return value
        table = {k: v for k, v in value.items() if k in ("replicates", "zip")}
        table["grid"] = {k: v for k, v in value.items() if k not in ("replicates", "zip")}
        return table

    @field_validator("zip", mode="before")
    @classmethod
    def _zip_tables(cls, value: Any) -> Any:
        if isinstance(value, dict):  # [sweep.zip] rather than [[sweep.zip]]: one group
            value = [value]
        if not isinstance(value, list) or not all(isinstance(group, dict) for group in value):
            raise ValueError(
                "must be tables of lists of the same length ([[sweep.zip]]), "
                "each varied together as one dimension"
            )
        return value


class ReportTable(_Table):
    """``[report]``: what the aggregate table and the charts show."""

    metrics: list[str] = Field(default_factory=lambda: list(DEFAULT_METRICS))

    @field_validator("metrics")
    @classmethod
    def _some(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError(
                "give at least one metric name (a column of results.parquet), "
                'e.g. ["cooperation_rate"]'
            )
        return value


class SweepFile(_Table):
    """A sweep file as written, before the base scenario is read."""

    scenario: str
    name: str | None = None
    description: str = ""
    seed: Annotated[int, SEED_RULE] | None = None
    set: Annotated[dict[Key, Any], BeforeValidator(_joined)] = Field(default_factory=dict)
    sweep: SweepTable = Field(default_factory=SweepTable)
    report: ReportTable = Field(default_factory=ReportTable)

    @field_validator("name")
    @classmethod
    def _is_a_name(cls, value: str | None) -> str | None:
        problem = None if value is None else name_problem(value)
        if problem:  # the rule of scenario names: a file name, no "..", no ".x"
            raise ValueError(problem)
        return value


REQUIRED = {
    "scenario": "the base scenario file, relative to the sweep file, e.g. scenario = "
    '"round_robin_rules.toml"',
    "seed": "the master seed every run's seed is derived from, when the base scenario has "
    "no seed; e.g. seed = 1",
}
_SEED = TypeAdapter(Annotated[int, SEED_RULE], config=ConfigDict(strict=True))


# ------------------------------------------------------------------ the sweep


@dataclass(frozen=True)
class Axis:
    """One dimension of the grid: a single key, or a group of zipped keys."""

    keys: tuple[str, ...]
    values: tuple[tuple[Any, ...], ...]  # per position, one value per key


@dataclass(frozen=True)
class Run:
    """One simulation of the sweep."""

    run_id: str  # the folder name under runs/
    point: int
    replicate: int
    seed: int
    params: dict[str, Any]  # swept key -> value
    overrides: tuple[str, ...]  # what --set would be given
    llm: tuple[dict[str, Any], ...] = ()  # parameters of each LLM player


@dataclass
class Sweep:
    """A validated sweep: its grid, its fixed overrides and every run it expands to."""

    path: Path
    name: str
    description: str
    base: Path
    seed: int
    replicates: int
    keys: list[str]
    axes: list[Axis]
    fixed: dict[str, Any]
    metrics: list[str]
    text: str
    points: list[dict[str, Any]] = field(default_factory=list)
    runs: list[Run] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        """A JSON-ready summary of the sweep: its settings and how many points and runs."""
        return {
            "name": self.name,
            "description": self.description,
            "sweep_file": str(self.path),
            "base": str(self.base),
            "seed": self.seed,
            "replicates": self.replicates,
            "keys": self.keys,
            "axes": [list(axis.keys) for axis in self.axes],
            "fixed": {k: canonical(v) for k, v in self.fixed.items()},
            "metrics": self.metrics,
            "points": len(self.points),
            "runs": len(self.runs),
        }


def _validated(path: Path) -> tuple[SweepFile, str]:
    data, text = read_toml(path, "sweep file")
    try:
        return SweepFile.model_validate(data), text
    except ValidationError as exc:
        raise ScenarioError(
            explain(exc, str(path), SweepFile, required=REQUIRED, whole="the sweep file")
        ) from None


def _command_line(src: str, overrides: list[str]) -> dict[str, tuple[Any, str]]:
    """``--set`` overrides: key -> (value, the override as typed)."""
    out: dict[str, tuple[Any, str]] = {}
    for text in overrides:
        where = f"{src}: --set {text!r}"
        parts, value = parse_override(text, src)
        try:
            out[swept_key(".".join(parts))] = (value, text)
        except ValueError as exc:
            raise ScenarioError(f"{where}: {exc}") from None
    return out


def _base_seed(src: str, base: Path, base_raw: dict[str, Any]) -> int:
    seed = base_raw.get("seed")
    if seed is None:
        raise ScenarioError(f"{src}: field 'seed' is required: {REQUIRED['seed']}")
    try:
        return _SEED.validate_python(seed)
    except ValidationError as exc:
        raise ScenarioError(
            explain(exc, f"{src}: base scenario {base.name}", SweepFile, whole="field 'seed'")
        ) from None


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file and build (and validate) every run's scenario.

    Args:
        path: the sweep file.
        overrides: ``KEY.PATH=VALUE`` strings applied to every run, like ``[set]``.

    Returns:
        The sweep with every run.

    Raises:
        ScenarioError: one paragraph naming the sweep file, the field and what is allowed
            (worded as scenario errors are).
    """
    path = Path(path)
    src = str(path)
    spec, text = _validated(path)
    base = (path.parent / spec.scenario).resolve()
    if not base.is_file():
        raise field_error(src, ("scenario",), f"no such scenario file: {base}")

    # fixed overrides: [set], then --set
    fixed: dict[str, Any] = dict(spec.set)
    typed = _command_line(src, list(overrides or []))
    fixed.update((key, value) for key, (value, _) in typed.items())

    # the grid: each key swept once, in [sweep] or in one zipped group
    axes = [Axis((key,), tuple((v,) for v in values)) for key, values in spec.sweep.grid.items()]
    axes += [
        Axis(tuple(group), tuple(zip(*group.values(), strict=True))) for group in spec.sweep.zip
    ]
    where: dict[str, tuple[str | int, ...]] = {}
    places = [("sweep", key) for key in spec.sweep.grid]
    places += [("sweep", "zip", i, key) for i, group in enumerate(spec.sweep.zip) for key in group]
    for place in places:
        key = str(place[-1])
        if key in where:
            raise field_error(
                src, place, f"swept twice (also at '{dotted(where[key])}'); sweep each key once"
            )
        where[key] = place
        if key in typed:
            raise ScenarioError(
                f"{src}: --set {typed[key][1]!r}: '{key}' is also swept (at "
                f"'{dotted(place)}'); keep one"
            )
        if key in spec.set:
            raise field_error(src, ("set", key), f"also swept (at '{dotted(place)}'); keep one")

    try:
        base_raw, _ = read_toml(base, "scenario file")
    except ScenarioError as exc:
        raise field_error(src, ("scenario",), f"cannot read the base scenario: {exc}") from None
    seed = spec.seed if spec.seed is not None else _base_seed(src, base, base_raw)

    sweep = Sweep(
        path=path,
        name=spec.name or safe_name(path.stem),  # a stem need not be a name
        description=spec.description,
        base=base,
        seed=seed,
        replicates=spec.sweep.replicates,
        keys=list(where),
        axes=axes,
        fixed=fixed,
        metrics=list(spec.report.metrics),
        text=text,
    )
    _expand(sweep, base_raw)
    return sweep


# ------------------------------------------------------------------ expansion


def _expand(sweep: Sweep, base_raw: dict[str, Any]) -> None:
    src = str(sweep.path)
    combos = list(itertools.product(*[range(len(axis.values)) for axis in sweep.axes]))
    points: list[dict[str, Any]] = []
    for combo in combos:
        point: dict[str, Any] = {}
        for axis, j in zip(sweep.axes, combo, strict=True):
            point.update(zip(axis.keys, axis.values[j], strict=True))
        points.append({key: point[key] for key in sweep.keys})
    scenarios: list[tuple[list[str], Scenario]] = []
    failures: list[str] = []
    for point in points:
        where = f"{src}: run with {_describe(point)}" if point else f"{src}: [set]"
        try:  # names the sweep file and the key itself
            overrides = overrides_for(base_raw, {**sweep.fixed, **point}, src)
        except ScenarioError as exc:
            failures.append(str(exc))
            continue
        try:
            scenario = load_scenario(sweep.base, overrides, derive_seed(sweep.seed, point, 0))
            _preflight(scenario, sweep.base)
        except ScenarioError as exc:
            failures.append(f"{where}: {_rebase(str(exc), sweep.base)}")
            continue
        scenarios.append((overrides, scenario))
    if failures:
        more = f" (and {len(failures) - 1} more runs fail)" if len(failures) > 1 else ""
        raise ScenarioError(failures[0] + more)
    sweep.points = points
    runs_by_replicate = []
    for replicate in range(sweep.replicates):
        for index, (point, (overrides, scenario)) in enumerate(zip(points, scenarios, strict=True)):
            seed = derive_seed(sweep.seed, point, replicate)
            resolved = scenario.model_copy(update={"seed": seed}).to_toml_dict()
            digest = hashlib.sha256(canonical_text(resolved).encode()).hexdigest()[:8]
            llm = tuple(
                dict(spec.params) for spec in _named_policies(scenario) if spec.name == "llm"
            )
            runs_by_replicate.append(
                Run(
                    run_id=f"{_slug(point)}-r{replicate}-{digest}",
                    point=index,
                    replicate=replicate,
                    seed=seed,
                    params=point,
                    overrides=tuple(overrides),
                    llm=llm,
                )
            )
    sweep.runs = runs_by_replicate  # replicate-major: early results cover every point


def _preflight(scenario: Scenario, base: Path) -> None:
    """Build the model once for a rule-only point, so its errors show before the sweep starts.

    Graph and population errors are caught this way; a point with an LLM player is
    checked only when it runs, since building it would load the model.
    """
    specs = _named_policies(scenario)
    if not scenario.policies() or any(spec.name == "llm" for spec in specs):
        return
    from abm.model import DilemmaModel

    DilemmaModel(scenario, source=str(base), collect_agents=False)


def _named_policies(scenario: Scenario) -> list[Any]:
    """Every policy the scenario names, those evolution may bring in included."""
    mutants = getattr(scenario, "mutants", None)
    return [*scenario.policies(), *(mutants() if callable(mutants) else [])]


def _describe(point: dict[str, Any]) -> str:
    return ", ".join(f"{k} = {toml_value(v)}" for k, v in point.items())


def _rebase(message: str, base: Path) -> str:
    """Point a scenario error at the base file and at the sweep rather than at --set."""
    message = message.removeprefix(f"{base}: ")
    message = message.replace(" (set with --set)", " (set by the sweep)")
    return f"base scenario {base.name}: {message}"
