"""Bad input: one clear paragraph naming file and field, exit status 2, nothing written."""

import subprocess
import sys

import pytest
from conftest import ROOT

from abm.run import main

GOOD = """
name = "tiny"
seed = 1
[game]
noise = 0.0
[match]
rounds = 3
[graph]
kind = "complete"
self_loops = true
[population]
players = ["all_d", "tit_for_tat", "trigger"]
"""


def run_cli(path, *extra, out=None):
    args = [str(path), "--quiet", *extra]
    if out is not None:
        args += ["--out", str(out)]
    return main(args)


@pytest.mark.parametrize(
    "edit, must_mention",
    [
        (("noise = 0.0", "nosie = 0.1"), ["game.nosie", "did you mean 'noise'", "allowed keys"]),
        (("noise = 0.0", "noise = 1.5"), ["game.noise", "less than or equal to 1", "1.5"]),
        (("rounds = 3", "rounds = 0"), ["match.rounds", "greater than or equal to 1"]),
        (
            ('"trigger"]', '"triger"]'),
            ["population.players[2]", "unknown policy 'triger'", "did you mean 'trigger'"],
        ),
        (('"trigger"]', '{ name = "random", p = 2 }]'), ["population.players[2]", "random", "p"]),
        (
            ('"trigger"]', '{ name = "random", q = 0.5 }]'),
            ["population.players[2]", "q", "parameters allowed: p"],
        ),
        (
            ('kind = "complete"', 'kind = "completee"'),
            ["graph.kind", "unknown graph kind", "watts_strogatz"],
        ),
        (
            ('kind = "complete"', 'kind = "complete"\nn = 4'),
            ["population.players", "3 policies", "4 nodes"],
        ),
        (
            ('kind = "complete"', 'kind = "watts_strogatz"\nn = 3\nk = 4\np = 0.1'),
            ["graph.k", "smaller than n"],
        ),
        (('kind = "complete"', 'kind = "random_regular"\nn = 3\nd = 1'), ["graph.d", "even"]),
        (
            ('kind = "complete"', 'kind = "file"\npath = "missing.graphml"'),
            ["graph.path", "no such file"],
        ),
        (("noise = 0.0", "noise = 0.0\nT = 8"), ["game", "T > R > P > S", "custom"]),
        (("rounds = 3", "rounds = 3\ncontinuation_probability = 0.9"), ["match", "not both"]),
        (("[match]", '[memory]\nscope = "all"\n[match]'), ["memory", "finite window"]),
        (("[match]", "[memory]\nwindow = 1\n[match]\n"), []),  # replaced below for TF2T
        (("rounds = 3", "rounds = 3.5"), ["match.rounds", "integer"]),
        (("[population]", "[populaton]"), ["populaton", "did you mean 'population'"]),
    ],
)
def test_bad_scenarios_are_explained(scenario_file, tmp_path, capsys, edit, must_mention):
    text = GOOD.replace(*edit)
    if not must_mention:  # a window too short for a policy's memory depth
        text = text.replace('"trigger"]', '"tit_for_two_tats"]')
        must_mention = ["memory.window", "tit_for_two_tats", "2 rounds"]
    path = scenario_file(text)
    out = tmp_path / "out"
    assert run_cli(path, out=out) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}")
    for piece in must_mention:
        assert piece in err, (piece, err)
    assert "Traceback" not in err
    assert len(err.strip().splitlines()) == 1
    assert not out.exists()
    assert not list(tmp_path.glob(".out.partial-*"))


def test_malformed_toml(scenario_file, capsys):
    path = scenario_file(GOOD.replace("[game]", "[game"))
    assert run_cli(path) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "not valid TOML" in err and "line" in err


def test_missing_file(tmp_path, capsys):
    assert run_cli(tmp_path / "nope.toml") == 2
    assert "no such scenario file" in capsys.readouterr().err


def test_mix_must_add_up(scenario_file, capsys):
    path = scenario_file(
        GOOD.replace(
            'players = ["all_d", "tit_for_tat", "trigger"]',
            'mix = [{ policy = "all_d", share = 0.5 }, { policy = "all_c", share = 0.4 }]',
        )
    )
    assert run_cli(path) == 2
    err = capsys.readouterr().err
    assert "population" in err and "add up to 0.9" in err


def test_set_values_are_validated_like_the_file(scenario_file, capsys):
    path = scenario_file(GOOD)
    assert run_cli(path, "--set", "game.noise=2") == 2
    err = capsys.readouterr().err
    assert "game.noise" in err and "(set with --set)" in err
    assert run_cli(path, "--set", "game.noise") == 2
    assert "expected KEY.PATH=VALUE" in capsys.readouterr().err
    assert run_cli(path, "--set", "graph.kind.x=1") == 2
    assert "graph.kind is a value" in capsys.readouterr().err


def test_existing_nonempty_out_is_refused(scenario_file, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    assert run_cli(scenario_file(GOOD), out=out) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "mine"


@pytest.mark.slow
def test_subprocess_exit_status_and_no_traceback(scenario_file, tmp_path):
    path = scenario_file(GOOD.replace("rounds = 3", "rounds = 0"))
    proc = subprocess.run(
        [sys.executable, "-m", "abm.run", str(path), "--out", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 2
    assert "match.rounds" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "o").exists()


def test_failure_midway_leaves_no_complete_folder(scenario_file, tmp_path, monkeypatch):
    def boom(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr("abm.run.write_results", boom)
    out = tmp_path / "run"
    with pytest.raises(RuntimeError):
        run_cli(scenario_file(GOOD), out=out)
    assert not out.exists()
    assert list(tmp_path.iterdir()) == [tmp_path / "scenario.toml"]


def test_policy_that_cannot_be_built_for_the_game(scenario_file, capsys):
    text = GOOD.replace("noise = 0.0", 'kind = "custom"\nR = 1\nS = 1\nT = 2\nP = 0').replace(
        '"trigger"]', '"generous_tit_for_tat"]'
    )
    assert run_cli(scenario_file(text)) == 2
    err = capsys.readouterr().err
    assert "population" in err and "give g" in err
