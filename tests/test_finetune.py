"""Fine-tuning: the distillation loss by hand, option scores with and without the shared
prefix, the whole teacher -> export -> finetune -> student loop on a tiny model, the
adapter round trip, and the command's errors."""

import json
import math

import pytest

from abm.finetune.__main__ import main as finetune_main

pytestmark = pytest.mark.llm_extra
torch = pytest.importorskip("torch")
pytest.importorskip("peft")
pytest.importorskip("trl")
pytest.importorskip("datasets")


def test_option_kl_by_hand():
    from abm.finetune.losses import option_kl

    target = torch.tensor([[0.8, 0.2], [1.0, 0.0]])
    # student: P(C) 0.3, P(D) 0.1 -> renormalised 0.75 / 0.25; then 0.5 / 0.5
    logp = torch.tensor([[math.log(0.3), math.log(0.1)], [math.log(0.5), math.log(0.5)]])
    first = 0.8 * math.log(0.8 / 0.75) + 0.2 * math.log(0.2 / 0.25)
    second = 1.0 * math.log(1.0 / 0.5)  # 0 log 0 counts 0
    assert option_kl(target, logp).item() == pytest.approx((first + second) / 2, rel=1e-6)
    # a student that matches the teacher has no loss
    assert option_kl(target[:1], torch.log(torch.tensor([[0.4, 0.1]]))).item() == pytest.approx(
        0.0, abs=1e-6
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from tiny_llm import build_tiny_model

    return build_tiny_model(tmp_path_factory.mktemp("tiny_model"))


def tiny_backend(folder):
    """The tiny model loaded as a run loads it: its tokenization is the one a run uses."""
    from abm.llm.backend import Backend
    from abm.llm.models import resolve

    return Backend(resolve(str(folder)), device="cpu", dtype="float32")


def test_option_scores_with_a_shared_prefix_equal_the_full_sequences(tiny):
    from abm.finetune.losses import option_batch, option_logprobs, option_rows, prefix_cache

    backend = tiny_backend(tiny)
    model = backend.model
    prompts = [
        "<|user|> the game round one history <|assistant|> Suspect1: I want to",
        "<|user|> the game round two history you did this <|assistant|> Suspect1: I want to",
    ]
    options = [(" remain silent", " testify")] * 2
    rows = option_rows(backend, prompts, options)
    expected = []
    with torch.no_grad():
        for ids, n in rows:  # each sequence alone: sum of log P(token | everything before)
            logp = model(input_ids=torch.tensor([ids])).logits[0].log_softmax(-1)
            expected.append(sum(logp[j - 1, ids[j]].item() for j in range(len(ids) - n, len(ids))))
        plain = option_logprobs(model, option_batch(rows, 0, 1, "cpu"))
        prefix = 4  # "<|user|> the game round" is shared
        cache = prefix_cache(model, rows[0][0][:prefix], len(rows), "cpu")
        cached = option_logprobs(model, option_batch(rows, prefix, 1, "cpu"), cache)
    assert plain.flatten().tolist() == pytest.approx(expected, abs=1e-4)
    assert cached.flatten().tolist() == pytest.approx(expected, abs=1e-4)


TEACHER = """
name = "teacher"
seed = 5
[match]
rounds = 3
[graph]
kind = "complete"
self_loops = true
[population]
players = ["all_d", "all_c", "alternator", "random",
  { name = "llm", label = "Teacher", model = "MODEL", device = "cpu", dtype = "float32", framing = "police", mode = "score", rule_teacher = "tit_for_tat" }]
[pairing]
scheme = "all_edges"
steps = 3
[output]
charts = false
"""

STUDENT = TEACHER.replace(
    'rule_teacher = "tit_for_tat"',
    'adapter = "ADAPTER", phrasings = { cooperate = ["remain silent"], defect = ["testify"] }',
).replace('"teacher"', '"student"')


@pytest.fixture(scope="module")
def exported(tiny, tmp_path_factory):
    from abm.export import main as export_main
    from abm.run import run_scenario

    folder = tmp_path_factory.mktemp("distill")
    (folder / "teacher.toml").write_text(TEACHER.replace("MODEL", str(tiny)), encoding="utf-8")
    run = run_scenario(folder / "teacher.toml", out=folder / "teacher", quiet=True)
    assert export_main([str(run), "--validation", "0.25"]) == 0
    return folder, run / "sft.train.jsonl", run / "sft.validation.jsonl"


@pytest.mark.slow
@pytest.mark.parametrize("loss", ["sft", "kl"])
def test_finetune_runs_end_to_end_and_the_loss_falls(tiny, exported, loss, capsys):
    folder, train, held = exported
    out = folder / f"adapter_{loss}"
    argv = [str(train), "--validation", str(held), "--out", str(out), "--loss", loss]
    argv += ["--merged"] if loss == "sft" else []
    assert (
        finetune_main([*argv, "--steps", "12", "--batch-size", "4", "--learning-rate", "0.01"]) == 0
    )
    assert f"adapter written to {out}" in capsys.readouterr().out
    about = json.loads((out / "abm_adapter.json").read_text())
    losses = about["loss"]["steps"]
    assert len(losses) == 12
    assert sum(losses[-3:]) / 3 < sum(losses[:3]) / 3  # it learned something
    assert about["base_model"] == str(tiny)  # the model the teacher's inputs were rendered for
    assert about["examples"]["train"] == len(train.read_text().splitlines())
    assert about["agreement"]["after"]["n"] == len(held.read_text().splitlines())
    for name in ("adapter_config.json", "adapter_model.safetensors", "README.md", "loss.png"):
        assert (out / name).is_file(), name
    assert "Agreement with the teacher" in (out / "README.md").read_text()
    if loss == "sft":  # written with --merged: a plain model folder giving the adapter's scores
        from peft import PeftModel
        from transformers import AutoModelForCausalLM

        from abm.finetune.losses import option_batch, option_logprobs, option_rows

        rows = option_rows(
            tiny_backend(tiny),
            ["<|user|> the game round one <|assistant|> Suspect1: I want to"],
            [(" remain silent", " testify")],
        )
        base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
        with torch.no_grad():
            adapted = option_logprobs(
                PeftModel.from_pretrained(base, out).eval(), option_batch(rows, 0, 1, "cpu")
            )
            merged = AutoModelForCausalLM.from_pretrained(out / "merged", dtype=torch.float32)
            plain = option_logprobs(merged.eval(), option_batch(rows, 0, 1, "cpu"))
            fresh = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32).eval()
            untrained = option_logprobs(fresh, option_batch(rows, 0, 1, "cpu"))
        assert plain.flatten().tolist() == pytest.approx(adapted.flatten().tolist(), abs=1e-4)
        assert not torch.allclose(plain, untrained, atol=1e-3)  # the adapter is in there
    assert not list(folder.glob(f".adapter_{loss}.partial-*"))


