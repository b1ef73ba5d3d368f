"""The scenario file reference and the command-line reference, generated from the code.

The scenario schema (``abm.scenario``), the policy registry (``abm.policies``), the graph
kinds (``abm.graphs.GRAPH_KINDS``), the evolution update rules
(``abm.evolution.UPDATE_RULES``) and the LLM framings (``abm.llm.prompts.FRAMINGS``)
are the one source of truth: field descriptions are the attribute docstrings under
each field, and every registry entry is described by its own docstring. The
documentation site renders these pages at build time (``docs/hooks.py``);
``python -m abm.reference [scenario|cli]`` prints them.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import re
import sys
import types
import typing
from collections.abc import Callable, Iterable, Mapping
from typing import Annotated, Any, Literal, Union

import annotated_types
from pydantic import BaseModel
from pydantic.fields import FieldInfo
from pydantic_core import PydanticUndefined

# ---------------------------------------------------------------- registries


def graph_kinds() -> dict[str, type[BaseModel]]:
    """Graph kind name -> its pydantic config class.

    Returns:
        ``abm.graphs.GRAPH_KINDS``; where a build predates that registry, the members
        of the scenario's ``graph`` union, keyed by their ``kind``.
    """
    from abm import graphs

    registry = getattr(graphs, "GRAPH_KINDS", None)
    if isinstance(registry, dict):
        return dict(registry)
    from abm.scenario import Scenario

    members = _union_members(Scenario.model_fields["graph"].annotation)
    return {typing.get_args(m.model_fields["kind"].annotation)[0]: m for m in members}


def update_rules() -> dict[str, Any]:
    """Evolution update rule name -> the rule (a class or object with a docstring).

    Returns:
        ``abm.evolution.UPDATE_RULES``; where a build predates that registry, the
        names allowed by ``EvolutionConfig.rule``, each mapped to None.
    """
    from abm import evolution

    registry = getattr(evolution, "UPDATE_RULES", None)
    if isinstance(registry, dict):
        return dict(registry)
    from abm.scenario import EvolutionConfig

    return dict.fromkeys(_literal_values(EvolutionConfig.model_fields["rule"].annotation))


def framings() -> dict[str, Any]:
    """LLM framing name -> the framing (or what builds it).

    Returns:
        ``abm.llm.prompts.FRAMINGS``; where a build predates that registry, the names
        allowed by the LLM player's ``framing`` key, each mapped to None.
    """
    from abm.llm import prompts

    registry = getattr(prompts, "FRAMINGS", None)
    if isinstance(registry, dict):
        return dict(registry)
    from abm.policies.llm_params import LLMParams

    return dict.fromkeys(_literal_values(LLMParams.model_fields["framing"].annotation))


# ---------------------------------------------------------------- scenario reference

# The scenario's tables in the order a scenario file usually has them; any table the
# schema gains later is appended after these.
_SECTION_ORDER = (
    "game",
    "match",
    "memory",
    "graph",
    "population",
    "pairing",
    "output",
    "evolution",
)


def scenario_reference() -> str:
    """The scenario file reference as Markdown.

    Every table of a scenario and every key in it with its type, default and
    description; every graph kind, policy, LLM parameter, LLM framing and evolution
    update rule with its docstring and parameters.

    Returns:
        A Markdown document whose first heading is level 2, to be placed under a page
        title.
    """
    from abm.policies.llm_params import LLMParams
    from abm.scenario import PolicySpec, Scenario, Share

    out: list[str] = []
    sections = _sections(Scenario)
    top = [name for name in Scenario.model_fields if name not in sections]

    out += [
        "## Top level",
        "",
        "Keys outside any table. Every table is optional except `[graph]` and `[population]`.",
        "",
    ]
    out += _field_table(Scenario, top)

    for name, model in sections.items():
        field = Scenario.model_fields[name]
        if name == "graph":
            out += _graph_section()
            continue
        out += [f"## `[{name}]`", "", _table_line(field), ""]
        doc = _own_doc(model)
        if doc:
            out += [doc, ""]
        out += _field_table(model)
        if name == "population":
            out += ["### A mix entry", "", "Each element of `mix`.", ""]
            out += _field_table(Share)
            out += [
                "### A policy",
                "",
                'A policy is a registered name (`"tit_for_tat"`) or a table with '
                "`name`, the policy's own parameters and an optional `label`: "
                '`{ name = "random", p = 0.3, label = "Coin" }`.',
                "",
            ]
            out += _field_table(PolicySpec, ["name", "label"])
            out += _policy_section()
            out += _llm_section(LLMParams)
        if name == "evolution":
            out += _rules_section()
    return "\n".join(out).rstrip() + "\n"


def _sections(scenario: type[BaseModel]) -> dict[str, Any]:
    """The scenario's table-valued keys (name -> model class, or the graph union)."""
    found: dict[str, Any] = {}
    for name, field in scenario.model_fields.items():
        inner = _strip_optional(field.annotation)
        if name == "graph" or (isinstance(inner, type) and issubclass(inner, BaseModel)):
            found[name] = inner
    ordered = {k: found[k] for k in _SECTION_ORDER if k in found}
    ordered.update({k: v for k, v in found.items() if k not in ordered})
    return ordered


