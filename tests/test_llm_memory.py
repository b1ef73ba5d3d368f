"""Running out of GPU memory: a batch is split and run again, never half-recorded.

No GPU is needed: the backend's prefill is wrapped so that batches above a
given size raise torch's own out-of-memory error, as CUDA would. What must hold
is that scores and greedy answers are those of the unsplit run, that the split
is recorded, and that a prompt which cannot fit alone stops the run with a
message saying what to change. The key/value cache sizes of real model shapes
are computed by hand from their published configurations.
"""

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

from abm.errors import ScenarioError  # noqa: E402
from abm.llm import static_decode  # noqa: E402
from abm.llm.backend import Backend  # noqa: E402
from abm.llm.models import resolve  # noqa: E402
from abm.llm.placement import kv_cache_bytes_per_token  # noqa: E402

pytestmark = pytest.mark.llm_extra

# seven prompts whose greedy answers all differ
SEVEN = [
    TAILS[i % len(TAILS)] + " Suspect2 chose testify." * (i // len(TAILS) + 1) for i in range(7)
]
OUT_OF_MEMORY = "CUDA out of memory. Tried to allocate 2.00 GiB\nmore detail"


def out_of_memory():
    return torch.OutOfMemoryError(OUT_OF_MEMORY)


@pytest.fixture
def pair(tiny_dir):  # noqa: F811 (the imported fixture)
    """Two backends of the tiny model: one whose batches above ``limit`` run out of memory."""

    def make(limit: int, decode: str = "eager") -> tuple[Backend, Backend]:
        plain, limited = (
            Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32", decode=decode)
            for _ in range(2)
        )
        prefill = limited._prefill

        def small_batches_only(seqs, k):
            if len(seqs) > limit:
                raise out_of_memory()
            return prefill(seqs, k)

        limited._prefill = small_batches_only
        return plain, limited

    return make


def prompts_of(backend: Backend) -> list[list[int]]:
    return [backend.encode(conversation(t)) for t in SEVEN]


def test_a_batch_that_runs_out_of_memory_is_run_in_halves_with_the_same_answers(pair, capsys):
    plain, limited = pair(limit=2)
    prompts = prompts_of(plain)
    expected = plain.generate(prompts, max_new_tokens=6, max_batch_size=8)
    assert len(set(expected)) == 7  # a swap of any two answers would show
    assert limited.generate(prompts, max_new_tokens=6, max_batch_size=8) == expected
    # 7 rows fail -> halves of 4 and 3; 4 fails -> 2 + 2 (cap 2); the 3 are cut to 2 + 1
    # without trying: two splits, and every later batch holds at most 2 prompts
    loading = limited.loading()
    assert loading["out_of_memory_splits"] == 2
    assert loading["batch_cap"] == 2
    err = capsys.readouterr().err
    assert err.count("warning") == 1
    assert "ran out of memory writing answers to a batch of 7 prompts on cpu" in err
    assert "at most 4 prompts a batch from now on" in err
    # the cap holds for the next call: no further split is needed
    assert limited.loading()["capped_calls"] == 0  # the splits were not the cap's doing
    assert limited.generate(prompts, max_new_tokens=6, max_batch_size=8) == expected
    assert limited.loading()["out_of_memory_splits"] == 2
    assert limited.loading()["capped_calls"] == 1  # 8 asked, 2 a batch
    limited.generate(prompts, max_new_tokens=2, max_batch_size=2)  # within the cap
    limited.generate(prompts[:2], max_new_tokens=2, max_batch_size=8)  # too few to cut
    assert limited.loading()["capped_calls"] == 1
    assert "out_of_memory_splits" not in plain.loading()


def test_scores_after_a_split_equal_the_unsplit_scores(pair):
    plain, limited = pair(limit=3)
    prompts = prompts_of(plain)
    phrasings = [plain.label_ids(w) for w in ("remain silent", "testify", " testify")]
    expected = plain.score_phrasings(prompts, phrasings, max_batch_size=16)
    got = limited.score_phrasings(prompts, phrasings, max_batch_size=16)
    assert got.shape == (7, 3)
    # padding differs between batch shapes: equal up to float32 rounding
    assert abs(got - expected).max() < 1e-4
    # 7 -> 4 + 3; 4 -> 2 + 2 (cap 2); 3 -> 2 + 1 without trying
    assert limited.loading()["out_of_memory_splits"] == 2
    assert limited.score_phrasings([], phrasings).shape == (0, 3)


def test_the_static_path_splits_as_the_eager_one(pair):
    plain, limited = pair(limit=2, decode="static")
    prompts = prompts_of(plain)
    assert limited.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)
    assert limited.loading()["decode_path"] == "static"


