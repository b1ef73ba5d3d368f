"""The two front doors hardened: ``python -m abm.export`` and ``python -m abm.viz`` (bad
command lines end in one paragraph, exit 2 and nothing left behind), the SFT export's
handling of unreadable answers, and the page: a bounded graph-size box, slider values,
self-play loops, node ids, and heatmaps and an LLM panel that say which answers could not
be read."""

from __future__ import annotations

import json
import os
import re
import subprocess
from pathlib import Path

import ipyvuetify as v
import pytest
import solara
from conftest import SCENARIOS

from abm.export import main as export_main
from abm.viz.app import Page
from abm.viz.components import selected
from abm.viz.draw import network_png
from abm.viz.model import VizModel
from abm.viz.server import main as viz_main

pytestmark = pytest.mark.filterwarnings("ignore:.*ComponentsView")

RULES = str(SCENARIOS / "round_robin_rules.toml")
SMALL_WORLD = str(SCENARIOS / "small_world_rules.toml")


@pytest.fixture(autouse=True)
def no_selection():
    selected.set(None)
    yield
    selected.set(None)


# ---------------------------------------------------------------- transcripts


def record(**extra):
    """One transcript line as python -m abm.run writes it (the keys the export reads)."""
    base = {
        "step": 1,
        "match": 0,
        "side": 0,
        "round": 1,
        "agent": 5,
        "opponent": 0,
        "prompt": [{"role": "user", "content": "Will you remain silent or testify?"}],
        "input": "<user>\nWill you remain silent or testify?\n<assistant>\n",
        "answer": "remain silent",
        "response": "Answer: remain silent",
        "valid": True,
        "fallback": False,
        "action": "C",
        "actual": "C",
        "model": "m",
        "player": "LLM",
        "opponent_player": "All-D",
        "reflection": None,
    }
    return {**base, **extra}


def write_run(folder: Path, lines: list) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    (folder / "transcripts.jsonl").write_text(text, encoding="utf-8")
    return folder


def snapshot(root: Path) -> dict[str, bytes | None]:
    return {
        str(p.relative_to(root)): (p.read_bytes() if p.is_file() else None)
        for p in sorted(root.rglob("*"))
    }


# ---------------------------------------------------------------- bad command lines


def _run_with_bad_line(tmp, line, with_old_output=True):
    run = write_run(tmp / "run", [record(), line])
    if with_old_output:  # an earlier export must survive a failed one untouched
        (run / "sft.jsonl").write_text("earlier export\n", encoding="utf-8")
    return [str(run)]


def _non_utf8(tmp):
    run = write_run(tmp / "run", [record()])
    with open(run / "transcripts.jsonl", "ab") as handle:
        handle.write(b'{"prompt": [], "response": "caf\xe9"}\n')  # Latin-1, not UTF-8
    return [str(run)]


def _read_only(tmp, cleanup):
    run = write_run(tmp / "run", [record()])
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    cleanup.append(lambda: locked.chmod(0o755))
    if os.geteuid() == 0:  # root writes into mode 555 folders; an immutable one stops it
        done = subprocess.run(["chattr", "+i", str(locked)], capture_output=True)
        if done.returncode:
            pytest.skip("running as root without chattr: no read-only folder to test")
        cleanup.insert(0, lambda: subprocess.run(["chattr", "-i", str(locked)]))
    try:
        (locked / "probe").write_text("x")
    except OSError:
        pass
    else:
        (locked / "probe").unlink()
        pytest.skip("this file system has no read-only folders for this user")
    return [str(run), "--out", str(locked / "sft.jsonl")]


