"""``python -m abm.run`` under hostile conditions: bad output folders, interrupts,
SIGTERM, a full disk, two runs into one folder, stale leftovers of killed runs;
and what the run writes: progress totals, degrees, shares, chart titles."""

from __future__ import annotations

import errno
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import tomli_w
from conftest import ROOT, SCENARIOS

from abm.population import Population
from abm.run import expected_llm_calls, main, run_scenario
from abm.table_writer import TableWriter

HEAVY = (
    "pandas",
    "pyarrow",
    "mesa",
    "altair",
    "tqdm",
    "abm.model",
    "abm.results",
    "abm.run_folder",
    "abm.table_writer",
    "abm.scenario",
)


def tree(root: Path) -> list[str]:
    """Every path under ``root``, hidden ones included."""
    out = []
    for folder, dirs, files in os.walk(root):
        for name in dirs + files:
            out.append(os.path.relpath(os.path.join(folder, name), root))
    return sorted(out)


def cli(argv: list[str]) -> int:
    """main() as the shell sees it: argparse's own exit becomes the status."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as exc:
        return int(exc.code)


def dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


@pytest.fixture
def sleeper():
    """A live process that is not this one, for claims held by 'another run'."""
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    yield proc.pid
    proc.kill()
    proc.wait()


# ---------------------------------------------------------------- bad command lines


def _file_sub(tmp, mp, pid):
    (tmp / "afile").write_text("x")
    return ["--out", tmp / "afile" / "sub"]


def _file_sub_deeper(tmp, mp, pid):
    (tmp / "afile").write_text("x")
    return ["--out", tmp / "afile" / "sub" / "deeper"]


def _out_is_file(tmp, mp, pid):
    (tmp / "afile").write_text("x")
    return ["--out", tmp / "afile"]


def _read_only_parent(tmp, mp, pid):
    ro = tmp / "ro"
    ro.mkdir()
    ro.chmod(0o555)
    if os.geteuid() == 0:  # root writes anywhere: make mkdir answer as for anyone else
        real = os.mkdir

        def mkdir(path, *args, **kwargs):
            if Path(path).parent == ro:
                raise PermissionError(errno.EACCES, "Permission denied", str(path))
            return real(path, *args, **kwargs)

        mp.setattr(os, "mkdir", mkdir)
    return ["--out", ro / "run"]


def _long_name(tmp, mp, pid):
    return ["--out", tmp / ("x" * 300)]


def _nul_byte(tmp, mp, pid):
    return ["--out", str(tmp / "a") + "\0b"]


def _newline_and_nul(tmp, mp, pid):
    return ["--out", str(tmp / "a\nb") + "\0"]


def _another_run(tmp, mp, pid):
    (tmp / "busy").mkdir()
    (tmp / "busy" / ".running").write_text(f"{pid}\n")
    return ["--out", tmp / "busy"]


def _bad_seed(tmp, mp, pid):
    return ["--seed", "x"]


def _unknown_option(tmp, mp, pid):
    return ["--bogus"]


@pytest.mark.parametrize(
    "setup, fragment",
    [
        (_file_sub, "afile is a file, not a folder"),
        (_file_sub_deeper, "a part of the path is a file, not a folder"),
        (_out_is_file, "is a file, not a folder"),
        (_read_only_parent, "permission denied"),
        (_long_name, "the folder name is 300 bytes long; allowed: at most"),
        (_nul_byte, "NUL byte"),
        (_newline_and_nul, "NUL byte"),
        (_another_run, "another run (PID"),
        (_bad_seed, "invalid int value"),
        (_unknown_option, "unrecognized arguments: --bogus"),
    ],
    ids=lambda v: getattr(v, "__name__", "")[1:] or None,
)
def test_bad_command_line_or_out_folder_exits_2_and_leaves_nothing(
    setup, fragment, rules_scenario, tmp_path, monkeypatch, capsys, sleeper
):
    extra = setup(tmp_path, monkeypatch, sleeper)
    before = tree(tmp_path)
    try:
        code = cli([rules_scenario, *extra])
    finally:
        if (tmp_path / "ro").exists():
            (tmp_path / "ro").chmod(0o755)
    err = capsys.readouterr().err
    assert code == 2, err
    assert fragment in err
    assert "Traceback" not in err
    assert "\n\n" not in err.strip()  # one paragraph
    if "error:" in err and "usage:" not in err:
        assert len(err.strip().splitlines()) == 1, err
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- fast start, Ctrl-C


def test_help_and_argument_errors_import_nothing_heavy():
    code = (
        "import sys, abm.run\n"
        "for argv in (['--help'], ['--seed', 'x', 's.toml'], []):\n"
        "    try:\n        abm.run.main(argv)\n"
        "    except SystemExit as exc:\n        assert exc.code in (0, 2), exc.code\n"
        f"print([m for m in {HEAVY!r} if m in sys.modules])\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "[]"


def test_runs_folder_is_ignored_by_git():
    lines = (ROOT / ".gitignore").read_text().splitlines()
    assert "runs/" in lines


@pytest.mark.slow
def test_ctrl_c_during_the_imports_exits_130_with_one_line(rules_scenario, tmp_path):
    proc = subprocess.Popen(
        [sys.executable, "-m", "abm.run", str(rules_scenario), "--out", str(tmp_path / "out")],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(0.3)  # the heavy imports take a second or more
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    assert "Traceback" not in err
    assert err.strip() == "interrupted; no output folder was written"
    assert not (tmp_path / "out").exists()


def test_ctrl_c_inside_the_imports_in_process(rules_scenario, monkeypatch, capsys):
    def interrupted():
        raise KeyboardInterrupt

    monkeypatch.setattr("abm.run._import_heavy", interrupted)
    assert cli([rules_scenario]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; no output folder was written"


def test_ctrl_c_swallowed_by_a_library_during_the_imports_still_stops(
    rules_scenario, tmp_path, monkeypatch, capsys
):
    import abm.run

    real = abm.run.importlib.import_module

    def import_module(name):
        try:  # library code that catches everything, KeyboardInterrupt included
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.2)
        except BaseException:
            pass
        return real(name)

    monkeypatch.delitem(abm.run.__dict__, "tqdm", raising=False)  # one import to do
    monkeypatch.setattr(abm.run.importlib, "import_module", import_module)
    assert cli([rules_scenario, "--out", tmp_path / "run"]) == 130
    assert capsys.readouterr().err.strip() == "interrupted; no output folder was written"
    assert not (tmp_path / "run").exists()


# ---------------------------------------------------------------- a full disk


@pytest.mark.parametrize("code", [errno.ENOSPC, errno.EDQUOT])
def test_disk_full_midway_is_one_error_and_removes_everything(
    code, rules_scenario, tmp_path, monkeypatch, capsys
):
    real_add = TableWriter.add
    calls = []

    def add(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 2:  # the first step's rows are on disk already
            raise OSError(code, os.strerror(code))
        return real_add(self, *args, **kwargs)

    def close(self):  # the cleanup's close fails again on the full disk
        raise OSError(code, os.strerror(code))

    monkeypatch.setattr(TableWriter, "add", add)
    monkeypatch.setattr(TableWriter, "close", close)
    out = tmp_path / "run"
    assert cli([rules_scenario, "--out", out, "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "no space left on device" in err and f"while writing {out}" in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert tree(tmp_path) == [rules_scenario.name]


def test_pyarrow_style_disk_full_without_errno(rules_scenario, tmp_path, monkeypatch, capsys):
    def add(self, *args, **kwargs):
        raise OSError("Error writing bytes to file. Detail: [errno 28] No space left on device")

    monkeypatch.setattr(TableWriter, "add", add)
    assert cli([rules_scenario, "--out", tmp_path / "run", "--quiet"]) == 2
    assert "no space left on device while writing" in capsys.readouterr().err
    assert tree(tmp_path) == [rules_scenario.name]


def test_failing_close_in_the_cleanup_does_not_mask_the_first_error(
    rules_scenario, tmp_path, monkeypatch
):
    def add(self, *args, **kwargs):
        raise RuntimeError("the first error")

    def close(self):
        raise OSError(errno.EIO, "close failed too")

    monkeypatch.setattr(TableWriter, "add", add)
    monkeypatch.setattr(TableWriter, "close", close)
    with pytest.raises(RuntimeError, match="the first error") as info:
        # the parent folders it made go too
        run_scenario(rules_scenario, out=tmp_path / "new" / "deeper" / "run", quiet=True)
    assert info.value.__context__ is None or not isinstance(info.value.__context__, OSError)
    assert tree(tmp_path) == [rules_scenario.name]


def test_table_writer_closes_every_file_when_one_close_fails(tmp_path):
    class Broken:
        def close(self):
            raise OSError(errno.ENOSPC, "full")

    class Fine:
        closed = False

        def close(self):
            Fine.closed = True

    writer = TableWriter(tmp_path, Population(["a"], np.zeros(1, np.int64)))
    writer.rounds_writer, writer.matches_writer = Broken(), Fine()
    with pytest.raises(OSError):
        writer.close()
    assert Fine.closed and writer.rounds_writer is None and writer.matches_writer is None
    writer.close()  # nothing left to close: no second error


# ---------------------------------------------------------------- SIGTERM, SIGKILL, two runs


@pytest.mark.slow
def test_sigterm_cleans_up_like_ctrl_c_and_a_second_run_is_refused_meanwhile(tmp_path, capsys):
    scenario = tmp_path / "long.toml"
    shutil.copy(SCENARIOS / "small_world_rules.toml", scenario)
    out = tmp_path / "run"
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "abm.run",
            str(scenario),
            "--out",
            str(out),
            "--quiet",
            "--set",
            "pairing.steps=10000000",
        ],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    partial = tmp_path / f".run.partial-{proc.pid}"
    try:
        deadline = time.monotonic() + 120
        while not partial.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline
            time.sleep(0.05)
        # while it runs: the final folder is a claim holding only .running
        assert os.listdir(out) == [".running"]
        # the claim names the run's PID and machine
        assert (out / ".running").read_text().split() == [str(proc.pid), socket.gethostname()]
        # a second run into the same folder is refused at once, without touching it
        started = time.monotonic()
        assert cli([scenario, "--out", out, "--quiet"]) == 2
        assert time.monotonic() - started < 30
        err = capsys.readouterr().err
        assert f"another run (PID {proc.pid})" in err and "Traceback" not in err
        assert partial.exists() and os.listdir(out) == [".running"]
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143, err
    assert "Traceback" not in err
    assert err.strip() == "terminated (SIGTERM); no output folder was written"
    assert tree(tmp_path) == ["long.toml"]


def test_stale_partial_folders_of_dead_runs_are_removed_live_ones_kept(
    rules_scenario, tmp_path, sleeper
):
    dead = tmp_path / f".old.partial-{dead_pid()}"
    live = tmp_path / f".other.partial-{sleeper}"
    odd = tmp_path / ".notes.partial-abc"
    for folder in (dead, live, odd):
        folder.mkdir()
        (folder / "rounds.parquet").write_bytes(b"half")
    assert cli([rules_scenario, "--out", tmp_path / "run", "--quiet"]) == 0
    assert not dead.exists()
    assert (live / "rounds.parquet").exists() and (odd / "rounds.parquet").exists()
    assert (tmp_path / "run" / "summary.json").exists()


def test_stale_claim_of_a_dead_run_is_taken_over(rules_scenario, tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    pid = dead_pid()
    (out / ".running").write_text(f"{pid}\n")
    (tmp_path / f".run.partial-{pid}").mkdir()
    assert cli([rules_scenario, "--out", out, "--quiet"]) == 0
    assert (out / "summary.json").exists() and not (out / ".running").exists()
    assert tree(tmp_path) == sorted(
        [rules_scenario.name, "run"] + [f"run/{p.name}" for p in out.iterdir()]
    )


def test_during_the_run_the_out_folder_is_only_a_claim(rules_scenario, tmp_path, monkeypatch):
    import abm.results

    seen = {}
    real = abm.results.write_results

    def spy(model, folder, *args, **kwargs):
        seen["final"] = sorted(os.listdir(tmp_path / "run"))
        seen["marker"] = (tmp_path / "run" / ".running").read_text().strip()
        return real(model, folder, *args, **kwargs)

    monkeypatch.setattr("abm.run.write_results", spy)
    assert cli([rules_scenario, "--out", tmp_path / "run", "--quiet"]) == 0
    assert seen == {"final": [".running"], "marker": f"{os.getpid()} {socket.gethostname()}"}
    assert not (tmp_path / "run" / ".running").exists()


def test_an_existing_empty_out_folder_is_still_accepted(rules_scenario, tmp_path):
    (tmp_path / "run").mkdir()
    assert cli([rules_scenario, "--out", tmp_path / "run", "--quiet"]) == 0
    assert (tmp_path / "run" / "summary.json").exists()


def test_a_model_error_after_the_claim_leaves_nothing(scenario_file, tmp_path, capsys):
    # valid as a file, but the graph has 4 nodes for 3 players: the model says so,
    # after the output folder was claimed
    path = scenario_file("""
