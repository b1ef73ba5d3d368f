"""Sweep files: a base scenario, a grid of dotted keys, replicates; expanded into runs.

A sweep file names a base scenario (relative to the sweep file) and a ``[sweep]``
table whose leaves are lists of values. Every run is the base scenario with some
``--set`` overrides and a seed, so each run is exactly ``python -m abm.run BASE
--seed SEED --set ...`` and is validated the same way before anything starts.
"""

from __future__ import annotations

import difflib
import hashlib
import itertools
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from abm.batch.keys import (Path_, canonical, canonical_text, flatten, format_key, label,
                            overrides_for, parse_key, toml_value)
from abm.errors import ScenarioError
from abm.scenario import Scenario, load_scenario, name_problem, parse_override, safe_name

TOP_KEYS = ("scenario", "name", "description", "seed", "set", "sweep", "report")
SWEEP_KEYS = ("replicates", "zip")
REPORT_KEYS = ("metrics",)
DEFAULT_METRICS = ("cooperation_rate", "mean_payoff")
MAX_REPLICATES = 1_000_000


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


def _read(path: Path) -> tuple[dict[str, Any], str]:
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such sweep file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot read the sweep file ({exc})") from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {exc}") from None


def _unknown(where: str, key: str, allowed: tuple[str, ...] | list[str]) -> ScenarioError:
    close = difflib.get_close_matches(key, allowed, n=1)
    hint = f" (did you mean {close[0]!r}?)" if close else ""
    return ScenarioError(f"{where}: unknown key {key!r}{hint}; allowed keys here: "
                         f"{', '.join(allowed)}")


def _check_path(path: Path_, where: str) -> None:
    top = path[0]
    fields = list(Scenario.model_fields)
    if top not in fields:
        close = difflib.get_close_matches(str(top), fields, n=1)
        hint = f" (did you mean {close[0]!r}?)" if close else ""
        raise ScenarioError(f"{where}: unknown key path '{format_key(path)}'{hint}; a key path "
                            f"starts with one of: {', '.join(fields)}")
    if path == ("seed",):
        raise ScenarioError(f"{where}: 'seed' cannot be swept or set: each run's seed is "
                            "derived from the sweep's seed and the replicate; set the "
                            "top-level seed and [sweep] replicates instead")


def _values(path: Path_, value: Any, where: str) -> list[Any]:
    key = format_key(path)
    if not isinstance(value, list):
        raise ScenarioError(f"{where}: field '{key}': expected a list of values to sweep, "
                            f"such as [0, 0.01, 0.05]; got {value!r} (a single value goes in "
                            "[set])")
    if not value:
        raise ScenarioError(f"{where}: field '{key}': empty list; give at least one value")
    seen: set[str] = set()
    for v in value:
        text = canonical_text(v)
        if text in seen:
            raise ScenarioError(f"{where}: field '{key}': the value {toml_value(v)} is listed "
                                "twice; each value must appear once")
        seen.add(text)
    return value


def _int_field(data: dict[str, Any], key: str, where: str, lo: int, hi: int,
               default: int | None) -> int | None:
    value = data.get(key, default)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not lo <= value < hi:
        raise ScenarioError(f"{where}: field '{key}': must be an integer from {lo} to "
                            f"{hi - 1}; got {value!r}")
    return value


