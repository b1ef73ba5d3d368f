"""Sweep files: grid expansion, zipped keys, seeds, overrides and the errors."""

import hashlib
import json
import subprocess
import sys
import tomllib

import numpy as np
import pytest
from batch_scenarios import tiny_base
from conftest import ROOT, SCENARIOS

from abm.batch.__main__ import main
from abm.batch.keys import overrides_for
from abm.batch.sweep import derive_seed, load_sweep
from abm.errors import ScenarioError
from abm.scenario import load_scenario

BASE = tiny_base()


@pytest.fixture
def sweep_file(tmp_path):
    (tmp_path / "base.toml").write_text(BASE, encoding="utf-8")

    def write(body: str, head: str = 'scenario = "base.toml"\nseed = 11\n') -> str:
        path = tmp_path / "sweep.toml"
        path.write_text(head + body, encoding="utf-8")
        return path

    return write


def test_grid_is_the_product_in_file_order(sweep_file):
    sweep = load_sweep(
        sweep_file("""
[sweep]
replicates = 2
game.noise = [0.0, 0.1, 0.2]
match.rounds = [3, 7]
""")
    )
    assert sweep.keys == ["game.noise", "match.rounds"]
    assert sweep.points == [
        {"game.noise": n, "match.rounds": r} for n in (0.0, 0.1, 0.2) for r in (3, 7)
    ]
    assert len(sweep.runs) == 12
    # replicate-major order: every point once before any point twice
    assert [(r.point, r.replicate) for r in sweep.runs] == [
        (p, rep) for rep in range(2) for p in range(6)
    ]
    assert len({r.run_id for r in sweep.runs}) == 12
    run = sweep.runs[3]  # point 3: noise 0.1, rounds 7
    assert run.params == {"game.noise": 0.1, "match.rounds": 7}
    assert run.overrides == ("game.noise=0.1", "match.rounds=7")
    scenario = load_scenario(sweep.base, list(run.overrides), run.seed)
    assert (scenario.game.noise, scenario.match.rounds, scenario.seed) == (0.1, 7, run.seed)


def test_zipped_keys_vary_together(sweep_file):
    sweep = load_sweep(
        sweep_file("""
[sweep]
game.noise = [0.0, 0.1]
[[sweep.zip]]
match.rounds = [2, 4, 6]
"population.players[2].p" = [0.2, 0.4, 0.6]
""")
    )
    assert [(p["match.rounds"], p["population.players[2].p"]) for p in sweep.points] == [
        (2, 0.2),
        (4, 0.4),
        (6, 0.6),
        (2, 0.2),
        (4, 0.4),
        (6, 0.6),
    ]
    assert [p["game.noise"] for p in sweep.points] == [0.0] * 3 + [0.1] * 3
    assert [a.keys for a in sweep.axes] == [
        ("game.noise",),
        ("match.rounds", "population.players[2].p"),
    ]


def test_list_elements_become_whole_list_overrides(sweep_file):
    sweep = load_sweep(
        sweep_file("""
[set]
"population.players[1].label" = "TFT"
[sweep]
"population.players[2].p" = [0.25]
""")
    )
    (override,) = sweep.runs[0].overrides
    key, _, value = override.partition("=")
    assert key == "population.players"
    players = tomllib.loads(f"v = {value}")["v"]
    assert players == [
        "all_d",
        {"name": "tit_for_tat", "label": "TFT"},
        {"name": "random", "p": 0.25},
    ]


def test_whole_tables_are_set_before_keys_inside_them():
    base = {"graph": {"kind": "watts_strogatz", "n": 100, "k": 4, "p": 0.1}}
    sets = overrides_for(base, {"graph.n": 30, "graph": {"kind": "ring", "k": 2}}, "x")
    assert sets == ['graph={kind = "ring", k = 2, n = 30}', "graph.n=30"]


def test_seed_is_a_function_of_master_point_and_replicate_only(sweep_file):
    first = load_sweep(
        sweep_file("""
[sweep]
replicates = 3
game.noise = [0.0, 0.1]
""")
    )
    # the recipe, written out: SHA-256 of the point as sorted compact JSON, the first
    # four little-endian 32-bit words as the spawn key with the replicate, master seed 11
    digest = hashlib.sha256(
        json.dumps({"game.noise": 0.1}, separators=(",", ":")).encode()
    ).digest()
    words = [int.from_bytes(digest[i : i + 4], "little") for i in range(0, 16, 4)]
    expected = int(np.random.SeedSequence(11, spawn_key=(*words, 2)).generate_state(1)[0])
    run = next(r for r in first.runs if r.params == {"game.noise": 0.1} and r.replicate == 2)
    assert run.seed == expected == derive_seed(11, {"game.noise": 0.1}, 2)
    # a grown, reordered grid: the runs that were there keep their seeds and folders
    grown = load_sweep(
        sweep_file("""
[sweep]
replicates = 4
game.noise = [0.3, 0.1, 0.0]
""")
    )
    old = {(r.params["game.noise"], r.replicate): (r.seed, r.run_id) for r in first.runs}
    new = {(r.params["game.noise"], r.replicate): (r.seed, r.run_id) for r in grown.runs}
    assert len(old) == 6 and len(new) == 12
    assert all(new[key] == value for key, value in old.items())
    # 0 and 0.0 are the same value
    same = load_sweep(sweep_file("[sweep]\nreplicates = 3\ngame.noise = [0, 0.1]\n"))
    assert [r.seed for r in same.runs] == [r.seed for r in first.runs]
    # replicates of one point get different seeds; another master seed changes them all
    seeds = [r.seed for r in grown.runs if r.params == {"game.noise": 0.0}]
    assert len(set(seeds)) == 4
    other = load_sweep(
        sweep_file(
            "[sweep]\nreplicates = 3\ngame.noise = [0.0, 0.1]\n",
            head='scenario = "base.toml"\nseed = 12\n',
        )
    )
    assert not {r.seed for r in other.runs} & {r.seed for r in first.runs}