def test_one_prompt_that_cannot_fit_stops_with_what_to_change(pair):
    _, limited = pair(limit=0)
    prompt = prompts_of(limited)[0]
    with pytest.raises(ScenarioError) as caught:
        limited.generate([prompt], max_new_tokens=5)
    message = str(caught.value)
    # the tiny model: 2 layers x 2 key/value heads x 8 per head x 2 (keys, values) x 4 bytes
    per_token = 2 * 2 * 8 * 2 * 4 / 1024
    assert message.startswith(
        f"{limited.source.name} ran out of memory on cpu writing answers to a single prompt "
        f"of {len(prompt)} tokens and 5 new ones (CUDA out of memory. Tried to allocate "
        f"2.00 GiB); its key/value cache takes {per_token:g} KiB a token."
    )
    assert 'quantization = "8bit" or "4bit"' in message
    assert 'device_map = "auto"' in message
    with pytest.raises(ScenarioError, match="scoring a single prompt"):
        limited.score_phrasings([prompt], [limited.label_ids("testify")])


def test_out_of_memory_is_not_taken_for_a_failed_compilation(tiny_dir, monkeypatch):  # noqa: F811
    def runs_out(fn):
        def step(*args):
            raise torch.OutOfMemoryError("CUDA out of memory while capturing the graph")

        return step

    monkeypatch.setattr(static_decode, "_compile", runs_out)
    backend = Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32", decode="compiled")
    with pytest.raises(ScenarioError, match="ran out of memory"):
        backend.generate(prompts_of(backend)[:2], max_new_tokens=4)
    loading = backend.loading()
    assert loading["decode_path"] == "compiled"  # still compiled: memory, not the compiler
    assert "decode_fallback" not in loading
    assert loading["out_of_memory_splits"] == 1


def test_key_value_cache_bytes_per_token_of_real_shapes():
    from transformers import LlamaConfig

    # Llama-2-7B: 32 layers, 32 heads of 128 (hidden 4096), no grouped-query attention
    llama7b = LlamaConfig(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32)
    assert kv_cache_bytes_per_token(llama7b, torch.bfloat16) == 2 * 32 * 32 * 128 * 2
    assert kv_cache_bytes_per_token(llama7b, torch.bfloat16) == 2**19  # 0.5 MiB
    # Llama-2-70B: 80 layers, 64 heads of 128 (hidden 8192), 8 key/value heads
    llama70b = LlamaConfig(
        hidden_size=8192, num_hidden_layers=80, num_attention_heads=64, num_key_value_heads=8
    )
    assert kv_cache_bytes_per_token(llama70b, torch.bfloat16) == 2 * 80 * 8 * 128 * 2
    assert kv_cache_bytes_per_token(llama70b, torch.float32) == 2 * 80 * 8 * 128 * 4


def test_the_loading_block_states_the_cache_per_token(tiny_dir):  # noqa: F811
    backend = Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32")
    config = backend.model.config
    head = config.hidden_size // config.num_attention_heads
    kv_heads = config.num_key_value_heads or config.num_attention_heads
    by_hand = 2 * config.num_hidden_layers * kv_heads * head * 4
    assert backend.loading()["kv_cache_kib_per_token"] == by_hand / 1024 == 0.25


