"""python -m abm.run SCENARIO --replicates N: N seeds, cells and rates with intervals."""

from __future__ import annotations

import json
import statistics

import pandas as pd
import pytest
from conftest import SCENARIOS
from test_round_robin import PAYOFF, PLAYERS

from abm.run import main

T_975_2 = 4.302652729911275  # Student t, 97.5 % quantile, 2 degrees of freedom


@pytest.mark.slow
def test_identical_replicates_reproduce_the_hand_table(tmp_path):
    assert (
        main(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--replicates",
                "2",
                "--quiet",
                "--out",
                str(tmp_path / "r"),
            ]
        )
        == 0
    )
    cells = pd.read_csv(tmp_path / "r" / "payoff_matrix_replicates.csv")
    cells = cells.set_index(["player", "opponent"])
    for i, row in enumerate(PLAYERS):
        for j, col in enumerate(PLAYERS):
            cell = cells.loc[(row, col)]
            # no noise: both seeds play the same matches, so no spread
            assert cell["n"] == 2 and cell["mean"] == PAYOFF[i][j] and cell["std"] == 0
            assert cell["ci_low"] == cell["ci_high"] == PAYOFF[i][j]
    meta = json.loads((tmp_path / "r" / "replicates.json").read_text())
    assert meta["replicates"] == 2 and meta["seeds"][1] == meta["seeds"][0] + 1
    assert (tmp_path / "r" / "payoff_heatmap.png").stat().st_size > 0


