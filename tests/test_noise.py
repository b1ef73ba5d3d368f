"""The noise channel: each intended action is flipped independently with probability ``noise``.

Statistical checks use fixed seeds and 5-sigma binomial bands: for n independent flips
with probability q the flipped share has sd sqrt(q (1 - q) / n); a 5-sigma excursion
has probability below 1e-6, so the bands cannot fail by chance, while a wrong flip rate
(e.g. 0.05 or 0.2 instead of 0.1) lies hundreds of sigmas away.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from abm.engine import Engine
from abm.game import C, D, PayoffMatrix, apply_noise
from abm.policies import make
from abm.population import Population
from abm.seeding import stream

GAME = PayoffMatrix()
PURPOSES = ("noise", "policy", "match_length")
M = 2000  # matches (edges)
ROUNDS = 50


def population(a: str, b: str, *, noise: float, seed: int = 1, m: int = M, rounds: int = ROUNDS):
    """m disjoint matches, node i (policy a) against node m + i (policy b)."""
    pols = [make(a, {}, GAME), make(b, {}, GAME)]
    edges = np.stack([np.arange(m), np.arange(m, 2 * m)], axis=1)
    eng = Engine(
        game=GAME,
        noise=noise,
        population=Population.of_policies(pols, np.repeat([0, 1], m)),
        edges=edges,
        window=None,
        scope="match",
        rounds=rounds,
        continuation_probability=None,
        rngs={p: stream(seed, p) for p in PURPOSES},
    )
    return eng.play(0, np.arange(m))


def expected_flips(seed: int, noise: float, rounds: int, sides: int) -> np.ndarray:
    """The flips the engine should make: one uniform per live side per round from the
    'noise' stream, flipped where it falls below ``noise``."""
    rng = stream(seed, "noise")
    return np.stack([rng.random(sides) < noise for _ in range(rounds)])


# --------------------------------------------------------------------------------------
# engine
# --------------------------------------------------------------------------------------


def test_noise_flip_rate_all_c_population():
    noise = 0.1
    res = population("all_c", "all_c", noise=noise)
    assert res.actual.shape == (ROUNDS, 2 * M)
    # all_c never means to defect, whatever it saw
    assert (res.intended == C).all()
    flipped = res.actual != res.intended
    # every flip of a C is a D, and every D is a flip
    np.testing.assert_array_equal(flipped, res.actual == D)
    n = ROUNDS * 2 * M  # 200000 decisions
    sd = math.sqrt(noise * (1 - noise) / n)  # ~0.00067
    assert abs(flipped.mean() - noise) < 5 * sd
    # flips are spread over both sides and over rounds, not bunched in one place
    per_round = flipped.mean(axis=1)
    assert per_round.min() > 0 and per_round.max() < 0.2
    side_a, side_b = flipped[:, :M].mean(), flipped[:, M:].mean()
    sd_half = math.sqrt(noise * (1 - noise) / (n / 2))
    assert abs(side_a - noise) < 5 * sd_half and abs(side_b - noise) < 5 * sd_half


def test_flips_are_exactly_those_of_the_noise_stream():
    # actual differs from intended exactly where the 'noise' stream says to flip
    seed, noise, m, rounds = 3, 0.1, 500, 20
    res = population("all_c", "all_d", noise=noise, seed=seed, m=m, rounds=rounds)
    flips = expected_flips(seed, noise, rounds, 2 * m)
    assert flips.any() and not flips.all()
    np.testing.assert_array_equal(res.actual != res.intended, flips)
    np.testing.assert_array_equal(res.actual, np.where(flips, 1 - res.intended, res.intended))


def test_noise_zero_flips_nothing():
    res = population("all_c", "all_d", noise=0.0, m=300, rounds=20)
    np.testing.assert_array_equal(res.actual, res.intended)
    assert (res.actual[:, :300] == C).all() and (res.actual[:, 300:] == D).all()


def test_noise_one_flips_everything():
    res = population("all_c", "all_d", noise=1.0, m=300, rounds=20)
    assert (res.intended[:, :300] == C).all() and (res.intended[:, 300:] == D).all()
    np.testing.assert_array_equal(res.actual, 1 - res.intended)
    # all_c's side always ends up playing D and all_d's side C: payoff T for the first
    # side, S for the second
    assert (res.payoff[:, :300] == GAME.T).all()
    assert (res.payoff[:, 300:] == GAME.S).all()


def test_payoffs_and_memory_use_actual_moves():
    # TFT against TFT with noise: each side intends what its partner *actually* played in
    # the previous round (not what the partner intended), and the payoff is computed from
    # the actual moves.
    m, rounds = 400, 15
    res = population("tit_for_tat", "tit_for_tat", noise=0.1, seed=4, m=m, rounds=rounds)
    partner = np.concatenate([np.arange(m, 2 * m), np.arange(m)])
    assert (res.intended[0] == C).all()
    np.testing.assert_array_equal(res.intended[1:], res.actual[:-1, partner])
    # the noise changed something, so this is not the trivial all-C match
    assert (res.actual != res.intended).any()
    assert (res.intended[:-1, partner] != res.actual[:-1, partner]).any()
    table = GAME.table
    np.testing.assert_array_equal(res.payoff, table[res.actual, res.actual[:, partner]])
    totals = res.totals()
    np.testing.assert_array_equal(totals["defections"], (res.actual == D).sum(axis=0))
    np.testing.assert_array_equal(totals["intended_defections"], (res.intended == D).sum(axis=0))


def test_same_seed_same_arrays_different_seed_different_arrays():
    a = population("tit_for_tat", "random", noise=0.1, seed=10, m=200, rounds=20)
    b = population("tit_for_tat", "random", noise=0.1, seed=10, m=200, rounds=20)
    c = population("tit_for_tat", "random", noise=0.1, seed=11, m=200, rounds=20)
    for field in ("intended", "actual", "payoff"):
        np.testing.assert_array_equal(getattr(a, field), getattr(b, field))
    assert not np.array_equal(a.actual, c.actual)
    assert not np.array_equal(a.intended, c.intended)
    # the flip pattern itself depends on the seed
    assert not np.array_equal(a.actual != a.intended, c.actual != c.intended)


def test_flips_are_nested_across_noise_levels():
    # the noise stream draws one uniform per decision whatever the level, so with the same
    # seed every flip at noise 0.05 is also a flip at noise 0.2 (all_c keeps the intended
    # actions identical across runs, so the comparison is like for like)
    low = population("all_c", "all_c", noise=0.05, seed=8, m=300, rounds=20)
    high = population("all_c", "all_c", noise=0.2, seed=8, m=300, rounds=20)
    lo_f, hi_f = low.actual != low.intended, high.actual != high.intended
    assert lo_f.any()
    assert (hi_f[lo_f]).all()
    assert hi_f.sum() > lo_f.sum()


# --------------------------------------------------------------------------------------
# apply_noise directly
# --------------------------------------------------------------------------------------


def test_apply_noise_zero_and_one():
    rng = np.random.default_rng(0)
    intended = rng.integers(0, 2, size=1000).astype(np.int8)
    out0 = apply_noise(intended, 0.0, np.random.default_rng(1))
    out1 = apply_noise(intended, 1.0, np.random.default_rng(1))
    assert out0.dtype == np.int8 and out1.dtype == np.int8
    np.testing.assert_array_equal(out0, intended)
    np.testing.assert_array_equal(out1, 1 - intended)
    assert set(np.unique(out1)) <= {0, 1}


def test_apply_noise_does_not_modify_its_input():
    intended = np.zeros(100, np.int8)
    apply_noise(intended, 1.0, np.random.default_rng(0))
    assert (intended == 0).all()


@pytest.mark.parametrize("noise", [0.01, 0.1, 0.5])
def test_apply_noise_rate(noise):
    n = 200_000
    intended = np.random.default_rng(2).integers(0, 2, size=n).astype(np.int8)
    out = apply_noise(intended, noise, np.random.default_rng(3))
    flipped = out != intended
    sd = math.sqrt(noise * (1 - noise) / n)
    assert abs(flipped.mean() - noise) < 5 * sd
    # flipping does not depend on the action: C's and D's are flipped at the same rate
    for action in (C, D):
        mask = intended == action
        sd_a = math.sqrt(noise * (1 - noise) / mask.sum())
        assert abs(flipped[mask].mean() - noise) < 5 * sd_a


def test_apply_noise_matches_the_uniforms_it_draws():
    intended = np.array([0, 1, 0, 1, 0, 1, 0, 1], np.int8)
    u = np.random.default_rng(42).random(len(intended))
    out = apply_noise(intended, 0.5, np.random.default_rng(42))
    np.testing.assert_array_equal(out, np.where(u < 0.5, 1 - intended, intended))


def test_apply_noise_draws_even_at_zero_noise():
    # documented: the draw is made even at noise 0, keeping the stream aligned
    rng_a, rng_b = np.random.default_rng(9), np.random.default_rng(9)
    apply_noise(np.zeros(17, np.int8), 0.0, rng_a)
    rng_b.random(17)
    assert rng_a.random() == rng_b.random()


def test_apply_noise_same_seed_same_flips():
    intended = np.zeros(5000, np.int8)
    a = apply_noise(intended, 0.1, stream(1, "noise"))
    b = apply_noise(intended, 0.1, stream(1, "noise"))
    c = apply_noise(intended, 0.1, stream(2, "noise"))
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def test_apply_noise_empty():
    out = apply_noise(np.zeros(0, np.int8), 0.3, np.random.default_rng(0))
    assert out.shape == (0,) and out.dtype == np.int8
