"""Training data from runs: a rule teacher's answers, the export's training fields, the
filters and the split by match."""

import json

import pytest
from test_llm_policy import play, scenario

from abm.export import completion_parts, match_key, split_by_match
from abm.export import main as export_main
from abm.model import DilemmaModel
from abm.run import run_scenario

TEACHER = {"rule_teacher": "all_c", "mode": "score", "framing": "police"}


def test_rule_teacher_decides_instead_of_the_model(fake):
    # the fake model answers like Tit-for-tat (C, then D after each D: CDDD against
    # All-D); the teacher is All-C, so every answer must be "remain silent"
    model = play(DilemmaModel(scenario(TEACHER, others=("all_d",), rounds=4)))
    records = model.llm_policies[0].drain()
    assert [r["action"] for r in records] == list("CCCC")
    assert [r["answer"] for r in records] == ["remain silent"] * 4
    assert [r["response"] for r in records] == ["Suspect1: I want to remain silent"] * 4
    assert [(r["p_cooperate"], r["p_defect"]) for r in records] == [(1.0, 0.0)] * 4
    assert {r["rule_teacher"] for r in records} == {"all_c"}
    assert fake.score_batches == []  # the model was never asked
    from abm.run import llm_line

    stats = {**model.llm_policies[0].stats(), "players": ["LLM"]}
    assert stats["rule_teacher"] == "all_c"
    assert "4 decisions made by the rule all_c (rule_teacher)" in llm_line(stats)
    assert "none is the model's" in llm_line(stats)


def test_rule_teacher_tit_for_tat_against_alternator(fake):
    # Alternator plays C, D, C, D; Tit-for-tat answers C, then its last move: C, C, D, C
    model = play(
        DilemmaModel(scenario({**TEACHER, "rule_teacher": "tit_for_tat"}, ("alternator",), 4))
    )
    records = model.llm_policies[0].drain()
    assert "".join(r["action"] for r in records) == "CCDC"
    assert [r["answer"] for r in records] == ["remain silent"] * 2 + ["testify", "remain silent"]


@pytest.mark.parametrize(
    "value, message",
    [("llm", "not llm"), ("tit_for_that", "unknown policy 'tit_for_that'")],
)
def test_rule_teacher_must_name_a_rule(value, message):
    with pytest.raises(Exception, match=message):
        scenario({"rule_teacher": value})


def test_completion_parts_score_and_generate():
    score = {
        "mode": "score",
        "input": "<assistant>\nSuspect1: I want to",
        "answer": "testify",
        "response": "Suspect1: I want to testify",
        "labels": ["remain silent", "testify"],
        "p_cooperate": 0.25,
        "p_defect": 0.75,
        "action": "D",
    }
    assert completion_parts(score) == (" testify", [" remain silent", " testify"], [0.25, 0.75])
    # an input that ends in white space takes the options without another space
    assert completion_parts({**score, "input": "A: "})[1] == ["remain silent", "testify"]
    generate = {
        "mode": "generate",
        "input": "<assistant>\n",
        "response": "I remain silent.",
        "labels": ["remain silent", "testify"],
        "action": "C",
    }
    assert completion_parts(generate) == (
        "I remain silent.",
        [" remain silent", " testify"],
        [1.0, 0.0],
    )
    assert completion_parts({**generate, "action": "invalid"})[2] is None
    # a fallback rule's move (kept with --include-invalid) is not the model's: no target
    assert completion_parts({**generate, "valid": False, "fallback": True})[2] is None


def test_split_by_match_holds_out_whole_matches():
    keys = [(1, m) for m in range(10) for _ in range(4)]  # 10 matches, 4 records each
    held = split_by_match(keys, 0.2, seed=3)
    assert len(held) == 2 and held <= set(keys)
    assert held == split_by_match(keys, 0.2, seed=3)  # the seed decides
    assert len(split_by_match(keys, 0.99)) == 9  # never every match
    assert len(split_by_match(keys, 0.01)) == 1  # at least one
    assert split_by_match([(1, 0)] * 5, 0.5) == set()  # one match: nothing to hold out
    assert split_by_match(keys, 0.0) == set()


