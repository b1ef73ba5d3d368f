"""The LLM player as a measuring instrument, end to end with a model whose truth is known.

A scripted stand-in for the model plays Tit-for-tat but says so in varied
natural phrasings (decision lines, JSON, numbering, preambles that mention the
other player's past move, "No, I will ..."), and answers garbage in one known
situation. The whole pipeline must recover Tit-for-tat's payoff and defection
tables exactly (computed by hand in test_round_robin.py), mark every garbage
answer as invalid, and never play C for one. Score mode is checked the same way
with a model that puts most of its probability on paraphrases of the labels.
"""

from __future__ import annotations

import json
import math
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
import tomli_w
from conftest import SCENARIOS
from fake_llm import FakeBackend, labels_in, last_history_line
from test_round_robin import DEFECTIONS, PAYOFF, PLAYERS

import abm.policies.llm as llm_module
from abm.llm.reflections import clean_reflection
from abm.model import DilemmaModel
from abm.run import main, run_scenario
from abm.scenario import validate_scenario

TFT = PLAYERS.index("Tit-for-tat")
OPTIONS = {
    0: ("remain silent", "Remaining silent", "Silence"),
    1: ("testify", "Testifying", "Testimony"),
}


def tft_move(text: str) -> int:
    return 1 if FakeBackend().provoked(text) else 0


def remembered_opponent_moves(text: str) -> str:
    lines = [ln for ln in text.split("\n") if ln.startswith("- Suspect1:") and "(" in ln]
    return "".join("D" if "Suspect2: testify" in ln else "C" for ln in lines)


class Speaker:
    """Answers like Tit-for-tat in a different phrasing each time; garbage whenever the
    opponent's remembered moves are exactly D, C (only Defect Once, in round 3)."""

    def __init__(self):
        self.n = 0
        self.garbage = 0

    def __call__(self, text: str) -> str:
        if remembered_opponent_moves(text.split("<assistant>")[0]) == "DC":
            self.garbage += 1
            return ["The weather is nice today.", "Maybe. I am not sure, officer."][
                "could not be read" in text
            ]
        move = tft_move(text)
        opt, ing, noun = OPTIONS[move]
        past = "testified" if "Suspect2: testify" in last_history_line(text) else "remained silent"
        other = OPTIONS[1 - move][0]
        forms = [
            f"Answer: {opt}",
            f"Suspect2 {past} last time, so I will {opt}.",
            f"No, I will {opt}.",
            f"{ing}.",
            f"1. {opt.capitalize()}",
            f"Let me think. Suspect2 could {other}.\nAnswer: {opt}",
            json.dumps({"action": opt}),
            f"I am {ing.lower()}.",
            f"Suspect1: I want to {opt}.",
            f"{noun}.",
        ]
        self.n += 1
        return forms[self.n % len(forms)]


def experiment_file(tmp_path, **llm) -> Path:
    """round_robin.toml with the LLM player's keys changed (reflections off)."""
    data = tomllib.loads((SCENARIOS / "round_robin.toml").read_text())
    data["population"]["players"][-1].update({"reflection": False, **llm})
    path = tmp_path / "round_robin.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def experiment(tmp_path, fake, name="rr", **llm):
    return run_scenario(experiment_file(tmp_path, **llm), out=tmp_path / name, quiet=True)


