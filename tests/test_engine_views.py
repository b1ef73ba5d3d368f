"""What the engine hands the policies is read-only; its grouping and sums are exact."""

import numpy as np
import pytest

from abm.engine import Engine, _group, _sum_rounds
from abm.game import PayoffMatrix, apply_noise
from abm.policies import make
from abm.population import Population
from abm.seeding import stream

GAME = PayoffMatrix()  # R=9, S=0, T=10, P=5


class Writer:
    """Decides C, but first writes into one array of the view it was given."""

    def __init__(self, field: str) -> None:
        self.field = field

    def decide(self, view, rng):
        target = getattr(view, self.field)
        if target.ndim == 2:
            target[:, -1] = 0
        else:
            target[:] = 0
        return np.zeros(len(view), np.int8)


class Noter:
    """Decides C and writes into the outcome it is shown."""

    def decide(self, view, rng):
        return np.zeros(len(view), np.int8)

    def observe(self, outcome):
        outcome.mine[:] = 1


def engine(policy, scope="match", window=None) -> Engine:
    population = Population.of_policies([policy, make("all_c", {}, GAME)], np.array([0, 1]))
    return Engine(
        game=GAME,
        noise=0.0,
        population=population,
        edges=np.array([[0, 1]]),
        window=window,
        scope=scope,
        rounds=3,
        continuation_probability=None,
        rngs={p: stream(1, p) for p in ("noise", "policy", "match_length")},
    )


@pytest.mark.parametrize(
    "field",
    ["mine", "theirs", "length", "agent", "opponent", "match", "side", "score", "rounds_total"],
)
@pytest.mark.parametrize("scope", ["match", "opponent", "all"])
def test_a_policy_cannot_write_into_its_view(field, scope):
    with pytest.raises(ValueError, match="read-only"):
        engine(Writer(field), scope=scope, window=2).play(0, np.array([0]))


def test_a_policy_cannot_write_into_the_outcome():
    with pytest.raises(ValueError, match="read-only"):
        engine(Noter()).play(0, np.array([0]))


def test_the_view_is_the_memory_itself_not_a_copy():
    seen, kept = [], []

    class Keep:
        def decide(self, view, rng):
            seen.append((view.mine.tolist(), view.theirs.tolist(), view.score.tolist()))
            kept.append(view)
            return np.ones(len(view), np.int8)

    engine(Keep()).play(0, np.array([0]))
    # round 3 of the match: the two rounds before, right-aligned, in the window
    assert seen[2] == ([[-1, 1, 1]], [[-1, 0, 0]], [20.0])  # T = 10 twice
    # a view kept from round 1 shows the window now: it was never copied
    assert kept[0].mine.tolist() == [[1, 1, 1]]


@pytest.mark.parametrize("n_policies", [3, 40])
def test_grouping_is_a_stable_sort_by_policy(n_policies):
    rng = np.random.default_rng(4)
    side_policy = rng.integers(0, n_policies, 5000)
    side_policy[side_policy == 1] = 2  # one policy with no side
    order, groups = _group(side_policy, n_policies)
    assert order.tolist() == np.argsort(side_policy, kind="stable").tolist()
    assert all(p != 1 for p, _, _ in groups)
    for p, a, b in groups:
        assert (side_policy[order[a:b]] == p).all() and b - a == (side_policy == p).sum()


def test_round_sums_equal_numpy_sums_exactly():
    rng = np.random.default_rng(2)
    values = rng.random((7, 1000)) * 10.0 ** rng.integers(-8, 8, (7, 1000))
    assert _sum_rounds(values).tolist() == values.sum(axis=0).tolist()
    mask = rng.random((7, 1000)) < 0.3
    assert _sum_rounds(mask.view(np.int8)).tolist() == mask.sum(axis=0).tolist()


def test_without_noise_the_stream_moves_on_as_if_drawn():
    drawn, skipped = stream(3, "noise"), stream(3, "noise")
    intended = np.array([0, 1, -1, 0, 1], np.int8)
    assert (apply_noise(intended, 0.0, drawn) == intended).all()
    eng = engine(make("all_c", {}, GAME))
    eng.rngs["noise"] = skipped
    assert eng._noisy(intended).tolist() == intended.tolist()
    assert drawn.random(4).tolist() == skipped.random(4).tolist()
