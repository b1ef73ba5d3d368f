"""Sweep files: a base scenario, a grid of dotted keys, replicates; expanded into runs.

A sweep file names a base scenario (relative to the sweep file) and a ``[sweep]``
table whose leaves are lists of values. Every run is the base scenario with some
``--set`` overrides and a seed, so each run is exactly ``python -m abm.run BASE
--seed SEED --set ...`` and is validated the same way before anything starts.
"""

from __future__ import annotations

import copy
import difflib
import hashlib
import itertools
import json
import math
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import tomli_w

from abm.errors import ScenarioError
from abm.scenario import Scenario, load_scenario, parse_override

TOP_KEYS = ("scenario", "name", "description", "seed", "set", "sweep", "report")
SWEEP_KEYS = ("replicates", "zip")
REPORT_KEYS = ("metrics",)
DEFAULT_METRICS = ("cooperation_rate", "mean_payoff")
MAX_REPLICATES = 1_000_000

Path_ = tuple[str | int, ...]  # a key path: table keys and list indices

_SEGMENT = re.compile(r"^([A-Za-z0-9_-]+)((?:\[\d+\])*)$")


# ------------------------------------------------------------------ key paths


def parse_key(text: str, where: str) -> Path_:
    """``"population.players[5].framing"`` -> ("population", "players", 5, "framing")."""
    parts: list[str | int] = []
    for segment in text.split("."):
        match = _SEGMENT.match(segment.strip())
        if not match:
            raise ScenarioError(f"{where}: key {text!r} is not a key path; write dotted keys "
                                "such as game.noise, with [i] to pick a list element, as in "
                                "\"population.players[5].framing\"")
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return tuple(parts)


def format_key(path: Path_) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def _flatten(table: dict[str, Any], where: str, prefix: Path_ = ()) -> list[tuple[Path_, Any]]:
    """Nested tables (from dotted TOML keys) -> (path, leaf value) pairs, in file order."""
    out: list[tuple[Path_, Any]] = []
    for key, value in table.items():
        path = prefix + parse_key(key, where)
        if isinstance(value, dict):
            out += _flatten(value, where, path)
        else:
            out.append((path, value))
    return out


# ------------------------------------------------------------------ values


def canonical(value: Any) -> Any:
    """A JSON-ready form in which equal TOML values are equal (0 and 0.0 alike)."""
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    if isinstance(value, int):
        return value
    if isinstance(value, float):
        if math.isfinite(value) and value.is_integer() and abs(value) < 2**53:
            return int(value)
        return value if math.isfinite(value) else repr(value)
    if isinstance(value, dict):
        return {str(k): canonical(v) for k, v in sorted(value.items())}
    if isinstance(value, (list, tuple)):
        return [canonical(v) for v in value]
    return str(value)  # dates and times


def canonical_text(value: Any) -> str:
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))


def toml_value(value: Any) -> str:
    """A value as inline TOML, as ``--set KEY=VALUE`` reads it."""
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = "):]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def label(value: Any) -> Any:
    """How a swept value is shown in tables and charts: scalars as they are, tables
    as ``kind(key=value, ...)``, lists as text."""
    if isinstance(value, dict):
        rest = {k: v for k, v in value.items() if k != "kind"}
        inner = ", ".join(f"{k}={label(v)}" for k, v in rest.items())
        if "kind" in value:
            return f"{value['kind']}({inner})" if inner else str(value["kind"])
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(label(v)) for v in value) + "]"
    return value


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
    name = data.get("name", path.stem)
    if not re.fullmatch(r"[A-Za-z0-9._-]+", name):
        raise ScenarioError(f"{src}: field 'name': letters, digits, '.', '_' and '-' only "
                            f"(it names the output folder); got {name!r}")

    # fixed overrides: [set] and --set
    fixed: dict[str, Any] = {}
    for p, value in _flatten(data.get("set", {}), f"{src}: [set]"):
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

    for p, value in _flatten(table, f"{src}: [sweep]"):
        key = claim(p, f"{src}: [sweep]")
        vals = _values(p, value, f"{src}: [sweep]")
        axes.append(Axis((key,), tuple((v,) for v in vals)))
    for i, group in enumerate(zips):
        where = f"{src}: [[sweep.zip]] #{i + 1}"
        leaves = _flatten(group, where)
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


def _set_path(data: dict[str, Any], path: Path_, value: Any, where: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        here = format_key(path[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ScenarioError(f"{where}: field '{format_key(path)}': {format_key(path[:i])} "
                                    f"has {size} elements, so there is no [{part}]")
            if node[part] is None or (not isinstance(node[part], (dict, list))):
                if isinstance(nxt, str) and isinstance(node[part], str):
                    node[part] = {"name": node[part]}  # a bare policy name becomes a table
                else:
                    raise ScenarioError(f"{where}: field '{format_key(path)}': {here} is a "
                                        "value, not a table")
            node = node[part]
            continue
        if not isinstance(node, dict):
            raise ScenarioError(f"{where}: field '{format_key(path)}': "
                                f"{format_key(path[:i]) or 'the scenario'} is "
                                f"{'a list; pick an element with [i]' if isinstance(node, list) else 'a value, not a table'}")
        if isinstance(nxt, int):
            if not isinstance(node.get(part), list):
                raise ScenarioError(f"{where}: field '{format_key(path)}': {here} is not a list "
                                    "in the base scenario, so it has no elements to pick")
        else:
            if part not in node:
                node[part] = {}
            elif isinstance(node[part], str) and isinstance(nxt, str) and path[0] == "population":
                node[part] = {"name": node[part]}  # policy = "name" -> policy = { name = ... }
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ScenarioError(f"{where}: field '{format_key(path)}': no element [{last}]")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        raise ScenarioError(f"{where}: field '{format_key(path)}': {format_key(path[:-1])} is a "
                            f"{'list; pick an element with [i]' if isinstance(node, list) else 'value, not a table'}")


def _get_path(data: Any, path: Path_) -> Any:
    for part in path:
        data = data[part]
    return data


def overrides_for(base_raw: dict[str, Any], settings: dict[str, Any], where: str) -> list[str]:
    """``--set`` strings that turn the base scenario into the one with ``settings``.

    A key that picks a list element (``population.players[5].framing``) is given to
    ``--set`` as the whole list with that element changed, since ``--set`` has no
    list indices; tables are set before the keys inside them.
    """
    final = copy.deepcopy(base_raw)
    order: dict[Path_, int] = {}
    paths = [(parse_key(key, where), value) for key, value in settings.items()]
    paths.sort(key=lambda pv: len(pv[0]))  # whole tables before the keys inside them
    for p, value in paths:
        _set_path(final, p, copy.deepcopy(value), where)
        first_index = next((i for i, part in enumerate(p) if isinstance(part, int)), None)
        collapsed = p if first_index is None else p[:first_index]
        order.setdefault(collapsed, len(order))
    result = []
    for collapsed in sorted(order, key=lambda c: (len(c), order[c])):
        result.append(f"{format_key(collapsed)}={toml_value(_get_path(final, collapsed))}")
    return result


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
