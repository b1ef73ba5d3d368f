"""Running sweeps: serial and process pool agree, resume after a crash, failures, --force."""

import gc
import json
import os
import signal
import subprocess
import sys
import time
import weakref
from pathlib import Path

import pandas as pd
import pytest
from batch_scenarios import tiny_base
from conftest import ROOT

from abm.batch import load_sweep, run_sweep
from abm.batch.__main__ import main
from abm.batch.storage import read_metrics

TIMING = ["run_seconds"]  # the only columns that may differ between two runs of a sweep

BASE = tiny_base()

SWEEP = """
scenario = "base.toml"
seed = 11
[sweep]
replicates = 3
game.noise = [0.0, 0.2]
"population.players[2].p" = [0.2, 0.8]
"""


def write(folder: Path, sweep: str = SWEEP, base: str = BASE) -> Path:
    (folder / "base.toml").write_text(base, encoding="utf-8")
    path = folder / "sweep.toml"
    path.write_text(sweep, encoding="utf-8")
    return path


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").drop(columns=TIMING)


@pytest.fixture(scope="module")
def serial(tmp_path_factory):
    folder = tmp_path_factory.mktemp("serial")
    sweep = load_sweep(write(folder))
    result = run_sweep(sweep, folder / "out", backend="serial", report=False)
    return sweep, result, folder / "out"


def test_every_run_is_recorded_with_its_parameters_and_seed(serial):
    sweep, result, out = serial
    frame = rows(out)
    assert result.ok and result.skipped == 0 and len(result.ran) == 12
    assert len(frame) == 12 and (frame["status"] == "ok").all()
    assert list(frame.columns[:7]) == [
        "run_id",
        "point",
        "replicate",
        "seed",
        "game.noise",
        "population.players[2].p",
        "status",
    ]
    for run in sweep.runs:
        row = frame[frame["run_id"] == run.run_id].iloc[0]
        assert (row["seed"], row["replicate"], row["point"]) == (run.seed, run.replicate, run.point)
        assert row["game.noise"] == run.params["game.noise"]
        folder = out / row["out"]
        config = (folder / "config.toml").read_text()
        assert f"seed = {run.seed}" in config
        summary = json.loads((folder / "summary.json").read_text())
        assert row["cooperation_rate"] == summary["cooperation_rate"]
        assert row["decisions"] == summary["decisions"] == 6 * 3 * 2  # 6 matches x 3 rounds x 2
    # the rows hold what the run folders say, metric by metric
    first = frame.iloc[0]
    for key, value in read_metrics(out / first["out"]).items():
        assert first[key] == value
    # All-D never cooperates; a noise-free point has All-D at cooperation 0 exactly
    quiet = frame[frame["game.noise"] == 0.0]
    assert (quiet["cooperation[all_d]"] == 0.0).all()
    noisy = frame[frame["game.noise"] == 0.2]
    assert (noisy["cooperation[all_d]"] > 0).any()


@pytest.mark.slow
def test_local_processes_give_the_same_rows(serial, tmp_path):
    sweep, _, out = serial
    result = run_sweep(sweep, tmp_path / "out", backend="local", workers=2, report=False)
    assert result.ok and len(result.ran) == 12
    pd.testing.assert_frame_equal(rows(out), rows(tmp_path / "out"))


@pytest.mark.slow
@pytest.mark.llm_extra
def test_runs_with_a_model_on_the_gpu_stay_in_this_process(tmp_path, monkeypatch):
    pytest.importorskip("torch", reason="needs the llm extra (torch)")
    from tiny_llm import build_tiny_model

    import abm.batch.backends as backends
    import abm.policies.llm_backends as llm_backends

    models = [build_tiny_model(tmp_path / name, seed=i) for i, name in enumerate("ab")]
    llms = [f'{{ name = "llm", model = "{m}", dtype = "float32" }}' for m in models]
    path = write(
        tmp_path,
        'scenario = "base.toml"\nseed = 2\n[sweep]\nreplicates = 2\n'
        f'"population.players[2]" = ["random", {llms[0]}, {llms[1]}]\n',
    )
    # as on a machine with a GPU: a model on device "auto" would load onto it
    monkeypatch.setattr(backends, "_cuda_present", lambda: True)
    monkeypatch.setattr(llm_backends, "_BACKENDS", {})
    released, release = [], llm_backends.release_backends

    def watched():  # the models let go, to see that nothing else keeps them
        released.extend(weakref.ref(b) for b in llm_backends._BACKENDS.values())
        release()

    monkeypatch.setattr(llm_backends, "release_backends", watched)
    result = run_sweep(load_sweep(path), tmp_path / "out", backend="local", workers=2)
    assert result.ok, result.errors
    frame = pd.read_parquet(tmp_path / "out" / "results.parquet").set_index("run_id")
    here = f":{os.getpid()}"
    with_model = frame["llm_decisions"].fillna(0) > 0
    assert with_model.sum() == 4 and (~with_model).sum() == 2
    for run_id, uses_model in with_model.items():
        # the models' runs in this process (one copy of a model), the others in the pool
        assert result.workers[run_id].endswith(here) == bool(uses_model), run_id
    # one model after the other, the first let go before the second loaded: one model
    # is held at the end (two without the release)
    order = [r for r in result.ran if with_model[r]]
    point = frame["point"].to_dict()
    assert point[order[0]] == point[order[1]] != point[order[2]] == point[order[3]]
    assert len(llm_backends._BACKENDS) == 1
    gc.collect()
    assert len(released) == 1 and released[0]() is None  # freed, not only unlisted


