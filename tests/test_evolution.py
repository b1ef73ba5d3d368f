"""Strategy updates between steps: each rule on tiny graphs with hand-checked outcomes,
sampling frequencies against their exact probabilities, conservation, seeds, and a
short Nowak & May lattice run."""

import math

import numpy as np
import pytest
from fake_llm import FakeBackend

import abm.policies.llm as llm_module
from abm.evolution import Adjacency, Evolution
from abm.model import DilemmaModel
from abm.run import main
from abm.scenario import EvolutionConfig, validate_scenario


def weak_pd(b: float) -> dict:
    """Nowak & May's single-round game: R = 1, T = b, S = P = 0."""
    return {"kind": "custom", "R": 1.0, "T": b, "S": 0.0, "P": 0.0}


def model_of(players, graph, evolution, game=None, rounds=1, steps=1, seed=1):
    return DilemmaModel(
        validate_scenario(
            {
                "seed": seed,
                "game": game or weak_pd(1.5),
                "match": {"rounds": rounds},
                "graph": graph,
                "population": {"players": players},
                "pairing": {"scheme": "all_edges", "steps": steps},
                "evolution": evolution,
            }
        )
    )


def labels(model) -> list[str]:
    return [model.labels[i] for i in model.label_of_node]


def lone_defector(b: float) -> DilemmaModel:
    """5 x 5 torus, Moore neighbourhood with self-interaction, one D in the middle."""
    players = ["all_c"] * 25
    players[12] = "all_d"
    return model_of(
        players,
        {
            "kind": "grid",
            "rows": 5,
            "cols": 5,
            "torus": True,
            "neighbourhood": "moore",
            "self_loops": True,
        },
        {"rule": "imitate_best"},
        game=weak_pd(b),
    )


@pytest.mark.parametrize("b, spreads", [(1.1, False), (1.2, True)])
def test_imitate_best_lone_defector(b, spreads):
    # D earns 8b from its 8 C neighbours (and P = 0 against itself). A C next to it
    # earns 7 from C neighbours + 1 from itself = 8, and sees C neighbours two steps
    # from D earning 9; it turns D only when 8b > 9, i.e. b > 1.125. The D keeps D
    # since 8b > 8 for any b > 1.
    model = lone_defector(b)
    model.step()
    got = np.array(labels(model)).reshape(5, 5)
    expected = np.full((5, 5), "all_c")
    if spreads:
        expected[1:4, 1:4] = "all_d"
    else:
        expected[2, 2] = "all_d"
    assert (got == expected).all()
    assert model.label_of_node.sum() == (9 if spreads else 1)  # all_c is label 0, all_d 1


def test_imitate_best_payoffs_are_the_step_payoffs():
    model = lone_defector(1.2)
    model.step()
    fit = model.evolution.fitness(model.scores, np.full(25, 9))
    assert fit[12] == pytest.approx(8 * 1.2)
    assert fit[11] == pytest.approx(8.0) and fit[0] == pytest.approx(9.0)


def ring_model(rule, steps=1, seed=5, **evolution):
    players = ["all_c", "all_c", "all_d", "all_d"] * 1000
    return model_of(
        players,
        {"kind": "ring", "n": 4000},
        {"rule": rule, **evolution},
        game={"kind": "prisoners_dilemma", "R": 3, "S": 0, "T": 5, "P": 1},
        steps=steps,
        seed=seed,
    )


def within(count: int, n: int, p: float, sds: float = 4.5) -> bool:
    return abs(count - n * p) <= sds * math.sqrt(n * p * (1 - p)) + 1


def test_proportional_rule_switching_rate():
    # Ring C C D D ...: a C has a C and a D neighbour, earning R + S = 3; a D earns
    # P + T = 6. A C picks its D neighbour with probability 1/2 and then copies it with
    # probability (6 - 3) / (max degree 2 * payoff range (5 - 0)) = 0.3; a D never
    # copies a worse C. So each C turns D with probability 0.15, and no D turns C.
    model = ring_model("proportional")
    was_c = model.label_of_node == 0
    model.step()
    now_d = model.label_of_node == 1
    assert now_d[~was_c].all()
    assert within(int(now_d[was_c].sum()), 2000, 0.15)


