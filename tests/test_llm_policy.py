"""The LLM policy with a fake backend: prompts, decisions, retries, fallbacks, records."""

import json

import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from conftest import SCENARIOS
from test_round_robin import DEFECTIONS, PAYOFF, PLAYERS

from abm.export import main as export_main
from abm.model import DilemmaModel
from abm.run import run_scenario
from abm.scenario import validate_scenario


def scenario(llm: dict, others=("all_d",), rounds=3, memory=None, steps=1):
    return validate_scenario(
        {
            "seed": 3,
            "match": {"rounds": rounds},
            "memory": memory or {},
            "graph": {"kind": "complete", "self_loops": False},
            "population": {"players": [{"name": "llm", "label": "LLM", **llm}, *others]},
            "pairing": {"scheme": "all_edges", "steps": steps},
        }
    )


def play(model):
    while model.running:
        model.step()
    return model


def moves(model, node):
    r = model.last_result
    side = int(np.flatnonzero(r.agent == node)[0])
    return "".join("CD"[a] for a in r.actual[:, side])


def test_score_mode_reads_the_history_and_acts_greedily(fake):
    model = play(DilemmaModel(scenario({}, others=("all_d",), rounds=4)))
    # the fake answers like Tit-for-tat: C, then D after each remembered D
    assert moves(model, 0) == "CDDD"
    records = model.llm_policies[0].drain()
    assert [r["action"] for r in records] == list("CDDD")
    assert all(r["p_cooperate"] + r["p_defect"] == pytest.approx(1) for r in records)
    assert records[1]["p_defect"] == pytest.approx(0.9)  # 0.9 / (0.1 + 0.9)


def test_prompt_shows_only_the_memory_window(fake):
    model = play(DilemmaModel(scenario({}, others=("alternator",), rounds=4, memory={"window": 2})))
    records = model.llm_policies[0].drain()
    last = records[-1]["prompt"][-1]["content"]
    assert "This is interrogation 4 of 4." in last
    assert "last 2 interrogations" in last
    assert last.count("\n- Suspect1:") == 2
    # alternator played C, D, C; the window holds rounds 2 and 3: D then C
    history = [line for line in last.splitlines() if line.startswith("- Suspect1")]
    assert "Suspect2: testify" in history[0] and "Suspect2: remain silent" in history[1]
    # points of the remembered rounds only: (C v D) 0 + (D v C) 10, not the match's 19
    assert "Your points in the interrogations you remember: 10." in last


def test_identical_prompts_are_computed_once(fake):
    # three All-C opponents give the LLM three identical histories every round
    model = play(DilemmaModel(scenario({}, others=("all_c", "all_c", "all_c"), rounds=3)))
    counts = model.llm_policies[0].counts
    assert counts["decisions"] == 9
    # one distinct prompt per round (the history grows), each sent to the backend once
    assert counts["computed"] == 3 and counts["memo_hits"] == 6
    assert fake.score_batches == [1, 1, 1]


def test_generate_mode_retries_then_falls_back(fake):
    calls = {"n": 0}

    def script(text):
        calls["n"] += 1
        if "Your reply could not be read." in text:
            return "testify"
        return "I will not testify."

    fake.script = script
    model = DilemmaModel(
        scenario({"mode": "generate", "fallback": "defect"}, others=("all_c",), rounds=1)
    )
    play(model)
    record = model.llm_policies[0].drain()[0]
    assert record["first_answer"] == "I will not testify."
    assert record["answer"] == "testify" and record["retries"] == 1 and record["valid"]
    assert record["action"] == "D" and not record["fallback"]


@pytest.mark.parametrize("fallback, expected", [("cooperate", "C"), ("defect", "D")])
def test_invalid_twice_uses_the_fallback_and_is_counted(fake, fallback, expected):
    fake.script = lambda text: "Maybe."
    model = play(
        DilemmaModel(
            scenario({"mode": "generate", "fallback": fallback}, others=("all_c",), rounds=2)
        )
    )
    policy = model.llm_policies[0]
    records = policy.drain()
    assert [r["action"] for r in records] == [expected, expected]
    assert all(r["fallback"] and not r["valid"] and r["retries"] == 1 for r in records)
    assert policy.stats()["invalid"] == 2 and policy.stats()["invalid_rate"] == 1.0


