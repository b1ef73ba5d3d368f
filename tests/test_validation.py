"""The shared reading and wording of config-file errors: read_toml, did_you_mean, dotted
and explain, each against expectations written out by hand."""

from typing import Annotated, Literal

import pytest
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, ValidationError

from abm.errors import ScenarioError
from abm.validation import INLINE, did_you_mean, dotted, explain, field_error, read_toml

# ------------------------------------------------------------------ read_toml


@pytest.mark.parametrize(
    "content, message",
    [
        (None, "{path}: no such sweep file"),
        ("folder", "{path}: is a folder, not a sweep file; give the file itself"),
        (
            b'a = 1\nb = "\xff"\n',
            "{path}: the sweep file is not UTF-8 text (byte 0xff at line 2, "
            "column 6); save it as UTF-8",
        ),
        (
            b"\xfe",
            "{path}: the sweep file is not UTF-8 text (byte 0xfe at line 1, column 1); "
            "save it as UTF-8",
        ),
        (
            "a = 1\n[game\nx = 2\n",
            "{path}: not valid TOML: Expected ']' at the end of a table "
            "declaration (at line 2, column 6)",
        ),
        # tomllib says "at end of document" for the last line; the place is given all the same
        (
            "a = 1\n[x",
            "{path}: not valid TOML: Expected ']' at the end of a table declaration "
            "(at line 2, column 3)",
        ),
        (
            "a = 1\na = 2\n",
            "{path}: not valid TOML: Cannot overwrite a value (at line 2, column 6)",
        ),
    ],
    ids=[
        "missing",
        "folder",
        "not UTF-8",
        "not UTF-8 at the start",
        "bad table",
        "bad table at the end",
        "key twice",
    ],
)
def test_read_toml_errors(tmp_path, content, message):
    path = tmp_path / "sweep.toml"
    if content == "folder":
        path.mkdir()
    elif isinstance(content, bytes):
        path.write_bytes(content)
    elif content is not None:
        path.write_text(content, encoding="utf-8")
    with pytest.raises(ScenarioError) as info:
        read_toml(path, "sweep file")
    assert str(info.value) == message.format(path=path)


def test_read_toml_returns_the_tables_and_the_text(tmp_path):
    text = 'name = "x"\n[game]\nnoise = 0.5\n'
    (tmp_path / "s.toml").write_text(text, encoding="utf-8")
    assert read_toml(tmp_path / "s.toml", "scenario file") == (
        {"name": "x", "game": {"noise": 0.5}},
        text,
    )


# ------------------------------------------------------------------ did_you_mean


@pytest.mark.parametrize(
    "word, allowed, n, hint",
    [
        ("nosie", ["kind", "noise"], 1, " (did you mean 'noise'?)"),
        ("xyz", ["kind", "noise"], 1, ""),
        ("anything", [], 1, ""),
        # ratios 10/11, 8/9 and 8/10: closest first
        ("noise", ["poise", "nois", "noise1"], 3, " (did you mean 'noise1', 'nois' or 'poise'?)"),
        ("noise", ["poise", "nois", "noise1"], 2, " (did you mean 'noise1' or 'nois'?)"),
        ("noise", ["poise", "nois", "noise1"], 1, " (did you mean 'noise1'?)"),
        (7, ["7a", "b"], 1, " (did you mean '7a'?)"),  # a list index is looked up as text
    ],
)
def test_did_you_mean(word, allowed, n, hint):
    assert did_you_mean(word, allowed, n=n) == hint


# ------------------------------------------------------------------ dotted


@pytest.mark.parametrize(
    "path, text",
    [
        ((), ""),
        (("game",), "game"),
        (("game", "noise"), "game.noise"),
        (("population", "players", 5, "model"), "population.players[5].model"),
        (("population", "players", 5), "population.players[5]"),
        (("sweep", "zip", 0, "game.noise"), "sweep.zip[0].game.noise"),
        (("grid", 2, 3), "grid[2][3]"),
        ((0, "x"), "[0].x"),
    ],
)
def test_dotted(path, text):
    assert dotted(path) == text