def _table_line(field: FieldInfo) -> str:
    """A table's one-line summary: whether it may be left out, and what it is for."""
    needed = "Required table" if field.is_required() else "Optional table"
    return f"*{needed}.* {field.description or ''}".rstrip()


def _graph_section() -> list[str]:
    from abm.scenario import Scenario

    kinds = graph_kinds()
    out = [
        "## `[graph]`",
        "",
        _table_line(Scenario.model_fields["graph"]),
        "",
        "`kind` picks the family; the other keys belong to that kind. Allowed kinds: "
        + ", ".join(f"[`{k}`](#graph-{_slug(k)})" for k in kinds)
        + ".",
        "",
    ]
    for kind, model in kinds.items():
        out += [f"### `{kind}` {{#graph-{_slug(kind)}}}", ""]
        doc = _own_doc(model)
        if doc:
            out += [doc, ""]
        out += _field_table(model, [n for n in model.model_fields if n != "kind"])
    return out


def _policy_section() -> list[str]:
    from abm.policies import REGISTRY

    out = [
        "### Policies",
        "",
        "Every registered policy. *Memory depth* is how many past rounds it reads (a "
        "`memory.window` shorter than that is refused).",
        "",
        "| name | memory depth | stochastic | parameters | behaviour |",
        "|---|---|---|---|---|",
    ]
    for name, info in REGISTRY.items():
        shown = f"`{name}`" + (
            " (alias " + ", ".join(f"`{a}`" for a in info.aliases) + ")" if info.aliases else ""
        )
        depth = "the whole window" if math.isinf(info.memory_depth) else f"{info.memory_depth:g}"
        if info.uses_llm:
            params = "see [LLM players](#llm-players)"
        else:
            params = (
                "; ".join(_param_text(n, f) for n, f in info.params.model_fields.items()) or "—"
            )
            if info.params.model_config.get("extra") == "allow":
                params += "; further keys go to the strategy"
        out.append(
            f"| {shown} | {depth} | {'yes' if info.stochastic else 'no'} | "
            f"{_cell(params)} | {_cell(info.description)} |"
        )
    return out + [""]


def _llm_section(params: type[BaseModel]) -> list[str]:
    out = [
        "### LLM players",
        "",
        'The keys of an `{ name = "llm", ... }` player; how prompts are built and '
        "answers read is in [LLM players](llm-players.md).",
        "",
    ]
    out += _field_table(params)
    out += ["### LLM framings", "", "The values of an LLM player's `framing` key.", ""]
    for name, framing in framings().items():
        out += [f"#### `{name}` {{#framing-{_slug(name)}}}", ""]
        doc = _entry_doc(framing)
        if doc:
            out += [doc, ""]
        # a framing's settings are the LLM player's keys in the table above
    return out