[graph]
kind = "complete"
n = 4
[population]
players = ["all_d", "tit_for_tat", "trigger"]
""")
    before = tree(tmp_path)
    assert cli([path, "--out", tmp_path / "run"]) == 2
    err = capsys.readouterr().err
    assert "4 nodes" in err and "Traceback" not in err
    assert tree(tmp_path) == before


# ---------------------------------------------------------------- progress


class Bars:
    """Stands in for tqdm: records each bar's settings and updates."""

    made: list[Bars] = []

    def __init__(self, iterable=None, **kwargs):
        self.kwargs, self.n = kwargs, 0
        Bars.made.append(self)

    def update(self, n=1):
        self.n += n

    def close(self):
        pass


def llm_scenario(tmp_path, reflection, match=None, **pairing) -> Path:
    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1]["reflection"] = reflection
    data["pairing"].update(pairing)
    if match is not None:
        data["match"] = match
    path = tmp_path / "rr.toml"
    path.write_text(tomli_w.dumps(data))
    return path


@pytest.mark.parametrize(
    "reflection, pairing",
    [
        (False, {}),
        (True, {}),
        (False, {"scheme": "round_robin", "steps": 4}),
    ],
)
def test_llm_progress_bar_counts_decisions_and_reflections_with_a_total(
    reflection, pairing, fake, tmp_path, monkeypatch
):
    Bars.made = []
    monkeypatch.setattr("abm.run.tqdm", Bars)
    out = run_scenario(llm_scenario(tmp_path, reflection, **pairing), out=tmp_path / "o")
    summary = json.loads((out / "summary.json").read_text())
    decisions = summary["llm"][0]["decisions"]
    steps, calls = Bars.made
    assert steps.kwargs["disable"] == (summary["steps"] == 1)  # no '0/1 step' bar
    assert calls.kwargs["total"] == decisions * (2 if reflection else 1)
    assert (
        "reflections" in calls.kwargs["desc"]
        if reflection
        else calls.kwargs["desc"] == "LLM decisions"
    )
    assert calls.n == calls.kwargs["total"]  # the policy counts reflections too
    if not pairing:  # the seed experiment: 5 matches and both sides of self-play, 5 rounds
        assert decisions == 35


