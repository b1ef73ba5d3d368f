"""Decisions that could not be read: nothing is played, the match stops, every table says so.

A scripted policy stands in for an LLM whose answer in a given round cannot be
read; every expected value is worked out by hand in the comments.
"""

from __future__ import annotations

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

from abm.engine import Engine
from abm.game import EMPTY, INVALID, C, D, PayoffMatrix, apply_noise
from abm.policies import make
from abm.policies.base import Decisions
from abm.population import Population
from abm.seeding import stream
from abm.table_writer import TableWriter
from abm.tally import Tally

GAME = PayoffMatrix()  # R=9, S=0, T=10, P=5


class Scripted:
    """Plays a fixed row of codes per round (C, D or INVALID); ``fallback`` marks rounds
    whose action a fallback rule chose."""

    def __init__(self, moves: str, fallback: str = ""):
        self.moves = moves
        self.fallback = fallback

    def decide(self, view, rng):
        r = int(view.round[0])
        code = {"C": C, "D": D, "X": INVALID}[self.moves[r]]
        flagged = self.fallback[r : r + 1] == "f"
        return Decisions(np.full(len(view), code, np.int8), np.full(len(view), flagged))


def engine(scripted, opponent="tit_for_tat", rounds=5, scope="match", window=None):
    """Node 0 (scripted) against node 1, and node 2 (the same script) against node 3
    (All-C); edge 0 and edge 1."""
    policies = [scripted, make(opponent, {}, GAME), make("all_c", {}, GAME)]
    return Engine(
        game=GAME,
        noise=0.0,
        population=Population.of_policies(policies, np.array([0, 1, 0, 2])),
        edges=np.array([[0, 1], [2, 3]]),
        window=window,
        scope=scope,
        rounds=rounds,
        continuation_probability=None,
        rngs={p: stream(1, p) for p in ("noise", "policy", "match_length")},
    )


def play(scripted, **options):
    return engine(scripted, **options).play(0, np.array([0, 1]))


def test_noise_never_turns_an_invalid_decision_into_an_action():
    intended = np.array([INVALID, EMPTY, C, D] * 1000, np.int8)
    out = apply_noise(intended, 1.0, np.random.default_rng(0))
    # noise 1 flips every C and D; INVALID and EMPTY stay as they are
    np.testing.assert_array_equal(out, np.array([INVALID, EMPTY, D, C] * 1000, np.int8))


def test_an_unreadable_answer_stops_its_match_and_nothing_is_played():
    # round 3 unreadable: rounds 1-2 are played (C, D) against Tit-for-tat (C, C);
    # round 3 is decided by TFT (it saw D: D) but not played; rounds 4-5 never happen
    r = play(Scripted("CDXCC"))
    sides = {"scripted": 0, "tft": 2}  # sides are [first ends..., second ends...]
    assert list(r.length) == [2, 2]  # both matches: the script is the same in both
    assert list(r.void) == [True, True]
    assert (
        "".join(
            {C: "C", D: "D", INVALID: "X", EMPTY: "-"}[v] for v in r.intended[:, sides["scripted"]]
        )
        == "CDX--"
    )
    assert list(r.intended[:, sides["tft"]]) == [C, C, D, EMPTY, EMPTY]
    # nothing is played in round 3, for either side
    assert list(r.actual[:, sides["scripted"]]) == [C, D, EMPTY, EMPTY, EMPTY]
    assert list(r.actual[:, sides["tft"]]) == [C, C, EMPTY, EMPTY, EMPTY]
    # payoffs: (C,C) 9, (D,C) 10 for the script; 9, 0 for TFT; nothing after
    assert r.payoff[:, sides["scripted"]].tolist() == [9, 10, 0, 0, 0]
    assert r.payoff[:, sides["tft"]].tolist() == [9, 0, 0, 0, 0]
    totals = r.totals()
    assert totals["invalid"].tolist() == [1, 1, 0, 0]
    assert totals["decided"].tolist() == [3, 3, 3, 3]


def test_matches_without_unreadable_answers_play_on():
    r = play(Scripted("CCCCD"))
    assert list(r.length) == [5, 5] and not r.void.any()
    assert r.totals()["invalid"].sum() == 0


def test_tables_leave_stopped_matches_out_and_count_them(tmp_path):
    labels = ["LLM", "TFT", "All-C"]
    label_of_node = np.array([0, 1, 0, 2])
    tally = Tally(Population(labels, label_of_node))
    # step 1: the script stops both matches in round 2; step 2: a clean CCCCC script
    tally.add(play(Scripted("CX")))
    clean = play(Scripted("CCCCC"))
    tally.add(clean)
    payoff = tally.payoff_matrix()
    # only the clean matches count: LLM v TFT and LLM v All-C all C: 5 * 9 = 45
    assert payoff.loc["LLM", "TFT"] == 45 and payoff.loc["TFT", "LLM"] == 45
    assert tally.void_matrix().loc["LLM", "TFT"] == 1
    assert tally.void_matrix().loc["All-C", "LLM"] == 1
    unread = tally.unread_matrix()
    # LLM v TFT: 2 decisions in the stopped match (C, X) + 5 clean = 7, one invalid
    assert unread.loc["LLM", "TFT"] == 1 / 7
    # TFT decided twice in the stopped match and five times after: none unread
    assert unread.loc["TFT", "LLM"] == 0
    counts = tally.unread_counts().set_index(["player", "opponent"])
    assert counts.loc[("LLM", "All-C"), "invalid"] == 1
    assert counts.loc[("LLM", "All-C"), "complete_matches"] == 1