def load_sweep(path: str | Path, overrides: list[str] | None = None) -> Sweep:
    """Read and validate a sweep file and build (and validate) every run's scenario.

    ``overrides`` are ``KEY.PATH=VALUE`` strings applied to every run, like ``[set]``.
    Raises ScenarioError naming the sweep file, the field and what is allowed.
    """
    path = Path(path)
    src = str(path)
    data, text = _read(path)
    for key in data:
        if key not in TOP_KEYS:
            raise _unknown(src, key, TOP_KEYS)
    if not isinstance(data.get("scenario"), str):
        raise ScenarioError(f"{src}: field 'scenario' is required: the base scenario file, "
                            "relative to the sweep file, e.g. scenario = \"round_robin_rules.toml\"")
    base = (path.parent / data["scenario"]).resolve()
    if not base.is_file():
        raise ScenarioError(f"{src}: field 'scenario': no such scenario file: {base}")
    for key in ("name", "description"):
        if key in data and not isinstance(data[key], str):
            raise ScenarioError(f"{src}: field '{key}': must be a string; got {data[key]!r}")
    for key in ("set", "sweep", "report"):
        if key in data and not isinstance(data[key], dict):
            raise ScenarioError(f"{src}: field '{key}': must be a table ([{key}])")
    name = data.get("name", safe_name(path.stem))  # a file stem need not be a name
    problem = name_problem(name)  # the rule of scenario names: a file name, no "..", no ".x"
    if problem:
        raise ScenarioError(f"{src}: field 'name': {problem}; got {name!r}")

    # fixed overrides: [set] and --set
    fixed: dict[str, Any] = {}
    for p, value in flatten(data.get("set", {}), f"{src}: [set]"):
        _check_path(p, f"{src}: [set]")
        fixed[format_key(p)] = value
    for text_override in overrides or []:
        p, value = parse_override(text_override)
        p = parse_key(".".join(p), f"--set {text_override!r}")
        _check_path(p, f"--set {text_override!r}")
        fixed[format_key(p)] = value

    # the grid
    table = dict(data.get("sweep", {}))
    replicates = _int_field(table, "replicates", f"{src}: [sweep]", 1, MAX_REPLICATES + 1, 1)
    table.pop("replicates", None)
    zips = table.pop("zip", [])
    if isinstance(zips, dict):
        zips = [zips]
    if not isinstance(zips, list) or not all(isinstance(z, dict) for z in zips):
        raise ScenarioError(f"{src}: field 'sweep.zip': must be tables of lists of the same "
                            "length ([[sweep.zip]]), each varied together as one dimension")
    axes: list[Axis] = []
    seen_keys: dict[str, str] = {}

    def claim(p: Path_, where: str) -> str:
        key = format_key(p)
        _check_path(p, where)
        if key in seen_keys:
            raise ScenarioError(f"{where}: field '{key}' is swept twice ({seen_keys[key]} and "
                                "here); sweep each key once")
        seen_keys[key] = where.rsplit(": ", 1)[-1]
        return key

    for p, value in flatten(table, f"{src}: [sweep]"):
        key = claim(p, f"{src}: [sweep]")
        vals = _values(p, value, f"{src}: [sweep]")
        axes.append(Axis((key,), tuple((v,) for v in vals)))
    for i, group in enumerate(zips):
        where = f"{src}: [[sweep.zip]] #{i + 1}"
        leaves = flatten(group, where)
        if not leaves:
            raise ScenarioError(f"{where}: empty table; give two or more lists of the same "
                                "length")
        keys, columns = [], []
        for p, value in leaves:
            keys.append(claim(p, where))
            columns.append(_values(p, value, where))
        lengths = {k: len(c) for k, c in zip(keys, columns)}
        if len(set(lengths.values())) > 1:
            shown = ", ".join(f"{k}: {n}" for k, n in lengths.items())
            raise ScenarioError(f"{where}: zipped lists must have the same length; got {shown}")
        axes.append(Axis(tuple(keys), tuple(zip(*columns))))
    for key in seen_keys:
        if key in fixed:
            raise ScenarioError(f"{src}: field '{key}' is both in [set] and swept; keep one")

    # report
    report = data.get("report", {})
    for key in report:
        if key not in REPORT_KEYS:
            raise _unknown(f"{src}: [report]", key, REPORT_KEYS)
    metrics = report.get("metrics", list(DEFAULT_METRICS))
    if not isinstance(metrics, list) or not metrics or not all(isinstance(m, str) for m in metrics):
        raise ScenarioError(f"{src}: field 'report.metrics': a non-empty list of metric names "
                            "(columns of results.parquet), e.g. [\"cooperation_rate\"]")

    try:
        base_raw = tomllib.loads(base.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, tomllib.TOMLDecodeError) as exc:
        raise ScenarioError(f"{src}: field 'scenario': cannot read {base}: {exc}") from None
    seed = data.get("seed", base_raw.get("seed"))
    if "seed" not in data and seed is None:
        raise ScenarioError(f"{src}: field 'seed' is required (the master seed every run's seed "
                            "is derived from) when the base scenario has no seed; e.g. seed = 1")
    seed = _int_field({"seed": seed}, "seed", src, 0, 2**63, None)

    sweep = Sweep(path=path, name=name, description=data.get("description", ""), base=base,
                  seed=seed, replicates=replicates, keys=list(seen_keys), axes=axes, fixed=fixed,
                  metrics=list(metrics), text=text)
    _expand(sweep, base_raw)
    return sweep


# ------------------------------------------------------------------ expansion


def _expand(sweep: Sweep, base_raw: dict[str, Any]) -> None:
    src = str(sweep.path)
    combos = list(itertools.product(*[range(len(axis.values)) for axis in sweep.axes]))
    points: list[dict[str, Any]] = []
    for combo in combos:
        point: dict[str, Any] = {}
        for axis, j in zip(sweep.axes, combo):
            point.update(zip(axis.keys, axis.values[j]))
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
        for index, (point, (overrides, scenario)) in enumerate(zip(points, scenarios)):
            seed = derive_seed(sweep.seed, point, replicate)
            resolved = scenario.model_copy(update={"seed": seed}).to_toml_dict()
            digest = hashlib.sha256(canonical_text(resolved).encode()).hexdigest()[:8]
            llm = tuple(dict(spec.params) for spec in _named_policies(scenario)
                        if spec.name == "llm")
            runs_by_replicate.append(Run(
                run_id=f"{_slug(point)}-r{replicate}-{digest}", point=index,
                replicate=replicate, seed=seed, params=point, overrides=tuple(overrides),
                llm=llm))
    sweep.runs = runs_by_replicate  # replicate-major: early results cover every point


def _preflight(scenario: Scenario, base: Path) -> None:
    """Build the model once for rule-only points, so graph and population errors show
    before the sweep starts (an LLM model would be loaded, so those are checked when run)."""
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