@pytest.mark.slow
def test_adapter_round_trip_gives_the_decisions_of_the_adapter_loaded_directly(tiny, exported):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abm.finetune.losses import option_batch, option_logprobs, option_rows
    from abm.run import run_scenario

    folder, train, held = exported
    adapter = folder / "adapter_round_trip"
    assert (
        finetune_main(
            [str(train), "--out", str(adapter), "--steps", "6", "--learning-rate", "0.05"]
        )
        == 0
    )
    path = folder / "student.toml"
    path.write_text(STUDENT.replace("MODEL", str(tiny)).replace("ADAPTER", str(adapter)))
    run = run_scenario(path, out=folder / "student", quiet=True)
    records = [json.loads(line) for line in (run / "transcripts.jsonl").read_text().splitlines()]
    assert records and all(r["adapter"] == str(adapter) for r in records)
    summary = json.loads((run / "summary.json").read_text())["llm"][0]
    assert summary["adapter"] == summary["loading"]["adapter"] == str(adapter)

    tokenizer = AutoTokenizer.from_pretrained(tiny)
    base = AutoModelForCausalLM.from_pretrained(tiny, dtype=torch.float32)
    tokens = tiny_backend(tiny)  # tokenizes as the run did; the model scored is `direct`
    direct = PeftModel.from_pretrained(base, adapter).eval()
    rows = option_rows(
        tokens, [r["input"] for r in records], [(" remain silent", " testify")] * len(records)
    )
    with torch.no_grad():
        p_c = option_logprobs(direct, option_batch(rows, 0, tokenizer.pad_token_id, "cpu")).softmax(
            -1
        )[:, 0]
    assert [r["p_cooperate"] for r in records] == pytest.approx(p_c.tolist(), abs=1e-4)
    assert [r["action"] for r in records] == ["C" if p > 0.5 else "D" for p in p_c.tolist()]
    # an adapter whose card names another base model is refused before it is loaded
    import shutil

    from abm.errors import ScenarioError

    other = folder / "adapter_of_another"
    shutil.copytree(adapter, other)
    about = json.loads((other / "abm_adapter.json").read_text())
    (other / "abm_adapter.json").write_text(json.dumps({**about, "base_model": "some/other-7b"}))
    path.write_text(STUDENT.replace("MODEL", str(tiny)).replace("ADAPTER", str(other)))
    with pytest.raises(ScenarioError, match="was trained on 'some/other-7b', not on model"):
        run_scenario(path, out=folder / "refused", quiet=True)
    # and the adapter changed the model: the base model alone decides otherwise somewhere
    with torch.no_grad(), direct.disable_adapter():
        plain = option_logprobs(
            direct, option_batch(rows, 0, tokenizer.pad_token_id, "cpu")
        ).softmax(-1)[:, 0]
    assert not torch.allclose(plain, p_c, atol=1e-3)