def _rules_section() -> list[str]:
    out = ["### Update rules", "", "The values of `evolution.rule`.", ""]
    for name, rule in update_rules().items():
        out += [f"#### `{name}` {{#rule-{_slug(name)}}}", ""]
        doc = _entry_doc(rule)
        if doc:
            out += [doc, ""]
        out += _entry_parameters(rule)
    return out


def _entry_doc(entry: Any) -> str:
    """A registry entry's own description: its ``description`` text or docstring."""
    if entry is None:
        return ""
    text = getattr(entry, "description", None)
    if isinstance(text, str) and text.strip():
        return inspect.cleandoc(text)
    return _summary(
        _own_doc(entry if inspect.isclass(entry) or inspect.isroutine(entry) else type(entry))
    )


def _summary(doc: str) -> str:
    """A docstring without its Google-style sections (Args, Returns, Raises ...).

    Those sections speak to programmers rather than to scenario authors.
    """
    kept: list[str] = []
    for line in doc.splitlines():
        if re.fullmatch(
            r"(Args|Arguments|Returns|Raises|Yields|Examples?|Attributes|Note)"
            r":\s*",
            line,
        ):
            break
        kept.append(line)
    return "\n".join(kept).strip()


def _entry_parameters(entry: Any) -> list[str]:
    """The parameters a registry entry takes, as a Markdown table (or nothing)."""
    params = getattr(entry, "params", None)
    if isinstance(params, Mapping):  # name -> default; typed and described by the schema
        return _mapping_table(params) if params else []
    model = _params_model(entry)
    if model is not None:
        names = [n for n in model.model_fields if n not in ("kind", "name")]
        return _field_table(model, names) if names else []
    if dataclasses.is_dataclass(entry):
        rows = [
            (
                f.name,
                _type_text(f.type) if not isinstance(f.type, str) else f.type,
                _default_text(f.default)
                if f.default is not dataclasses.MISSING
                else _default_text(getattr(entry, f.name, None))
                if not inspect.isclass(entry)
                else "required",
                "",
            )
            for f in dataclasses.fields(entry)
            if not f.name.startswith("_")
        ]
        return _table(rows) if rows else []
    if inspect.isroutine(entry):
        rows = []
        for p in inspect.signature(entry).parameters.values():
            default = "required" if p.default is p.empty else _default_text(p.default)
            kind = (
                ""
                if p.annotation is p.empty
                else (p.annotation if isinstance(p.annotation, str) else _type_text(p.annotation))
            )
            rows.append((p.name, kind, default, ""))
        return _table(rows) if rows else []
    return []


def _mapping_table(params: Mapping[str, Any]) -> list[str]:
    """Rule parameters given as name -> default, described by ``EvolutionConfig``."""
    from abm.scenario import EvolutionConfig

    fields = EvolutionConfig.model_fields
    rows = [
        (
            name,
            _field_type(fields[name]) if name in fields else "",
            _default_text(default),
            fields[name].description or "" if name in fields else "",
        )
        for name, default in params.items()
    ]
    return _table(rows)


def _params_model(entry: Any) -> type[BaseModel] | None:
    """The pydantic model holding an entry's parameters, if it has one."""
    if isinstance(entry, type) and issubclass(entry, BaseModel):
        return entry
    for attr in ("params", "Params", "config", "parameters"):
        value = getattr(entry, attr, None)
        if isinstance(value, type) and issubclass(value, BaseModel):
            return value
    return None


# ---------------------------------------------------------------- field tables


def _field_table(model: type[BaseModel], names: Iterable[str] | None = None) -> list[str]:
    fields = model.model_fields
    rows = [
        (
            name,
            _field_type(fields[name]),
            _field_default(fields[name]),
            fields[name].description or "",
        )
        for name in (names if names is not None else fields)
    ]
    return _table(rows)


def _table(rows: list[tuple[str, str, str, str]]) -> list[str]:
    out = ["| key | type | default | description |", "|---|---|---|---|"]
    out += [
        f"| `{name}` | {_cell(kind)} | {_cell(default)} | {_cell(text)} |"
        for name, kind, default, text in rows
    ]
    return out + [""]