def test_fermi_rule_switching_rate():
    # Same ring, K = 1: a C copies its D neighbour with 1 / (1 + e^-3); a D copies its
    # C neighbour with 1 / (1 + e^3); each picks that neighbour half the time.
    model = ring_model("fermi", temperature=1.0)
    was_c = model.label_of_node == 0
    model.step()
    now = model.label_of_node
    assert within(int((now[was_c] == 1).sum()), 2000, 0.5 / (1 + math.exp(-3)))
    assert within(int((now[~was_c] == 0).sum()), 2000, 0.5 / (1 + math.exp(3)))


def test_degree_averaged_payoff_removes_the_degree_factor():
    # averaged: C earns 1.5, D earns 3; copy probability (3 - 1.5) / 5 = 0.3 again
    model = ring_model("proportional", payoff="average")
    was_c = model.label_of_node == 0
    model.step()
    assert within(int((model.label_of_node[was_c] == 1).sum()), 2000, 0.15)


def star(n_leaves):
    edges = np.array([[0, i] for i in range(1, n_leaves + 1)])
    return Adjacency(edges, n_leaves + 1)


def test_weighted_neighbour_draws_in_proportion_to_fitness():
    adj = star(3)
    weight = np.array([0.0, 1.0, 2.0, 5.0])
    rng = np.random.default_rng(0)
    picks = adj.weighted_neighbour(np.zeros(40_000, np.int64), weight, rng)
    counts = np.bincount(picks, minlength=4)
    assert counts[0] == 0
    for leaf, p in ((1, 1 / 8), (2, 2 / 8), (3, 5 / 8)):
        assert within(int(counts[leaf]), 40_000, p)
    # leaves have one neighbour, the hub; all-zero weights fall back to uniform
    assert (adj.weighted_neighbour(np.array([1, 2, 3]), weight, rng) == 0).all()
    zero = adj.weighted_neighbour(np.zeros(3000, np.int64), np.zeros(4), rng)
    assert set(np.unique(zero)) == {1, 2, 3}


def test_best_neighbour_breaks_ties_at_random():
    adj = star(3)
    fitness = np.array([0.0, 4.0, 4.0, 1.0])
    seen = {int(adj.best_neighbour(fitness, np.random.default_rng(s))[0][0]) for s in range(40)}
    assert seen == {1, 2}


def evolution(rule, **options):
    return EvolutionConfig(rule=rule, **options)


def test_death_birth_takes_a_neighbour_in_proportion_to_fitness():
    # path 0 - 1 - 2; with intensity w = 1 the weights are the payoffs. Node 1 dies
    # every time (synchronous) and is replaced by node 0's type with 3 / (3 + 1).
    edges = np.array([[0, 1], [1, 2]])
    types = np.array([0, 1, 1])
    fitness = np.array([3.0, 0.0, 1.0])
    evo = Evolution(
        evolution("death_birth", intensity=1.0), edges, 3, [0, 1], 1.0, np.random.default_rng(2)
    )
    outcomes = np.array([evo.update(types, fitness) for _ in range(4000)])
    assert (outcomes[:, 0] == 1).all() and (outcomes[:, 2] == 1).all()  # their one neighbour
    assert within(int((outcomes[:, 1] == 0).sum()), 4000, 0.75)


def test_moran_parent_is_drawn_by_fitness_and_replaces_a_neighbour():
    # two nodes, fitness 3 and 1 (w = 1): one event a step; the parent is node 0 with
    # probability 3/4, and then node 1 takes type 0
    edges = np.array([[0, 1]])
    evo = Evolution(
        evolution("moran", update="asynchronous", intensity=1.0),
        edges,
        2,
        [0, 1],
        1.0,
        np.random.default_rng(3),
    )
    outcomes = np.array([evo.update(np.array([0, 1]), np.array([3.0, 1.0])) for _ in range(4000)])
    all_zero = (outcomes == 0).all(axis=1)
    all_one = (outcomes == 1).all(axis=1)
    assert (all_zero | all_one).all()
    assert within(int(all_zero.sum()), 4000, 0.75)


def test_asynchronous_update_moves_the_requested_number_of_agents():
    edges = np.array([[i, (i + 1) % 100] for i in range(100)])
    types = np.arange(100) % 2
    fitness = np.where(types == 1, 10.0, 0.0)  # every 0 sees a better 1 on both sides
    for fraction, movers in ((None, 1), (0.1, 10)):
        evo = Evolution(
            evolution("imitate_best", update="asynchronous", update_fraction=fraction),
            edges,
            100,
            [0, 1],
            1.0,
            np.random.default_rng(4),
        )
        new = evo.update(types, fitness)
        # only the chosen 0s switch; chosen 1s already hold the best type
        assert 0 < (new != types).sum() <= movers
        assert ((new != types) <= (types == 0)).all()


