"""The Ray backend on a local instance: the same rows as serial runs, LLM runs on actors."""

import sys
from pathlib import Path

import pandas as pd
import pytest
from batch_scenarios import tiny_base
from tiny_llm import build_tiny_model

from abm.batch import load_sweep, run_sweep
from abm.batch.__main__ import main
from abm.batch.backends import Task
from abm.batch.ray_backend import gpus_for, model_key

ray = pytest.importorskip("ray")

RULES = tiny_base(noise=0.1)

LLM = """
name = "tiny_llm"
seed = 5
[game]
noise = 0.1
[match]
rounds = 2
[graph]
kind = "complete"
self_loops = true
[population]
players = ["all_d", "tit_for_tat",
           { name = "llm", label = "LLM", model = "MODEL", device = "cpu", dtype = "float32" }]
[output]
charts = false
rounds = false
"""


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=2, include_dashboard=False, logging_level="warning", log_to_driver=False)
    yield
    ray.shutdown()


def rows(out: Path) -> pd.DataFrame:
    return pd.read_parquet(out / "results.parquet").drop(columns=["run_seconds"])


@pytest.mark.slow
def test_ray_rows_equal_serial_rows(local_ray, tmp_path):
    (tmp_path / "base.toml").write_text(RULES)
    (tmp_path / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 11\n[sweep]\nreplicates = 3\n'
        'game.noise = [0.0, 0.2]\n"population.players[2].p" = [0.2, 0.8]\n'
    )
    sweep = load_sweep(tmp_path / "sweep.toml")
    serial = run_sweep(sweep, tmp_path / "serial", backend="serial", report=False)
    on_ray = run_sweep(sweep, tmp_path / "ray", backend="ray", report=False)
    assert serial.ok and on_ray.ok and len(on_ray.ran) == 12
    pd.testing.assert_frame_equal(rows(tmp_path / "serial"), rows(tmp_path / "ray"))
    assert ray.is_initialized()  # a session it did not start is left running
    # and resuming on Ray skips what is complete
    again = run_sweep(sweep, tmp_path / "ray", backend="ray", report=False)
    assert again.skipped == 12 and again.ran == []


@pytest.mark.slow
@pytest.mark.llm_extra
def test_llm_runs_go_to_one_actor_that_keeps_its_model(local_ray, tmp_path):
    model = build_tiny_model(tmp_path / "tiny_model")
    (tmp_path / "base.toml").write_text(LLM.replace("MODEL", str(model)))
    (tmp_path / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 4\n[sweep]\nreplicates = 2\n'
        '"population.players[2].framing" = ["police", "neutral"]\n'
    )
    sweep = load_sweep(tmp_path / "sweep.toml")
    assert all(run.llm for run in sweep.runs)
    on_ray = run_sweep(sweep, tmp_path / "ray", backend="ray", workers=1, report=False)
    assert on_ray.ok, on_ray.errors
    # one actor process served all four runs, loading the model once
    assert len(set(on_ray.workers.values())) == 1
    assert not any(w.endswith(f":{__import__('os').getpid()}") for w in on_ray.workers.values())
    loads = [
        pd.read_json(tmp_path / "ray" / "runs" / r / "summary.json", typ="series")["llm"][0][
            "load_seconds"
        ]
        for r in on_ray.ran
    ]
    # the run that loaded the model reports the load; the others reused it
    assert len(loads) == 4 and sum(x > 0 for x in loads) == 1
    serial = run_sweep(sweep, tmp_path / "serial", backend="serial", report=False)
    assert serial.ok
    frame = rows(tmp_path / "ray")
    pd.testing.assert_frame_equal(rows(tmp_path / "serial"), frame)
    assert (frame["llm_decisions"] > 0).all()


@pytest.mark.slow
def test_a_cuda_model_on_a_cluster_without_gpus_fails_its_runs(local_ray, tmp_path):
    (tmp_path / "base.toml").write_text(
        LLM.replace("MODEL", "/nowhere").replace('device = "cpu"', 'device = "cuda"')
    )
    (tmp_path / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 4\n[sweep]\nmatch.rounds = [1, 2]\n'
    )
    result = run_sweep(
        load_sweep(tmp_path / "sweep.toml"), tmp_path / "out", backend="ray", report=False
    )
    assert len(result.failed) == 2
    assert all("asks for CUDA but the Ray cluster has no GPU" in e for e in result.errors.values())


def test_gpu_requests():
    def task(*devices):
        return Task("r", "b", (), 1, "o", llm=tuple({"device": d} for d in devices))

    assert gpus_for(task("cuda"), cluster_gpus=0) == 1
    # Ray numbers an actor's GPUs from 0: GPU 1 is there only when it holds two
    assert gpus_for(task("cuda:1"), cluster_gpus=4) == 2
    assert gpus_for(task("cuda:0", "cuda:2"), cluster_gpus=4) == 3
    assert gpus_for(task("auto"), cluster_gpus=2) == 1
    assert gpus_for(task("auto"), cluster_gpus=0) == 0
    assert gpus_for(task("cpu"), cluster_gpus=8) == 0
    assert gpus_for(task(), cluster_gpus=8) == 0
    on_server = Task("r", "b", (), 1, "o", llm=({"server": "http://127.0.0.1:8000/v1"},))
    assert gpus_for(on_server, cluster_gpus=8) == 0  # the server holds the model
    assert model_key(task("cpu")) != model_key(task("cuda"))