def test_records_handed_out_by_the_model_are_written_once(fake, tmp_path):
    """The run writes the records the model hands out each step (last_exchanges):
    every decision once, none lost, none twice."""
    out = run_scenario(llm_scenario(tmp_path, False), out=tmp_path / "o", quiet=True)
    lines = [json.loads(ln) for ln in (out / "transcripts.jsonl").read_text().splitlines()]
    keys = {(r["step"], r["match"], r["side"], r["round"]) for r in lines}
    assert len(lines) == len(keys) == 35


def test_llm_progress_total_is_unknown_for_geometric_lengths(fake, tmp_path):
    from abm.model import DilemmaModel
    from abm.scenario import load_scenario

    scenario = load_scenario(llm_scenario(tmp_path, False, {"continuation_probability": 0.8}))
    assert expected_llm_calls(DilemmaModel(scenario)) is None


# ---------------------------------------------------------------- what the run writes


@pytest.fixture(scope="module")
def rr_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("rr") / "run"
    final = run_scenario(
        SCENARIOS / "round_robin_rules.toml", out=out, quiet=True, overrides=["game.noise=0.05"]
    )
    return final


def test_degree_counts_distinct_other_neighbours_and_self_loop_apart(rr_run):
    agents = pd.read_csv(rr_run / "agents.csv")
    # 5 players, complete graph with self-loops: 4 others each, plus self-play
    assert agents["degree"].tolist() == [4] * 5
    assert agents["self_loop"].tolist() == [True] * 5