def test_mutation_draws_from_the_mutant_set():
    edges = np.array([[i, (i + 1) % 50] for i in range(50)])
    evo = Evolution(
        evolution("imitate_best", mutation=1.0), edges, 50, [2, 3], 1.0, np.random.default_rng(5)
    )
    new = evo.update(np.zeros(50, np.int64), np.zeros(50))
    assert set(np.unique(new)) == {2, 3}


@pytest.mark.parametrize("rule", ["imitate_best", "proportional", "fermi", "death_birth", "moran"])
def test_counts_are_conserved_and_policies_follow_labels(rule):
    model = model_of(
        ["all_c", "all_d", "tit_for_tat", "all_c"] * 25,
        {"kind": "watts_strogatz", "n": 100, "k": 4, "p": 0.1},
        {"rule": rule, "update": "asynchronous", "update_fraction": 0.2},
        game={"kind": "prisoners_dilemma"},
        rounds=3,
        steps=15,
    )
    start = set(model.label_of_node.tolist())
    while model.running:
        model.step()
        assert len(model.label_of_node) == 100
        assert set(model.label_of_node.tolist()) <= start  # copying never invents a policy
        assert (model.policy_of_node == model.policy_of_label[model.label_of_node]).all()
        assert sum(
            v for k, v in model.tally.steps[-1].items() if k.startswith("share:")
        ) == pytest.approx(1.0)
    # the engine plays with the updated policies: a step's cooperation follows the labels
    assert [p.label for p in model.players] == labels(model)


def test_seeded_runs_repeat_and_seeds_matter():
    def shares(seed):
        model = ring_model("fermi", steps=5, seed=seed, temperature=1.0)
        while model.running:
            model.step()
        return [s["share:all_c"] for s in model.tally.steps], model.label_of_node.copy()

    a, b, c = shares(1), shares(1), shares(2)
    assert a[0] == b[0] and (a[1] == b[1]).all()
    assert not (a[1] == c[1]).all()


def test_mutants_join_the_labels_and_can_take_over():
    model = model_of(
        ["all_c"] * 10,
        {"kind": "ring", "n": 10},
        {"rule": "imitate_best", "mutation": 1.0, "mutants": ["all_d"]},
        game={"kind": "prisoners_dilemma"},
        steps=2,
    )
    assert model.labels == ["all_c", "all_d"]
    model.step()
    assert labels(model) == ["all_d"] * 10
    model.step()
    # all_d against all_d pays P = 5 in the one round
    assert model.tally.steps[-1]["mean_payoff"] == 5.0


def test_llm_agents_spread_like_any_policy(monkeypatch):
    backend = FakeBackend()  # answers like Tit-for-tat
    monkeypatch.setattr(llm_module, "shared_backend", lambda params: backend)
    ring = {"kind": "ring", "n": 6}
    pd_game = {"kind": "prisoners_dilemma"}
    # one LLM among all_d, 2 rounds: the LLM earns 0 + 5 against each all_d neighbour
    # (10); its all_d neighbours earn 10 + 5 from it and 5 + 5 from the other side (25),
    # so the LLM copies all_d and nobody copies the LLM
    model = model_of(
        [{"name": "llm", "label": "LLM"}] + ["all_d"] * 5,
        ring,
        {"rule": "imitate_best"},
        game=pd_game,
        rounds=2,
    )
    model.step()
    assert labels(model) == ["all_d"] * 6
    # one all_d among LLMs, 5 rounds: all_d earns 10 + 4 * 5 = 30 from each side (60); an
    # LLM next to it earns 20 from it and 45 from its LLM neighbour (65), the others 90:
    # all_d turns into an LLM agent, and every LLM keeps its policy
    model = model_of(
        ["all_d"] + [{"name": "llm", "label": "LLM"}] * 5,
        ring,
        {"rule": "imitate_best"},
        game=pd_game,
        rounds=5,
    )
    model.step()
    assert labels(model) == ["LLM"] * 6
    llm = model.policies[model.policy_of_label[model.labels.index("LLM")]]
    assert (model.policy_of_node == model.policies.index(llm)).all()
    assert hasattr(llm, "drain")