def test_rerun_skips_complete_runs_and_force_reruns(serial, tmp_path):
    sweep, _, _ = serial
    out = tmp_path / "out"
    run_sweep(sweep, out, backend="serial", report=False)
    before = rows(out)
    folders = sorted((out / "runs").iterdir())
    for folder in folders:
        (folder / "marker").write_text("from the first run")
    again = run_sweep(sweep, out, backend="serial", report=False)
    assert again.skipped == 12 and again.ran == []
    assert sorted((out / "runs").iterdir()) == folders
    assert all((folder / "marker").exists() for folder in folders)  # left as they were
    pd.testing.assert_frame_equal(before, rows(out))
    # a lost results.parquet is rebuilt from the run folders
    (out / "results.parquet").unlink()
    rebuilt = run_sweep(sweep, out, backend="serial", report=False)
    assert rebuilt.recovered == 12 and rebuilt.ran == []
    pd.testing.assert_frame_equal(before, rows(out))
    forced = run_sweep(sweep, out, backend="serial", force=True, report=False)
    assert len(forced.ran) == 12
    assert not any((folder / "marker").exists() for folder in folders)  # written anew
    pd.testing.assert_frame_equal(before, rows(out))


def test_grown_grid_runs_only_the_new_points(serial, tmp_path):
    _, _, out0 = serial
    folder = tmp_path
    out = folder / "out"
    small = load_sweep(write(folder, SWEEP.replace("[0.0, 0.2]", "[0.0]")))
    run_sweep(small, out, backend="serial", report=False)
    grown = load_sweep(write(folder))
    result = run_sweep(grown, out, backend="serial", report=False)
    assert result.skipped == 6 and len(result.ran) == 6
    assert {
        grown.runs[i].run_id for i in range(12) if grown.runs[i].params["game.noise"] == 0.2
    } == set(result.ran)
    frame = rows(out)
    pd.testing.assert_frame_equal(rows(out0), frame)


def test_a_failed_run_is_recorded_and_the_sweep_goes_on(tmp_path):
    # two graph files; the second vanishes after validation, so its runs fail
    for name in ("a", "b"):
        (tmp_path / f"{name}.edgelist").write_text("0 1\n1 2\n2 0\n")
    base = BASE.replace('kind = "complete"', 'kind = "file"\npath = "a.edgelist"')
    sweep = load_sweep(
        write(
            tmp_path,
            'scenario = "base.toml"\n[sweep]\nreplicates = 2\n'
            f'graph.path = ["{tmp_path}/a.edgelist", "{tmp_path}/b.edgelist"]'
            "\n",
            base,
        )
    )
    (tmp_path / "b.edgelist").unlink()
    out = tmp_path / "out"
    result = run_sweep(sweep, out, backend="serial", report=True, charts=False)
    frame = pd.read_parquet(out / "results.parquet")
    failed = frame[frame["status"] == "failed"]
    assert len(result.failed) == 2 == len(failed) and len(frame) == 4
    assert set(failed["run_id"]) == {
        r.run_id for r in sweep.runs if "b.edgelist" in r.params["graph.path"]
    }
    assert failed["error"].str.contains("b.edgelist").all()
    assert failed["out"].isna().all() and failed["cooperation_rate"].isna().all()
    assert not (out / "runs" / failed["run_id"].iloc[0]).exists()
    assert "b.edgelist" in (out / "errors.log").read_text()
    # the report counts the successful runs only
    aggregate = pd.read_csv(out / "aggregate.csv")
    assert set(aggregate["point"]) == {0}
    assert (aggregate.loc[aggregate["metric"] == "cooperation_rate", "n"] == 2).all()
    # the file is back: a rerun runs exactly the failed runs
    (tmp_path / "b.edgelist").write_text("0 1\n1 2\n2 0\n")
    again = run_sweep(sweep, out, backend="serial", report=False)
    assert sorted(again.ran) == sorted(failed["run_id"]) and again.ok


