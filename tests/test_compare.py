"""python -m abm.compare: conditions side by side, with a stated test of differences."""

from __future__ import annotations

import json
import tomllib

import pandas as pd
import pytest
import tomli_w
from conftest import SCENARIOS

from abm.compare import main, two_proportion_test
from abm.run import run_scenario


def experiment(tmp_path, name, seed=2024, **llm):
    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1].update({"reflection": False, **llm})
    data["seed"] = seed
    path = tmp_path / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return run_scenario(path, out=tmp_path / name, quiet=True, overrides=["output.charts=false"])


def test_two_proportion_test_by_hand():
    # 30/50 against 20/50: pooled 0.5, se sqrt(0.25 * (1/50 + 1/50)) = 0.1, z = 2
    z, p = two_proportion_test(30, 50, 20, 50)
    assert z == pytest.approx(2.0) and p == pytest.approx(0.0455003, abs=1e-6)
    assert two_proportion_test(5, 5, 5, 5) == (0.0, 1.0)


def test_identical_models_differ_in_nothing_and_different_ones_do(fake, tmp_path, capsys):
    a = experiment(tmp_path, "police")
    b = experiment(tmp_path, "neutral", framing="neutral")  # the fake plays TFT in both
    fake.script = lambda text: "Answer: testify"
    c = experiment(tmp_path, "defector", mode="generate")
    assert main([str(a), str(b), str(c), "--out", str(tmp_path / "cmp")]) == 0
    assert "3 conditions compared" in capsys.readouterr().out
    coop = pd.read_csv(tmp_path / "cmp" / "cooperation.csv")
    police = coop[coop["condition"] == "police"].set_index("opponent")
    # Tit-for-tat against All-D: C then four D; against All-C: five C
    assert police.loc["All-D", "share"] == pytest.approx(1 / 5)
    assert police.loc["All-C", "share"] == 1.0
    # all: 35 decisions; C against All-C, Trigger, TFT (15), self-play (10), All-D (1),
    # Defect Once (C D C C C: 4) = 30
    assert police.loc["all", "decisions"] == 35 and police.loc["all", "cooperate"] == 30
    lo, hi = police.loc["all", ["low", "high"]]
    assert lo < 30 / 35 < hi
    diffs = pd.read_csv(tmp_path / "cmp" / "differences.csv")
    assert set(diffs["player"]) == {"LLM"}  # pairs are matched by player and opponent
    same = diffs[(diffs["a"] == "police") & (diffs["b"] == "neutral")]
    assert (same["difference"] == 0).all() and (same["p_value"] == 1).all()
    apart = diffs[
        (diffs["a"] == "police") & (diffs["b"] == "defector") & (diffs["opponent"] == "all")
    ].iloc[0]
    assert apart["difference"] == pytest.approx(30 / 35) and apart["p_value"] < 1e-6
    prints = pd.read_csv(tmp_path / "cmp" / "fingerprints.csv")
    tft = prints[prints["condition"] == "police"].set_index("situation")["p"]
    assert tft.tolist() == [1, 1, 0, 1, 0]
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "two-proportion z-test" in page and "vega" in page


def test_a_sweep_folder_gives_one_condition_per_point(fake, tmp_path):
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    rows = []
    for run_id, (point, framing, seed) in enumerate(
        [(0, "police", 1), (0, "police", 2), (1, "neutral", 1)]
    ):
        out = experiment(tmp_path, f"r{run_id}", seed=seed, framing=framing)
        out.rename(sweep / "runs" / str(run_id))
        rows.append(
            {
                "run_id": run_id,
                "point": point,
                "status": "ok",
                "population.players[5].framing": framing,
            }
        )
    pd.DataFrame(rows).to_parquet(sweep / "results.parquet")
    (sweep / "sweep.json").write_text(json.dumps({"keys": ["population.players[5].framing"]}))
    assert main([str(sweep), "--out", str(tmp_path / "cmp")]) == 0
    settings = pd.read_csv(tmp_path / "cmp" / "conditions.csv")
    assert settings["condition"].tolist() == [
        "population.players[5].framing=police",
        "population.players[5].framing=neutral",
    ]
    assert settings["runs"].tolist() == [2, 1]
    coop = pd.read_csv(tmp_path / "cmp" / "cooperation.csv")
    both = coop[coop["condition"].str.endswith("police") & (coop["opponent"] == "all")]
    assert both["decisions"].iloc[0] == 70  # two replicates pooled


@pytest.mark.parametrize(
    "args, message",
    [
        (["{tmp}/missing", "{tmp}/missing2"], "no such folder"),
        (["{run}"], "at least two runs"),
        (["{run}", "{tmp}"], "not a run folder"),
    ],
)
def test_bad_arguments(fake, tmp_path, capsys, args, message):
    run = experiment(tmp_path, "one")
    argv = [a.format(tmp=tmp_path, run=run) for a in args] + ["--out", str(tmp_path / "cmp")]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err
    assert not (tmp_path / "cmp").exists()


def test_a_swept_probability_gives_the_cooperation_curve(fake, tmp_path):
    # the fake plays Tit-for-tat against an opponent cooperating with probability p:
    # p = 0 (All-D): C once, then D: 1 C in 10; p = 1 (All-C): all C
    sweep = tmp_path / "sweep"
    (sweep / "runs").mkdir(parents=True)
    rows = []
    for run_id, p in enumerate([0.0, 1.0]):
        data = tomllib.loads((SCENARIOS / "llm_vs_random.toml").read_text())
        data["population"]["players"][0]["p"] = p
        path = tmp_path / f"a{run_id}.toml"
        path.write_text(tomli_w.dumps(data))
        run_scenario(
            path, out=sweep / "runs" / str(run_id), quiet=True, overrides=["output.charts=false"]
        )
        rows.append(
            {"run_id": run_id, "point": run_id, "status": "ok", "population.players[0].p": p}
        )
    pd.DataFrame(rows).to_parquet(sweep / "results.parquet")
    (sweep / "sweep.json").write_text(json.dumps({"keys": ["population.players[0].p"]}))
    assert main([str(sweep), "--out", str(tmp_path / "cmp")]) == 0
    coop = pd.read_csv(tmp_path / "cmp" / "cooperation.csv")
    overall = coop[coop["opponent"] == "all"].set_index("condition")["share"]
    assert overall.tolist() == [pytest.approx(10 / 100), 1.0]  # ten 10-round matches
    page = (tmp_path / "cmp" / "report.html").read_text()
    assert "The LLM's cooperation against population.players[0].p" in page
