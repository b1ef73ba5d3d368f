"""How config files are read and how what is wrong with them is said, one way for all.

Scenario files and sweep files are TOML read by ``read_toml`` and checked by pydantic
models; ``explain`` turns pydantic's report into the one paragraph a user sees
(``FILE: field 'game.noise': ...; unknown key 'x' (did you mean 'y'?); allowed keys
here: ...``), ``did_you_mean`` is the hint of every unknown name and ``dotted`` spells
every field path (``population.players[5].model``).
"""

from __future__ import annotations

import difflib
import re
import tomllib
import types
import typing
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Annotated, Any, Union

from pydantic import BaseModel, ValidationError

from abm.errors import ScenarioError

# A field marked so (``Field(json_schema_extra=INLINE)``) holds keys that the file writes
# directly in the enclosing table (the grid of a sweep's [sweep]); paths leave it out.
INLINE = {"inline": True}

_TOML_PLACE = re.compile(r"\s*\(at (?:line (\d+), column (\d+)|end of document)\)$")


# ------------------------------------------------------------------ reading


def read_toml(path: str | Path, what: str) -> tuple[dict[str, Any], str]:
    """Read a TOML file as a dict, with its text.

    Args:
        path: the file.
        what: what the file is, as errors name it ("scenario file", "sweep file").

    Returns:
        The parsed tables and the file's text.

    Raises:
        ScenarioError: one paragraph starting with the path when the file is missing, is
            a folder, cannot be read, is not UTF-8 or is not valid TOML (with the line and
            column of the problem).
    """
    path = Path(path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        raise ScenarioError(f"{path}: no such {what}") from None
    except IsADirectoryError:
        raise ScenarioError(f"{path}: is a folder, not a {what}; give the file itself") from None
    except OSError as exc:
        raise ScenarioError(f"{path}: cannot read the {what} ({exc.strerror or exc})") from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        column = exc.start - (raw.rfind(b"\n", 0, exc.start) + 1) + 1
        raise ScenarioError(
            f"{path}: the {what} is not UTF-8 text (byte "
            f"0x{raw[exc.start]:02x} at line {line}, column {column}); save "
            "it as UTF-8"
        ) from None
    try:
        return tomllib.loads(text), text
    except tomllib.TOMLDecodeError as exc:
        raise ScenarioError(f"{path}: not valid TOML: {_toml_problem(str(exc), text)}") from None


def _toml_problem(message: str, text: str) -> str:
    """Reword a TOML error so that its place is always a line and a column.

    Python 3.11's tomllib says "at end of document" for a problem on the last line.
    """
    match = _TOML_PLACE.search(message)
    if not match:
        return message
    if match.group(1):
        line, column = int(match.group(1)), int(match.group(2))
    else:
        lines = text.split("\n")
        line, column = len(lines), len(lines[-1]) + 1
    return f"{message[: match.start()]} (at line {line}, column {column})"


# ------------------------------------------------------------------ names and paths


def did_you_mean(word: object, allowed: Iterable[str], n: int = 1) -> str:
    """The hint after an unknown name: `` (did you mean 'noise'?)``.

    Args:
        word: the unknown name as given.
        allowed: the names allowed there.
        n: how many close names to offer at most.

    Returns:
        `` (did you mean 'a'?)``, `` (did you mean 'a' or 'b'?)``, `` (did you mean 'a',
        'b' or 'c'?)`` (closest first), or "".
    """
    close = difflib.get_close_matches(str(word), list(allowed), n=n)
    if not close:
        return ""
    shown = [repr(c) for c in close]
    names = shown[0] if len(shown) == 1 else f"{', '.join(shown[:-1])} or {shown[-1]}"
    return f" (did you mean {names}?)"


def dotted(path: Iterable[str | int]) -> str:
    """A field path as a file spells it.

    ``("population", "players", 5, "model")`` becomes ``population.players[5].model``.
    """
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


# ------------------------------------------------------------------ pydantic's report


def field_error(source: str, path: Sequence[str | int], message: str) -> ScenarioError:
    """The error of one field found wrong outside pydantic, worded as ``explain`` words it.

    Args:
        source: The file, first in the message.
        path: The field's path, as ``dotted`` takes it.
        message: What is wrong and what is allowed.

    Returns:
        ``ScenarioError("SOURCE: field 'a.b[2]': MESSAGE")``, to be raised.
    """
    return ScenarioError(f"{source}: field '{dotted(path)}': {message}")


def explain(
    exc: ValidationError,
    source: str,
    root: type[BaseModel],
    set_keys: Sequence[str] = (),
    required: Mapping[str, str] | None = None,
    whole: str = "the scenario",
) -> str:
    """Pydantic's report on a file as one paragraph naming the file and every field.

    Args:
        exc: what ``root.model_validate`` raised.
        source: the file, first in the paragraph.
        root: the model the file was validated as.
        set_keys: fields given on the command line (``--set``), which the paragraph marks.
        required: for required fields (by path), what the field is, said after "is
            required".
        whole: how a problem of the whole file is introduced.

    Returns:
        ``SOURCE: PROBLEM; PROBLEM ...``.
    """
    problems = []
    for err in exc.errors(include_url=False):
        loc = tuple(err["loc"])
        shown, is_key = _shown_path(root, loc)
        field = dotted(shown)
        where = (
            " (set with --set)"
            if any(_within(field, k) or (field and _within(k, field)) for k in set_keys)
            else ""
        )
        kind = err["type"]
        if kind == "extra_forbidden":
            allowed = _keys_at(root, loc[:-1])
            problems.append(
                f"unknown key '{field}'{where}{did_you_mean(loc[-1], allowed)}; "
                f"allowed keys here: {', '.join(allowed)}"
            )
        elif kind == "missing":
            what = (required or {}).get(field)
            problems.append(f"field '{field}' is required{where}{f': {what}' if what else ''}")
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            tag = err["ctx"]["discriminator"].strip("'\"")
            allowed = ", ".join(_tags(_type_at(root, loc), tag))
            if kind == "union_tag_invalid":
                problems.append(
                    f"field '{field}.{tag}'{where}: unknown {shown[-1]} {tag} "
                    f"{err['ctx']['tag']!r}; allowed: {allowed}"
                )
            else:
                problems.append(f"field '{field}.{tag}' is required{where}; allowed: {allowed}")
        else:
            msg = err["msg"].removeprefix("Value error, ")
            if kind in ("model_type", "dict_type"):
                msg = "must be a table"  # TOML's word; "a dictionary or instance of X" is not
            got = err.get("input")
            shown_got = (
                "" if is_key or isinstance(got, dict) or got is None else f" (got {_as_toml(got)})"
            )
            name = f"field '{field}'" if field else whole
            problems.append(f"{name}{where}: {msg}{shown_got}")
    return f"{source}: " + "; ".join(problems)


def _as_toml(got: Any) -> str:
    text = ("true" if got else "false") if isinstance(got, bool) else repr(got)
    if len(text) > 80:  # a 300-character name need not be shown whole
        text = f"{text[:60]}... ({len(got) if isinstance(got, str) else len(text)} characters)"
    return text


def _within(field: str, key: str) -> bool:
    """Whether ``field`` is ``key`` or lies inside it (``a.b[2].c`` inside ``a.b``)."""
    return field == key or field.startswith((key + ".", key + "["))


def _shown_path(root: Any, loc: tuple[Any, ...]) -> tuple[tuple[Any, ...], bool]:
    """Pydantic's location as the file spells it, and whether it is a table key's own error.

    Pydantic puts a discriminated union's tag, an inline field's name and "[key]" in the
    location; a file never writes them.
    """
    shown: list[Any] = []
    node: Any = root
    is_key = False
    for part in loc:
        node, hidden = _step(node, part)
        if part == "[key]":
            is_key = True
        elif not hidden:
            shown.append(part)
    return tuple(shown), is_key


def _type_at(root: Any, loc: tuple[Any, ...]) -> Any:
    node = root
    for part in loc:
        node, _ = _step(node, part)
    return _unwrap(node)


def _keys_at(root: Any, loc: tuple[Any, ...]) -> list[str]:
    """The keys a file may write in the table at ``loc``."""
    model = _type_at(root, loc)
    if isinstance(model, type) and issubclass(model, BaseModel):
        return [name for name, info in model.model_fields.items() if not _inline(info)]
    return []


def _tags(members: Any, tag: str) -> list[str]:
    if not isinstance(members, list):
        return []
    return [
        value
        for member in members
        if tag in member.model_fields
        for value in typing.get_args(member.model_fields[tag].annotation)
    ]


def _inline(info: Any) -> bool:
    extra = info.json_schema_extra
    return isinstance(extra, dict) and bool(extra.get("inline"))


def _step(node: Any, part: Any) -> tuple[Any, bool]:
    """The type one location part further in, and whether the file leaves the part out."""
    node = _unwrap(node)
    if isinstance(node, list):  # union members: a discriminated union's tag
        for member in node:
            fields = getattr(member, "model_fields", {})
            if any(part in typing.get_args(info.annotation) for info in fields.values()):
                return member, True
        return None, False
    origin = typing.get_origin(node)
    if origin in (list, tuple):
        args = typing.get_args(node)
        return (args[0] if args else None), False
    if origin is dict:
        args = typing.get_args(node)
        if part == "[key]":
            return (args[0] if args else None), True
        return (args[1] if len(args) == 2 else None), False
    if isinstance(node, type) and issubclass(node, BaseModel) and part in node.model_fields:
        info = node.model_fields[part]
        return info.annotation, _inline(info)
    return None, False


def _unwrap(tp: Any) -> Any:
    """Strip Annotated and Optional from a type.

    Returns:
        A model class, a list or dict type, or a list of union members.
    """
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
        else:
            return tp