def test_repeat_last_fallback_repeats_the_previous_actual_action(fake):
    answers = iter(["I want to testify."] + ["?"] * 10)
    fake.script = lambda text: next(answers)
    model = play(
        DilemmaModel(
            scenario({"mode": "generate", "fallback": "repeat_last"}, others=("all_c",), rounds=3)
        )
    )
    assert moves(model, 0) == "DDD"


def test_reflections_follow_each_round_and_feed_the_next_prompt(fake):
    model = play(DilemmaModel(scenario({"reflection": True}, others=("all_d",), rounds=2)))
    first, second = model.llm_policies[0].drain()
    assert first["reflection"] == "I think it went as planned."
    assert (
        "Suspect2 testified against the other, while Suspect1 remained silent"
        in first["reflection_prompt"]
    )
    assert (
        "Your reflection after the last interrogation: I think it went as planned."
        in second["prompt"][-1]["content"]
    )


def test_run_writes_transcripts_and_llm_summary(fake, tmp_path):
    out = run_scenario(SCENARIOS / "round_robin.toml", out=tmp_path / "rr", quiet=True)
    lines = [json.loads(ln) for ln in (out / "transcripts.jsonl").read_text().splitlines()]
    rounds = pq.read_table(out / "rounds.parquet").to_pandas()
    llm_rows = rounds[rounds["player"] == "LLM"]
    assert len(lines) == len(llm_rows) == 7 * 5  # 5 rule opponents + 2 self-play sides
    keys = {
        "step",
        "match",
        "round",
        "agent",
        "opponent",
        "player",
        "opponent_player",
        "prompt",
        "answer",
        "response",
        "action",
        "p_cooperate",
        "p_defect",
        "valid",
        "retries",
        "reflection",
        "latency_s",
        "model",
        "revision",
        "actual",
        "payoff",
        "input",
        "input_tokens",
        "labels",
        "option_order",
        "label_mass",
    }
    assert keys <= set(lines[0])
    assert lines[0]["prompt"][-1]["role"] == "user"
    by_key = {(ln["match"], ln["agent"], ln["round"], ln["opponent"]): ln["actual"] for ln in lines}
    for row in llm_rows.itertuples():
        assert by_key[(row.match, row.agent, row.round, row.opponent)] == row.actual
    summary = json.loads((out / "summary.json").read_text())
    assert summary["llm"][0]["decisions"] == 35 and summary["llm"][0]["reflections"] == 35
    # rule-vs-rule cells still equal the hand-computed table
    payoff = pd.read_csv(out / "payoff_matrix.csv", index_col="player")
    defections = pd.read_csv(out / "defections.csv", index_col="player")
    for i, row in enumerate(PLAYERS):
        for j, col in enumerate(PLAYERS):
            assert payoff.loc[row, col] == PAYOFF[i][j]
            assert defections.loc[row, col] == DEFECTIONS[i][j]
    # the fake plays Tit-for-tat, so its row equals Tit-for-tat's against the rules
    for col in PLAYERS:
        assert payoff.loc["LLM", col] == payoff.loc["Tit-for-tat", col]
    assert {"LLM"} <= set(payoff.columns)


def test_sft_export(fake, tmp_path, capsys):
    out = run_scenario(SCENARIOS / "round_robin.toml", out=tmp_path / "rr", quiet=True)
    assert export_main([str(out), "--format", "sft", "--valid-only", "--reflections"]) == 0
    examples = [json.loads(ln) for ln in (out / "sft.jsonl").read_text().splitlines()]
    assert len(examples) == 35
    roles = [m["role"] for m in examples[0]["messages"]]
    assert roles == ["user", "assistant", "user", "assistant"]
    assert examples[0]["messages"][1]["content"].startswith("Suspect1: I want to")
    assert (
        export_main([str(out), "--model", "other-model", "--out", str(tmp_path / "none.jsonl")])
        == 0
    )
    assert (tmp_path / "none.jsonl").read_text() == ""
    assert export_main([str(tmp_path)]) == 2
    assert "no transcripts.jsonl" in capsys.readouterr().err


