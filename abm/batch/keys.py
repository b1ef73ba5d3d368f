"""Dotted key paths of a sweep file and the ``--set`` overrides built from them.

A key path is written ``game.noise`` or ``population.players[5].framing``; the
overrides apply one parameter point to the base scenario.
"""

from __future__ import annotations

import copy
import json
import math
import re
from typing import Any

import tomli_w

from abm.errors import ScenarioError
from abm.validation import dotted

Path_ = tuple[str | int, ...]  # a key path: table keys and list indices

_SEGMENT = re.compile(r"^([A-Za-z0-9_-]+)((?:\[\d+\])*)$")


# ------------------------------------------------------------------ key paths


NOT_A_KEY_PATH = (
    "not a key path; write dotted keys such as game.noise, with [i] to pick "
    'a list element, as in "population.players[5].framing"'
)


def key_path(text: str) -> Path_ | None:
    """Split a dotted key into its table keys and list indices.

    ``"population.players[5].framing"`` becomes ``("population", "players", 5, "framing")``.

    Args:
        text: The key as written in a sweep file or a ``--set`` option.

    Returns:
        The key path, or None when ``text`` is no key path.
    """
    parts: list[str | int] = []
    for segment in text.split("."):
        match = _SEGMENT.match(segment.strip())
        if not match:
            return None
        parts.append(match.group(1))
        parts.extend(int(i) for i in re.findall(r"\[(\d+)\]", match.group(2)))
    return tuple(parts)


def parse_key(text: str, where: str) -> Path_:
    """Split a dotted key like ``key_path``, refusing text that is no key path.

    Args:
        text: The key as written.
        where: The file or option the key comes from; it starts the error message.

    Returns:
        The key path.

    Raises:
        ScenarioError: When ``text`` is no key path.
    """
    path = key_path(text)
    if path is None:
        raise ScenarioError(f"{where}: key {text!r} is {NOT_A_KEY_PATH}")
    return path


def joined(table: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested tables (from dotted TOML keys) -> {dotted key: leaf value}, in file order.

    Keys are spelt as ``dotted`` spells their path, so ``game.noise`` and
    ``"game.noise"`` are one key; a key that is no key path is kept as written.

    Raises:
        ValueError: when one key is written twice (in two spellings).
    """
    out: dict[str, Any] = {}
    for key, value in table.items():
        full = f"{prefix}.{key}" if prefix else str(key)
        leaves = joined(value, full) if isinstance(value, dict) else {full: value}
        for leaf, leaf_value in leaves.items():
            path = key_path(leaf)
            name = leaf if path is None else dotted(path)
            if name in out:
                raise ValueError(f"key '{name}' is written twice; give each key once")
            out[name] = leaf_value
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
    """The compact, key-sorted JSON text of ``canonical(value)``, equal for equal values."""
    return json.dumps(canonical(value), sort_keys=True, separators=(",", ":"))


def toml_value(value: Any) -> str:
    """A value as inline TOML, as ``--set KEY=VALUE`` reads it."""
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(k)} = {toml_value(v)}" for k, v in value.items())
        return "{" + items + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    return tomli_w.dumps({"v": value}).strip()[len("v = ") :]


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)


def label(value: Any) -> Any:
    """How a swept value is shown in tables and charts.

    Scalars stay as they are; tables become ``kind(key=value, ...)`` (or
    ``{key=value, ...}`` without a ``kind``); lists become text.
    """
    if isinstance(value, dict):
        rest = {k: v for k, v in value.items() if k != "kind"}
        inner = ", ".join(f"{k}={label(v)}" for k, v in rest.items())
        if "kind" in value:
            return f"{value['kind']}({inner})" if inner else str(value["kind"])
        return "{" + inner + "}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(str(label(v)) for v in value) + "]"
    return value


def _set_path(data: dict[str, Any], path: Path_, value: Any, where: str) -> None:
    node: Any = data
    for i, part in enumerate(path[:-1]):
        nxt = path[i + 1]
        here = dotted(path[: i + 1])
        if isinstance(part, int):
            if not isinstance(node, list) or part >= len(node):
                size = len(node) if isinstance(node, list) else 0
                raise ScenarioError(
                    f"{where}: field '{dotted(path)}': {dotted(path[:i])} "
                    f"has {size} elements, so there is no [{part}]"
                )
            if node[part] is None or (not isinstance(node[part], (dict, list))):
                if isinstance(nxt, str) and isinstance(node[part], str):
                    node[part] = {"name": node[part]}  # a bare policy name becomes a table
                else:
                    raise ScenarioError(
                        f"{where}: field '{dotted(path)}': {here} is a value, not a table"
                    )
            node = node[part]
            continue
        if not isinstance(node, dict):
            what = (
                "a list; pick an element with [i]"
                if isinstance(node, list)
                else "a value, not a table"
            )
            raise ScenarioError(
                f"{where}: field '{dotted(path)}': {dotted(path[:i]) or 'the scenario'} is {what}"
            )
        if isinstance(nxt, int):
            if not isinstance(node.get(part), list):
                raise ScenarioError(
                    f"{where}: field '{dotted(path)}': {here} is not a list "
                    "in the base scenario, so it has no elements to pick"
                )
        else:
            if part not in node:
                node[part] = {}
            elif isinstance(node[part], str) and isinstance(nxt, str) and path[0] == "population":
                node[part] = {"name": node[part]}  # policy = "name" -> policy = { name = ... }
        node = node[part]
    last = path[-1]
    if isinstance(last, int):
        if not isinstance(node, list) or last >= len(node):
            raise ScenarioError(f"{where}: field '{dotted(path)}': no element [{last}]")
        node[last] = value
    elif isinstance(node, dict):
        node[last] = value
    else:
        what = "list; pick an element with [i]" if isinstance(node, list) else "value, not a table"
        raise ScenarioError(f"{where}: field '{dotted(path)}': {dotted(path[:-1])} is a {what}")


def _get_path(data: Any, path: Path_) -> Any:
    for part in path:
        data = data[part]
    return data


def overrides_for(base_raw: dict[str, Any], settings: dict[str, Any], where: str) -> list[str]:
    """``--set`` strings that turn the base scenario into the one with ``settings``.

    A key that picks a list element (``population.players[5].framing``) is given to
    ``--set`` as the whole list with that element changed (one override per list,
    whichever of its elements the sweep sets); tables are set before the keys
    inside them.
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
        result.append(f"{dotted(collapsed)}={toml_value(_get_path(final, collapsed))}")
    return result