@pytest.mark.slow
def test_seed_is_the_same_in_another_process(sweep_file):
    path = sweep_file("[sweep]\nreplicates = 2\ngame.noise = [0.0, 0.1]\n")
    code = (
        "import sys; from abm.batch import load_sweep; "
        "print([r.seed for r in load_sweep(sys.argv[1]).runs])"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(path)],
        capture_output=True,
        text=True,
        check=True,
        env={"PYTHONHASHSEED": "123", "PATH": ""},
        cwd=ROOT,
    ).stdout
    assert out.strip() == str([r.seed for r in load_sweep(path).runs])


def test_master_seed_defaults_to_the_base_scenarios(sweep_file):
    sweep = load_sweep(sweep_file("[sweep]\ngame.noise = [0.0]\n", head='scenario = "base.toml"\n'))
    assert sweep.seed == 5


@pytest.mark.parametrize(
    "body, must_mention",
    [
        ("[sweep]\ngame.nosie = [0.1]\n", ["game.nosie", "did you mean 'noise'"]),
        (
            "[sweep]\ngaem.noise = [0.1]\n",
            ["unknown key path 'gaem.noise'", "did you mean 'game'", "starts with one of"],
        ),
        ("[sweep]\ngame.noise = []\n", ["game.noise", "empty list"]),
        ("[sweep]\ngame.noise = 0.1\n", ["game.noise", "expected a list", "[set]"]),
        (
            "[sweep]\ngame.noise = [0.1, 1.5]\n",
            [
                "game.noise = 1.5",
                "base scenario base.toml",
                "less than or equal to 1",
                "set by the sweep",
            ],
        ),
        ('[sweep]\nmatch.rounds = [3, "five"]\n', ["match.rounds", "integer"]),
        ("[sweep]\ngame.noise = [0.1, 0.1]\n", ["game.noise", "listed twice"]),
        ("[sweep]\nreplicates = 0\n", ["sweep.replicates", "greater than or equal to 1"]),
        ("[sweep]\nreplicates = 2.5\n", ["replicates", "integer"]),
        ("[sweep]\nseed = [1, 2]\n", ["'seed' cannot be swept", "replicates"]),
        (
            "[[sweep.zip]]\ngame.noise = [0.0, 0.1]\nmatch.rounds = [2]\n",
            ["zipped lists must have the same length", "game.noise: 2", "match.rounds: 1"],
        ),
        ("[sweep]\ngame.noise = [0.1]\n[[sweep.zip]]\ngame.noise = [0.2]\n", ["swept twice"]),
        ('[sweep]\n"population.players[7].p" = [0.1]\n', ["population.players[7].p", "3 elements"]),
        ('[sweep]\n"population.players[0].p" = [0.1]\n', ["population.players[0]", "all_d"]),
        (
            '[sweep]\ngraph.k = [1, 9]\ngraph.kind = ["ring"]\ngraph.n = [3]\n',
            ["graph.k = 9", "graph.k"],
        ),
        ("[sweeep]\n", ["unknown key 'sweeep'", "did you mean 'sweep'"]),
        ('[report]\nmetric = ["x"]\n', ["unknown key 'report.metric'", "metrics"]),
    ],
)
def test_bad_sweeps_are_explained(sweep_file, tmp_path, capsys, body, must_mention):
    path = sweep_file(body)
    out = tmp_path / "out"
    assert main([str(path), "--out", str(out), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}"), err
    for piece in must_mention:
        assert piece in err, (piece, err)
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert not out.exists()  # validated before anything is written


def test_missing_base_and_missing_seed(tmp_path, capsys):
    path = tmp_path / "s.toml"
    path.write_text('scenario = "nope.toml"\n[sweep]\ngame.noise = [0.1]\n')
    assert main([str(path)]) == 2
    assert "field 'scenario': no such scenario file" in capsys.readouterr().err
    (tmp_path / "b.toml").write_text(BASE.replace("seed = 5\n", ""))
    path.write_text('scenario = "b.toml"\n[sweep]\ngame.noise = [0.1]\n')
    with pytest.raises(ScenarioError, match="field 'seed' is required"):
        load_sweep(path)


def test_graph_errors_show_before_anything_runs(sweep_file):
    # the graph is only built by the model; rule-only points are built once up front
    with pytest.raises(ScenarioError) as info:
        load_sweep(sweep_file("[set]\ngraph.n = 4\n[sweep]\nmatch.rounds = [2]\n"))
    assert "population.players" in str(info.value) and "4 nodes" in str(info.value)


def test_dry_run_lists_runs_with_seeds(capsys):
    assert main([str(SCENARIOS / "sweep_noise.toml"), "--dry-run"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    sweep = load_sweep(SCENARIOS / "sweep_noise.toml")
    assert len(lines) == 1 + len(sweep.runs) == 1 + 6 * 2 * 10
    assert lines[1].split("\t")[:2] == [sweep.runs[0].run_id, f"seed={sweep.runs[0].seed}"]


@pytest.mark.parametrize(
    "name, runs", [("sweep_noise", 120), ("sweep_memory_llm", 12), ("sweep_graphs", 60)]
)
def test_shipped_sweeps_are_valid(name, runs):
    sweep = load_sweep(SCENARIOS / f"{name}.toml")
    assert len(sweep.runs) == runs
    if name == "sweep_memory_llm":
        assert all(run.llm and run.llm[0]["reflection"] is False for run in sweep.runs)
        assert {run.llm[0]["framing"] for run in sweep.runs} == {"police", "neutral"}
