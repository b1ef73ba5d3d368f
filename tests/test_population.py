"""The Population: the one owner of who plays what, changed only by relabel."""

import numpy as np
import pytest

from abm.engine import StepResult
from abm.errors import ScenarioError
from abm.game import PayoffMatrix
from abm.model import DilemmaModel
from abm.policies import make
from abm.population import Population
from abm.scenario import validate_scenario
from abm.tally import Tally

GAME = PayoffMatrix()


def three_labels() -> Population:
    # labels A and C share policy 0 (all_c), B plays policy 1 (all_d)
    policies = [make("all_c", {}, GAME), make("all_d", {}, GAME)]
    return Population(
        ["A", "B", "C"],
        np.array([0, 1, 2, 1]),
        policies=policies,
        policy_of_label=[0, 1, 0],
        policy_names=["all_c", "all_d", "all_c"],
    )


def test_relabel_moves_labels_policies_and_the_last_players_together():
    pop = three_labels()
    held = pop.label_of_node, pop.policy_of_node, pop.played_label_of_node
    assert pop.policy_of_node.tolist() == [0, 1, 0, 1]
    pop.relabel(np.array([1, 1, 0, 2]))
    assert pop.label_of_node.tolist() == [1, 1, 0, 2]
    assert pop.policy_of_node.tolist() == [1, 1, 0, 0]
    assert pop.played_label_of_node.tolist() == [0, 1, 2, 1]  # who played before
    # arrays taken before the relabel see it too: they are views of the owner's arrays
    assert [a.tolist() for a in held] == [[1, 1, 0, 2], [1, 1, 0, 0], [0, 1, 2, 1]]


@pytest.mark.parametrize(
    "name", ["label_of_node", "policy_of_node", "played_label_of_node", "policy_of_label"]
)
def test_arrays_handed_out_cannot_be_written(name):
    pop = three_labels()
    with pytest.raises(ValueError, match="read-only"):
        getattr(pop, name)[:] = 0
    assert pop.label_of_node.tolist() == [0, 1, 2, 1]


def test_relabel_refuses_a_wrong_shape_or_an_unknown_label_and_changes_nothing():
    pop = three_labels()
    with pytest.raises(ValueError, match="one label per node"):
        pop.relabel(np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="0..2"):
        pop.relabel(np.array([0, 1, 3, 0]))
    assert pop.label_of_node.tolist() == [0, 1, 2, 1]
    assert pop.policy_of_node.tolist() == [0, 1, 0, 1]


def test_counts_shares_and_policy_names():
    pop = three_labels()
    assert pop.counts().tolist() == [1, 2, 1]
    assert pop.shares().tolist() == [0.25, 0.5, 0.25]
    assert pop.policy_name_of_node() == ["all_c", "all_d", "all_c", "all_d"]
    assert pop.n_nodes == 4 and pop.label_index("C") == 2


def test_the_tally_counts_under_the_labels_of_the_moment():
    pop = three_labels()
    tally = Tally(pop, track_shares=True)
    pop.relabel(np.array([2, 2, 2, 0]))
    # one one-round match, node 0 (C then) against node 1 (C then): C v D
    result = StepResult(
        step=0,
        edge=np.array([0]),
        agent=np.array([0, 1]),
        opponent=np.array([1, 0]),
        twin=np.zeros(2, bool),
        length=np.array([1]),
        intended=np.array([[0, 1]], np.int8),
        actual=np.array([[0, 1]], np.int8),
        payoff=np.array([[0.0, 10.0]]),
    )
    tally.add(result)
    assert tally.pair_matches.reshape(3, 3)[2, 2] == 2 and tally.pair_matches.sum() == 2
    step = tally.steps[0]
    assert (step["share:A"], step["share:B"], step["share:C"]) == (0.25, 0.0, 0.75)


def scenario(**extra):
    data = {
        "seed": 1,
        "graph": {"kind": "ring", "n": 10, "k": 2},
        "population": {
            "mix": [
                {"policy": "all_d", "share": 0.5},
                {"policy": {"name": "random", "p": 0.5, "label": "Coin"}, "share": 0.5},
            ]
        },
        **extra,
    }
    return validate_scenario(data)


def test_model_arrays_are_the_population_read_only():
    model = DilemmaModel(scenario(evolution={"rule": "imitate_best"}, pairing={"steps": 3}))
    assert model.labels == ["all_d", "Coin"]
    assert model.policy_name_of_label == ["all_d", "random(p=0.5)"]
    with pytest.raises(ValueError, match="read-only"):
        model.label_of_node[:] = 0
    while model.running:
        model.step()
        pop = model.population
        assert (pop.policy_of_node == pop.policy_of_label[pop.label_of_node]).all()
        assert model.engine.population is pop and model.tally.population is pop


def test_a_label_given_to_two_policies_is_refused():
    data = scenario().model_dump()
    with pytest.raises(ScenarioError, match="field 'population'.*'X' is given to two"):
        DilemmaModel(
            validate_scenario(
                {
                    **data,
                    "population": {
                        "mix": [
                            {"policy": {"name": "all_d", "label": "X"}, "share": 0.5},
                            {"policy": {"name": "all_c", "label": "X"}, "share": 0.5},
                        ]
                    },
                }
            )
        )
