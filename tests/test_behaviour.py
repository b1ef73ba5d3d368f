"""Round-by-round views and memory-one fingerprints, checked against known truths.

Expected numbers are worked out by hand in the comments; the scripted models'
strategies are the truth their fingerprints must recover.
"""

from __future__ import annotations

import json
import math

import numpy as np
import pandas as pd
import pytest
from conftest import SCENARIOS
from fake_llm import last_history_line

from abm.behaviour import (
    classic_strategies,
    fingerprint,
    round_by_round,
    run_decisions,
    sequences,
    wilson,
)
from abm.run import run_scenario


def test_wilson_interval_by_hand():
    # 5 of 10: centre (0.5 + z^2/20) / (1 + z^2/10) = 0.5, half-width
    # z sqrt(0.025 + z^2/400) / (1 + z^2/10) = 1.96 * 0.18601 / 1.38415 = 0.26340
    low, high = wilson(5, 10)
    assert low == pytest.approx(0.5 - 0.26340, abs=1e-4)
    assert high == pytest.approx(0.5 + 0.26340, abs=1e-4)
    # 0 of 10: centre 0.19208 / 1.38415 = 0.13877 = half-width: (0, 0.27754)
    assert wilson(0, 10) == pytest.approx((0.0, 0.27754), abs=1e-4)
    assert all(math.isnan(v) for v in wilson(0, 0))


def run_table(out):
    return run_decisions(out)


def test_tit_for_tat_fingerprints_itself(tmp_path):
    out = run_scenario(
        SCENARIOS / "round_robin_rules.toml",
        out=tmp_path / "rr",
        quiet=True,
        overrides=["output.charts=false"],
    )
    frame = run_table(out)
    tft = fingerprint(frame[frame["player"] == "Tit-for-tat"])
    # every condition occurs in the round robin (DC: after its D against Defect Once)
    assert tft.vector == (1, 1, 0, 1, 0)
    assert (tft.table["n"] > 0).all()
    assert tft.nearest(classic_strategies())[0] == {"strategy": "Tit-for-tat", "distance": 0.0}
    alld = fingerprint(frame[frame["player"] == "All-D"]).table
    # All-D never sees mutual C (CC, CD need its own C): only first, DC, DD occur
    assert alld.loc[["first", "DC", "DD"], "p"].tolist() == [0, 0, 0]
    assert alld.loc[["CC", "CD"], "n"].tolist() == [0, 0]


TRUTH = {"first": 0.9, "CC": 0.8, "CD": 0.3, "DC": 0.6, "DD": 0.1}


def condition_of(text: str) -> str:
    last = last_history_line(text)
    if not last:
        return "first"
    mine, theirs = (part.split(":")[1].split("(")[0].strip() for part in last.split(";"))
    return ("C" if mine == "remain silent" else "D") + ("C" if theirs == "remain silent" else "D")


@pytest.mark.slow
def test_a_known_memory_one_strategy_is_recovered(fake, scenario_file, tmp_path):
    fake.phrase_probs = lambda text: {
        "remain silent": TRUTH[condition_of(text)],
        "testify": 1 - TRUTH[condition_of(text)],
    }
    # 40 LLM players on a ring, random matching, 30 rounds: sampled at temperature 1
    path = scenario_file(
        'seed = 8\n[match]\nrounds = 30\n[graph]\nkind = "ring"\nn = 40\n'
        '[population]\nmix = [{ policy = { name = "llm", label = "LLM", temperature = 1.0 },'
        ' share = 1.0 }]\n[pairing]\nscheme = "random_matching"\nsteps = 3\n'
        "[output]\ncharts = false\n"
    )
    frame = run_table(run_scenario(path, out=tmp_path / "fp", quiet=True))
    fp = fingerprint(frame)
    for condition, p in TRUTH.items():
        row = fp.table.loc[condition]
        # the model's own probabilities are the truth exactly ...
        assert row["p_model"] == pytest.approx(p)
        # ... and the sampled choices recover it: five 95 % intervals miss one truth
        # about a quarter of the time, so the check uses 99.9 % Wilson intervals
        # (z = 3.29), which all cover the truth with probability above 99.5 %
        low, high = wilson(int(row["cooperate"]), int(row["n"]), z=3.2905)
        assert low <= p <= high, (condition, row.to_dict())
        assert row["low"] < row["p"] < row["high"]  # the stated 95 % interval
        assert row["n"] >= 50


def retaliate_then_forgive(text: str) -> str:
    """C until the opponent's first D, then D twice, then C for ever."""
    lines = [
        ln
        for ln in text.split("<assistant>")[0].split("\n")
        if ln.startswith("- Suspect1:") and "(" in ln
    ]
    theirs = ["testify" in ln.split(";")[1] for ln in lines]
    if True not in theirs:
        return "Answer: remain silent"
    since = len(theirs) - theirs.index(True)  # rounds since that D, counting its own
    return "Answer: testify" if since <= 2 else "Answer: remain silent"