def test_field_error_reads_like_explain():
    error = field_error("s.toml", ("sweep", "zip", 1, "game.noise"), "swept twice")
    assert isinstance(error, ScenarioError)
    assert str(error) == "s.toml: field 'sweep.zip[1].game.noise': swept twice"


# ------------------------------------------------------------------ explain


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


class Inner(_Strict):
    noise: float = Field(0.0, le=1.0)


class ShapeA(_Strict):
    kind: Literal["a"]
    x: int = 0


class ShapeB(_Strict):
    kind: Literal["b"]


def _short(key: str) -> str:
    if len(key) > 3:
        raise ValueError("keys are at most 3 characters")
    return key


class Root(_Strict):
    shape: Annotated[ShapeA | ShapeB, Field(discriminator="kind")]
    inner: Inner = Inner()
    items: list[Inner] = []
    # written directly in the file's top table, so paths leave its name out
    extra: dict[Annotated[str, AfterValidator(_short)], int] = Field(
        default_factory=dict, json_schema_extra=INLINE
    )


A = {"kind": "a"}


@pytest.mark.parametrize(
    "data, kwargs, message",
    [
        (
            {"shape": A, "inner": {"nosie": 1}},
            {},
            "unknown key 'inner.nosie' (did you mean 'noise'?); allowed keys here: noise",
        ),
        (
            {"shape": A, "inner": {"nosie": 1}, "item": []},
            {},
            "unknown key 'inner.nosie' (did you mean 'noise'?); allowed keys here: noise; unknown "
            "key 'item' (did you mean 'items'?); allowed keys here: shape, inner, items",
        ),
        ({}, {}, "field 'shape' is required"),
        (
            {},
            {"required": {"shape": "a table with a kind"}},
            "field 'shape' is required: a table with a kind",
        ),
        ({"shape": {"kind": "c"}}, {}, "field 'shape.kind': unknown shape kind 'c'; allowed: a, b"),
        ({"shape": {}}, {}, "field 'shape.kind' is required; allowed: a, b"),
        (
            {"shape": {"kind": "a", "x": "1"}},
            {},
            "field 'shape.x': Input should be a valid integer (got '1')",
        ),
        (
            {"shape": A, "items": [{}, {"noise": 2}]},
            {},
            "field 'items[1].noise': Input should be less than or equal to 1 (got 2)",
        ),
        (
            {"shape": A, "items": [{"noise": True}]},
            {},
            "field 'items[0].noise': Input should be a valid number (got true)",
        ),
        ({"shape": A, "inner": 3}, {}, "field 'inner': must be a table (got 3)"),
        (
            {"shape": A, "inner": {"noise": 2}},
            {"set_keys": ["inner.noise"]},
            "field 'inner.noise' (set with --set): Input should be less than or equal to 1 (got 2)",
        ),
        (
            {"shape": A, "inner": {"noise": 2}},
            {"set_keys": ["inner"]},
            "field 'inner.noise' (set with --set): Input should be less than or equal to 1 (got 2)",
        ),
        ({"shape": A, "extra": {"long": 1}}, {}, "field 'long': keys are at most 3 characters"),
        (
            {"shape": A, "extra": {"ok": "1"}},
            {},
            "field 'ok': Input should be a valid integer (got '1')",
        ),
        (
            {"shape": A, "items": [{"noise": "x" * 100}]},
            {},
            "field 'items[0].noise': Input should be a valid number (got '"
            + "x" * 59
            + "... (100 characters))",
        ),
    ],
)
def test_explain(data, kwargs, message):
    with pytest.raises(ValidationError) as info:
        Root.model_validate(data)
    assert explain(info.value, "f.toml", Root, **kwargs) == f"f.toml: {message}"


def test_explain_names_a_problem_of_the_whole_file():
    class Whole(_Strict):
        a: int = 0

    with pytest.raises(ValidationError) as info:
        Whole.model_validate(3)
    assert (
        explain(info.value, "f.toml", Whole, whole="the sweep file")
        == "f.toml: the sweep file: must be a table (got 3)"
    )