def tables(out: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return (
        pd.read_csv(out / "payoff_matrix.csv", index_col="player"),
        pd.read_csv(out / "defections.csv", index_col="player"),
    )


def assert_tft_row(payoff, defections, skip=()):
    """The LLM's row equals Tit-for-tat's hand-computed row; self-play (TFT v TFT) is
    all C: 5 * 9 = 45 points, no defection."""
    for j, col in enumerate(PLAYERS):
        if col in skip:
            continue
        assert payoff.loc["LLM", col] == PAYOFF[TFT][j], col
        assert defections.loc["LLM", col] == DEFECTIONS[TFT][j], col
    assert payoff.loc["LLM", "LLM"] == 45 and defections.loc["LLM", "LLM"] == 0


def test_generate_mode_recovers_the_known_strategy_and_marks_garbage(fake, tmp_path):
    fake.script = speaker = Speaker()
    out = experiment(tmp_path, fake, mode="generate")
    payoff, defections = tables(out)
    assert_tft_row(payoff, defections, skip=("Defect Once",))
    # the garbage answer came in round 3 against Defect Once: that match stopped, so
    # neither side's cell has a complete match to average
    assert math.isnan(payoff.loc["LLM", "Defect Once"])
    assert math.isnan(payoff.loc["Defect Once", "LLM"])
    assert speaker.garbage == 2  # the answer and the retry's answer
    rounds = pq.read_table(out / "rounds.parquet").to_pandas()
    llm = rounds[(rounds["player"] == "LLM") & (rounds["opponent_player"] == "Defect Once")]
    # TFT against Defect Once (D C C C C): C, D, then the unreadable third answer
    assert llm["intended"].tolist() == ["C", "D", "invalid"]
    assert llm["actual"].isna().tolist() == [False, False, True]
    lines = [json.loads(ln) for ln in (out / "transcripts.jsonl").read_text().splitlines()]
    invalid = [ln for ln in lines if not ln["valid"]]
    assert len(invalid) == 1 and invalid[0]["action"] == "invalid"
    assert invalid[0]["actual"] is None and invalid[0]["retries"] == 1
    # every readable answer was read as Tit-for-tat's move
    for ln in lines:
        if ln["valid"]:
            assert ln["action"] == "CD"[tft_move(ln["input"])], ln["answer"]
    counts = pd.read_csv(out / "invalid_answers.csv").set_index(["player", "opponent"])
    assert counts.loc[("LLM", "Defect Once"), "invalid"] == 1
    assert counts.loc[("LLM", "Defect Once"), "void_matches"] == 1
    assert counts.loc[("LLM", "All-D"), "invalid"] == 0
    summary = json.loads((out / "summary.json").read_text())
    entry = summary["llm"][0]
    assert entry["invalid"] == 1 and entry["invalid_rate"] == pytest.approx(1 / 33)
    assert entry["by_opponent"]["Defect Once"]["invalid"] == 1
    # 1 of 33 decisions is 3 %, under the 5 % default threshold: no warning
    assert summary["warnings"] == []


def test_fallback_rule_plays_and_flags_but_never_hides(fake, tmp_path):
    fake.script = Speaker()
    out = experiment(tmp_path, fake, mode="generate", fallback="cooperate")
    payoff, defections = tables(out)
    # the garbage round is played as C by the rule: TFT would have played C there
    # too (Defect Once's round-2 move was C), so every cell equals Tit-for-tat's ...
    assert_tft_row(payoff, defections)
    # ... but the cell is marked and the decision flagged as the rule's
    unread = pd.read_csv(out / "invalid_answers.csv").set_index(["player", "opponent"])
    assert unread.loc[("LLM", "Defect Once"), "fallbacks"] == 1
    rounds = pq.read_table(out / "rounds.parquet").to_pandas()
    flagged = rounds[rounds["fallback"]]
    assert len(flagged) == 1 and flagged.iloc[0]["round"] == 3
    assert flagged.iloc[0]["opponent_player"] == "Defect Once"
    matches = pd.read_csv(out / "matches.csv")
    assert matches["fallbacks"].sum() == 1
    # one meaning of "invalid" everywhere: the answer could not be read
    assert matches["invalid"].sum() == 1 and unread.loc[("LLM", "Defect Once"), "invalid"] == 1
    entry = json.loads((out / "summary.json").read_text())["llm"][0]
    assert entry["invalid"] == entry["fallbacks"] == 1
    assert entry["by_opponent"]["Defect Once"]["invalid"] == 1


def test_all_garbage_is_loud_and_leaves_no_cooperation_behind(fake, tmp_path, capsys):
    fake.script = lambda text: "Hmm."
    path = experiment_file(tmp_path, mode="generate")
    assert main([str(path), "--out", str(tmp_path / "g")]) == 0
    captured = capsys.readouterr()
    assert "7 decisions, 7 invalid (100.0%)" in captured.out
    assert "WARNING: 7 of 7 answers" in captured.err
    payoff, defections = tables(tmp_path / "g")
    # every match of the LLM stopped in round 1: no number stands for it anywhere
    assert payoff.loc["LLM"].isna().all() and defections.loc["LLM"].isna().all()
    rounds = pq.read_table(tmp_path / "g" / "rounds.parquet").to_pandas()
    llm = rounds[rounds["player"] == "LLM"]
    assert set(llm["intended"]) == {"invalid"} and llm["actual"].isna().all()
    chart = (tmp_path / "g" / "payoff_heatmap.html").read_text()
    assert "no data" in chart and "not read from the model" in chart


class Paraphraser:
    """Score mode: most probability on paraphrases; " remain silent" itself is rare."""

    def __call__(self, text: str) -> dict[str, float]:
        if FakeBackend().provoked(text):  # C 0.02 + 0.05 = 0.07 against D 0.30 + 0.05
            return {"remain silent": 0.02, "stay silent": 0.05, "testify": 0.30, "confess": 0.05}
        # C 0.05 + 0.25 + 0.15 = 0.45 against D 0.20
        return {"remain silent": 0.05, "stay silent": 0.25, "keep quiet": 0.15, "testify": 0.20}


def test_score_mode_counts_paraphrases_and_reports_label_mass(fake, tmp_path):
    fake.phrase_probs = Paraphraser()
    out = experiment(tmp_path, fake, warn_label_mass=0.7)
    assert_tft_row(*tables(out))
    lines = [json.loads(ln) for ln in (out / "transcripts.jsonl").read_text().splitlines()]
    first = next(ln for ln in lines if ln["round"] == 1)
    assert first["label_mass"] == pytest.approx(0.65)
    assert first["p_cooperate"] == pytest.approx(0.45 / 0.65)
    summary = json.loads((out / "summary.json").read_text())
    mass = summary["llm"][0]["label_mass"]
    # 5 provoked prompts (All-D rounds 2-5, Defect Once round 2) hold 0.42, 30 hold 0.65
    assert mass["min"] == pytest.approx(0.42)
    assert mass["mean"] == pytest.approx((5 * 0.42 + 30 * 0.65) / 35)
    assert any("next-token probability" in w for w in summary["warnings"])


def test_batches_split_for_gpu_memory_are_a_warning_of_the_run(fake, tmp_path):
    # a loaded model's counters over its life, as a backend reports them; each run
    # must report only what happened during it
    life = {"oom_splits": 0, "capped_calls": 0}
    fake.loading = lambda: {
        "device": "cuda:0",
        "out_of_memory_splits": life["oom_splits"],
        "batch_cap": 4,
        "capped_calls": life["capped_calls"],
    }

    def run(name, splits, capped):  # what the run itself adds to the counters
        for attribute, value in life.items():
            setattr(fake, attribute, value)  # where the run starts
        life["oom_splits"] += splits
        life["capped_calls"] += capped
        summary = json.loads((experiment(tmp_path, fake, name=name) / "summary.json").read_text())
        return summary["llm"][0], [w for w in summary["warnings"] if "GPU memory" in w]

    entry, (warning,) = run("first", 2, 1)
    assert entry["loading"]["out_of_memory_splits"] == 2  # all of them its own
    assert "split 2 times (at most 4 prompts a batch since)" in warning
    assert "Lower max_batch_size" in warning
    # later runs of the same model: 3 more splits; then batches cut by the cap only;
    # then batches the cap did not touch
    entry, (warning,) = run("second", 3, 2)
    assert entry["loading"]["out_of_memory_splits"] == 3
    assert "split 3 times" in warning
    entry, (warning,) = run("third", 0, 2)
    assert "out_of_memory_splits" not in entry["loading"]
    assert entry["loading"]["capped_calls"] == 2
    assert warning.startswith(
        f"{entry['model']} ran at most 4 prompts a batch in this run, because an earlier "
    )
    entry, warnings = run("fourth", 0, 0)
    assert warnings == [] and "capped_calls" not in entry["loading"]


def test_scoring_only_the_labels_would_tilt_the_measurement(fake, tmp_path):
    # the same model read through the two labels alone prefers testify (0.20 > 0.05)
    # even where its paraphrases say C: the default phrasings are what fixes that
    fake.phrase_probs = Paraphraser()
    out = experiment(
        tmp_path, fake, phrasings={"cooperate": ["remain silent"], "defect": ["testify"]}
    )
    payoff, defections = tables(out)
    assert defections.loc["LLM", "All-C"] == 5


def test_option_order_is_counterbalanced_and_recorded(fake, tmp_path):
    out = experiment(tmp_path, fake, mode="generate", option_order="random")
    assert_tft_row(*tables(out))
    lines = [json.loads(ln) for ln in (out / "transcripts.jsonl").read_text().splitlines()]
    orders = {ln["option_order"] for ln in lines}
    assert orders == {"CD", "DC"}
    for ln in lines:
        question = (
            "Will you testify or remain silent?"
            if ln["option_order"] == "DC"
            else "Will you remain silent or testify?"
        )
        assert question in ln["input"]
        first = "testify" if ln["option_order"] == "DC" else "remain silent"
        assert f"you either {first} or" in ln["input"]
    summary = json.loads((out / "summary.json").read_text())
    by_order = summary["llm"][0]["by_option_order"]
    assert by_order["CD"]["decisions"] + by_order["DC"]["decisions"] == 35


def test_neutral_labels_can_be_reassigned_per_decision(fake, tmp_path):
    out = experiment(
        tmp_path,
        fake,
        framing="neutral",
        mode="generate",
        label_assignment="random",
        option_order="random",
    )
    assert_tft_row(*tables(out))
    lines = [json.loads(ln) for ln in (out / "transcripts.jsonl").read_text().splitlines()]
    assert {tuple(ln["labels"]) for ln in lines} == {("J", "F"), ("F", "J")}
    for ln in lines:
        assert labels_in(ln["input"]) == tuple(ln["labels"])


def test_history_echoes_are_not_decisions(fake, tmp_path):
    # the neutral framing's history reads "- you: J; ...": an answer that only echoes
    # it is not a choice, and with fallback = "invalid" it stops the match
    fake.script = lambda text: "You chose J."
    out = experiment(tmp_path, fake, framing="neutral", mode="generate")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["llm"][0]["invalid_rate"] == 1.0


def scenario(llm: dict, others=("all_c", "all_c", "all_c"), rounds=2):
    return validate_scenario(
        {
            "seed": 3,
            "match": {"rounds": rounds},
            "graph": {"kind": "complete", "self_loops": False},
            "population": {"players": [{"name": "llm", "label": "LLM", **llm}, *others]},
            "pairing": {"scheme": "all_edges", "steps": 1},
        }
    )


def run(model):
    while model.running:
        model.step()
    return model


def test_sampled_answers_are_drawn_per_decision(fake, monkeypatch):
    # three All-C opponents give three identical prompts each round
    model = run(DilemmaModel(scenario({"mode": "generate", "temperature": 0.7})))
    assert fake.generate_batches == [3, 3]  # not one shared sample
    assert model.llm_policies[0].counts["memo_hits"] == 0
    greedy = FakeBackend()
    monkeypatch.setattr(llm_module, "shared_backend", lambda params: greedy)
    run(DilemmaModel(scenario({"mode": "generate"})))
    assert greedy.generate_batches == [1, 1]  # greedy answers are computed once


def test_reflections_have_their_own_temperature_and_are_cleaned(fake):
    fake.script = None
    model = run(
        DilemmaModel(
            scenario(
                {"mode": "generate", "reflection": True, "reflection_temperature": 0.9},
                others=("all_d",),
            )
        )
    )
    # decisions greedy (0.0), reflections sampled (0.9)
    assert set(fake.generate_temperatures) == {0.0, 0.9}
    record = model.llm_policies[0].drain()[0]
    assert record["reflection"] == "I think it went as planned."
    assert "reflect on your decision" in record["reflection_input"]


def test_sampled_reflections_follow_the_run_seed(fake):
    seeds = []
    for seed in (1, 2, 1):
        fake.generate_seeds.clear()
        fake.generate_temperatures.clear()
        spec = scenario(
            {"mode": "generate", "reflection": True, "reflection_temperature": 0.9},
            others=("all_d",),
        )
        run(DilemmaModel(spec.model_copy(update={"seed": seed})))
        seeds.append(
            [
                s
                for s, t in zip(fake.generate_seeds, fake.generate_temperatures, strict=True)
                if t == 0.9
            ]
        )
    assert seeds[0] == seeds[2] and seeds[0] != seeds[1]


def test_stopped_matches_are_not_fitness(fake, monkeypatch):
    from abm.evolution import Evolution

    seen = {}
    real = Evolution.fitness

    def spy(self, payoff, matches):
        seen.update(payoff=payoff.copy(), matches=matches.copy())
        return real(self, payoff, matches)

    monkeypatch.setattr(Evolution, "fitness", spy)
    # the LLM (node 0) answers round 1 and then garbage: its matches stop in round 2
    fake.script = lambda text: "Answer: testify" if "Nothing has happened" in text else "Hm."
    spec = validate_scenario(
        {
            "seed": 3,
            "match": {"rounds": 3},
            "graph": {"kind": "complete", "self_loops": False},
            "population": {
                "players": [{"name": "llm", "label": "LLM", "mode": "generate"}, "all_c", "all_c"]
            },
            "pairing": {"scheme": "all_edges", "steps": 1},
            "evolution": {"rule": "imitate_best"},
        }
    )
    run(DilemmaModel(spec))
    # node 0's two matches stopped; nodes 1 and 2 keep only their match with each other
    assert seen["matches"].tolist() == [0, 1, 1]
    assert seen["payoff"].tolist() == [0, 27, 27]  # 3 rounds of (C, C) at 9


def test_the_exact_model_input_is_recorded(fake):
    model = run(
        DilemmaModel(
            scenario({"system_prompt": "You are a careful suspect."}, others=("all_d",), rounds=1)
        )
    )
    record = model.llm_policies[0].drain()[0]
    assert record["input"] == fake.render(record["prompt"], "Suspect1: I want to")
    assert record["input"].startswith("<system>\nYou are a careful suspect.\n<user>\n")
    assert record["input_tokens"] == len(record["input"])


@pytest.mark.parametrize(
    "raw, want",
    [
        (
            "I stayed silent because cooperation pays. USER: Will you",
            "I stayed silent because cooperation pays.",
        ),
        ("Suspect1: It worked. Police: Next question", "It worked."),
        (
            "I think it went well. Next time I might testify, but only if the",
            "I think it went well.",
        ),
        ("No sentence end at all", "No sentence end at all"),
        ("Fine! <|im_start|>user", "Fine!"),
    ],
)
def test_clean_reflection(raw, want):
    assert clean_reflection(raw, ("Suspect1", "Suspect2", "Police")) == want


def test_invalid_rate_threshold_is_a_parameter(fake, tmp_path):
    fake.script = Speaker()
    out = experiment(tmp_path, fake, mode="generate", warn_invalid_rate=0.01)
    summary = json.loads((out / "summary.json").read_text())
    assert len(summary["warnings"]) == 1 and "1 of 33 answers" in summary["warnings"][0]
    assert np.isclose(summary["llm"][0]["invalid_rate"], 1 / 33)