BAD_LINES = [
    # (front door, setup -> argv, fragment of the one-paragraph error)
    ("export", lambda tmp, c: [str(tmp / "no_such_run")], "no_such_run: no such folder"),
    ("export", lambda tmp, c: [str(tmp / "a_file.txt")], "is a file, not a run folder"),
    ("export", lambda tmp, c: [str(tmp)], "no transcripts.jsonl here"),
    ("export", lambda tmp, c: _run_with_bad_line(tmp, {}), "line 2 lacks 'prompt' and 'response'"),
    ("export", lambda tmp, c: _run_with_bad_line(tmp, [1, 2]), "line 2 is an array, not an object"),
    ("export", lambda tmp, c: _run_with_bad_line(tmp, "{not json"), "line 2 is not JSON"),
    (
        "export",
        lambda tmp, c: _run_with_bad_line(tmp, record(prompt="hello")),
        "line 2 has a 'prompt' that is not a list",
    ),
    ("export", lambda tmp, c: _non_utf8(tmp), "line 2 is not UTF-8 text (byte 0xe9"),
    (
        "export",
        lambda tmp, c: [
            str(write_run(tmp / "run", [record()])),
            "--out",
            str(tmp / "missing" / "sft.jsonl"),
        ],
        "does not exist",
    ),
    (
        "export",
        lambda tmp, c: [str(write_run(tmp / "run", [record()])), "--out", str(tmp)],
        "is a folder; give a file name",
    ),
    ("export", lambda tmp, c: _read_only(tmp, c), "cannot write"),
    (
        "export",
        lambda tmp, c: [
            str(write_run(tmp / "run", [record()])),
            "--out",
            str(tmp / "run" / "transcripts.jsonl"),
        ],
        "is the run's transcripts.jsonl itself",
    ),
    (
        "export",
        lambda tmp, c: [
            str(write_run(tmp / "run", [record()])),
            "--valid-only",
            "--include-invalid",
        ],
        "contradict each other",
    ),
    (
        "viz",
        lambda tmp, c: [RULES, "--host", "no.such.host.invalid", "--port", "0"],
        "--host 'no.such.host.invalid' is not an address or a host name that resolves",
    ),
    (
        "viz",
        lambda tmp, c: [RULES, "--host", "999.1.1.1", "--port", "0"],
        "--host '999.1.1.1' is not an address",
    ),
    ("viz", lambda tmp, c: [RULES, "--host", "no.such.host.invalid"], "allowed: an address"),
    ("viz", lambda tmp, c: [RULES, "--port", "70000"], "between 0 and 65535"),
]


@pytest.mark.parametrize(
    "door, setup, fragment", BAD_LINES, ids=[f"{d}-{f[:30]}" for d, _, f in BAD_LINES]
)
def test_bad_command_lines_exit_2_with_one_paragraph_and_leave_nothing(
    door, setup, fragment, tmp_path, capsys, monkeypatch
):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a_file.txt").write_text("not a run\n")
    cleanup: list = []
    try:
        argv = setup(tmp_path, cleanup)
        before = snapshot(tmp_path)
        capsys.readouterr()
        status = (export_main if door == "export" else viz_main)(argv)
        out, err = capsys.readouterr()
        after = snapshot(tmp_path)
    finally:
        for undo in cleanup:
            undo()
    assert status == 2
    assert fragment in err, err
    assert err.startswith("error: ") and err.count("\n") == 1, err  # one paragraph
    assert "Traceback" not in err and out == ""
    assert after == before  # no output, no partial file, an earlier export untouched


