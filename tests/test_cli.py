"""End to end through ``python -m abm.run``: files, summary, overrides, reproducibility."""

import json
import subprocess
import sys
import tomllib

import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import ROOT, SCENARIOS

from abm.run import main

SMALL = SCENARIOS / "small_world_rules.toml"


@pytest.fixture(scope="module")
def small_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("cli") / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "abm.run",
            str(SMALL),
            "--out",
            str(out),
            "--seed",
            "11",
            "--set",
            "game.noise=0.1",
            "--set",
            "pairing.steps=4",
        ],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert proc.returncode == 0, proc.stderr
    return out, proc.stdout


@pytest.mark.slow
def test_every_output_is_written(small_run):
    out, stdout = small_run
    names = {p.name for p in out.iterdir()}
    for name in [
        "config.toml",
        "rounds.parquet",
        "matches.csv",
        "payoff_matrix.csv",
        "defections.csv",
        "summary.json",
        "steps.csv",
        "agents.csv",
        "payoff_heatmap.html",
        "payoff_heatmap.png",
        "defections_heatmap.html",
        "defections_heatmap.png",
        "cooperation.html",
        "cooperation.png",
    ]:
        assert name in names
    assert stdout.strip().splitlines()[-1] == f"outputs: {out}"
    assert (out / "payoff_heatmap.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "<script" in (out / "payoff_heatmap.html").read_text()


@pytest.mark.slow
def test_config_records_seed_and_overrides(small_run):
    out, _ = small_run
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["seed"] == 11
    assert config["game"]["noise"] == 0.1
    assert config["pairing"]["steps"] == 4
    assert config["memory"] == {"window": 3, "scope": "opponent"}


@pytest.mark.slow
def test_tables_agree_with_each_other(small_run):
    out, _ = small_run
    rounds = pq.read_table(out / "rounds.parquet").to_pandas()
    matches = pd.read_csv(out / "matches.csv")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["seed"] == 11 and summary["steps"] == 4
    assert len(rounds) == summary["decisions"] == matches["rounds"].sum()
    assert set(rounds.columns) >= {
        "step",
        "match",
        "round",
        "agent",
        "opponent",
        "player",
        "opponent_player",
        "policy",
        "opponent_policy",
        "intended",
        "actual",
        "payoff",
    }
    by_side = rounds.groupby(["match", "agent"])["payoff"].sum()
    per_match = matches.set_index(["match", "agent"])["payoff"]
    assert by_side.sort_index().to_numpy() == pytest.approx(per_match.sort_index().to_numpy())
    assert (rounds["actual"] == "C").mean() == pytest.approx(summary["cooperation_rate"])
    # noise 0.1: some intended actions were flipped, and only in the actual column
    flipped = (rounds["intended"] != rounds["actual"]).mean()
    assert 0.05 < flipped < 0.15
    # payoff cell = mean total payoff of the row player's matches against that column
    payoff = pd.read_csv(out / "payoff_matrix.csv", index_col="player")
    expect = matches.groupby(["player", "opponent_player"])["payoff"].mean()
    for (row, col), value in expect.items():
        assert payoff.loc[row, col] == pytest.approx(value)
    defections = pd.read_csv(out / "defections.csv", index_col="player")
    expect = matches.groupby(["player", "opponent_player"])["intended_defections"].mean()
    for (row, col), value in expect.items():
        assert defections.loc[row, col] == pytest.approx(value)
    assert summary["cooperation_by_step"] == pytest.approx(
        pd.read_csv(out / "steps.csv")["cooperation_rate"].tolist()
    )


@pytest.mark.slow
def test_same_seed_gives_identical_rounds_and_other_seed_differs(tmp_path):
    args = [str(SMALL), "--quiet", "--set", "pairing.steps=3"]
    assert main([*args, "--out", str(tmp_path / "a"), "--seed", "5"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--seed", "5"]) == 0
    assert main([*args, "--out", str(tmp_path / "c"), "--seed", "6"]) == 0
    a, b, c = (pq.read_table(tmp_path / x / "rounds.parquet") for x in "abc")
    assert a.equals(b)
    assert not a.equals(c)
    assert (tmp_path / "a" / "matches.csv").read_bytes() == (
        tmp_path / "b" / "matches.csv"
    ).read_bytes()


def test_default_output_folder_and_switches(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert (
        main(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--set",
                "output.rounds=false",
                "--set",
                "output.charts=false",
            ]
        )
        == 0
    )
    line = capsys.readouterr().out.strip().splitlines()[-1]
    folder = tmp_path / line.removeprefix("outputs: ")
    assert folder.parent == tmp_path / "outputs"
    assert folder.name.startswith("round_robin_rules-")
    names = {p.name for p in folder.iterdir()}
    assert "rounds.parquet" not in names and "payoff_heatmap.png" not in names
    assert "payoff_matrix.csv" in names
    assert not [p for p in (tmp_path / "outputs").iterdir() if p.name.startswith(".")]


def test_set_accepts_bare_words_and_tables(tmp_path):
    out = tmp_path / "ring"
    assert (
        main(
            [
                str(SMALL),
                "--quiet",
                "--out",
                str(out),
                "--set",
                "graph={kind='ring', n=12}",
                "--set",
                "pairing.scheme=round_robin",
                "--set",
                "pairing.steps=2",
            ]
        )
        == 0
    )
    config = tomllib.loads((out / "config.toml").read_text())
    assert config["graph"]["kind"] == "ring" and config["pairing"]["scheme"] == "round_robin"