def _field_type(field: FieldInfo) -> str:
    text = _type_text(field.annotation)
    bounds = _bounds(field.metadata)
    if not bounds:
        return text
    return f"{text}, {bounds}" if bounds.startswith("at ") else f"{text} {bounds}"


def _bounds(metadata: Iterable[Any]) -> str:
    parts = []
    for item in metadata:
        for attr, sign in (("ge", "≥"), ("gt", ">"), ("le", "≤"), ("lt", "<")):
            value = getattr(item, attr, None)
            if value is not None and isinstance(item, annotated_types.BaseMetadata):
                parts.append(f"{sign} {_bound(value)}")
        if isinstance(item, annotated_types.MinLen) and item.min_length:
            parts.append(f"at least {item.min_length} item{'s' * (item.min_length != 1)}")
        if isinstance(item, annotated_types.MaxLen):
            parts.append(f"at most {item.max_length} items")
    return ", ".join(parts)


def _bound(value: Any) -> str:
    """A bound as people write it: 1 rather than 1.0, 2^63 rather than its digits."""
    if isinstance(value, int) and value > 2**32 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    return (
        f"{value:,}".replace(",", "_")
        if isinstance(value, int) and value >= 100_000
        else str(value)
    )


def _field_default(field: FieldInfo) -> str:
    if field.is_required():
        return "required"
    if field.default_factory is not None:
        return _default_text(field.default_factory())  # type: ignore[call-arg]
    return _default_text(field.default)


def _default_text(value: Any) -> str:
    if value is None or value is PydanticUndefined:
        return "—"
    if isinstance(value, BaseModel):
        return "the table's defaults"
    return f"`{_toml(value)}`"