def test_final_shares_are_keyed_by_label_like_the_ranking(rr_run):
    summary = json.loads((rr_run / "summary.json").read_text())
    labels = {row["player"] for row in summary["ranking"]}
    assert (
        set(summary["final_shares"])
        == labels
        == {"All-D", "All-C", "Defect Once", "Trigger", "Tit-for-tat"}
    )
    assert sum(summary["final_shares"].values()) == pytest.approx(1.0)


def chart_spec(folder: Path, stem: str) -> str:
    return (folder / f"{stem}.html").read_text()


def test_heatmap_titles_say_mean_intended_and_the_conditions(rr_run):
    payoff = chart_spec(rr_run, "payoff_heatmap")
    defections = chart_spec(rr_run, "defections_heatmap")
    assert "Mean total payoff of the row player per match" in payoff
    assert "Total payoff of the player in a match" not in payoff
    assert "Intended defections" in defections and "before noise" in defections
    for spec in (payoff, defections):
        assert "5 rounds per match; noise 0.05; 1 match per cell" in spec


def test_one_step_run_plots_cooperation_per_round(rr_run, tmp_path):
    # the rules round robin is 5 steps: cooperation per step; the all-edges one is 1 step
    assert "Cooperation rate per step" in chart_spec(rr_run, "cooperation")
    out = run_scenario(
        SCENARIOS / "round_robin_rules.toml",
        out=tmp_path / "one",
        quiet=True,
        overrides=["pairing.scheme=all_edges"],
    )
    spec = chart_spec(out, "cooperation")
    assert "Cooperation rate per round (one step)" in spec
    assert '"round"' in spec