def test_a_model_spread_over_gpus_asks_for_them():
    def task(**player):
        return Task("r", "b", (), 1, "o", llm=(player,))

    # "auto", "balanced", ...: every GPU of the largest node (an actor's are on one node)
    assert gpus_for(task(device_map="auto"), cluster_gpus=16, node_gpus=8) == 8
    assert gpus_for(task(device_map="balanced"), cluster_gpus=4) == 4
    # a table: its highest GPU number + 1; the CPU and a bare "cuda" (GPU 0) as written
    table = {"model.layers.0": 0, "model.layers.1": "cuda:2", "lm_head": "cpu"}
    assert gpus_for(task(device_map=table), cluster_gpus=8, node_gpus=8) == 3
    assert gpus_for(task(device_map={"": "cuda"}), cluster_gpus=8) == 1
    assert gpus_for(task(device_map={"": "cpu"}), cluster_gpus=8) == 0
    # without GPUs "auto" places the layers on the CPU
    assert gpus_for(task(device_map="auto"), cluster_gpus=0) == 0
    # loaded another way, the same model is another actor's
    assert model_key(task(model="m", quantization="4bit")) != model_key(task(model="m"))
    assert model_key(task(model="m", device_map="auto")) != model_key(task(model="m"))


def test_without_ray_the_error_says_how_to_install(tmp_path, monkeypatch, capsys):
    (tmp_path / "base.toml").write_text(RULES)
    (tmp_path / "sweep.toml").write_text('scenario = "base.toml"\n[sweep]\ngame.noise = [0.0]\n')
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray fails
    assert (
        main(
            [
                str(tmp_path / "sweep.toml"),
                "--backend",
                "ray",
                "--out",
                str(tmp_path / "out"),
                "--quiet",
            ]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert 'pip install -e ".[ray]"' in err and "Traceback" not in err


def test_a_run_needing_more_gpus_than_any_node_has_fails_at_once():
    from abm.batch.ray_backend import _schedule

    class TwoNodesOfFour:  # only what scheduling asks before it would start an actor
        def cluster_resources(self):
            return {"CPU": 32.0, "GPU": 8.0}

        def nodes(self):
            return [{"Alive": True, "Resources": {"GPU": 4.0}}] * 2

        def remote(self, *args, **kwargs):
            return lambda thing: thing

    wide = {"model.layers.0": 0, "lm_head": 5}  # GPU 5: six GPUs on one node
    tasks = [Task(f"r{i}", "b", (), i, "o", llm=({"device_map": wide},)) for i in range(2)]
    rows = []
    _schedule(TwoNodesOfFour(), tasks, lambda task, row: rows.append(row), None, 0)
    assert [r["status"] for r in rows] == ["failed", "failed"]
    assert rows[0]["error"] == (
        "the run's LLM needs 6 GPUs on one machine (its device or device_map), but no node "
        "of the Ray cluster has more than 4"
    )


def test_actors_that_need_several_gpus_are_as_many_as_the_nodes_hold():
    from abm.batch.ray_backend import LLMWorker, _schedule

    started = []

    class Actor:
        class run:  # noqa: N801 (as Ray spells an actor's method)
            @staticmethod
            def remote(task):
                return task.run_id

    class ActorClass:
        def options(self, **options):
            started.append(options)
            return self

        def remote(self):
            return Actor()

    class ThreeNodesOfFour:  # what scheduling asks until it waits for a first result
        def cluster_resources(self):
            return {"CPU": 48.0, "GPU": 12.0}

        def nodes(self):
            return [{"Alive": True, "Resources": {"GPU": 4.0}}] * 3

        def remote(self, *args, **kwargs):
            return ActorClass() if args and args[0] is LLMWorker else (lambda fn: fn)

        def wait(self, refs, num_returns):
            raise KeyboardInterrupt  # the actors were started: that is all this test needs

        def kill(self, actor):
            pass

    # cuda:2 needs three GPUs an actor; the 12 GPUs would make four actors, but they are
    # on three nodes of four, each of which holds one (a fourth would wait for ever)
    tasks = [Task(f"r{i}", "b", (), i, "o", llm=({"device": "cuda:2"},)) for i in range(6)]
    with pytest.raises(KeyboardInterrupt):
        _schedule(ThreeNodesOfFour(), tasks, lambda task, row: None, None, 0)
    assert [o["num_gpus"] for o in started] == [3, 3, 3]
