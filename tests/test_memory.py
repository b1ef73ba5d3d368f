"""Memory windows and scopes."""

import numpy as np
import pandas as pd
import pytest

from abm.memory import Memory
from abm.model import DilemmaModel
from abm.scenario import validate_scenario


def test_window_keeps_the_last_k_rounds_right_aligned():
    mem = Memory(2, 3)
    for mine, theirs in [(0, 1), (1, 1), (0, 0), (1, 0)]:
        mem.push(np.array([0]), np.array([mine], np.int8), np.array([theirs], np.int8))
    mine, theirs, length = mem.read(np.array([0, 1]))
    assert mine.tolist() == [[1, 0, 1], [-1, -1, -1]]
    assert theirs.tolist() == [[1, 0, 0], [-1, -1, -1]]
    assert length.tolist() == [3, 0]


def test_push_to_every_slot_in_place_matches_push_by_index():
    a, b = Memory(4, 2), Memory(4, 2)
    rng = np.random.default_rng(0)
    for _ in range(3):
        x, y = rng.integers(0, 2, 4).astype(np.int8), rng.integers(0, 2, 4).astype(np.int8)
        a.push(None, x, y)
        b.push(np.arange(4), x, y)
    assert (a.mine == b.mine).all() and (a.theirs == b.theirs).all()
    assert (a.length == b.length).all()


def test_repeated_slots_append_in_order():
    mem = Memory(3, 4)
    mem.push(np.array([2]), np.array([0], np.int8), np.array([0], np.int8))
    # slot 2 gets three rounds in one push, slot 0 one; order within a slot is kept
    mem.push(
        np.array([2, 0, 2, 2]),
        np.array([1, 1, 0, 1], np.int8),
        np.array([0, 1, 1, 1], np.int8),
        unique=False,
    )
    assert mem.mine[2].tolist() == [0, 1, 0, 1]
    assert mem.theirs[2].tolist() == [0, 0, 1, 1]
    assert mem.mine[0].tolist() == [-1, -1, -1, 1]
    assert mem.length.tolist() == [1, 0, 4]
    # more new rounds than the window: only the last four stay
    mem.push(
        np.array([0] * 6), np.arange(6).astype(np.int8) % 2, np.zeros(6, np.int8), unique=False
    )
    assert mem.mine[0].tolist() == [0, 1, 0, 1]
    assert mem.length[0] == 4


def tft_vs_alld(scope: str, window: int | None, steps: int = 2) -> pd.DataFrame:
    data = {
        "seed": 1,
        "match": {"rounds": 2},
        "memory": {"scope": scope, **({"window": window} if window else {})},
        "graph": {"kind": "complete"},
        "population": {"players": ["tit_for_tat", "all_d"]},
        "pairing": {"scheme": "all_edges", "steps": steps},
    }
    model = DilemmaModel(validate_scenario(data))
    moves = []
    while model.running:
        model.step()
        moves.append("".join("CD"[a] for a in model.last_result.actual[:, 0]))
    return moves


def test_match_scope_forgets_between_matches():
    # TFT meets All-D twice; each match starts from an empty memory: C then D
    assert tft_vs_alld("match", None) == ["CD", "CD"]


def test_opponent_scope_remembers_across_matches():
    # the second match starts with All-D's last D remembered: TFT opens with D
    assert tft_vs_alld("opponent", 2) == ["CD", "DD"]


def test_all_scope_remembers_anyone():
    assert tft_vs_alld("all", 1) == ["CD", "DD"]


def hub_moves(scope: str) -> dict[int, str]:
    """Last-step moves of a Tit-for-tat hub (node 0) against All-D (1) and All-C (2).

    Complete graph on 3 nodes, every edge plays a 1-round match each step for
    3 steps, memory window 1.
    """
    data = {
        "seed": 1,
        "match": {"rounds": 1},
        "memory": {"scope": scope, "window": 1},
        "graph": {"kind": "complete", "n": 3},
        "population": {"players": ["tit_for_tat", "all_d", "all_c"]},
        "pairing": {"scheme": "all_edges", "steps": 3},
    }
    model = DilemmaModel(validate_scenario(data))
    while model.running:
        model.step()
    r = model.last_result
    return {
        int(o): "CD"[a]
        for a, o, ag in zip(r.actual[0], r.opponent, r.agent, strict=True)
        if ag == 0
    }


def test_opponent_scope_keeps_opponents_apart():
    # each pair has its own memory: D for All-D's last D, C for All-C's last C
    assert hub_moves("opponent") == {1: "D", 2: "C"}


def test_all_scope_mixes_opponents():
    # one memory for everyone: the hub's rounds go in in match order (vs All-D, then vs
    # All-C), so with a window of 1 it remembers only All-C's C and plays C in both matches
    assert hub_moves("all") == {1: "C", 2: "C"}


def test_self_play_twin_has_its_own_memory():
    # Alternator against itself: both copies start with C and alternate independently
    data = {
        "seed": 1,
        "match": {"rounds": 4},
        "memory": {"scope": "all", "window": 2},
        "graph": {"kind": "complete", "self_loops": True},
        "population": {"players": ["alternator"]},
        "pairing": {"steps": 2},
    }
    model = DilemmaModel(validate_scenario(data))
    model.step()
    first = model.last_result.actual.T.tolist()
    assert first == [[0, 1, 0, 1], [0, 1, 0, 1]]
    model.step()
    # each side remembers its own last move (D), so both open the next match with C
    assert model.last_result.actual.T.tolist() == [[0, 1, 0, 1], [0, 1, 0, 1]]


def test_read_gives_read_only_arrays_and_leaves_the_tables_writable():
    mem = Memory(3, 2)
    mem.push(None, np.array([0, 1, 0], np.int8), np.array([1, 1, 0], np.int8))
    for slots in (slice(0, 2), np.array([2, 0])):
        mine, theirs, length = mem.read(slots)
        for array in (mine, theirs, length):
            with pytest.raises(ValueError, match="read-only"):
                array[...] = 0
    # the reader could not change what slot 0 remembers, and pushing still works
    mem.push(None, np.array([1, 1, 1], np.int8), np.array([0, 0, 0], np.int8))
    assert mem.mine[0].tolist() == [0, 1] and mem.theirs[0].tolist() == [1, 0]
    assert mem.length.tolist() == [2, 2, 2]
