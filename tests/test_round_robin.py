"""The seed experiment without the LLM: every cell computed by hand."""

import pandas as pd
import pytest
from conftest import SCENARIOS

from abm.model import DilemmaModel
from abm.run import run_scenario

PLAYERS = ["All-D", "All-C", "Defect Once", "Trigger", "Tit-for-tat"]

# Payoffs R=9 (C,C), S=0 (C,D), T=10 (D,C), P=5 (D,D); 5 rounds a match.
# Moves of the row player / column player, then the row player's total:
# All-D  v All-D:        DDDDD / DDDDD -> 5*P = 25
# All-D  v All-C:        DDDDD / CCCCC -> 5*T = 50
# All-D  v Defect Once:  DDDDD / DCCCC -> P + 4*T = 5 + 40 = 45
# All-D  v Trigger:      DDDDD / CDDDD -> T + 4*P = 10 + 20 = 30
# All-D  v Tit-for-tat:  DDDDD / CDDDD -> T + 4*P = 30
# All-C  v All-D:        CCCCC / DDDDD -> 5*S = 0
# All-C  v All-C:        5*R = 45
# All-C  v Defect Once:  CCCCC / DCCCC -> S + 4*R = 36
# All-C  v Trigger, Tit-for-tat: all C -> 45
# Defect Once v All-D:   DCCCC / DDDDD -> P + 4*S = 5
# Defect Once v All-C:   DCCCC / CCCCC -> T + 4*R = 10 + 36 = 46
# Defect Once v itself:  DCCCC / DCCCC -> P + 4*R = 5 + 36 = 41
# Defect Once v Trigger: DCCCC / CDDDD -> T + 4*S = 10
# Defect Once v TFT:     DCCCC / CDCCC -> T + S + 3*R = 10 + 0 + 27 = 37
# Trigger v All-D:       CDDDD / DDDDD -> S + 4*P = 20
# Trigger v All-C:       45
# Trigger v Defect Once: CDDDD / DCCCC -> S + 4*T = 40
# Trigger v Trigger, TFT: all C -> 45
# TFT v All-D:           CDDDD / DDDDD -> S + 4*P = 20
# TFT v All-C:           45
# TFT v Defect Once:     CDCCC / DCCCC -> S + T + 3*R = 0 + 10 + 27 = 37
# TFT v Trigger, TFT:    45
PAYOFF = [
    [25, 50, 45, 30, 30],
    [0, 45, 36, 45, 45],
    [5, 46, 41, 10, 37],
    [20, 45, 40, 45, 45],
    [20, 45, 37, 45, 45],
]
# D counts of the row player, from the same move strings.
DEFECTIONS = [
    [5, 5, 5, 5, 5],
    [0, 0, 0, 0, 0],
    [1, 1, 1, 1, 1],
    [4, 0, 4, 0, 0],
    [4, 0, 1, 0, 0],
]


def expected(table):
    return pd.DataFrame(table, index=pd.Index(PLAYERS, name="player"), columns=PLAYERS, dtype=float)


def test_model_tables_equal_hand_computation():
    model = DilemmaModel(SCENARIOS / "round_robin_rules.toml")
    while model.running:
        model.step()
    pd.testing.assert_frame_equal(model.tally.payoff_matrix(), expected(PAYOFF))
    pd.testing.assert_frame_equal(model.tally.defection_matrix(), expected(DEFECTIONS))


def test_round_robin_takes_five_steps_each_a_matching():
    model = DilemmaModel(SCENARIOS / "round_robin_rules.toml")
    assert model.total_steps == 5
    seen = []
    while model.running:
        model.step()
        r = model.last_result
        # each player plays exactly once per step (self-play counts once)
        assert sorted(
            r.agent[: r.n_matches].tolist()
            + r.agent[r.n_matches :][~r.twin[r.n_matches :]].tolist()
        ) == list(range(5))
        seen += r.edge.tolist()
    assert sorted(seen) == list(range(15))  # 10 pairs + 5 self-loops, each exactly once


def test_cli_csv_files_equal_hand_computation(tmp_path):
    out = run_scenario(SCENARIOS / "round_robin_rules.toml", out=tmp_path / "run", quiet=True)
    payoff = pd.read_csv(out / "payoff_matrix.csv", index_col="player")
    defections = pd.read_csv(out / "defections.csv", index_col="player")
    pd.testing.assert_frame_equal(payoff, expected(PAYOFF))
    pd.testing.assert_frame_equal(defections, expected(DEFECTIONS))


@pytest.mark.parametrize("scheme", ["all_edges", "round_robin"])
def test_pairing_scheme_does_not_change_match_scope_results(scheme):
    from abm.scenario import load_scenario

    scenario = load_scenario(SCENARIOS / "round_robin_rules.toml", [f"pairing.scheme={scheme}"])
    model = DilemmaModel(scenario)
    while model.running:
        model.step()
    pd.testing.assert_frame_equal(model.tally.payoff_matrix(), expected(PAYOFF))


def test_ranking_excludes_self_play():
    model = DilemmaModel(SCENARIOS / "round_robin_rules.toml")
    while model.running:
        model.step()
    ranking = {r["player"]: r["mean_payoff"] for r in model.tally.ranking()}
    # row means of PAYOFF without the diagonal
    for i, name in enumerate(PLAYERS):
        others = [v for j, v in enumerate(PAYOFF[i]) if j != i]
        assert ranking[name] == pytest.approx(sum(others) / 4)
    assert [r["player"] for r in model.tally.ranking()][0] == "All-D"  # (50+45+30+30)/4 = 38.75
