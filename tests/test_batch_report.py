"""The sweep report: aggregate.csv against hand computations, t quantiles, charts."""

import math

import pandas as pd
import pytest
from batch_scenarios import tiny_base

from abm.batch import aggregate, load_sweep, run_sweep
from abm.batch.__main__ import main
from abm.batch.stats import mean_ci, t_quantile

BASE = tiny_base(noise=0.1, rounds=4)

# two-sided 95 % quantiles of Student's t, from printed tables
T975 = {
    1: 12.706204736174694,
    2: 4.302652729749462,
    4: 2.7764451051977934,
    9: 2.262157162798205,
    30: 2.0422724563012378,
    1000: 1.9623390808264083,
}


@pytest.mark.parametrize("df, value", sorted(T975.items()))
def test_t_quantiles_match_the_tables(df, value):
    assert t_quantile(0.975, df) == pytest.approx(value, rel=1e-10)


def test_t_quantiles_match_scipy_where_installed():
    stats = pytest.importorskip("scipy.stats")
    for df in [1, 2, 3, 5, 8, 13, 50, 199, 200, 201, 500, 10_000]:
        for p in (0.9, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


def test_mean_ci_by_hand():
    got = mean_ci([1.0, 2.0, 3.0])
    # mean 2, squared deviations 1 + 0 + 1 over n - 1 = 2: std 1, sem 1/sqrt(3)
    assert got["n"] == 3 and got["mean"] == 2.0 and got["std"] == 1.0
    assert got["sem"] == pytest.approx(1 / math.sqrt(3))
    assert got["ci_low"] == pytest.approx(2 - 4.302652729749462 / math.sqrt(3))
    assert got["ci_high"] == pytest.approx(2 + 4.302652729749462 / math.sqrt(3))
    one = mean_ci([5.0])
    assert one["mean"] == 5.0 and math.isnan(one["std"]) and math.isnan(one["ci_low"])
    assert mean_ci([float("nan"), 4.0, 6.0])["n"] == 2


def test_aggregate_of_a_hand_made_table():
    results = pd.DataFrame(
        {
            "point": [0, 0, 0, 0, 1, 1],
            "x": [0.5, 0.5, 0.5, 0.5, 1.0, 1.0],
            "status": ["ok", "ok", "ok", "failed", "ok", "ok"],
            "score": [4.0, 6.0, 11.0, float("nan"), 7.0, 7.0],
        }
    )
    table = aggregate(results, ["x"])
    assert list(table.columns) == [
        "point",
        "x",
        "metric",
        "n",
        "mean",
        "std",
        "sem",
        "ci95_low",
        "ci95_high",
    ]
    first, second = table.iloc[0], table.iloc[1]
    # 4, 6, 11: mean 7, deviations -3, -1, 4, sum of squares 26, variance 13
    assert (first["x"], first["n"], first["mean"]) == (0.5, 3, 7.0)
    assert first["std"] == pytest.approx(math.sqrt(13))
    half = 4.302652729749462 * math.sqrt(13) / math.sqrt(3)
    assert (first["ci95_low"], first["ci95_high"]) == pytest.approx((7 - half, 7 + half))
    assert (second["n"], second["mean"], second["std"], second["ci95_low"]) == (2, 7.0, 0.0, 7.0)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder = tmp_path_factory.mktemp("report")
    (folder / "base.toml").write_text(BASE)
    (folder / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 3\n[sweep]\nreplicates = 3\n'
        "game.noise = [0.1, 0.3]\nmatch.rounds = [2, 4]\n"
        '[report]\nmetrics = ["cooperation_rate", "payoff[tit_for_tat]"]\n'
    )
    out = folder / "out"
    run_sweep(load_sweep(folder / "sweep.toml"), out, backend="serial")
    return out


@pytest.mark.slow
def test_report_numbers_are_the_hand_computed_ones(tiny):
    results = pd.read_parquet(tiny / "results.parquet")
    table = pd.read_csv(tiny / "aggregate.csv")
    assert len(results) == 12
    for metric in ("cooperation_rate", "mean_payoff", "payoff[tit_for_tat]"):
        for (noise, rounds), runs in results.groupby(["game.noise", "match.rounds"]):
            xs = list(runs[metric])
            assert len(xs) == 3
            mean = (xs[0] + xs[1] + xs[2]) / 3
            std = math.sqrt(((xs[0] - mean) ** 2 + (xs[1] - mean) ** 2 + (xs[2] - mean) ** 2) / 2)
            half = 4.302652729749462 * std / math.sqrt(3)
            row = table[
                (table["metric"] == metric)
                & (table["game.noise"] == noise)
                & (table["match.rounds"] == rounds)
            ]
            assert len(row) == 1
            row = row.iloc[0]
            assert row["n"] == 3
            assert row["mean"] == pytest.approx(mean, rel=1e-12)
            assert row["std"] == pytest.approx(std, rel=1e-12, abs=1e-15)
            assert row["ci95_low"] == pytest.approx(mean - half, rel=1e-12, abs=1e-12)
            assert row["ci95_high"] == pytest.approx(mean + half, rel=1e-12, abs=1e-12)
    # noise makes the replicates differ, so the intervals have width
    coop = table[table["metric"] == "cooperation_rate"]
    assert (coop["ci95_high"] > coop["ci95_low"]).all()


@pytest.mark.slow
def test_charts_one_per_metric_and_key_and_a_heatmap(tiny):
    charts = tiny / "charts"
    for metric in ("cooperation_rate", "payoff_tit_for_tat"):
        for stem in (f"{metric}_vs_game.noise", f"{metric}_vs_match.rounds", f"{metric}_heatmap"):
            assert (charts / f"{stem}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", stem
            assert (charts / f"{stem}.html").is_file()
    assert len(list(charts.glob("*.png"))) == 6


@pytest.mark.slow
def test_report_command_rewrites_the_aggregate(tiny, capsys):
    before = (tiny / "aggregate.csv").read_text()
    (tiny / "aggregate.csv").unlink()
    assert main(["report", str(tiny), "--no-charts"]) == 0
    assert (tiny / "aggregate.csv").read_text() == before
    assert "aggregate" in capsys.readouterr().out


def test_report_of_a_folder_that_is_not_a_sweep(tmp_path, capsys):
    assert main(["report", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "not a sweep output folder" in err and "Traceback" not in err


def test_zipped_keys_get_no_heatmap(tmp_path):
    (tmp_path / "base.toml").write_text(BASE)
    (tmp_path / "sweep.toml").write_text(
        'scenario = "base.toml"\nseed = 3\n[[sweep.zip]]\n'
        'game.noise = [0.1, 0.3]\nmatch.rounds = [2, 4]\n[report]\nmetrics = ["mean_payoff"]\n'
    )
    run_sweep(load_sweep(tmp_path / "sweep.toml"), tmp_path / "out", backend="serial")
    names = sorted(p.name for p in (tmp_path / "out" / "charts").glob("*.png"))
    assert names == ["mean_payoff_vs_game.noise.png", "mean_payoff_vs_match.rounds.png"]


def test_evolution_shares_reach_the_results(tmp_path):
    from conftest import SCENARIOS

    from abm.batch.storage import read_metrics
    from abm.run import run_scenario

    out = run_scenario(
        SCENARIOS / "nowak_may.toml",
        out=tmp_path / "nm",
        quiet=True,
        overrides=[
            "graph.rows=10",
            "graph.cols=10",
            "pairing.steps=4",
            "evolution.average_last=2",
            "output.charts=false",
        ],
    )
    metrics = read_metrics(out)
    summary = __import__("json").loads((out / "summary.json").read_text())
    assert metrics["final_share[all_c]"] == summary["evolution"]["final_shares"]["all_c"]
    assert metrics["mean_share[all_d]"] == summary["evolution"]["mean_shares"]["all_d"]
    assert metrics["final_share[all_c]"] + metrics["final_share[all_d]"] == pytest.approx(1.0)
