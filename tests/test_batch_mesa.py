"""DilemmaModel and SweepModel under ``mesa.batch_run``."""

import json

import mesa
import pandas as pd
import pytest
from conftest import SCENARIOS

from abm.batch.mesa_compat import SweepModel
from abm.model import DilemmaModel
from abm.run import run_scenario

RULES = SCENARIOS / "round_robin_rules.toml"


def final_rows(rows: list[dict]) -> pd.DataFrame:
    frame = pd.DataFrame(rows)
    return frame[frame["Step"] == frame.groupby("RunId")["Step"].transform("max")]


def test_dilemma_model_runs_under_batch_run_over_seeds():
    rows = mesa.batch_run(
        DilemmaModel,
        parameters={"scenario": str(RULES), "seed": [1, 2]},
        number_processes=1,
        data_collection_period=-1,
        max_steps=100,
        display_progress=False,
    )
    frame = pd.DataFrame(rows)
    assert sorted(frame["seed"].unique()) == [1, 2]
    # the round robin of 5 players is 5 steps; the model reporters of the last row are
    # those of the last step, as a run by itself gives them
    model = DilemmaModel(str(RULES), seed=2)
    while model.running:
        model.step()
    last = model.datacollector.get_model_vars_dataframe().iloc[-1]
    got = frame[frame["seed"] == 2].iloc[0]
    assert got["Step"] == 4 and model.played_steps == 5
    assert got["mean_payoff"] == last["mean_payoff"]


def test_sweep_model_varies_scenario_keys_like_the_batch_runner(tmp_path):
    rows = mesa.batch_run(
        SweepModel,
        parameters={
            "scenario": str(RULES),
            "game.noise": [0.0, 0.2],
            "match__rounds": 4,
            "seed": [3, 4],
        },
        number_processes=1,
        data_collection_period=1,
        max_steps=100,
        display_progress=False,
    )
    frame = pd.DataFrame(rows)
    assert len(frame["RunId"].unique()) == 4
    # every step has the model row and all 5 agents, Steps 0..4, the last one final
    per_step = frame.groupby(["RunId", "Step"]).size()
    assert set(per_step) == {5} and sorted(frame["Step"].unique()) == [0, 1, 2, 3, 4]
    last = final_rows(rows)
    for (noise, seed), group in last.groupby(["game.noise", "seed"]):
        out = tmp_path / f"{noise}-{seed}"
        run_scenario(
            RULES,
            out=out,
            seed=int(seed),
            quiet=True,
            overrides=[
                f"game.noise={noise}",
                "match.rounds=4",
                "output.charts=false",
                "output.rounds=false",
            ],
        )
        summary = json.loads((out / "summary.json").read_text())
        assert group["overall_cooperation_rate"].iloc[0] == summary["cooperation_rate"]
        agents = pd.read_csv(out / "agents.csv").set_index("agent")
        by_agent = group.set_index("AgentID")["score"]
        # Mesa numbers agents from 1, in node order
        assert [by_agent[node + 1] for node in agents.index] == list(agents["score"])


def test_agent_rows_line_up_with_model_rows():
    model = SweepModel(str(RULES), seed=1, **{"game.noise": 0.1})
    while model.running:
        model.step()
    agents = model.datacollector.get_agent_vars_dataframe()
    steps = model.datacollector.get_model_vars_dataframe()
    assert list(agents.index.get_level_values("Step").unique()) == list(steps.index)
    assert model.overrides == ["game.noise=0.1"]
    assert model.scenario.game.noise == 0.1 and model.master_seed == 1
    # the final agent scores are the model's scores
    final = agents.xs(steps.index[-1], level="Step")["score"]
    assert list(final) == list(model.scores)


def test_bad_keys_are_scenario_errors():
    from abm.errors import ScenarioError

    with pytest.raises(ScenarioError, match="did you mean 'noise'"):
        SweepModel(str(RULES), seed=1, **{"game.nosie": 0.1})