def test_only_void_matches_leave_a_cell_empty():
    tally = Tally(Population(["LLM", "TFT", "All-C"], np.array([0, 1, 0, 2])))
    tally.add(play(Scripted("X")))
    assert np.isnan(tally.payoff_matrix().loc["LLM", "TFT"])
    assert tally.unread_matrix().loc["LLM", "TFT"] == 1.0


def test_fallback_actions_are_played_and_flagged():
    # round 2 played by a fallback rule (D), flagged; the match goes on
    r = play(Scripted("CDCCC", fallback=".f"))
    assert list(r.length) == [5, 5]
    assert r.fallback[:, 0].tolist() == [False, True, False, False, False]
    assert r.totals()["fallbacks"].tolist() == [1, 1, 0, 0]
    # a fallback action stands for an answer that could not be read
    assert r.totals()["invalid"].tolist() == [1, 1, 0, 0]
    tally = Tally(Population(["LLM", "TFT", "All-C"], np.array([0, 1, 0, 2])))
    tally.add(r)
    # 1 of the script's 5 decisions against TFT was the rule's
    assert tally.unread_matrix().loc["LLM", "TFT"] == 1 / 5
    assert tally.payoff_matrix().loc["LLM", "TFT"] == 9 + 10 + 0 + 9 + 9  # CDCCC v CCDCC


def test_records_mark_invalid_and_fallback_decisions(tmp_path):
    labels = ["LLM", "TFT", "All-C"]
    label_of_node = np.array([0, 1, 0, 2])
    population = Population(labels, label_of_node, policy_names=["llm", "tit_for_tat", "all_c"])
    writer = TableWriter(tmp_path, population)
    tally = Tally(population)
    for step, script in enumerate([Scripted("CDX"), Scripted("DCC", fallback="f")]):
        r = engine(script, rounds=3).play(step, np.array([0, 1]))
        writer.add(r, tally.add(r))
    writer.close()
    rounds = pq.read_table(tmp_path / "rounds.parquet").to_pandas()
    first = rounds[(rounds["step"] == 1) & (rounds["match"] == 0)]
    # 3 decisions per side, round 3 decided but not played
    llm = first[first["player"] == "LLM"]
    assert llm["intended"].tolist() == ["C", "D", "invalid"]
    assert llm["actual"].tolist()[:2] == ["C", "D"] and pd.isna(llm["actual"].tolist()[2])
    assert pd.isna(llm["payoff"].tolist()[2])
    tft = first[first["player"] == "TFT"]
    assert tft["intended"].tolist() == ["C", "C", "D"]
    assert pd.isna(tft["actual"].tolist()[2])
    second = rounds[(rounds["step"] == 2) & (rounds["player"] == "LLM")]
    assert second["fallback"].tolist() == [True, False, False] * 2
    matches = pd.read_csv(tmp_path / "matches.csv")
    row = matches[(matches["step"] == 1) & (matches["player"] == "LLM")].iloc[0]
    assert row["rounds"] == 2 and row["invalid"] == 1 and bool(row["void"])
    row = matches[(matches["step"] == 2) & (matches["player"] == "LLM")].iloc[0]
    assert row["fallbacks"] == 1 and row["invalid"] == 1 and not bool(row["void"])
    # the partner's decision in the round that stopped the match was never played
    tft = matches[(matches["step"] == 1) & (matches["player"] == "TFT")].iloc[0]
    assert tft["rounds"] == 2 and tft["intended_defections"] == 0


def test_memory_across_matches_skips_the_unplayed_round():
    # opponent-scoped memory: after "C D X" Tit-for-tat remembers the script's C, D and
    # nothing of the unplayed round 3, so its first move of the next match copies that D
    game = engine(Scripted("CDX"), scope="opponent", window=4, rounds=3)
    assert list(game.play(0, np.array([0])).length) == [2]
    game.policies[0] = Scripted("CCC")
    nxt = game.play(1, np.array([0]))
    assert list(nxt.intended[:, 1]) == [D, C, C]


def test_heatmap_marks_unread_cells_and_greys_cells_without_data():
    from abm import charts

    labels = ["LLM", "TFT"]
    index = pd.Index(labels, name="player")
    values = pd.DataFrame([[np.nan, 20.0], [np.nan, 45.0]], index=index, columns=labels)
    unread = pd.DataFrame([[1.0, 0.2], [0.0, 0.0]], index=index, columns=labels)
    spec = charts.heatmap(values, "payoff", "payoff", unread=unread).to_dict()
    rows = {(r["player"], r["opponent"]): r for r in next(iter(spec["datasets"].values()))}
    # a value with some unread decisions gets a "*"; a cell with decisions but no
    # complete match reads "no data"; a clean cell is just its number
    assert rows[("LLM", "TFT")]["text"] == "20*" and rows[("LLM", "TFT")]["marked"]
    assert rows[("LLM", "LLM")]["text"] == "no data"
    assert rows[("TFT", "LLM")]["text"] == "no data" and not rows[("TFT", "LLM")]["marked"]
    assert rows[("TFT", "TFT")]["text"] == "45"
    marks = [layer["mark"] for layer in spec["layer"]]
    # the grey layer exists apart from the colour scale (which drops null values) and
    # the orange frame layer draws the marked cells
    assert {"type": "rect", "color": "#bbbbbb"} in marks
    assert any(m.get("stroke") == "#ff7f0e" for m in marks)