def test_kl_training_runs_whole_rows_under_gradient_checkpointing(tiny):
    from abm.finetune.data import Example
    from abm.finetune.train import TrainConfig, train_kl

    backend = tiny_backend(tiny)
    model = backend.model
    model.gradient_checkpointing_enable()  # as QLoRA's preparation does
    prompts = [
        f"<|user|> the game round {w} <|assistant|> Suspect1: I want to" for w in ("one", "two")
    ]
    examples = [
        Example(p, " testify", (" remain silent", " testify"), (0.0, 1.0), "D", []) for p in prompts
    ]
    _, losses = train_kl(
        model, backend, prompts, examples, TrainConfig(steps=2, batch_size=2), device="cpu"
    )
    assert len(losses) == 2 and all(math.isfinite(x) for x in losses)


def test_errors(tmp_path, capsys, monkeypatch):
    good = tmp_path / "train.jsonl"
    good.write_text("{}\n", encoding="utf-8")
    taken = tmp_path / "taken"
    taken.mkdir()
    (taken / "x").write_text("")
    assert finetune_main([str(good), "--out", str(taken)]) == 2
    assert "already exists and is not an empty folder" in capsys.readouterr().err
    assert finetune_main([str(tmp_path / "none.jsonl"), "--out", str(tmp_path / "a")]) == 2
    assert "none.jsonl: no such file" in capsys.readouterr().err
    assert finetune_main([str(good), "--out", str(tmp_path / "a")]) == 2
    assert "train.jsonl: line 1 lacks 'prompt'" in capsys.readouterr().err
    assert finetune_main([str(good), "--out", str(tmp_path / "a"), "--steps", "0"]) == 2
    assert "--steps 0: must be at least 1" in capsys.readouterr().err
    assert finetune_main([str(good), "--out", str(tmp_path / "a"), "--layers", "0"]) == 2
    assert "--layers 0: must be at least 1" in capsys.readouterr().err
    assert finetune_main([str(good), "--validation", str(good), "--out", str(tmp_path / "a")]) == 2
    assert "is also a training file" in capsys.readouterr().err
    argv = [str(good), "--out", str(tmp_path / "a"), "--merged", "--quantization", "4bit"]
    assert finetune_main(argv) == 2
    assert "quantized weights cannot take the adapter in" in capsys.readouterr().err
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "trl" else real(name, *a)
    )
    assert finetune_main([str(good), "--out", str(tmp_path / "a")]) == 2
    err = capsys.readouterr().err
    assert "trl not installed" in err and ".[llm,finetune]" in err
    assert not (tmp_path / "a").exists()


def test_sft_on_a_named_gpu_sees_that_gpu_alone():
    from abm.errors import ScenarioError
    from abm.finetune.__main__ import one_gpu

    env = {}
    assert one_gpu("cuda:2", env) == "cuda:0" and env == {"CUDA_VISIBLE_DEVICES": "2"}
    env = {"CUDA_VISIBLE_DEVICES": "4,5,6"}  # torch's cuda:1 is the machine's GPU 5
    assert one_gpu("cuda:1", env) == "cuda:0" and env["CUDA_VISIBLE_DEVICES"] == "5"
    env = {"CUDA_VISIBLE_DEVICES": "GPU-a1, GPU-b2"}
    assert one_gpu("auto", env) == "auto" and env["CUDA_VISIBLE_DEVICES"] == "GPU-a1"
    env = {}
    assert one_gpu("cuda", env) == "cuda" and env == {"CUDA_VISIBLE_DEVICES": "0"}
    for untouched in ({"CUDA_VISIBLE_DEVICES": ""}, {}):  # no GPU shown; or the CPU
        before = dict(untouched)
        device = "cuda" if untouched else "cpu"
        assert one_gpu(device, untouched) == device and untouched == before
    with pytest.raises(ScenarioError, match="lets torch see 2 GPU"):
        one_gpu("cuda:2", {"CUDA_VISIBLE_DEVICES": "0,1"})
