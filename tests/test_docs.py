"""The documentation: the generated references cover the code, links lead somewhere,
the README stays a front page, and the site builds."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from pydantic import BaseModel

from abm.policies import REGISTRY
from abm.policies.llm_params import LLMParams
from abm.reference import (
    COMMANDS,
    cli_reference,
    framings,
    graph_kinds,
    scenario_reference,
    update_rules,
)
from abm.scenario import (
    GameConfig,
    MatchConfig,
    MemoryConfig,
    OutputConfig,
    PairingConfig,
    PolicySpec,
    PopulationConfig,
    Scenario,
    Share,
)

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


@pytest.fixture(scope="module")
def reference() -> str:
    return scenario_reference()


def section(text: str, heading: str) -> str:
    """The part of a Markdown text under ``heading`` (a whole heading line), up to the
    next heading of the same or a higher level."""
    level = len(heading) - len(heading.lstrip("#"))
    lines = text.splitlines()
    assert heading in lines, f"no heading {heading!r}"
    start = lines.index(heading) + 1
    end = next(
        (i for i in range(start, len(lines)) if re.match(rf"#{{1,{level}}} ", lines[i])), len(lines)
    )
    return "\n".join(lines[start:end])


def rows(text: str) -> set[str]:
    """The keys of the reference tables in ``text`` (first cells)."""
    return set(re.findall(r"^\| `([^`]+)` \|", text, re.M))


# ---------------------------------------------------------------- the scenario reference


SECTIONS = {
    "game": GameConfig,
    "match": MatchConfig,
    "memory": MemoryConfig,
    "population": PopulationConfig,
    "pairing": PairingConfig,
    "output": OutputConfig,
}


def test_every_top_level_key_is_in_the_reference(reference):
    top = section(reference, "## Top level")
    assert rows(top) == {"name", "description", "seed"}
    tables = {name for name in Scenario.model_fields if name not in {"name", "description", "seed"}}
    for name in tables:
        assert f"## `[{name}]`" in reference.splitlines(), name


@pytest.mark.parametrize("name", sorted(SECTIONS))
def test_every_key_of_a_table_is_in_its_section(reference, name):
    model = SECTIONS[name]
    keys = rows(section(reference, f"## `[{name}]`"))
    assert set(model.model_fields) <= keys


def test_mix_entries_policies_and_llm_keys_are_in_the_reference(reference):
    assert rows(section(reference, "### A mix entry")) == set(Share.model_fields)
    assert (
        rows(section(reference, "### A policy"))
        == {"name", "label"}
        <= set(PolicySpec.model_fields)
    )
    assert rows(section(reference, "### LLM players")) == set(LLMParams.model_fields)


def test_evolution_keys_are_in_the_reference(reference):
    from abm.scenario import EvolutionConfig

    keys = rows(section(reference, "## `[evolution]`"))
    # the update rules' own parameters, where a rule has a table of them, are under
    # the rule's heading, which lies inside this section as well
    assert set(EvolutionConfig.model_fields) - {"kind"} <= keys


def test_every_graph_kind_has_a_section_with_its_keys(reference):
    kinds = graph_kinds()
    assert {
        "complete",
        "ring",
        "grid",
        "watts_strogatz",
        "barabasi_albert",
        "erdos_renyi",
        "random_regular",
        "file",
    } <= set(kinds)
    for kind, model in kinds.items():
        heading = next(line for line in reference.splitlines() if line.startswith(f"### `{kind}`"))
        assert rows(section(reference, heading)) == set(model.model_fields) - {"kind"}, kind


def test_every_graph_kind_registry_entry_is_in_the_reference(reference):
    from abm import graphs

    registry = getattr(graphs, "GRAPH_KINDS", None)
    if not isinstance(registry, dict):
        pytest.skip("abm.graphs has no GRAPH_KINDS registry in this build")
    for kind in registry:
        assert f"### `{kind}` {{#graph-" in reference, kind


def test_every_update_rule_and_framing_is_in_the_reference(reference):
    rules = update_rules()
    for name in rules:
        assert f"#### `{name}` {{#rule-" in reference, name
    for name in framings():
        assert f"#### `{name}` {{#framing-" in reference, name
    assert {"police", "neutral"} <= set(framings())
    assert {"imitate_best", "proportional", "fermi", "death_birth", "moran"} <= set(rules)


def test_registry_docstrings_are_the_descriptions(reference):
    from abm.reference import _entry_doc, _own_doc

    for kind, model in graph_kinds().items():
        doc = _own_doc(model)
        if doc:
            assert doc.splitlines()[0] in section(
                reference,
                next(line for line in reference.splitlines() if line.startswith(f"### `{kind}`")),
            )
    for entries in (update_rules(), framings()):
        for entry in entries.values():
            doc = _entry_doc(entry)
            if doc:
                assert doc.splitlines()[0] in reference


def test_every_policy_is_in_the_reference(reference):
    table = section(reference, "### Policies")
    for name, info in REGISTRY.items():
        assert f"| `{name}`" in table
        assert info.description.split("(")[0].strip() in table


@pytest.mark.parametrize(
    "model",
    [
        GameConfig,
        MatchConfig,
        MemoryConfig,
        PopulationConfig,
        Share,
        PairingConfig,
        OutputConfig,
        Scenario,
        LLMParams,
    ],
    ids=lambda m: m.__name__,
)
def test_every_key_has_a_description(reference, model: type[BaseModel]):
    for name, field in model.model_fields.items():
        assert field.description, f"{model.__name__}.{name} has no docstring"
        assert " ".join(field.description.split()).replace("|", "\\|") in reference


def test_a_reference_row_gives_type_default_and_description(reference):
    # the noise row, computed by hand from GameConfig: a number in [0, 1], default 0
    noise = next(
        line
        for line in section(reference, "## `[game]`").splitlines()
        if line.startswith("| `noise` |")
    )
    cells = [c.strip() for c in noise.strip("|").split(" | ")]
    assert cells[:3] == ["`noise`", "number ≥ 0, ≤ 1", "`0.0`"]
    assert cells[3].startswith("Probability that an intended action is flipped")
    scope = next(
        line
        for line in section(reference, "## `[memory]`").splitlines()
        if line.startswith("| `scope` |")
    )
    assert '`"match"` or `"opponent"` or `"all"` | `"match"`' in scope
    population = section(reference, "## `[population]`")
    assert "| `players` | list of policies, at least 1 item | — |" in population


# ---------------------------------------------------------------- the command-line reference


def test_the_command_line_reference_has_every_command():
    text = cli_reference()
    for command, _, args in COMMANDS:
        assert f"## `{command}`" in text
        usage = f"usage: {command}" if "report" not in args else "usage: python -m abm.batch report"
        assert usage in text, command
    assert "--replicates N" in text and "--no-charts" in text and "--include-invalid" in text


# ---------------------------------------------------------------- links and the README


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Targets of Markdown links and images and of HTML src/href attributes, outside code."""
    text = re.sub(r"^(```|~~~).*?^\1", "", text, flags=re.S | re.M)
    text = re.sub(r"`[^`\n]*`", "", text)
    targets = re.findall(r"\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)", text)
    targets += re.findall(r"(?:src|href)=\"([^\"]+)\"", text)
    return [t for t in targets if not re.match(r"[a-z][a-z0-9+.-]*:", t) and not t.startswith("#")]


