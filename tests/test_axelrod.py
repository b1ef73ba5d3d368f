"""Axelrod strategies inside abm, and a small cross-check against the Axelrod library."""

import numpy as np
import pytest

axl = pytest.importorskip("axelrod")

from abm.errors import ScenarioError  # noqa: E402
from abm.model import DilemmaModel  # noqa: E402
from abm.scenario import validate_scenario  # noqa: E402


def play(first, second, rounds=6, **extra):
    data = {
        "seed": 4,
        "match": {"rounds": rounds},
        "graph": {"kind": "complete"},
        "population": {"players": [first, second]},
        **extra,
    }
    model = DilemmaModel(validate_scenario(data))
    model.step()
    r = model.last_result
    return ["".join("CD"[a] for a in r.actual[:, side]) for side in (0, 1)]


@pytest.mark.parametrize(
    "strategy, opponent, expected",
    [
        # Bully (reverse tit-for-tat): D first, then the opposite of the opponent's last move.
        # Alternator plays C D C D C D, so Bully answers D, then D C D C D.
        ("Bully", "alternator", "DDCDCD"),
        # Grudger: C until the opponent's first D (round 2), D for ever after
        ("Grudger", "alternator", "CCDDDD"),
        # TitForTat copies: C, then the alternator's previous move
        ("TitForTat", "alternator", "CCDCDC"),
        # Defector against anything
        ("Defector", "all_c", "DDDDDD"),
        # Cooperator against defect_once: always C
        ("Cooperator", "defect_once", "CCCCCC"),
        # display names work too: "Tit For Tat" vs suspicious TFT: C D C D C D
        ("Tit For Tat", "suspicious_tit_for_tat", "CDCDCD"),
    ],
)
def test_adapter_move_sequences(strategy, opponent, expected):
    ours, _ = play({"name": "axelrod", "strategy": strategy}, opponent)
    assert ours == expected


def test_adapter_passes_parameters_and_plays_self():
    # Random(p=1) always cooperates; against itself both copies do
    a, b = play(
        {"name": "axelrod", "strategy": "Random", "p": 1.0},
        {"name": "axelrod", "strategy": "Random", "p": 1.0},
    )
    assert a == b == "CCCCCC"
    data = {
        "seed": 1,
        "match": {"rounds": 4},
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": [{"name": "axelrod", "strategy": "Alternator"}]},
    }
    model = DilemmaModel(validate_scenario(data))
    model.step()
    assert model.last_result.actual.T.tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]


def test_adapter_sees_noise_like_axelrod():
    # with noise 1 every intended C becomes D; Grudger then sees the All-C player "defect"
    ours, theirs = play(
        {"name": "axelrod", "strategy": "Grudger"}, "all_c", rounds=3, game={"noise": 1.0}
    )
    assert theirs == "DDD"  # All-C's C, flipped
    # Grudger intends C, then D after the flipped D: intended C D D, actual D C C
    assert ours == "DCC"


@pytest.mark.parametrize(
    "spec, message",
    [
        ({"name": "axelrod", "strategy": "TitForTatt"}, "did you mean 'TitForTat'"),
        ({"name": "axelrod", "strategy": "Darwin"}, "reads or changes its opponent"),
        ({"name": "axelrod", "strategy": "Random", "q": 1}, "does not take these parameters"),
    ],
)
def test_adapter_errors(spec, message):
    data = {"graph": {"kind": "complete"}, "population": {"players": [spec, "all_c"]}}
    with pytest.raises(ScenarioError, match=message):
        DilemmaModel(validate_scenario(data))


TWINS = {
    "all_c": axl.Cooperator,
    "all_d": axl.Defector,
    "trigger": axl.Grudger,
    "tit_for_tat": axl.TitForTat,
    "tit_for_two_tats": axl.TitFor2Tats,
    "win_stay_lose_shift": axl.WinStayLoseShift,
    "alternator": axl.Alternator,
    "suspicious_tit_for_tat": axl.SuspiciousTitForTat,
}


@pytest.mark.parametrize("payoffs", [(9, 0, 10, 5), (3, 0, 5, 1)])
def test_round_robin_equals_axelrod_matches(payoffs):
    names = list(TWINS)
    r, s, t, p = payoffs
    data = {
        "seed": 1,
        "game": {"kind": "custom", "R": r, "S": s, "T": t, "P": p},
        "match": {"rounds": 12},
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": [{"name": n, "label": n} for n in names]},
    }
    model = DilemmaModel(validate_scenario(data))
    while model.running:
        model.step()
    ours = model.tally.payoff_matrix().to_numpy()
    game = axl.Game(*payoffs)
    theirs = np.zeros_like(ours)
    for i, a in enumerate(names):
        for j, b in enumerate(names):
            match = axl.Match((TWINS[a](), TWINS[b]()), turns=12, game=game)
            match.play()
            theirs[i, j] = match.final_score()[0]
    np.testing.assert_array_equal(ours, theirs)


def test_repetitions_play_each_pair_several_times_at_once():
    data = {
        "seed": 2,
        "game": {"noise": 0.1},
        "match": {"rounds": 5},
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": ["tit_for_tat", "all_d"]},
        "pairing": {"repetitions": 50},
    }
    model = DilemmaModel(validate_scenario(data))
    model.step()
    assert model.last_result.n_matches == 3 * 50
    assert model.tally.pair_matches.sum() == 2 * 3 * 50  # two sides per match
    bad = {**data, "memory": {"scope": "opponent", "window": 2}}
    with pytest.raises(Exception, match="repetitions"):
        validate_scenario(bad)