def test_heatmap_subtitle_names_geometric_lengths_and_llm_models(fake, tmp_path):
    path = llm_scenario(tmp_path, False, {"continuation_probability": 0.5})
    out = run_scenario(path, out=tmp_path / "o", quiet=True)
    spec = chart_spec(out, "payoff_heatmap")
    assert "geometric match length, continuation p = 0.5" in spec
    assert "LLM: smollm2-135m-instruct" in spec


def test_no_install_hint_names_the_unrelated_pypi_package():
    for name in (
        "run.py",
        "run_folder.py",
        "results.py",
        "atomic.py",
        "table_writer.py",
        "charts.py",
        "errors.py",
    ):
        text = (ROOT / "abm" / name).read_text()
        assert 'install "abm[' not in text and "install 'abm[" not in text


# ------------------------------------------------------------------ shared folders, links


def test_partial_folders_and_claims_of_other_machines_are_left_alone(tmp_path):
    from abm.atomic import HOST, remove_stale_partials
    from abm.run_folder import _live_claim

    theirs = tmp_path / f".their-run.partial-{dead_pid()}"
    theirs.mkdir()
    (theirs / HOST).write_text("another-machine")
    ours = tmp_path / f".our-run.partial-{dead_pid()}"
    ours.mkdir()
    (ours / HOST).write_text(__import__("socket").gethostname())
    assert remove_stale_partials(tmp_path) == [ours]
    assert theirs.is_dir()
    marker = tmp_path / ".running"
    pid = dead_pid()
    marker.write_text(f"{pid} another-machine\n")
    assert _live_claim(marker) == f"PID {pid} on another-machine"  # cannot judge it here


def test_a_run_folder_holds_no_bookkeeping_files(tmp_path):
    assert (
        cli(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--quiet",
                "--set",
                "output.charts=false",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    assert not any(p.name.startswith(".") for p in (tmp_path / "o").iterdir())


def test_a_symbolic_link_as_out_is_refused_up_front(tmp_path, capsys):
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    assert (
        cli([str(SCENARIOS / "round_robin_rules.toml"), "--quiet", "--out", str(tmp_path / "link")])
        == 2
    )
    assert "is a symbolic link" in capsys.readouterr().err
    assert list((tmp_path / "real").iterdir()) == []


def test_finished_outputs_survive_a_failed_final_rename(tmp_path, monkeypatch, capsys):
    import abm.run_folder as outputs

    real = os.replace
    calls = {"n": 0}

    def flaky(src, dst):
        calls["n"] += 1
        if calls["n"] <= 2 and Path(dst).name == "o":  # both tries to put it in place fail
            raise OSError(errno.ENOTEMPTY, "Directory not empty")
        return real(src, dst)

    monkeypatch.setattr(outputs.os, "replace", flaky)
    assert (
        cli(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--quiet",
                "--set",
                "output.charts=false",
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    kept = [p for p in tmp_path.iterdir() if p.name.startswith("o.finished-")]
    assert len(kept) == 1 and (kept[0] / "summary.json").is_file()
    assert f"the finished outputs are in {kept[0]}" in err