def test_running_out_in_a_decode_step_or_a_scoring_level_splits_too(tiny_dir):  # noqa: F811
    plain, stepping, scoring = (
        Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32") for _ in range(3)
    )
    stepper, forward = stepping._stepper, scoring._forward

    def small_steps(state, max_new_tokens):
        advance, rows = stepper(state, max_new_tokens), len(state["mask"])

        def step(token):
            if rows > 3:  # the prefill fits; the first new token does not
                raise out_of_memory()
            return advance(token)

        return step

    def small_levels(tokens, mask, position, cache):
        if len(tokens) > 6:
            raise out_of_memory()
        return forward(tokens, mask, position, cache)

    stepping._stepper, scoring._forward = small_steps, small_levels
    prompts = prompts_of(plain)
    assert stepping.generate(prompts, max_new_tokens=6) == plain.generate(prompts, max_new_tokens=6)
    # 7 rows run out, then 4; 2 fit, and the last 3 are cut to 2 + 1
    assert (stepping.oom_splits, stepping.batch_cap) == (2, 2)
    phrasings = [plain.label_ids(w) for w in ("remain silent", "stay silent", "testify")]
    # two two-token phrasings of different first tokens: the second level feeds two rows
    # per prompt, so 7 prompts (14 rows) and 4 (8) run out, 2 (4) do not
    assert [len(p) for p in phrasings] == [2, 2, 1] and phrasings[0][0] != phrasings[1][0]
    got = scoring.score_phrasings(prompts, phrasings)
    assert abs(got - plain.score_phrasings(prompts, phrasings)).max() < 1e-4
    assert (scoring.oom_splits, scoring.batch_cap) == (2, 2)


def test_kept_static_caches_are_dropped_before_a_batch_is_split(pair):
    plain, limited = pair(limit=99, decode="static")
    prompts = prompts_of(plain)
    limited.generate(prompts[:4], max_new_tokens=4)  # keeps a static cache for 4 rows
    decoder = limited._decoders["static"]
    assert len(decoder._slots) == 1
    prefill, failures = limited._prefill, []

    def once_out_of_memory(seqs, k):
        if not failures:  # the kept cache filled the GPU: the first try runs out
            failures.append(len(seqs))
            raise out_of_memory()
        return prefill(seqs, k)

    limited._prefill = once_out_of_memory
    assert limited.generate(prompts[4:5], max_new_tokens=4) == plain.generate(
        prompts[4:5], max_new_tokens=4
    )
    assert failures == [1]
    # run again as it was, after the 4-row cache was let go: no split, no cap
    assert "out_of_memory_splits" not in limited.loading()
    assert [key[0] for key in decoder._slots] == [1]


def test_key_value_cache_bytes_of_other_attention_kinds():
    from transformers import FalconConfig, PretrainedConfig

    # Falcon-7B: multi-query attention, one key/value head of 4544 / 71 = 64, 32 layers
    falcon7b = FalconConfig(
        hidden_size=4544, num_hidden_layers=32, num_attention_heads=71, multi_query=True
    )
    assert kv_cache_bytes_per_token(falcon7b, torch.bfloat16) == 2 * 32 * 1 * 64 * 2
    # Falcon-40B: the new decoder architecture, 8 key/value heads of 64, 60 layers
    falcon40b = FalconConfig(
        hidden_size=8192,
        num_hidden_layers=60,
        num_attention_heads=128,
        num_kv_heads=8,
        new_decoder_architecture=True,
    )
    assert kv_cache_bytes_per_token(falcon40b, torch.bfloat16) == 2 * 60 * 8 * 64 * 2
    # latent attention (DeepSeek-V2/V3) caches a compressed vector: no figure rather than a
    # wrong one
    latent = PretrainedConfig(
        hidden_size=7168, num_hidden_layers=61, num_attention_heads=128, kv_lora_rank=512
    )
    assert kv_cache_bytes_per_token(latent, torch.bfloat16) is None
