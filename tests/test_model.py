"""The Mesa model: agents on the network, data collection, seeds, match lengths."""

import numpy as np
import pytest
from conftest import SCENARIOS

from abm.model import DilemmaModel
from abm.scenario import validate_scenario

MIX = {
    "mix": [
        {"policy": "tit_for_tat", "share": 0.5},
        {"policy": {"name": "random", "p": 0.3}, "share": 0.3},
        {"policy": "all_d", "share": 0.2},
    ]
}


def small_world(seed=3, **extra):
    data = {
        "seed": seed,
        "game": {"noise": 0.05},
        "graph": {"kind": "watts_strogatz", "n": 30, "k": 4, "p": 0.2},
        "population": MIX,
        "pairing": {"scheme": "random_matching", "steps": 6},
        **extra,
    }
    return DilemmaModel(validate_scenario(data))


def run(model):
    while model.running:
        model.step()
    return model


def test_agents_sit_on_the_mesa_network():
    model = small_world()
    assert len(model.agents) == 30
    for player in model.players:
        assert player.cell is model.space[player.node]
        neighbours = {a.node for c in player.cell.neighborhood for a in c.agents}
        assert neighbours == set(model.graph.neighbors(player.node))


def test_mesa_agents_are_built_on_first_use_only():
    model = DilemmaModel(small_world().scenario, collect_agents=False)
    run(model)
    assert model._players is None and len(model._all_agents) == 0  # never needed
    # the first look builds one Player per node, AgentIDs 1..n in node order
    assert [p.node for p in model.players] == list(range(30))
    assert [a.unique_id for a in model.agents] == list(range(1, 31))
    assert model.players[4].label == model.labels[model.label_of_node[4]]
    assert model.players[4].score == model.scores[4]


def test_every_mesa_collection_builds_the_agents_first():
    from abm.agents import Player

    for look in ("agents", "agents_by_type", "agent_types", "players", "space"):
        model = DilemmaModel(small_world().scenario, collect_agents=False)
        getattr(model, look)
        assert model.agent_types == [Player], look
        assert len(model.agents_by_type[Player]) == 30, look


def test_agent_rows_name_each_node_by_agent_id():
    model = run(small_world())
    rows = model.datacollector.get_agent_vars_dataframe().xs(6, level="Step")
    assert rows.index.tolist() == list(range(1, 31))
    assert rows["player"].tolist() == [model.labels[i] for i in model.label_of_node]
    assert np.allclose(rows["score"].to_numpy(), model.scores)


def test_mix_gives_exact_counts():
    model = small_world()
    counts = {name: model.policy_names.count(name) for name in set(model.policy_names)}
    # 30 * (0.5, 0.3, 0.2) = 15, 9, 6 exactly
    assert counts == {"tit_for_tat": 15, "random(p=0.3)": 9, "all_d": 6}


def test_datacollector_rows_per_step_and_agent():
    model = run(small_world())
    frame = model.datacollector.get_model_vars_dataframe()
    assert len(frame) == 6
    assert frame["cooperation_rate"].between(0, 1).all()
    agents = model.datacollector.get_agent_vars_dataframe()
    assert len(agents) == 6 * 30
    last = agents.xs(6, level="Step")
    assert np.allclose(last["score"].to_numpy(), model.scores)


def test_scores_add_up_to_the_match_payoffs():
    model = small_world()
    total = 0.0
    while model.running:
        model.step()
        r = model.last_result
        total += r.payoff[:, ~r.twin].sum()
    assert model.scores.sum() == pytest.approx(total)


def test_same_seed_same_results_and_new_seed_changes_them():
    a, b, c = run(small_world(3)), run(small_world(3)), run(small_world(4))
    assert np.array_equal(a.scores, b.scores)
    assert a.policy_names == b.policy_names
    assert not np.array_equal(a.scores, c.scores)


def test_seed_argument_overrides_scenario_and_is_recorded():
    model = DilemmaModel(SCENARIOS / "small_world_rules.toml", seed=99)
    assert model.master_seed == 99 and model.scenario.seed == 99


def test_missing_seed_is_drawn_and_recorded():
    data = {
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": ["random"]},
    }
    model = DilemmaModel(validate_scenario(data))
    assert isinstance(model.master_seed, int) and model.scenario.seed == model.master_seed