def test_nowak_may_lattice_keeps_cooperators_near_the_known_fraction():
    # Nowak & May (1992): Moore neighbourhood with self-interaction, 1.8 < b < 2, starting
    # from 10% defectors at random, cooperators persist in a chaotically shifting mix
    # around 0.318 of the lattice on large lattices. A 40 x 40 torus over 60 generations
    # stays within 0.2 - 0.45 (margin for the small lattice and short run).
    n = 40 * 40
    rng = np.random.default_rng(0)
    players = np.where(rng.random(n) < 0.1, "all_d", "all_c").tolist()
    model = model_of(
        players,
        {
            "kind": "grid",
            "rows": 40,
            "cols": 40,
            "torus": True,
            "neighbourhood": "moore",
            "self_loops": True,
        },
        {"rule": "imitate_best"},
        game=weak_pd(1.9),
        steps=60,
        seed=3,
    )
    while model.running:
        model.step()
    late = [s["share:all_c"] for s in model.tally.steps[-20:]]
    assert 0.2 <= np.mean(late) <= 0.45


def test_run_writes_shares_snapshots_and_summary(tmp_path, scenario_file):
    path = scenario_file("""
name = "lattice"
seed = 4
game = { kind = "custom", R = 1, T = 1.9, S = 0, P = 0 }
match = { rounds = 1 }
graph = { kind = "grid", rows = 6, cols = 6, torus = true, neighbourhood = "moore", self_loops = true }
population = { mix = [ { policy = "all_c", share = 0.9 }, { policy = "all_d", share = 0.1 } ] }
pairing = { steps = 8 }
output = { rounds = false, matches = false }
evolution = { rule = "imitate_best", average_last = 4, snapshot_every = 4 }
""")
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    out = tmp_path / "out"
    import json

    import pandas as pd

    summary = json.loads((out / "summary.json").read_text())
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps.columns[-2:]) == ["share:all_c", "share:all_d"]
    evo = summary["evolution"]
    assert evo["average_last"] == 4
    assert evo["mean_shares"]["all_c"] == pytest.approx(steps["share:all_c"].iloc[-4:].mean())
    final = np.load(out / "snapshots.npz")
    assert list(final["steps"]) == [0, 4, 8]
    assert final["grid"].shape == (3, 6, 6)
    assert evo["final_shares"]["all_c"] == pytest.approx((final["grid"][-1] == 0).mean())
    assert not (out / "matches.csv").exists()
    assert (out / "shares.png").exists() and (out / "lattice.png").exists()