@pytest.mark.parametrize("path", markdown_files(), ids=lambda p: p.name)
def test_every_relative_link_leads_to_a_file(path: Path):
    missing = []
    for target in relative_links(path.read_text(encoding="utf-8")):
        file = target.split("#", 1)[0]
        if not (path.parent / file).exists():
            missing.append(target)
    assert not missing, f"{path.name}: links to missing files: {missing}"


def test_the_link_finder_finds_links_and_skips_code():
    text = (
        'See [a](docs/a.md#x) and ![b](b.png "title"), <img src="c.png">, '
        "[web](https://example.org), [here](#top).\n```\n[no](in-code.md)\n```\n"
        "`[no](inline.md)`"
    )
    assert relative_links(text) == ["docs/a.md#x", "b.png", "c.png"]


def test_the_readme_is_a_front_page():
    lines = (ROOT / "README.md").read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200
    # every page of the manual is reachable from the README or the docs' own index
    linked = {Path(t.split("#")[0]).name for t in relative_links("\n".join(lines))}
    index = {
        Path(t.split("#")[0]).name
        for t in relative_links((DOCS / "index.md").read_text(encoding="utf-8"))
    }
    pages = {p.name for p in DOCS.glob("*.md")} - {"index.md"}
    assert pages <= linked | index, pages - linked - index


def quick_start_commands() -> list[str]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    quick = section(text, "## Quick start")
    block = re.search(r"```bash\n(.*?)```", quick, re.S)
    assert block, "no command block in the README's Quick start"
    return block.group(1).strip().splitlines()


def test_the_quick_start_commands_install_and_run():
    first, second = quick_start_commands()
    assert first.endswith("python -m abm.run scenarios/round_robin.toml")
    assert second.endswith("python -m pytest")


def test_ci_runs_the_quick_start_test_command():
    second = quick_start_commands()[1]
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8").splitlines()
    assert second in [line.strip() for line in ci]


def test_every_page_is_in_the_site_navigation():
    config = (ROOT / "mkdocs.yml").read_text(encoding="utf-8")
    for page in DOCS.glob("*.md"):
        assert re.search(rf":\s+{re.escape(page.name)}\s*$", config, re.M), page.name


# ---------------------------------------------------------------- the site


@pytest.mark.slow
def test_the_site_builds_strictly(tmp_path: Path):
    pytest.importorskip("mkdocs", reason='mkdocs is not installed (pip install -e ".[docs]")')
    pytest.importorskip("material", reason="mkdocs-material is not installed")
    pytest.importorskip("mkdocstrings", reason="mkdocstrings is not installed")
    mkdocs = shutil.which("mkdocs", path=str(Path(sys.executable).parent)) or "mkdocs"
    done = subprocess.run(
        [mkdocs, "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1"},
    )
    assert done.returncode == 0, done.stderr[-3000:]
    page = (tmp_path / "site" / "reference-scenario" / "index.html").read_text(encoding="utf-8")
    assert "watts_strogatz" in page and "continuation_probability" in page
    assert "usage: python -m abm.run" in (
        tmp_path / "site" / "reference-cli" / "index.html"
    ).read_text(encoding="utf-8")