def _toml(value: Any) -> str:
    """A value as it is written in a scenario file."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value, ensure_ascii=False)
    if isinstance(value, float):
        return _number(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    if isinstance(value, dict):
        return (
            "{" + ", ".join(f"{k} = {_toml(v)}" for k, v in value.items()) + "}" if value else "{}"
        )
    if isinstance(value, BaseModel):
        return _toml(value.model_dump())
    return str(value)


def _number(value: Any) -> str:
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return f"{value:.1f}"
    return (
        f"{value:,}".replace(",", "_")
        if isinstance(value, int) and value >= 100_000
        else str(value)
    )


_NAMES = {int: "integer", float: "number", bool: "boolean", str: "string", Any: "any"}


def _type_text(tp: Any) -> str:
    """A Python annotation as a scenario author reads it (TOML types)."""
    origin = typing.get_origin(tp)
    if origin is Annotated:
        return _type_text(typing.get_args(tp)[0])
    if origin is Literal:
        return " or ".join(f"`{_toml(v)}`" for v in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        return " or ".join(_type_text(m) for m in members)
    if origin in (list, tuple, set, frozenset) or tp in (list, tuple):
        args = [a for a in typing.get_args(tp) if a is not Ellipsis]
        if origin is tuple and len(args) > 1 and len(set(args)) == 1:
            return f"{len(args)} {_plural(_type_text(args[0]))}"
        inner = " or ".join(dict.fromkeys(_type_text(a) for a in args)) or "values"
        return f"list of {_plural(inner)}"
    if origin is dict or tp is dict:
        return "table"
    if tp in _NAMES:
        return _NAMES[tp]
    if isinstance(tp, type) and issubclass(tp, BaseModel):
        return "policy" if tp.__name__ == "PolicySpec" else "table"
    return getattr(tp, "__name__", str(tp))


def _plural(text: str) -> str:
    if text in ("policy",):
        return "policies"
    return text if " " in text or text.endswith("s") else text + "s"


def _param_text(name: str, field: FieldInfo) -> str:
    bounds = _bounds(field.metadata)
    default = _field_default(field)
    text = f"`{name}` ({_type_text(field.annotation)}"
    text += f" {bounds}" if bounds else ""
    text += f", default {default}" if default not in ("—", "required") else ""
    text += ", required" if default == "required" else ""
    text += ")"
    return text + (f": {field.description}" if field.description else "")


def _own_doc(obj: Any) -> str:
    """A class's or function's own docstring, or "".

    Pydantic's generic BaseModel text and docstrings inherited from a base class are not
    the object's description.
    """
    doc = obj.__dict__.get("__doc__") if isinstance(obj, type) else getattr(obj, "__doc__", None)
    return inspect.cleandoc(doc) if doc else ""


def _cell(text: str) -> str:
    """Text fit for one Markdown table cell."""
    return " ".join(str(text).split()).replace("|", "\\|") or "—"


def _slug(text: str) -> str:
    return "".join(ch if ch.isalnum() else "-" for ch in text.lower()).strip("-")


def _strip_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (Union, types.UnionType):
        members = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(members) == 1:
            return members[0]
    return tp


def _union_members(tp: Any) -> list[type[BaseModel]]:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return [m for m in typing.get_args(tp) if isinstance(m, type) and issubclass(m, BaseModel)]


def _literal_values(tp: Any) -> list[Any]:
    while typing.get_origin(tp) is Annotated:
        tp = typing.get_args(tp)[0]
    return list(typing.get_args(tp)) if typing.get_origin(tp) is Literal else []


# ---------------------------------------------------------------- command-line reference

# (command as typed, the module whose main() parses it, the arguments that ask for help)
COMMANDS: tuple[tuple[str, str, tuple[str, ...]], ...] = (
    ("python -m abm.run", "abm.run", ("--help",)),
    ("python -m abm.batch", "abm.batch.__main__", ("--help",)),
    ("python -m abm.batch report", "abm.batch.__main__", ("report", "--help")),
    ("python -m abm.export", "abm.export", ("--help",)),
    ("python -m abm.finetune", "abm.finetune.__main__", ("--help",)),
    ("python -m abm.compare", "abm.compare", ("--help",)),
    ("python -m abm.viz", "abm.viz.server", ("--help",)),
)


def command_help(module: str, args: tuple[str, ...]) -> str:
    """What ``python -m MODULE ARGS`` prints for ``--help``, from the command's own parser.

    Args:
        module: the module whose ``main(argv)`` parses the command line.
        args: the arguments, ending in ``--help``.

    Returns:
        The help text, wrapped at 100 columns whatever the terminal.

    Raises:
        RuntimeError: when the command does not print help and exit.
    """
    import importlib

    main: Callable[[list[str]], Any] = importlib.import_module(module).main
    buffer = io.StringIO()
    saved = os.environ.get("COLUMNS")
    os.environ["COLUMNS"] = "100"  # argparse wraps at the terminal width; pages do not have one
    try:
        with contextlib.redirect_stdout(buffer), contextlib.suppress(SystemExit):
            main(list(args))
    finally:
        if saved is None:
            os.environ.pop("COLUMNS", None)
        else:
            os.environ["COLUMNS"] = saved
    text = buffer.getvalue()
    if "usage:" not in text:
        raise RuntimeError(f"python -m {module} {' '.join(args)} printed no help")
    return text.rstrip() + "\n"


def cli_reference() -> str:
    """The command-line reference as Markdown: each command's ``--help`` text.

    Returns:
        A Markdown document with one level-2 section per command.
    """
    out: list[str] = []
    for command, module, args in COMMANDS:
        out += [f"## `{command}`", "", "```text", command_help(module, args).rstrip(), "```", ""]
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    """Print the scenario reference (default) or the command-line reference.

    Args:
        argv: The arguments after the program name; ``sys.argv[1:]`` when None.

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(
        prog="python -m abm.reference",
        description=("Print a reference page generated from the code, as Markdown."),
    )
    parser.add_argument("page", nargs="?", choices=("scenario", "cli"), default="scenario")
    page = parser.parse_args(argv).page
    sys.stdout.write(scenario_reference() if page == "scenario" else cli_reference())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