def test_cli_exit_status_is_1_when_a_run_fails(tmp_path, monkeypatch, capsys):
    import abm.batch.sweep

    monkeypatch.setattr(abm.batch.sweep, "_preflight", lambda *a: None)  # let it reach the run
    (tmp_path / "g.edgelist").write_text("0 1\n1 2\n")  # 3 nodes in a file for 3 players
    (tmp_path / "bad.edgelist").write_text("0 1\n")  # 2 nodes for 3 players
    base = BASE.replace('kind = "complete"', 'kind = "file"\npath = "g.edgelist"')
    path = write(
        tmp_path,
        'scenario = "base.toml"\n[sweep]\ngraph.path = ["g.edgelist", "bad.edgelist"]\n',
        base,
    )
    # graph paths given in the sweep are relative to the base scenario, like --set
    status = main([str(path), "--out", str(tmp_path / "out"), "--workers", "1", "--no-report"])
    captured = capsys.readouterr()
    assert status == 1
    assert "1 runs now" not in captured.out and "2 runs now (1 failed)" in captured.out
    assert "failed: path=bad.edgelist" in captured.err and "2 nodes" in captured.err
    assert captured.out.strip().splitlines()[-1] == f"outputs: {tmp_path / 'out'}"


def _children(pid: int) -> list[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return [int(p) for p in path.read_text().split()] if path.exists() else []


def _complete(out: Path) -> dict[str, int]:
    runs = out / "runs"
    if not runs.is_dir():
        return {}
    return {
        p.name: p.stat().st_ino
        for p in runs.iterdir()
        if not p.name.startswith(".") and (p / "summary.json").is_file()
    }


@pytest.mark.slow
@pytest.mark.skipif(not Path("/proc/self/task").exists(), reason="reads /proc")
def test_resume_after_a_worker_is_killed_runs_exactly_the_unfinished(tmp_path):
    base = (ROOT / "scenarios" / "small_world_rules.toml").read_text()
    sweep_text = (
        'scenario = "base.toml"\nseed = 3\n[set]\noutput.charts = false\n'
        "output.rounds = false\npairing.steps = 40\n"
        "[sweep]\nreplicates = 6\ngame.noise = [0.0, 0.1]\n"
    )
    path = write(tmp_path, sweep_text, base)
    out = tmp_path / "out"
    command = [
        sys.executable,
        "-m",
        "abm.batch",
        str(path),
        "--out",
        str(out),
        "--workers",
        "2",
        "--no-report",
    ]
    proc = subprocess.Popen(
        command + ["--quiet"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    deadline = time.monotonic() + 60
    victim = None
    while time.monotonic() < deadline and proc.poll() is None:
        if len(_complete(out)) >= 3:
            workers = [
                c
                for c in _children(proc.pid)
                if b"spawn_main" in Path(f"/proc/{c}/cmdline").read_bytes()
            ]
            if workers:
                victim = workers[0]
                os.kill(victim, signal.SIGKILL)
                break
        time.sleep(0.02)
    _, err = proc.communicate(timeout=60)
    assert victim is not None, "the sweep ended before a worker could be killed"
    assert proc.returncode == 1 and "worker process died" in err and "Traceback" not in err
    done = _complete(out)
    assert 3 <= len(done) < 12
    # results.parquet has a row for every run that completed, and only those
    frame = pd.read_parquet(out / "results.parquet")
    assert set(frame["run_id"]) <= set(done) and (frame["status"] == "ok").all()

    # resume in this process this time: how many workers does not matter to what is done
    command[command.index("--workers") + 1] = "1"
    again = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert again.returncode == 0, again.stderr
    assert f"{len(done)} complete, {12 - len(done)} to run" in again.stdout
    assert f"{12 - len(done)} runs now (0 failed), {len(done)} already complete" in again.stdout
    after = _complete(out)
    assert len(after) == 12
    assert all(after[name] == inode for name, inode in done.items())  # not run again
    assert not [p for p in (out / "runs").iterdir() if p.name.startswith(".")]  # no partials
    resumed = rows(out)
    assert len(resumed) == 12 and (resumed["status"] == "ok").all()
    # the same rows as an uninterrupted sweep
    fresh = tmp_path / "fresh"
    run_sweep(load_sweep(path), fresh, backend="serial", report=False)
    pd.testing.assert_frame_equal(rows(fresh), resumed)


def test_a_folder_of_something_else_is_refused(serial, tmp_path, capsys):
    sweep, _, _ = serial
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "notes.txt").write_text("mine")
    assert main([str(sweep.path), "--out", str(tmp_path / "out")]) == 2
    assert "holds no sweep" in capsys.readouterr().err