def test_round_by_round_shows_retaliation_then_forgiveness(fake, tmp_path):
    fake.script = retaliate_then_forgive
    import tomllib

    import tomli_w

    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1].update(mode="generate", reflection=False)
    (tmp_path / "s.toml").write_text(tomli_w.dumps(data))
    frame = run_table(
        run_scenario(
            tmp_path / "s.toml", out=tmp_path / "o", quiet=True, overrides=["output.charts=false"]
        )
    )
    seqs = sequences(frame, "LLM")
    # against All-D and Defect Once the opponent's D comes in round 1: C, D, D, C, C
    assert seqs["All-D"] == seqs["Defect Once"] == "CDDCC"
    assert seqs["All-C"] == seqs["Tit-for-tat"] == seqs["Trigger"] == "CCCCC"
    assert seqs["LLM"] == "CCCCC / CCCCC"
    table = round_by_round(frame, "LLM")
    alld = table[table["opponent"] == "All-D"]
    assert alld["round"].tolist() == [1, 2, 3, 4, 5]
    assert alld["p_cooperate"].tolist() == [1, 0, 0, 1, 1]


def test_nearest_strategy_uses_observed_conditions_only():
    table = pd.DataFrame(
        {
            "n": [4, 4, 0, 0, 4],
            "cooperate": [4, 4, 0, 0, 0],
            "p": [1, 1, np.nan, np.nan, 0],
            "low": 0.0,
            "high": 1.0,
            "p_model": np.nan,
        },
        index=pd.Index(["first", "CC", "CD", "DC", "DD"], name="situation"),
    )
    from abm.behaviour import Fingerprint

    ranked = Fingerprint(table, 0).nearest(classic_strategies())
    # (1, 1, ., ., 0) matches TFT, grim and GTFT(g=0) exactly on the observed entries
    exact = {r["strategy"] for r in ranked if r["distance"] == 0}
    assert exact == {"Tit-for-tat", "Grim trigger"}
    gtft = next(r for r in ranked if r["strategy"] == "Generous TFT")
    assert gtft["distance"] == pytest.approx(math.sqrt((1 / 3) ** 2 / 3))


@pytest.mark.slow
def test_every_llm_run_writes_its_behaviour(fake, tmp_path):
    import tomllib

    import tomli_w

    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1]["reflection"] = False
    (tmp_path / "s.toml").write_text(tomli_w.dumps(data))
    out = run_scenario(tmp_path / "s.toml", out=tmp_path / "o", quiet=True)
    entry = json.loads((out / "summary.json").read_text())["llm"][0]["behaviour"]["LLM"]
    # the fake plays Tit-for-tat: its fingerprint, and the nearest classic strategy
    situations = entry["fingerprint"]["situations"]
    assert [situations[s]["p"] for s in ("first", "CC", "CD", "DC", "DD")] == [1, 1, 0, 1, 0]
    assert entry["fingerprint"]["nearest"][0] == {"strategy": "Tit-for-tat", "distance": 0.0}
    # TFT against All-D: C, then four D
    assert entry["sequences"]["All-D"] == "CDDDD"
    assert entry["fingerprint_by_opponent"]["All-D"]["situations"]["CD"]["n"] == 1
    rounds = pd.read_csv(out / "llm_rounds.csv")
    assert set(rounds["opponent"]) == {
        "All-D",
        "All-C",
        "Defect Once",
        "Trigger",
        "Tit-for-tat",
        "LLM",
    }
    prints = pd.read_csv(out / "llm_fingerprints.csv")
    assert set(prints["opponent"]) >= {"all", "All-D"}
    for chart in ("llm_rounds", "llm_fingerprint"):
        assert (out / f"{chart}.png").stat().st_size > 0 and (out / f"{chart}.html").is_file()


def test_moves_of_a_fallback_rule_are_not_the_models_choices(fake, tmp_path):
    import tomllib

    import tomli_w

    fake.script = lambda text: "blah"  # never readable; the rule plays C for it
    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1].update(
        mode="generate", fallback="cooperate", reflection=False
    )
    (tmp_path / "s.toml").write_text(tomli_w.dumps(data))
    out = run_scenario(
        tmp_path / "s.toml", out=tmp_path / "o", quiet=True, overrides=["output.charts=false"]
    )
    entry = json.loads((out / "summary.json").read_text())["llm"][0]["behaviour"]["LLM"]
    situations = entry["fingerprint"]["situations"]
    assert all(situations[s]["n"] == 0 for s in situations)  # nothing was the model's
    assert entry["fingerprint"]["invalid"] == 35 and entry["fingerprint"]["nearest"] == []
    assert entry["sequences"]["All-D"] == "FFFFF"


def test_an_llm_mutant_that_never_played_is_described_as_such(fake, scenario_file, tmp_path):
    path = scenario_file(
        'seed = 2\n[match]\nrounds = 2\n[graph]\nkind = "ring"\nn = 10\n[population]\n'
        'mix = [{ policy = "all_d", share = 0.5 }, { policy = "tit_for_tat", share = 0.5 }]\n'
        '[pairing]\nsteps = 2\n[evolution]\nrule = "imitate_best"\nmutation = 0.0\n'
        'mutants = [{ name = "llm", label = "LLM" }]\n'
    )
    out = run_scenario(path, out=tmp_path / "o", quiet=True)
    summary = json.loads((out / "summary.json").read_text())
    assert summary["llm"][0]["behaviour"]["LLM"] == "no decisions"