def test_evolution_errors_name_the_field(scenario_file, capsys):
    path = scenario_file("""
graph = { kind = "ring", n = 10 }
population = { mix = [ { policy = "all_c", share = 1.0 } ] }
evolution = { rule = "imitate_best", update_fraction = 0.5 }
""")
    assert main([str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "evolution" in err and "asynchronous" in err
    path = scenario_file("""
graph = { kind = "ring", n = 10 }
population = { mix = [ { policy = "all_c", share = 1.0 } ] }
evolution = { rule = "copy_the_rich" }
""")
    assert main([str(path), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "evolution.rule" in err and "imitate_best" in err


def test_donation_game_sets_the_payoffs_from_b_and_c(scenario_file, capsys):
    from abm.scenario import validate_scenario as validate

    base = {
        "graph": {"kind": "ring", "n": 4},
        "population": {"mix": [{"policy": "all_c", "share": 1.0}]},
    }
    game = validate({**base, "game": {"kind": "donation", "b": 5, "c": 2}}).game
    # a cooperator pays c = 2 so that the other gets b = 5
    assert (game.R, game.S, game.T, game.P) == (3.0, -2.0, 5.0, 0.0)
    path = scenario_file("""
graph = { kind = "ring", n = 4 }
population = { mix = [ { policy = "all_c", share = 1.0 } ] }
game = { kind = "donation", b = 1, c = 2 }
""")
    assert main([str(path), "--quiet"]) == 2
    assert "b > c > 0" in capsys.readouterr().err


def test_graph_copies_are_independent_blocks():
    model = model_of(
        ["all_c"] * 30,
        {"kind": "random_regular", "n": 10, "d": 3, "copies": 3},
        {"rule": "death_birth"},
    )
    edges = model.edges
    assert len(edges) == 3 * 15
    # every edge stays inside its block of 10 nodes, and the blocks are different draws
    assert (edges[:, 0] // 10 == edges[:, 1] // 10).all()
    blocks = [{tuple(e) for e in edges[edges[:, 0] // 10 == i] - 10 * i} for i in range(3)]
    assert len({frozenset(b) for b in blocks}) > 1


@pytest.mark.parametrize("name", ["nowak_may", "santos_pacheco", "ohtsuki_bc"])
def test_reproduction_scenarios_run(name, tmp_path):
    from conftest import SCENARIOS

    out = tmp_path / name
    assert (
        main(
            [
                str(SCENARIOS / f"{name}.toml"),
                "--out",
                str(out),
                "--quiet",
                "--set",
                "pairing.steps=3",
                "--set",
                "evolution.average_last=2",
                "--set",
                "output.charts=false",
            ]
        )
        == 0
    )
    import json

    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3
    assert sum(summary["evolution"]["final_shares"].values()) == pytest.approx(1.0)


def test_datacollector_reports_the_shares_that_played_the_step():
    model = lone_defector(1.2)
    model.step()
    frame = model.datacollector.get_model_vars_dataframe()
    # collected after the step's games, before the update: one D among 25
    assert frame["share:all_d"].iloc[-1] == pytest.approx(1 / 25)
    assert model.shares()[1] == pytest.approx(9 / 25)  # after the update


def test_tables_name_the_policy_each_agent_played_not_the_one_it_took(tmp_path, scenario_file):
    path = scenario_file("""
seed = 2
game = { kind = "custom", R = 1, T = 1.9, S = 0, P = 0 }
match = { rounds = 2 }
graph = { kind = "grid", rows = 6, cols = 6, torus = true, neighbourhood = "moore" }
population = { mix = [ { policy = "all_c", share = 0.7 }, { policy = "all_d", share = 0.3 } ] }
pairing = { steps = 3 }
output = { charts = false }
evolution = { rule = "imitate_best", snapshot_every = 1 }
""")
    assert main([str(path), "--out", str(tmp_path / "out"), "--quiet"]) == 0
    import pandas as pd

    snaps = np.load(tmp_path / "out" / "snapshots.npz")
    labels = list(snaps["labels"])
    matches = pd.read_csv(tmp_path / "out" / "matches.csv")
    rounds = pd.read_parquet(tmp_path / "out" / "rounds.parquet")
    for step in (1, 2, 3):
        before = snaps["grid"][step - 1].ravel()  # the labels that played step `step`
        rows = matches[matches["step"] == step]
        assert (rows["player"].to_numpy() == np.array(labels)[before[rows["agent"]]]).all()
        played = rounds[rounds["step"] == step]
        # no noise: an all_d never chose C, an all_c never chose D
        assert set(played.loc[played["player"] == "all_d", "intended"]) <= {"D"}
        assert set(played.loc[played["player"] == "all_c", "intended"]) <= {"C"}
        assert set(played["intended"]) == {"C", "D"} or step > 1
    assert (snaps["grid"][1] != snaps["grid"][0]).any()  # somebody did change policy


def test_a_policy_on_no_node_can_still_arrive_by_mutation():
    # 1% of 36 nodes rounds to none; the policy is still a label, at share 0
    model = DilemmaModel(
        validate_scenario(
            {
                "seed": 1,
                "graph": {"kind": "grid", "rows": 6, "cols": 6},
                "population": {
                    "mix": [{"policy": "all_c", "share": 0.99}, {"policy": "all_d", "share": 0.01}]
                },
                "pairing": {"steps": 3},
                "evolution": {"rule": "fermi", "mutation": 0.5},
            }
        )
    )
    assert model.labels == ["all_c", "all_d"] and model.shares()[1] == 0
    while model.running:
        model.step()
    assert model.shares()[1] > 0


@pytest.mark.parametrize("rule", ["imitate_best", "proportional", "fermi", "death_birth", "moran"])
def test_agents_without_neighbours_keep_their_policy(rule):
    # only self-loops: everybody plays itself and has nobody to copy
    model = model_of(
        ["all_c", "all_d", "all_c"],
        {"kind": "erdos_renyi", "n": 3, "p": 0.0, "self_loops": True},
        {"rule": rule},
    )
    model.step()
    assert labels(model) == ["all_c", "all_d", "all_c"]


def test_proportional_scale_counts_the_matches_played():
    # one pair, gap 5 in a game whose one-match span is 10: copy with 5 / (10 * matches)
    edges = np.array([[0, 1]])
    evo = Evolution(evolution("proportional"), edges, 2, [0, 1], 10.0, np.random.default_rng(6))
    for played, p in ((1, 0.5), (2, 0.25)):
        copies = sum(
            evo.update(np.array([0, 1]), np.array([0.0, 5.0]), np.array([played, played]))[0] == 1
            for _ in range(4000)
        )
        assert within(int(copies), 4000, p)