@pytest.mark.slow
def test_rule_only_runs_do_not_import_torch(tmp_path):
    import subprocess
    import sys

    scenario, out_dir = SCENARIOS / "round_robin_rules.toml", tmp_path / "o"
    code = (
        f"import sys; from abm.run import main; main(['{scenario}', '--quiet', '--out', "
        f"'{out_dir}']); print('torch' in sys.modules, 'transformers' in sys.modules)"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.stdout.strip().splitlines()[-1] == "False False"


CUSTOM = """Two traders each pick BUY or HOLD. {length_rule} Points: both {label_c}: {R}.
---
Trade {round}{of_rounds}. {history} Points so far: {score}. Say {first} or {second}."""


def custom_scenario(scenario_file, tmp_path, template: str, extra: str = ""):
    (tmp_path / "prompts").mkdir(exist_ok=True)
    (tmp_path / "prompts" / "trade.txt").write_text(template)
    return scenario_file(
        'seed = 1\n[match]\nrounds = 2\n[graph]\nkind = "complete"\n[population]\n'
        'players = ["all_d", { name = "llm", framing = "custom", template = "prompts/trade.txt",'
        f' labels = ["HOLD", "BUY"]{extra} }}]\n'
    )


def test_custom_template_relative_to_the_scenario(fake, scenario_file, tmp_path):
    model = play(DilemmaModel(custom_scenario(scenario_file, tmp_path, CUSTOM)))
    first, second = model.llm_policies[0].drain()
    text = first["prompt"][-1]["content"]
    assert text.startswith(
        "Two traders each pick BUY or HOLD. There will be 2 rounds. Points: both HOLD: 9."
    )
    assert "Trade 1 of 2. Nothing has happened yet. Points so far: 0. Say HOLD or BUY." in text
    assert (
        "- you: HOLD; the other player: BUY (you got 0 points)" in second["prompt"][-1]["content"]
    )


@pytest.mark.parametrize(
    "template, extra, message",
    [
        (
            CUSTOM.replace("{score}", "{points}"),
            "",
            "uses {points}, which is not a template variable",
        ),
        (CUSTOM.replace("\n---\n", "\n"), "", "needs a line '---'"),
        (CUSTOM, ', answer_prefix = "I say"', None),
    ],
)
def test_custom_template_errors(fake, scenario_file, tmp_path, capsys, template, extra, message):
    from abm.run import main

    path = custom_scenario(scenario_file, tmp_path, template, extra)
    code = main([str(path), "--quiet", "--out", str(tmp_path / "out")])
    if message is None:
        assert code == 0
        return
    assert code == 2
    err = capsys.readouterr().err
    assert "field 'population.players[1]'" in err and message in err


def test_police_framing_refuses_labels(scenario_file, capsys):
    from abm.run import main

    path = scenario_file(
        '[graph]\nkind = "complete"\n[population]\n'
        'players = ["all_d", { name = "llm", labels = ["a", "b"] }]\n'
    )
    assert main([str(path), "--quiet"]) == 2
    assert "labels are for the neutral and custom framings" in capsys.readouterr().err


def test_summary_counts_only_this_runs_work(fake, tmp_path):
    # a process that runs several scenarios (a batch worker) keeps its loaded model:
    # counters from earlier runs and the one-time load must not be counted again
    fake.stats.tokens, fake.stats.forward_passes, fake.load_seconds = 1000, 7, 2.5
    score = fake.score_phrasings

    def counted(*args, **kwargs):  # count work as the real backend does
        fake.stats.tokens += 1
        return score(*args, **kwargs)

    fake.score_phrasings = counted
    summaries = []
    for name in ("a", "b"):
        out = run_scenario(
            SCENARIOS / "round_robin.toml",
            out=tmp_path / name,
            quiet=True,
            overrides=["output.charts=false"],
        )
        summaries.append(json.loads((out / "summary.json").read_text())["llm"][0])
    # the same seeded run twice does the same work, counted from zero each time
    assert summaries[0]["tokens"] == summaries[1]["tokens"] > 0
    assert [s["forward_passes"] for s in summaries] == [0, 0]
    assert [s["load_seconds"] for s in summaries] == [2.5, 0.0]
