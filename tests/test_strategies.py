"""Golden move sequences for every rule strategy, in the spirit of Axelrod's ``versus_test``.

Every expected sequence below was worked out by hand from the strategy's definition
(the derivation is in the comment next to the less obvious ones), not copied from
program output. Payoffs use the default game R=9, S=0, T=10, P=5, so per round
CC -> 9/9, CD -> 0/10, DC -> 10/0, DD -> 5/5.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from abm.engine import Engine
from abm.game import C, D, PayoffMatrix
from abm.policies import REGISTRY, View, lookup, make
from abm.policies.rules import GenerousTitForTat, Trigger, WinStayLoseShift
from abm.population import Population
from abm.seeding import stream

# the rule strategies; the LLM policy and the Axelrod adapter have tests of their own
RULES = {
    name: info for name, info in REGISTRY.items() if info.factory.__module__ == "abm.policies.rules"
}

GAME = PayoffMatrix()  # R=9, S=0, T=10, P=5
PURPOSES = ("noise", "policy", "match_length")


def _engine(
    policies, policy_of_node, edges, n_nodes, rounds, *, noise=0.0, window=None, seed=1, game=GAME
):
    assert len(policy_of_node) == n_nodes
    return Engine(
        game=game,
        noise=noise,
        population=Population.of_policies(policies, np.asarray(policy_of_node)),
        edges=np.asarray(edges),
        window=window,
        scope="match",
        rounds=rounds,
        continuation_probability=None,
        rngs={p: stream(seed, p) for p in PURPOSES},
    )


def play(a, b, rounds=5, *, params_a=None, params_b=None, window=None, seed=1, game=GAME):
    """One match between node 0 (policy ``a``) and node 1 (policy ``b``)."""
    pols = [make(a, params_a or {}, game), make(b, params_b or {}, game)]
    eng = _engine(pols, [0, 1], [[0, 1]], 2, rounds, window=window, seed=seed, game=game)
    return eng.play(0, np.array([0]))


def self_play(a, rounds=5, *, params=None, seed=1):
    """One match of a single node against itself (edge [0, 0])."""
    eng = _engine([make(a, params or {}, GAME)], [0], [[0, 0]], 1, rounds, seed=seed)
    return eng.play(0, np.array([0]))


def moves(column: np.ndarray) -> str:
    return "".join("CD"[int(x)] for x in column)


def versus(a, b, expected_a, expected_b, **kwargs):
    res = play(a, b, rounds=len(expected_a), **kwargs)
    assert res.actual.shape == (len(expected_a), 2)
    got = (moves(res.actual[:, 0]), moves(res.actual[:, 1]))
    assert got == (expected_a, expected_b), f"{a} vs {b}"
    # without noise the actions played are the actions intended
    np.testing.assert_array_equal(res.intended, res.actual)
    return res


# --------------------------------------------------------------------------------------
# golden sequences: (player, opponent, player's moves, opponent's moves)
# --------------------------------------------------------------------------------------

GOLDEN = [
    # all_c: always C
    ("all_c", "all_c", "CCCCC", "CCCCC"),
    ("all_c", "all_d", "CCCCC", "DDDDD"),
    ("all_c", "alternator", "CCCCC", "CDCDC"),
    ("all_c", "suspicious_tit_for_tat", "CCCCC", "DCCCC"),
    # all_d: always D
    ("all_d", "all_d", "DDDDD", "DDDDD"),
    ("all_d", "tit_for_tat", "DDDDD", "CDDDD"),
    ("all_d", "trigger", "DDDDD", "CDDDD"),
    # defect_once: D in round 1, then C whatever happens
    ("defect_once", "all_c", "DCCCC", "CCCCC"),
    ("defect_once", "all_d", "DCCCC", "DDDDD"),
    # TFT answers the single D one round later, then both cooperate again
    ("defect_once", "tit_for_tat", "DCCCC", "CDCCC"),
    # trigger never forgives the round-1 defection (full-match memory)
    ("defect_once", "trigger", "DCCCC", "CDDDD"),
    ("defect_once", "grim", "DCCCC", "CDDDD"),
    # trigger: C until the opponent's first D, D for ever after
    ("trigger", "all_c", "CCCCC", "CCCCC"),
    ("trigger", "all_d", "CDDDD", "DDDDD"),
    # alternator plays C D C D C; its first D is in round 2, so trigger switches in round 3
    ("trigger", "alternator", "CCDDD", "CDCDC"),
    # STFT's opening D is enough to trip the trigger; STFT then copies trigger's D's
    ("trigger", "suspicious_tit_for_tat", "CDDDD", "DCDDD"),
    # tit_for_tat: C first, then the opponent's previous move
    ("tit_for_tat", "all_c", "CCCCC", "CCCCC"),
    ("tit_for_tat", "all_d", "CDDDD", "DDDDD"),
    # alternator C D C D C, shifted one round right behind a leading C
    ("tit_for_tat", "alternator", "CCDCD", "CDCDC"),
    # TFT and STFT echo each other's last move: out of phase for ever
    ("tit_for_tat", "suspicious_tit_for_tat", "CDCDC", "DCDCD"),
    ("tit_for_tat", "tit_for_two_tats", "CCCCC", "CCCCC"),
    # suspicious_tit_for_tat: D first, then the opponent's previous move
    ("suspicious_tit_for_tat", "all_c", "DCCCC", "CCCCC"),
    ("suspicious_tit_for_tat", "all_d", "DDDDD", "DDDDD"),
    ("suspicious_tit_for_tat", "suspicious_tit_for_tat", "DDDDD", "DDDDD"),
    ("suspicious_tit_for_tat", "alternator", "DCDCD", "CDCDC"),
    # tit_for_two_tats: D only after two opponent D's in a row
    ("tit_for_two_tats", "all_c", "CCCCC", "CCCCC"),
    # one D seen after round 1, two after round 2 -> first D in round 3
    ("tit_for_two_tats", "all_d", "CCDDD", "DDDDD"),
    # the alternator never defects twice running
    ("tit_for_two_tats", "alternator", "CCCCCC", "CDCDCD"),
    ("tit_for_two_tats", "defect_once", "CCCCC", "DCCCC"),
    # STFT's single opening D is tolerated; STFT copies TF2T's C from round 2 on
    ("tit_for_two_tats", "suspicious_tit_for_tat", "CCCCC", "DCCCC"),
    # win_stay_lose_shift: C first, then C iff both last moves were equal
    ("win_stay_lose_shift", "all_c", "CCCCC", "CCCCC"),
    # CD -> D, DD -> C, CD -> D, ... : WSLS alternates against all_d
    ("win_stay_lose_shift", "all_d", "CDCDC", "DDDDD"),
    # CD -> D; then DC -> D for ever because defect_once keeps cooperating
    ("win_stay_lose_shift", "defect_once", "CDDDD", "DCCCC"),
    ("pavlov", "defect_once", "CDDDD", "DCCCC"),
    # r0 C/D; r1 CD->D, STFT copies C; r2 DC->D, STFT copies D; r3 DD->C, copies D;
    # r4 CD->D, copies C; r5 DC->D, copies D
    ("win_stay_lose_shift", "suspicious_tit_for_tat", "CDDCDD", "DCDDCD"),
    # alternator C D C D C D: r1 CC->C; r2 CD->D; r3 DC->D; r4 DD->C; r5 CC->C
    ("win_stay_lose_shift", "alternator", "CCDDCC", "CDCDCD"),
    ("win_stay_lose_shift", "tit_for_tat", "CCCCC", "CCCCC"),
    # alternator: C first, then the opposite of its own last move, whatever the opponent does
    ("alternator", "all_c", "CDCDC", "CCCCC"),
    ("alternator", "all_d", "CDCDC", "DDDDD"),
    ("alternator", "alternator", "CDCDCD", "CDCDCD"),
]


@pytest.mark.parametrize(
    ("a", "b", "seq_a", "seq_b"), GOLDEN, ids=[f"{a}-vs-{b}" for a, b, *_ in GOLDEN]
)
def test_golden_sequences(a, b, seq_a, seq_b):
    versus(a, b, seq_a, seq_b)


@pytest.mark.parametrize(
    ("a", "b", "seq_a", "seq_b"), GOLDEN, ids=[f"{b}-vs-{a}" for a, b, *_ in GOLDEN]
)
def test_golden_sequences_with_sides_swapped(a, b, seq_a, seq_b):
    # which end of the edge a player sits on must not matter
    versus(b, a, seq_b, seq_a)


def test_every_registered_strategy_has_a_golden_case():
    covered = {lookup(name).name for a, b, *_ in GOLDEN for name in (a, b)}
    # the two stochastic strategies get their own tests below
    assert set(RULES) - covered == {"generous_tit_for_tat", "random"}


# --------------------------------------------------------------------------------------
# self-play: a node against itself on a loop edge [0, 0]
# --------------------------------------------------------------------------------------

SELF_PLAY = [
    ("all_c", "CCCCC"),
    ("all_d", "DDDDD"),
    ("defect_once", "DCCCC"),  # both copies defect in round 1, then cooperate
    ("trigger", "CCCCC"),
    ("tit_for_tat", "CCCCC"),
    ("suspicious_tit_for_tat", "DDDDD"),
    ("tit_for_two_tats", "CCCCC"),
    ("win_stay_lose_shift", "CCCCC"),
    ("alternator", "CDCDC"),
]


@pytest.mark.parametrize(("name", "expected"), SELF_PLAY, ids=[n for n, _ in SELF_PLAY])
def test_self_play(name, expected):
    res = self_play(name, rounds=len(expected))
    assert res.actual.shape == (len(expected), 2)
    assert moves(res.actual[:, 0]) == expected
    assert moves(res.actual[:, 1]) == expected
    assert res.twin.tolist() == [False, True]
    assert res.agent.tolist() == [0, 0]


def test_self_play_payoffs_are_symmetric():
    res = self_play("defect_once", rounds=4)
    # both copies: DD -> 5/5, then CC -> 9/9 three times
    assert res.payoff[:, 0].tolist() == [5.0, 9.0, 9.0, 9.0]
    assert res.payoff[:, 1].tolist() == [5.0, 9.0, 9.0, 9.0]


# --------------------------------------------------------------------------------------
# payoffs and totals, by hand
# --------------------------------------------------------------------------------------


def test_payoffs_all_c_vs_all_d():
    res = versus("all_c", "all_d", "CCCCC", "DDDDD")
    assert res.payoff[:, 0].tolist() == [0.0] * 5  # S every round
    assert res.payoff[:, 1].tolist() == [10.0] * 5  # T every round
    totals = res.totals()
    assert totals["payoff"].tolist() == [0.0, 50.0]
    assert totals["cooperations"].tolist() == [5, 0]
    assert totals["defections"].tolist() == [0, 5]
    assert totals["intended_defections"].tolist() == [0, 5]


def test_payoffs_defect_once_vs_tit_for_tat():
    res = versus("defect_once", "tit_for_tat", "DCCCC", "CDCCC")
    # DC, CD, CC, CC, CC
    assert res.payoff[:, 0].tolist() == [10.0, 0.0, 9.0, 9.0, 9.0]
    assert res.payoff[:, 1].tolist() == [0.0, 10.0, 9.0, 9.0, 9.0]
    totals = res.totals()
    assert totals["payoff"].tolist() == [37.0, 37.0]
    assert totals["cooperations"].tolist() == [4, 4]
    assert totals["defections"].tolist() == [1, 1]


def test_payoffs_all_d_vs_tit_for_tat():
    res = versus("all_d", "tit_for_tat", "DDDDD", "CDDDD")
    # DC then DD four times
    assert res.payoff[:, 0].tolist() == [10.0, 5.0, 5.0, 5.0, 5.0]
    assert res.payoff[:, 1].tolist() == [0.0, 5.0, 5.0, 5.0, 5.0]
    assert res.totals()["payoff"].tolist() == [30.0, 20.0]


def test_payoffs_pavlov_exploits_defect_once():
    res = versus("pavlov", "defect_once", "CDDDD", "DCCCC")
    # CD, then DC four times
    assert res.payoff[:, 0].tolist() == [0.0, 10.0, 10.0, 10.0, 10.0]
    assert res.payoff[:, 1].tolist() == [10.0, 0.0, 0.0, 0.0, 0.0]
    assert res.totals()["payoff"].tolist() == [40.0, 10.0]


def test_payoffs_tit_for_tat_vs_suspicious():
    res = versus("tit_for_tat", "suspicious_tit_for_tat", "CDCDC", "DCDCD")
    # CD, DC, CD, DC, CD
    assert res.payoff[:, 0].tolist() == [0.0, 10.0, 0.0, 10.0, 0.0]
    assert res.payoff[:, 1].tolist() == [10.0, 0.0, 10.0, 0.0, 10.0]
    assert res.totals()["payoff"].tolist() == [20.0, 30.0]


def test_payoffs_follow_a_custom_game():
    # donation-style numbers, to make sure the engine reads the payoffs from the game
    game = PayoffMatrix(R=3, S=-1, T=4, P=0)
    res = play("tit_for_tat", "all_d", rounds=4, game=game)
    assert moves(res.actual[:, 0]) == "CDDD"
    assert res.payoff[:, 0].tolist() == [-1.0, 0.0, 0.0, 0.0]
    assert res.payoff[:, 1].tolist() == [4.0, 0.0, 0.0, 0.0]


# --------------------------------------------------------------------------------------
# memory windows
# --------------------------------------------------------------------------------------


def test_trigger_with_two_round_window_forgives():
    # defect_once plays D C C C C C. With window=2 the trigger decides on (at most) the
    # opponent's last two moves:
    #   r0: nothing remembered          -> C
    #   r1: remembers [D]               -> D
    #   r2: remembers [D, C]            -> D
    #   r3: remembers [C, C] (D is gone) -> C, and C from then on.
    res = versus("trigger", "defect_once", "CDDCCC", "DCCCCC", window=2)
    # the same match with the whole match remembered never forgives
    full = versus("trigger", "defect_once", "CDDDDD", "DCCCCC")
    assert not np.array_equal(res.actual, full.actual)


def test_trigger_with_one_round_window_is_tit_for_tat_like():
    # window=1: r1 remembers [D] -> D; r2 remembers [C] -> C
    versus("grim", "defect_once", "CDCCCC", "DCCCCC", window=1)


def test_window_longer_than_match_changes_nothing():
    versus("trigger", "defect_once", "CDDDDD", "DCCCCC", window=50)


def test_tit_for_two_tats_with_window_two_still_counts_two_defections():
    versus("tit_for_two_tats", "all_d", "CCDDD", "DDDDD", window=2)


# --------------------------------------------------------------------------------------
# generous tit for tat
# --------------------------------------------------------------------------------------


def test_generous_default_g_from_payoffs():
    pol = make("generous_tit_for_tat", {}, GAME)
    assert isinstance(pol, GenerousTitForTat)
    # min(1 - (T-R)/(R-S), (R-P)/(T-P)) = min(1 - 1/9, 4/5) = 0.8
    assert pol.g == pytest.approx(min(1 - (10 - 9) / (9 - 0), (9 - 5) / (10 - 5)))
    assert pol.g == pytest.approx(0.8)
    # the first term can be the smaller one: R=3, S=0, T=5, P=1 gives min(1/3, 1/2)
    other = make("generous_tit_for_tat", {}, PayoffMatrix(R=3, S=0, T=5, P=1))
    assert other.g == pytest.approx(1 / 3)


def test_generous_explicit_g_is_kept():
    assert make("generous_tit_for_tat", {"g": 0.25}, GAME).g == pytest.approx(0.25)


@pytest.mark.parametrize(
    ("opponent", "seq_a", "seq_b"),
    [
        ("all_d", "CDDDDD", "DDDDDD"),
        ("alternator", "CCDCDC", "CDCDCD"),
        ("suspicious_tit_for_tat", "CDCDCD", "DCDCDC"),
        ("defect_once", "CDCCCC", "DCCCCC"),
        ("all_c", "CCCCCC", "CCCCCC"),
    ],
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generous_with_g0_is_tit_for_tat(opponent, seq_a, seq_b, seed):
    versus("generous_tit_for_tat", opponent, seq_a, seq_b, params_a={"g": 0.0}, seed=seed)
    versus("tit_for_tat", opponent, seq_a, seq_b, seed=seed)


@pytest.mark.parametrize(
    "opponent", ["all_d", "alternator", "suspicious_tit_for_tat", "defect_once"]
)
@pytest.mark.parametrize("seed", [1, 2, 3])
def test_generous_with_g1_never_defects(opponent, seed):
    res = play("generous_tit_for_tat", opponent, rounds=20, params_a={"g": 1.0}, seed=seed)
    assert moves(res.actual[:, 0]) == "C" * 20


def test_generous_forgives_at_rate_g():
    # 2000 matches of GTFT (default g = 0.8) against all_d, 10 rounds each. From round 1 on
    # GTFT is always provoked, so each of its 2000 * 9 = 18000 later decisions is D with
    # probability 1 - g = 0.2, independently. Binomial sd of the share:
    # sqrt(0.2 * 0.8 / 18000) ~ 0.003; we allow 5 sd (~0.015), so a false failure has
    # probability < 1e-6 (and the seed is fixed anyway).
    m, rounds = 2000, 10
    pols = [make("generous_tit_for_tat", {}, GAME), make("all_d", {}, GAME)]
    edges = np.stack([np.arange(m), np.arange(m, 2 * m)], axis=1)
    policy_of_node = np.repeat([0, 1], m)
    res = _engine(pols, policy_of_node, edges, 2 * m, rounds, seed=7).play(0, np.arange(m))
    gtft = res.actual[:, :m]
    assert (gtft[0] == C).all()  # never provoked in round 0
    share_d = (gtft[1:] == D).mean()
    n = m * (rounds - 1)
    sd = math.sqrt(0.2 * 0.8 / n)
    assert abs(share_d - 0.2) < 5 * sd


# --------------------------------------------------------------------------------------
# random
# --------------------------------------------------------------------------------------


@pytest.mark.parametrize("opponent", ["all_c", "all_d", "tit_for_tat"])
def test_random_p1_always_cooperates(opponent):
    res = play("random", opponent, rounds=30, params_a={"p": 1.0})
    assert moves(res.actual[:, 0]) == "C" * 30


@pytest.mark.parametrize("opponent", ["all_c", "all_d", "tit_for_tat"])
def test_random_p0_always_defects(opponent):
    res = play("random", opponent, rounds=30, params_a={"p": 0.0})
    assert moves(res.actual[:, 0]) == "D" * 30


def test_random_default_p_is_half():
    assert make("random", {}, GAME).p == 0.5


def test_random_p03_cooperation_share():
    # 2000 matches of random(p=0.3) against all_c, 10 rounds: 20000 independent draws.
    # The C share is Binomial(20000, 0.3) / 20000 with sd sqrt(0.3 * 0.7 / 20000) ~ 0.0032;
    # a 5-sd band (~0.016) is loose enough never to fail by chance (p < 1e-6) and tight
    # enough to catch p and 1 - p being swapped (0.7) or a coin ignoring p (0.5).
    m, rounds = 2000, 10
    pols = [make("random", {"p": 0.3}, GAME), make("all_c", {}, GAME)]
    edges = np.stack([np.arange(m), np.arange(m, 2 * m)], axis=1)
    res = _engine(pols, np.repeat([0, 1], m), edges, 2 * m, rounds, seed=11).play(0, np.arange(m))
    share_c = (res.actual[:, :m] == C).mean()
    sd = math.sqrt(0.3 * 0.7 / (m * rounds))
    assert abs(share_c - 0.3) < 5 * sd
    # and the rounds really are different draws, not one draw repeated
    assert len({moves(res.actual[:, i]) for i in range(50)}) > 1


def test_random_same_seed_same_moves_different_seed_different_moves():
    a = play("random", "all_c", rounds=64, seed=5).actual
    b = play("random", "all_c", rounds=64, seed=5).actual
    c = play("random", "all_c", rounds=64, seed=6).actual
    np.testing.assert_array_equal(a, b)
    # 64 fair coins agreeing by chance has probability 2**-64
    assert not np.array_equal(a[:, 0], c[:, 0])


# --------------------------------------------------------------------------------------
# registry-wide checks on random batch views
# --------------------------------------------------------------------------------------

WINDOW = 4


def random_view(rng: np.random.Generator, n: int, window: int = WINDOW) -> View:
    """A batch of n right-aligned histories of random lengths 0..window."""
    length = rng.integers(0, window + 1, size=n).astype(np.int32)
    mine = rng.integers(0, 2, size=(n, window)).astype(np.int8)
    theirs = rng.integers(0, 2, size=(n, window)).astype(np.int8)
    empty = np.arange(window)[None, :] < (window - length)[:, None]
    mine[empty] = -1
    theirs[empty] = -1
    rounds = (length + rng.integers(0, 5, size=n)).astype(np.int32)
    return View(
        mine=mine,
        theirs=theirs,
        length=length,
        round=rounds,
        agent=np.arange(n),
        opponent=np.arange(n)[::-1].copy(),
        match=np.arange(n),
        step=0,
    )


def full_histories(window: int = WINDOW) -> tuple[np.ndarray, np.ndarray]:
    """Every pair of full-length (mine, theirs) histories of ``window`` rounds."""
    bits = (np.arange(2 ** (2 * window))[:, None] >> np.arange(2 * window)[None, :]) & 1
    bits = bits.astype(np.int8)
    return bits[:, :window].copy(), bits[:, window:].copy()


def view_of(mine, theirs, length=None, rnd=None) -> View:
    n, window = mine.shape
    length = np.full(n, window, np.int32) if length is None else length
    rnd = np.full(n, 7, np.int32) if rnd is None else rnd
    return View(
        mine=mine,
        theirs=theirs,
        length=length,
        round=rnd,
        agent=np.zeros(n, int),
        opponent=np.ones(n, int),
        match=np.arange(n),
        step=0,
    )


ALL_NAMES = sorted(RULES)


@pytest.mark.parametrize("name", ALL_NAMES)
def test_policy_returns_int8_actions_of_batch_length(name):
    rng = np.random.default_rng(123)
    pol = make(name, {}, GAME)
    for n in (0, 1, 37):
        view = random_view(rng, n)
        out = pol.decide(view, np.random.default_rng(0))
        assert isinstance(out, np.ndarray)
        assert out.dtype == np.int8
        assert out.shape == (n,)
        assert np.isin(out, [C, D]).all()


@pytest.mark.parametrize("name", ALL_NAMES)
def test_policy_accepts_an_empty_memory_window(name):
    # zero-column memory (round 0 of a match, nothing remembered)
    n = 5
    empty = np.empty((n, 0), np.int8)
    view = View(
        mine=empty,
        theirs=empty,
        length=np.zeros(n, np.int32),
        round=np.zeros(n, np.int32),
        agent=np.arange(n),
        opponent=np.arange(n),
        match=np.arange(n),
        step=0,
    )
    out = make(name, {}, GAME).decide(view, np.random.default_rng(0))
    assert out.dtype == np.int8 and out.shape == (n,)


@pytest.mark.parametrize("name", [n for n in ALL_NAMES if not math.isinf(REGISTRY[n].memory_depth)])
def test_memory_depth_is_respected(name):
    """A policy of memory depth d decides the same whatever happened before the last d
    rounds. Stochastic policies are called with identically seeded generators, so row i
    gets the same random draw in both batches and only the history differs."""
    depth = int(REGISTRY[name].memory_depth)
    pol = make(name, {}, GAME)
    mine, theirs = full_histories()
    base = pol.decide(view_of(mine, theirs), np.random.default_rng(99))
    rng = np.random.default_rng(5)
    older = slice(0, WINDOW - depth)  # columns older than the last ``depth`` rounds
    for _ in range(10):
        m2, t2 = mine.copy(), theirs.copy()
        m2[:, older] = rng.integers(0, 2, size=m2[:, older].shape)
        t2[:, older] = rng.integers(0, 2, size=t2[:, older].shape)
        assert (m2 != mine).any() or depth == WINDOW  # the perturbation does something
        out = pol.decide(view_of(m2, t2), np.random.default_rng(99))
        np.testing.assert_array_equal(out, base)
    if depth == 0:
        # no memory at all: the length of the history does not matter either
        n = len(mine)
        short = np.random.default_rng(6).integers(0, WINDOW + 1, size=n).astype(np.int32)
        m3, t3 = mine.copy(), theirs.copy()
        pad = np.arange(WINDOW)[None, :] < (WINDOW - short)[:, None]
        m3[pad] = -1
        t3[pad] = -1
        out = pol.decide(view_of(m3, t3, length=short), np.random.default_rng(99))
        np.testing.assert_array_equal(out, base)


@pytest.mark.parametrize(
    "name", [n for n in ALL_NAMES if not REGISTRY[n].stochastic and REGISTRY[n].memory_depth != 0]
)
def test_memory_depth_is_not_overstated(name):
    """A deterministic policy that claims depth d really looks d rounds back: changing the
    round d back (or the oldest remembered round, for unbounded memory) changes some
    decision. Over all 2**8 full histories of 4 rounds."""
    info = REGISTRY[name]
    col = 0 if math.isinf(info.memory_depth) else WINDOW - int(info.memory_depth)
    pol = make(name, {}, GAME)
    mine, theirs = full_histories()
    base = pol.decide(view_of(mine, theirs), np.random.default_rng(0))
    changed = False
    for table in (mine, theirs):
        flipped = table.copy()
        flipped[:, col] = 1 - flipped[:, col]
        args = (flipped, theirs) if table is mine else (mine, flipped)
        out = pol.decide(view_of(*args), np.random.default_rng(0))
        changed |= bool((out != base).any())
    assert changed


def test_deterministic_policies_ignore_the_generator():
    mine, theirs = full_histories()
    view = view_of(mine, theirs)
    for name in ALL_NAMES:
        if REGISTRY[name].stochastic:
            continue
        pol = make(name, {}, GAME)
        a = pol.decide(view, np.random.default_rng(1))
        b = pol.decide(view, np.random.default_rng(2))
        np.testing.assert_array_equal(a, b, err_msg=name)


def test_stochastic_flags():
    flagged = {name for name, info in RULES.items() if info.stochastic}
    assert flagged == {"generous_tit_for_tat", "random"}


def test_defect_once_depends_on_round_only():
    mine, theirs = full_histories()
    n = len(mine)
    pol = make("defect_once", {}, GAME)
    first = pol.decide(view_of(mine, theirs, rnd=np.zeros(n, np.int32)), None)
    later = pol.decide(view_of(mine, theirs, rnd=np.full(n, 3, np.int32)), None)
    assert (first == D).all()
    assert (later == C).all()


# --------------------------------------------------------------------------------------
# names, aliases, parameters
# --------------------------------------------------------------------------------------


def test_aliases_resolve():
    assert isinstance(make("grim", {}, GAME), Trigger)
    assert isinstance(make("pavlov", {}, GAME), WinStayLoseShift)
    assert lookup("grim").name == "trigger"
    assert lookup("pavlov").name == "win_stay_lose_shift"
    assert lookup("grim") is lookup("trigger")
    # aliases are not separate registry entries
    assert "grim" not in REGISTRY and "pavlov" not in REGISTRY


@pytest.mark.parametrize(
    ("typo", "meant"),
    [
        ("tit_for_tatt", "tit_for_tat"),
        ("grimm", "grim"),
        ("alternater", "alternator"),
        ("pavlof", "pavlov"),
    ],
)
def test_unknown_name_suggests_a_close_match(typo, meant):
    with pytest.raises(ValueError, match=f"did you mean '{meant}'"):
        make(typo, {}, GAME)


def test_unknown_name_without_close_match_lists_known_names():
    with pytest.raises(ValueError) as info:
        lookup("zzzzzzzzzzzzzzzz")
    text = str(info.value)
    assert "did you mean" not in text
    assert "zzzzzzzzzzzzzzzz" in text
    for name in ("all_c", "tit_for_tat", "grim", "pavlov"):
        assert name in text


@pytest.mark.parametrize(
    ("name", "params"),
    [
        ("random", {"p": 1.5}),
        ("random", {"p": -0.1}),
        ("random", {"q": 0.5}),
        ("generous_tit_for_tat", {"g": 2}),
        ("tit_for_tat", {"g": 0.5}),
    ],
)
def test_bad_parameters_raise_value_error(name, params):
    with pytest.raises(ValueError, match="bad parameters"):
        make(name, params, GAME)