@pytest.mark.slow
def test_intervals_are_student_t_over_replicates(tmp_path):
    out = tmp_path / "r"
    assert (
        main(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--replicates",
                "3",
                "--quiet",
                "--set",
                "game.noise=0.1",
                "--seed",
                "5",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    cells = pd.read_csv(out / "payoff_matrix_replicates.csv").set_index(["player", "opponent"])
    tables = [
        pd.read_csv(out / f"replicate-{i}" / "payoff_matrix.csv", index_col="player")
        for i in (1, 2, 3)
    ]
    for row, col in [("All-D", "All-C"), ("Tit-for-tat", "Defect Once")]:
        values = [t.loc[row, col] for t in tables]
        mean, sd = statistics.mean(values), statistics.stdev(values)
        half = T_975_2 * sd / 3**0.5
        assert cells.loc[(row, col), "mean"] == pytest.approx(mean)
        assert cells.loc[(row, col), "ci_low"] == pytest.approx(mean - half)
        assert cells.loc[(row, col), "ci_high"] == pytest.approx(mean + half)
    seeds = [
        json.loads((out / f"replicate-{i}" / "summary.json").read_text())["seed"] for i in (1, 2, 3)
    ]
    assert seeds == [5, 6, 7]


@pytest.mark.slow
def test_llm_cooperation_and_pooled_fingerprint(fake, tmp_path):
    out = tmp_path / "r"
    assert (
        main(
            [
                str(SCENARIOS / "round_robin.toml"),
                "--replicates",
                "2",
                "--quiet",
                "--set",
                "population.players[5].reflection=false",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    coop = pd.read_csv(out / "llm_cooperation_replicates.csv").set_index("opponent")
    # the fake plays Tit-for-tat: against All-D one C in five, in both replicates
    assert coop.loc["All-D", "mean"] == pytest.approx(0.2) and coop.loc["All-D", "n"] == 2
    prints = pd.read_csv(out / "llm_fingerprints_replicates.csv").set_index("situation")
    assert prints["p"].tolist() == [1, 1, 0, 1, 0]
    # first-round decisions of both replicates pooled: 7 matches' sides x 2
    assert prints.loc["first", "n"] == 14
    for chart in ("llm_cooperation", "llm_fingerprint"):
        assert (out / f"{chart}.html").is_file()


@pytest.mark.slow
def test_an_interrupted_command_resumes(tmp_path):
    out = tmp_path / "r"
    args = [str(SCENARIOS / "round_robin_rules.toml"), "--quiet", "--out", str(out)]
    assert main(args + ["--replicates", "2"]) == 0
    first = (out / "replicate-1" / "summary.json").stat().st_mtime_ns
    assert main(args + ["--replicates", "3"]) == 0
    assert (out / "replicate-1" / "summary.json").stat().st_mtime_ns == first  # kept
    assert json.loads((out / "replicates.json").read_text())["replicates"] == 3


def test_zero_replicates_is_an_argument_error(capsys):
    with pytest.raises(SystemExit) as exit_info:
        main([str(SCENARIOS / "round_robin_rules.toml"), "--replicates", "0"])
    assert exit_info.value.code == 2
    assert "--replicates must be 1 or more" in capsys.readouterr().err


def test_a_folder_holding_other_files_is_refused_and_left_alone(tmp_path, capsys):
    (tmp_path / "busy").mkdir()
    (tmp_path / "busy" / "notes.txt").write_text("mine")
    assert (
        main(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--quiet",
                "--replicates",
                "2",
                "--out",
                str(tmp_path / "busy"),
            ]
        )
        == 2
    )
    assert "holds other files" in capsys.readouterr().err
    assert sorted(p.name for p in (tmp_path / "busy").iterdir()) == ["notes.txt"]


@pytest.mark.slow
def test_another_request_into_the_same_folder_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    args = [
        str(SCENARIOS / "round_robin_rules.toml"),
        "--quiet",
        "--out",
        str(out),
        "--replicates",
        "2",
    ]
    assert main(args) == 0
    assert main(args + ["--set", "game.noise=0.3"]) == 2
    assert "holds replicates of another request" in capsys.readouterr().err
    assert sorted(p.name for p in out.iterdir() if p.name.startswith("replicate-")) == [
        "replicate-1",
        "replicate-2",
    ]


@pytest.mark.slow
def test_a_scenario_without_a_seed_resumes_with_its_recorded_seed(tmp_path, scenario_file):
    path = scenario_file(
        '[match]\nrounds = 3\n[graph]\nkind = "complete"\n'
        '[population]\nplayers = ["all_d", "random"]\n'
    )
    import shutil

    out = tmp_path / "r"
    args = [str(path), "--quiet", "--out", str(out), "--replicates", "2"]
    assert main(args) == 0
    first = json.loads((out / "replicates.json").read_text())
    shutil.rmtree(out / "replicate-2")  # as if the command had been interrupted
    assert main(args) == 0  # no seed in the file: the recorded one is used again
    meta = json.loads((out / "replicates.json").read_text())
    assert meta["base_seed"] == first["base_seed"]
    assert meta["seeds"] == [first["base_seed"], first["base_seed"] + 1]


def test_llm_replicates_without_rounds_tables_skip_the_llm_summary(fake, tmp_path):
    out = tmp_path / "r"
    assert (
        main(
            [
                str(SCENARIOS / "round_robin.toml"),
                "--replicates",
                "2",
                "--quiet",
                "--set",
                "output.rounds=false",
                "--set",
                "output.charts=false",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (out / "payoff_matrix_replicates.csv").is_file()
    assert not (out / "llm_cooperation_replicates.csv").exists()


def test_a_failing_first_replicate_leaves_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("ABM_MEMORY_LIMIT_GB", "0.000001")  # every run is refused as too big
    out = tmp_path / "r"
    assert (
        main(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--quiet",
                "--replicates",
                "2",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "error:" in capsys.readouterr().err
    assert not out.exists()


def test_an_unreadable_record_is_refused(tmp_path, capsys):
    out = tmp_path / "r"
    out.mkdir()
    (out / "replicates.json").write_text("[1, 2")
    assert (
        main(
            [
                str(SCENARIOS / "round_robin_rules.toml"),
                "--quiet",
                "--replicates",
                "2",
                "--out",
                str(out),
            ]
        )
        == 2
    )
    assert "replicates.json cannot be read" in capsys.readouterr().err
    assert (out / "replicates.json").read_text() == "[1, 2"