def test_a_failed_write_leaves_no_partial_file(tmp_path, monkeypatch, capsys):
    # the disk fills up halfway: the error names --out, the temporary file is removed
    run = write_run(tmp_path / "run", [record(), record(round=2)])
    real_dumps = json.dumps
    calls = {"n": 0}

    def full_disk(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 2:
            raise OSError(28, "No space left on device")
        return real_dumps(*args, **kwargs)

    monkeypatch.setattr("abm.export.json.dumps", full_disk)
    assert export_main([str(run)]) == 2
    err = capsys.readouterr().err
    assert "cannot write it (No space left on device)" in err and err.count("\n") == 1
    assert sorted(p.name for p in run.iterdir()) == ["transcripts.jsonl"]


# ---------------------------------------------------------------- SFT: unreadable answers


def test_sft_leaves_out_unreadable_answers_and_carries_their_metadata(tmp_path):
    run = write_run(
        tmp_path / "run",
        [
            record(p_cooperate=0.75, p_defect=0.25),
            record(
                round=2,
                answer="Maybe.",
                response="Maybe.",
                valid=False,
                action="invalid",
                actual=None,
            ),
            record(
                round=3,
                answer="Maybe.",
                response="Maybe.",
                valid=False,
                fallback=True,
                action="D",
                actual="D",
            ),
        ],
    )

    def export(*flags):
        out = tmp_path / "sft.jsonl"
        assert export_main([str(run), "--out", str(out), *flags]) == 0
        return [json.loads(line) for line in out.read_text().splitlines()]

    default = export()
    assert [e["metadata"]["round"] for e in default] == [1]
    assert export("--valid-only") == default  # the old flag: accepted, changes nothing
    kept = export("--include-invalid")
    assert [e["metadata"]["round"] for e in kept] == [1, 2, 3]
    meta = [e["metadata"] for e in kept]
    assert [(m["valid"], m["fallback"], m["action"]) for m in meta] == [
        (True, False, "C"),
        (False, False, "invalid"),
        (False, True, "D"),
    ]
    assert meta[0]["input"] == record()["input"]
    assert (meta[0]["p_cooperate"], meta[0]["p_defect"]) == (0.75, 0.25)
    assert "p_cooperate" not in meta[1]  # only where the record has them


def test_export_help_documents_the_flags(capsys):
    with pytest.raises(SystemExit):
        export_main(["--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "--include-invalid" in text
    assert "accepted for compatibility and changes nothing" in text


# ---------------------------------------------------------------- the page


def render(scenario):
    _, rc = solara.render(solara.AppLayout(children=[Page(scenario=scenario)]), handle_error=False)
    return rc


@pytest.mark.slow
def test_graph_size_box_has_an_upper_bound():
    from abm.viz.model import MAX_PAGE_AGENTS, size_problem  # new: fails fast before

    assert MAX_PAGE_AGENTS >= 2000  # at least the drawing cap: bigger graphs get sampled
    assert size_problem("100") is None and size_problem("") is None
    assert f"2 to {MAX_PAGE_AGENTS:,} agents; got 1,000,000" in size_problem("1000000")
    assert "whole number" in size_problem("lots")
    too_big = VizModel(scenario=SMALL_WORLD, n=10**7)  # refused: the file's 100 agents
    assert too_big.n_nodes == 100 and f"{MAX_PAGE_AGENTS:,}" in too_big.viz_error
    dense = VizModel(scenario=RULES, graph_kind="complete", n=5000)  # 12.5 M links
    assert dense.n_nodes == 5 and "links" in dense.viz_error
    # the box says its bounds, and in red why a value is refused
    rc = render(SMALL_WORLD)
    box = rc.find(v.TextField, label="Graph size (agents)").widget
    assert f"{MAX_PAGE_AGENTS:,} agents" in box.messages[0] and not box.error
    box.v_model = "1000000"
    box.fire_event("focusout")
    box = rc.find(v.TextField, label="Graph size (agents)").widget
    assert box.error and "got 1,000,000" in box.messages[0]
    rc.find(v.Btn, children=["Reset"]).widget.click()
    status = " ".join(str(w.children) for w in rc.find(v.Html, tag="span").widgets)
    assert "(100 agents" in status
    assert any(
        "showing the scenario as written" in str(w.children) for w in rc.find(v.Html).widgets
    )


@pytest.mark.slow
def test_sliders_show_their_values():
    def shown():
        return [w.children[0] for w in rc.find(v.Html, class_="abm-slider-value").widgets]

    rc = render(SMALL_WORLD)
    # noise, rounds per match, memory window, steps: the scenario's values
    assert shown() == ["0.05", "5", "3", "50"]
    rc.find(v.Slider, label="Rounds per match").widget.v_model = 2
    rc.find(v.Slider, label="Noise (flip probability)").widget.v_model = 0.07
    assert shown() == ["0.07", "2", "3", "50"]
    # still Mesa's controls: the new values apply on Reset
    rc.find(v.Btn, children=["Reset"]).widget.click()
    rc.find(v.Btn, children=["Step"]).widget.click()
    selected.set(0)
    panel = " ".join(str(w.children) for w in rc.find(v.Html, tag="span").widgets)
    assert re.search(r": [CD]{2} against [CD]{2}, payoff", panel), panel  # 2 rounds now


def test_self_play_loops_are_drawn_and_counted():
    model = VizModel(scenario=RULES)
    model.step()
    _, hits = network_png(model)
    assert hits.loops.tolist() == [0, 1, 2, 3, 4]  # 10 links + 5 self-play = 15 matches
    no_loops = VizModel(scenario=SMALL_WORLD)
    assert network_png(no_loops)[1].loops.tolist() == []
    rc = render(RULES)
    status = " ".join(str(w.children) for w in rc.find(v.Html, tag="span").widgets)
    assert "(5 agents, 10 links + 5 self-play loops," in status


def test_the_page_shows_node_ids_and_the_agent_table_has_them():
    model = VizModel(scenario=RULES)
    model.step()
    table = model.datacollector.get_agent_vars_dataframe().reset_index()
    assert (table["node"] == table["AgentID"] - 1).all()  # Mesa counts from 1
    selected.set(3)
    rc = render(RULES)
    ids = rc.find(v.Html, class_="abm-agent-ids").widget.children[0]
    assert "node ids, as in agents.csv" in ids and "Mesa's AgentID is 4" in ids
    assert rc.find(v.Html, class_="abm-agent-title").widget.children[0].startswith("Agent 3:")


UNREAD = """
name = "unread"
seed = 1
[match]
rounds = 3
[graph]
kind = "complete"
self_loops = true
[population]
players = [
  {{ name = "all_c", label = "All-C" }},
  {{ name = "tit_for_tat", label = "Tit-for-tat" }},
  {{ name = "llm", label = "LLM", mode = "generate", fallback = "{fallback}" }},
]
[pairing]
scheme = "all_edges"
"""


def texts(fig):
    return [t.get_text() for ax in fig.axes for t in ax.texts] + [t.get_text() for t in fig.texts]


def orange_frames(fig):
    from matplotlib.colors import to_rgba

    from abm.viz.draw import UNREAD_COLOUR

    return [
        (p.get_x(), p.get_y())
        for p in fig.axes[0].patches
        if to_rgba(p.get_edgecolor()) == to_rgba(UNREAD_COLOUR)
    ]


def test_heatmaps_mark_cells_with_unread_answers(fake, scenario_file):
    from abm.viz.draw import heatmaps_figure

    fake.script = lambda text: "Maybe."  # never readable
    # nothing played: every LLM match stopped in round 1, so its cells have no data
    stopped = VizModel(scenario=str(scenario_file(UNREAD.format(fallback="invalid"))))
    stopped.step()
    fig = heatmaps_figure(stopped)
    words = texts(fig)
    assert words.count("no data") == 2 * 5  # LLM row (3) and column (2), both tables
    assert len(orange_frames(fig)) == 3  # the LLM row: its decisions were not read
    assert any(
        "3 matches stopped by an unreadable answer left out" in t.replace("\n", " ") for t in words
    )
    # the fallback rule played: numbers, but marked
    played = VizModel(
        scenario=str(scenario_file(UNREAD.format(fallback="defect"), name="fallback.toml"))
    )
    played.step()
    fig = heatmaps_figure(played)
    starred = [t for t in texts(fig) if t.endswith("*")]
    assert len(starred) == 2 * 3 and "no data" not in texts(fig)
    assert len(orange_frames(fig)) == 3
    # rule players only: nothing marked, no note
    rules = VizModel(scenario=RULES)
    rules.step()
    fig = heatmaps_figure(rules)
    assert not orange_frames(fig) and not any("*" in t for t in texts(fig))


@pytest.mark.slow
@pytest.mark.parametrize(
    "fallback, says",
    [
        (
            "invalid",
            "invalid: the answer could not be read, so nothing was played and the match stopped",
        ),
        (
            "defect",
            "fallback: the answer could not be read (invalid), so the fallback rule "
            "played D; not the model's decision",
        ),
    ],
)
def test_llm_panel_says_invalid_or_fallback(fake, scenario_file, fallback, says):
    fake.script = lambda text: "Maybe."
    rc = render(str(scenario_file(UNREAD.format(fallback=fallback))))
    rc.find(v.Btn, children=["Step"]).widget.click()
    assert rc.find(v.Html, class_="abm-agent-title").widget.children[0].startswith("Agent 2: LLM")
    assert rc.find(v.Html, class_="abm-unread").widget.children[0] == says
    assert rc.find(v.Html, class_="abm-answer").widget.children[0] == "Maybe."
    matches = " ".join(str(w.children) for w in rc.find(v.Html, tag="span").widgets)
    if fallback == "defect":
        assert "(fallback rule, not the model, in rounds 1, 2, 3)" in matches
    else:
        assert "(stopped after 0 rounds: an answer could not be read)" in matches


def test_host_check_accepts_this_machine():
    from abm.viz.server import host_problem

    assert host_problem("127.0.0.1") is None
    assert "not an address" in host_problem("no.such.host.invalid")