@pytest.mark.slow
def test_geometric_match_lengths():
    delta = 0.8
    data = {
        "seed": 5,
        "match": {"continuation_probability": delta},
        "graph": {"kind": "complete", "n": 2},
        "population": {"players": ["tit_for_tat", "all_d"]},
        "pairing": {"steps": 4000},
    }
    model = run(DilemmaModel(validate_scenario(data)))
    lengths = np.array([s["decisions"] // 2 for s in model.tally.steps])
    # P(L = l) = delta^(l-1) (1 - delta): mean 1 / (1 - delta) = 5, sd sqrt(delta)/(1-delta) ~ 4.47
    assert lengths.min() == 1
    assert abs(lengths.mean() - 5) < 5 * 4.47 / np.sqrt(4000)
    assert (lengths == 1).mean() == pytest.approx(1 - delta, abs=0.03)


def test_geometric_matches_stop_at_their_own_length():
    data = {
        "seed": 2,
        "match": {"continuation_probability": 0.7},
        "graph": {"kind": "complete", "n": 40},
        "population": {"players": ["all_c"] * 40},
        "pairing": {"scheme": "all_edges"},
    }
    model = run(DilemmaModel(validate_scenario(data)))
    r = model.last_result
    played = (r.actual != -1).sum(axis=0)
    assert (played == r.side_length).all()
    assert len(set(r.length.tolist())) > 3
    assert (r.payoff[r.actual == -1] == 0).all()


def test_collect_agents_is_off_for_huge_runs_by_default():
    # the limit is on agents x steps: 10,001 agents for 100 steps pass 1,000,000 rows
    data = {
        "seed": 1,
        "graph": {"kind": "ring", "n": 10_001},
        "population": {"mix": [{"policy": "all_c", "share": 1.0}]},
        "pairing": {"steps": 100},
    }
    big = DilemmaModel(validate_scenario(data))
    big.step()
    assert not big.datacollector.agent_reporters
    assert len(big.datacollector.get_model_vars_dataframe()) == 1
    forced = DilemmaModel(validate_scenario(data), collect_agents=True)
    assert set(forced.datacollector.agent_reporters) == {"score", "cooperation_rate", "player"}
    data["pairing"]["steps"] = 99
    assert DilemmaModel(validate_scenario(data)).datacollector.agent_reporters


def test_resolved_scenario_round_trips(tmp_path):
    import tomli_w

    from abm.scenario import load_scenario

    model = DilemmaModel(SCENARIOS / "small_world_rules.toml")
    path = tmp_path / "config.toml"
    path.write_text(tomli_w.dumps(model.scenario.to_toml_dict()))
    again = load_scenario(path)
    assert again == model.scenario


def test_population_from_a_graphml_attribute(tmp_path, scenario_file):
    import networkx as nx

    g = nx.cycle_graph(["a", "b", "c", "d"])
    nx.set_node_attributes(
        g, {"a": "all_d", "b": "tit_for_tat", "c": "grim", "d": "all_c"}, "strategy"
    )
    nx.write_graphml(g, tmp_path / "net.graphml")
    path = scenario_file(
        'seed = 1\n[graph]\nkind = "file"\npath = "net.graphml"\n'
        '[population]\nattribute = "strategy"\n'
    )
    model = run(DilemmaModel(path))
    assert model.policy_names == ["all_d", "tit_for_tat", "trigger", "all_c"]
    # a-b, b-c, c-d, d-a each play one 5-round match; All-D (a) meets TFT (b) and All-C (d):
    # vs TFT: T + 4P = 30, vs All-C: 5T = 50 -> 80
    assert model.scores[0] == 80


def test_bad_attribute_value_is_explained(tmp_path, scenario_file):
    import networkx as nx

    from abm.errors import ScenarioError

    g = nx.path_graph(["a", "b"])
    nx.set_node_attributes(g, {"a": "all_d", "b": "tft"}, "strategy")
    nx.write_graphml(g, tmp_path / "net.graphml")
    path = scenario_file(
        '[graph]\nkind = "file"\npath = "net.graphml"\n[population]\nattribute = "strategy"\n'
    )
    with pytest.raises(
        ScenarioError, match=r"population\.attribute.*node 'b'.*unknown policy 'tft'"
    ):
        DilemmaModel(path)