def _teacher_run(tmp_path, fake):
    path = tmp_path / "teacher.toml"
    path.write_text(
        """
seed = 11
[match]
rounds = 3
[graph]
kind = "complete"
[population]
players = [
  "all_d", "alternator",
  { name = "llm", label = "Teacher", framing = "police", mode = "score", rule_teacher = "tit_for_tat" },
]
[pairing]
scheme = "all_edges"
steps = 4
[output]
charts = false
""",
        encoding="utf-8",
    )
    return run_scenario(path, out=tmp_path / "run", quiet=True)


def _read(path):
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_export_split_and_training_fields(fake, tmp_path, capsys):
    cooperate = [
        "remain silent",
        "stay silent",
        "keep silent",
        "remain quiet",
        "stay quiet",
        "keep quiet",
    ]
    defect = ["testify", "confess", "defect", "betray"]
    run = _teacher_run(tmp_path, fake)
    assert export_main([str(run), "--validation", "0.25", "--split-seed", "1"]) == 0
    assert "examples written to" in capsys.readouterr().out
    train, held = _read(run / "sft.train.jsonl"), _read(run / "sft.validation.jsonl")
    # the teacher meets 2 opponents for 3 rounds in each of 4 steps: 8 matches, 24 decisions
    assert len(train) + len(held) == 24
    train_matches = {match_key(e["metadata"]) for e in train}
    held_matches = {match_key(e["metadata"]) for e in held}
    assert len(held_matches) == 2 and len(train_matches) == 6
    assert not train_matches & held_matches
    assert not (run / "sft.jsonl").exists()
    for e in train + held:
        meta = e["metadata"]
        assert e["prompt"] == meta["input"] and e["prompt"].endswith("Suspect1: I want to")
        assert e["options"] == [" remain silent", " testify"]
        assert e["completion"] == (" remain silent" if meta["action"] == "C" else " testify")
        assert e["target"] == ([1.0, 0.0] if meta["action"] == "C" else [0.0, 1.0])
        assert meta["rule_teacher"] == "tit_for_tat" and meta["valid"] is True
        # what a student's score mode sums for each option: the police framing's phrasings
        assert [sorted(x) for x in e["phrasings"]] == [
            sorted(" " + t for t in cooperate),
            sorted(" " + t for t in defect),
        ]
        assert meta["split"] in ("train", "validation")
        # Tit-for-tat: C first, then the opponent's last move
        expected = (
            "C" if meta["round"] == 1 else ("D" if meta["opponent_player"] == "all_d" else None)
        )
        if expected:
            assert meta["action"] == expected


def test_export_filters(fake, tmp_path):
    run = _teacher_run(tmp_path, fake)
    out = tmp_path / "some.jsonl"
    assert (
        export_main(
            [
                str(run),
                "--opponent",
                "alternator",
                "--round",
                "2",
                "--round",
                "3",
                "--out",
                str(out),
            ]
        )
        == 0
    )
    rows = _read(out)
    assert len(rows) == 4 * 2  # 4 steps x rounds 2 and 3
    assert {(r["metadata"]["opponent_player"], r["metadata"]["round"]) for r in rows} == {
        ("alternator", 2),
        ("alternator", 3),
    }
    # Alternator's C, D, C: Tit-for-tat answers C, C, D
    assert [r["metadata"]["action"] for r in rows if r["metadata"]["round"] == 2] == ["C"] * 4
    assert [r["metadata"]["action"] for r in rows if r["metadata"]["round"] == 3] == ["D"] * 4


@pytest.mark.parametrize(
    "argv, message",
    [
        (["--validation", "1"], "at least 0 and below 1"),
        (["--validation", "0.5", "--opponent", "nobody"], "needs examples from two matches"),
    ],
)
def test_export_split_errors_leave_nothing(fake, tmp_path, capsys, argv, message):
    run = _teacher_run(tmp_path, fake)
    assert export_main([str(run), *argv]) == 2
    assert message in capsys.readouterr().err
    assert not list(run.glob("sft*"))
