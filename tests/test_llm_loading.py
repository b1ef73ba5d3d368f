"""Loading options for big models, CPU threads, and reflections that end at stop strings.

Runs on the CPU: the fit check is fed made-up free-memory figures, quantization is
only checked where bitsandbytes and CUDA are absent (its errors) or present (loading).
"""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["TRANSFORMERS_OFFLINE"] = "1"

import importlib.util  # noqa: E402
import json  # noqa: E402

import numpy as np  # noqa: E402
import pytest  # noqa: E402
from pydantic import ValidationError  # noqa: E402

from abm.errors import ScenarioError  # noqa: E402
from abm.policies.llm_backends import shared_backend  # noqa: E402
from abm.policies.llm_params import LLMParams, quantization_problem  # noqa: E402

torch = pytest.importorskip("torch", reason="needs the llm extra (torch)")
pytest.importorskip("transformers", reason="needs the llm extra (transformers)")

from tiny_llm import build_tiny_model, vocabulary  # noqa: E402

import abm.llm.placement as placement_module  # noqa: E402
from abm.llm.backend import Backend, _cut  # noqa: E402
from abm.llm.models import resolve  # noqa: E402
from abm.llm.placement import (  # noqa: E402
    check_size,
    config_parameters,
    estimate_weights,
    thread_count,
)

GiB = 2**30
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
HAS_CUDA = torch.cuda.is_available()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny_loading"))


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


# ------------------------------------------------------------------ options


def test_device_map_names_and_tables_are_accepted():
    assert LLMParams(device_map="auto").device_map == "auto"
    assert LLMParams(device_map="balanced").device_map == "balanced"
    table = {"model.layers.0": 0, "lm_head": "cuda:1", "model.norm": "cpu"}
    assert LLMParams(device_map=table).device_map == table


@pytest.mark.parametrize(
    ("options", "words"),
    [
        ({"device_map": "everywhere"}, "device_map 'everywhere' is not one of \"auto\""),
        ({"device_map": {"lm_head": "tpu"}}, "puts 'lm_head' on 'tpu'"),
        ({"device_map": {}}, "device_map is an empty table"),
        ({"device_map": {"model.layers": "disk"}}, "offloading weights to disk is not supported"),
        ({"device_map": "auto", "device": "cuda:0"}, 'leave device at "auto"'),
        ({"device_map": "auto", "device": "cpu"}, "asks for one device"),
        ({"quantization": "4bit", "device": "cpu"}, "runs on CUDA GPUs only"),
        ({"quantization": "3bit"}, "quantization"),
        ({"threads": 0}, "threads"),
        ({"reflection_stop": [""]}, "reflection_stop must hold non-empty strings"),
    ],
)
def test_bad_loading_options_are_refused_with_the_field(options, words):
    with pytest.raises(ValidationError, match=words):
        LLMParams(**options)


@pytest.mark.skipif(HAS_BNB and HAS_CUDA, reason="bitsandbytes and a CUDA GPU are both here")
def test_quantization_names_what_is_missing():
    missing = []
    if not HAS_CUDA:
        missing.append("a CUDA GPU (torch sees none)")
    if not HAS_BNB:
        missing.append("the bitsandbytes package")
    params = LLMParams(quantization="8bit")  # reading the scenario needs no GPU ...
    message = quantization_problem(params)  # ... loading the model does
    assert message.startswith("field 'quantization': ")
    assert 'quantization = "8bit" needs a CUDA GPU and the bitsandbytes package' in message
    assert quantization_problem(LLMParams()) is None
    for what in missing:
        assert what in message
    if HAS_CUDA:
        assert "CUDA GPU (torch" not in message


@pytest.mark.skipif(HAS_BNB and HAS_CUDA, reason="bitsandbytes and a CUDA GPU are both here")
def test_a_quantized_player_is_refused_when_its_model_is_loaded(tiny_dir):
    from abm.errors import ScenarioError

    params = LLMParams(model=str(tiny_dir), quantization="4bit")
    with pytest.raises(ScenarioError, match=r"field 'quantization': .* needs a CUDA GPU"):
        shared_backend(params)


@pytest.mark.skipif(not (HAS_BNB and HAS_CUDA), reason="needs bitsandbytes and a CUDA GPU")
def test_quantized_tiny_model_loads_on_the_gpu(tiny_dir):
    backend = Backend(resolve(str(tiny_dir)), quantization="4bit", dtype="bfloat16")
    assert backend.device.startswith("cuda")
    assert backend.loading()["quantization"] == "4bit"
    assert len(backend.generate([backend.tokenize("Suspect1 : I")], max_new_tokens=3)) == 1


# ------------------------------------------------------------------ the fit estimate


def llama2_7b_config():
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=32000,
        hidden_size=4096,
        intermediate_size=11008,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=32,
        tie_word_embeddings=False,
    )


def test_llama2_7b_estimate_matches_the_hand_count():
    # embeddings and output head: 2 x 32000 x 4096 = 262,144,000
    # per layer: attention 4 x 4096^2 = 67,108,864, MLP 3 x 4096 x 11008 = 135,266,304,
    # two norms 2 x 4096 = 8,192; 32 layers = 6,476,267,520; final norm 4,096
    total, linear = config_parameters(llama2_7b_config())
    assert total == 262_144_000 + 32 * (67_108_864 + 135_266_304 + 8_192) + 4_096
    assert total == 6_738_415_616  # the "6.74e9" of the model card
    assert linear == 32 * (67_108_864 + 135_266_304)  # what bitsandbytes quantizes
    assert estimate_weights(total, linear, torch.bfloat16).size == 6_738_415_616 * 2
    assert estimate_weights(total, linear, torch.float32).size == 6_738_415_616 * 4
    rest = total - linear  # embeddings, head and norms stay in bfloat16
    assert estimate_weights(total, linear, torch.bfloat16, "8bit").size == linear + rest * 2
    assert estimate_weights(total, linear, torch.bfloat16, "4bit").size == linear // 2 + rest * 2
    assert estimate_weights(total, linear, torch.bfloat16, "4bit").size == 3_762_823_168


def tiny_counts() -> tuple[int, int]:
    """The tiny Llama of tiny_llm.py counted by hand."""
    v, h, inter = len(vocabulary()), 32, 64
    per_layer = h * h + 2 * h * 16 + h * h + 3 * h * inter  # q, k and v (2 KV heads of 8), o, MLP
    linear = 2 * per_layer
    return linear + 2 * v * h + 2 * 2 * h + h, linear


def test_quantized_estimate_of_a_local_model(tiny_dir):
    total, linear = tiny_counts()
    source = resolve(str(tiny_dir))
    got = check_size(source, "auto", "cpu", torch.bfloat16, quantization="4bit")
    assert (got.parameters, got.quantizable) == (total, linear)
    assert got.size == linear // 2 + (total - linear) * 2


def test_device_map_refuses_a_model_the_gpus_cannot_hold(tiny_dir, monkeypatch):
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 69_000_000_000)
    monkeypatch.setattr(placement_module, "_config_parameters", lambda source, trust: None)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 79 * GiB, 1: 40 * GiB})
    # 69e9 x 2 bytes = 138e9 bytes = 128.5 GiB > 79 + 40 = 119 GiB
    with pytest.raises(ScenarioError) as info:
        check_size(resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map="auto")
    message = str(info.value)
    assert "about 69.0 billion parameters, about 129 GiB in bfloat16" in message
    assert "69,000,000,000 parameters x 2 bytes" in message
    assert 'device_map = "auto"' in message
    assert "devices it uses have 119.0 GiB free (cuda:0 79.0 GiB, cuda:1 40.0 GiB)" in message
    # three such GPUs hold it
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {i: 79 * GiB for i in range(3)})
    got = check_size(resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map="auto")
    assert got.size == 138_000_000_000


def test_a_bare_cuda_in_a_table_is_the_current_gpu(tiny_dir, monkeypatch):
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 7_000_000_000)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 10 * GiB, 1: 20 * GiB})
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 1)
    # 14e9 bytes = 13.0 GiB: fits the current GPU (1, 20 GiB), not GPU 0
    got = check_size(
        resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map={"": "cuda"}
    )
    assert got.size == 14_000_000_000
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    with pytest.raises(ScenarioError, match=r"10.0 GiB free \(cuda:0 10.0 GiB\)"):
        check_size(resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map={"": "cuda"})


def test_a_table_counts_only_the_gpus_it_names(tiny_dir, monkeypatch):
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 7_000_000_000)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 10 * GiB, 1: 10 * GiB})
    table = {"model.embed_tokens": 0, "model.layers": 1, "lm_head": "cuda:1"}
    # 7e9 x 2 = 14e9 bytes = 13.0 GiB: more than either GPU, less than both
    got = check_size(resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map=table)
    assert got.size == 14_000_000_000
    with pytest.raises(ScenarioError, match=r"10.0 GiB free \(cuda:1 10.0 GiB\)"):
        check_size(
            resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map={"": "cuda:1"}
        )
    # layers put in CPU memory on purpose count that memory too: 10 + 4 GiB hold 13 GiB
    monkeypatch.setattr(placement_module, "_cpu_free", lambda: 4 * GiB)
    offloaded = {"model": 1, "lm_head": "cpu"}
    got = check_size(resolve(str(tiny_dir)), "auto", "cuda", torch.bfloat16, device_map=offloaded)
    assert got.size == 14_000_000_000


def test_one_gpu_refusal_names_device_or_quantization(tiny_dir, monkeypatch):
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 7_000_000_000)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 12 * GiB})
    source = resolve(str(tiny_dir))
    with pytest.raises(ScenarioError, match=r'device = "cuda:0" loads it: cuda:0 has 12.0 GiB'):
        check_size(source, "cuda:0", "cuda:0", torch.bfloat16)
    # 4 bit: the tiny model's share of linear layers, scaled to 7e9 parameters
    total, linear = tiny_counts()
    quantizable = round(7_000_000_000 * linear / total)
    got = check_size(source, "cuda:0", "cuda:0", torch.bfloat16, quantization="4bit")
    assert got.size == int(quantizable * 0.5) + (7_000_000_000 - quantizable) * 2
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 1 * GiB})
    with pytest.raises(ScenarioError, match=r'quantization = "4bit" loads it: cuda:0 has 1.0'):
        check_size(source, "cuda:0", "cuda:0", torch.bfloat16, quantization="4bit")


def test_the_cpu_refuses_what_its_memory_cannot_hold(tiny_dir, monkeypatch):
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 1_000_000_000)
    monkeypatch.setattr(placement_module, "_cpu_free", lambda: 2 * GiB)
    # 1e9 x 4 bytes (float32) = 3.7 GiB > 2 GiB available
    with pytest.raises(ScenarioError, match=r'device = "cpu" loads it: the CPU has 2.0 GiB'):
        Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32")


def test_device_map_without_a_gpu_keeps_the_cpu_limit(tiny_dir, monkeypatch):
    monkeypatch.setattr(placement_module, "_parameter_count", lambda source: 7_000_000_000)
    monkeypatch.setattr(placement_module, "_gpu_free", dict)
    with pytest.raises(ScenarioError, match="torch sees no CUDA GPU, so device_map would run it"):
        check_size(resolve(str(tiny_dir)), "auto", "cpu", torch.float32, device_map="auto")


# ------------------------------------------------------------------ device_map on the CPU


@pytest.mark.skipif(HAS_CUDA, reason="checks the CPU placement of device_map")
def test_device_map_auto_on_the_cpu_gives_the_same_answers(tiny_dir):
    plain = Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32")
    mapped = Backend(resolve(str(tiny_dir)), device="auto", dtype="float32", device_map="auto")
    assert mapped.device == "cpu"
    assert mapped.loading()["device_map"] == "auto"
    assert mapped.loading()["placed_on"] == ["cpu"]
    prompts = [
        plain.encode([{"role": "user", "content": t}], "Suspect1: I want to")
        for t in ("You did this.", "They did that. Your points 9.", "score round")
    ]
    phrasings = [plain.continuation_ids("Suspect1: I want to", " remain silent")]
    phrasings.append(plain.continuation_ids("Suspect1: I want to", " testify"))
    assert np.array_equal(
        plain.score_phrasings(prompts, phrasings), mapped.score_phrasings(prompts, phrasings)
    )
    assert plain.generate(prompts, max_new_tokens=8) == mapped.generate(prompts, max_new_tokens=8)


# ------------------------------------------------------------------ load failures with the files here

DISK_MAP = {"model.layers.0": "disk", "": "cpu"}


def real_refusal(folder, **placement) -> str:
    """The first line transformers itself gives when refusing ``placement`` of ``folder``."""
    from transformers import AutoModelForCausalLM

    with pytest.raises(ValueError) as info:
        AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32, **placement)
    return str(info.value).strip().splitlines()[0].rstrip(". ")


def fake_hub_cache(root, repo: str, model_dir, weights: bool = True):
    """A Hugging Face cache under ``root`` holding ``repo`` as ``model_dir``'s files."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    entry = root / f"models--{repo.replace('/', '--')}"
    snapshot = entry / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (entry / "refs").mkdir()
    (entry / "refs" / "main").write_text(commit, encoding="ascii")
    for f in model_dir.iterdir():
        if weights or f.name != "model.safetensors":
            (snapshot / f.name).write_bytes(f.read_bytes())
    return snapshot


@pytest.fixture
def hub_cache(tmp_path, monkeypatch):
    """An offline hub whose cache is a fresh folder; no local folder shadows a hub id."""
    import huggingface_hub.constants as hub_constants

    monkeypatch.setattr(hub_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)
    monkeypatch.chdir(tmp_path)
    return tmp_path / "hub"


def test_a_refused_placement_of_a_whole_folder_is_not_called_missing_files(tiny_dir, tmp_path):
    from abm.llm.loading import load_model

    folder = tmp_path / "copy"
    folder.mkdir()
    for f in tiny_dir.iterdir():
        (folder / f.name).write_bytes(f.read_bytes())
    first = real_refusal(folder, device_map=DISK_MAP)
    with pytest.raises(ScenarioError) as info:
        load_model(resolve(str(folder)), torch.float32, False, {"device_map": DISK_MAP})
    message = str(info.value)
    assert "it needs config.json" not in message
    assert f"cannot load model {str(folder)!r} with " in message
    assert 'device_map = { "model.layers.0" = "disk", "" = "cpu" }: ' in message
    assert first in message
    assert f"its config.json and weights are in {folder}" in message
    assert "change device_map, or use a smaller model" in message
    assert "\n" not in message
    # the same folder without its weights is still a folder with files missing
    (folder / "model.safetensors").unlink()
    with pytest.raises(ScenarioError, match="it needs config.json, tokenizer files and weights"):
        load_model(resolve(str(folder)), torch.float32, False, {"device_map": DISK_MAP})


def test_a_refused_placement_of_a_cached_hub_model_is_not_called_uncached(tiny_dir, hub_cache):
    from abm.llm.loading import load_model

    snapshot = fake_hub_cache(hub_cache, "abm-test/tiny", tiny_dir)
    source = resolve("abm-test/tiny")
    assert source.hub
    tokenizer, model = load_model(source, torch.float32, False)  # the cache is whole
    assert model.config.vocab_size == len(tokenizer)
    first = real_refusal(snapshot, device_map=DISK_MAP)
    with pytest.raises(ScenarioError) as info:
        load_model(source, torch.float32, False, {"device_map": DISK_MAP})
    message = str(info.value)
    assert "not in the local Hugging Face cache" not in message
    assert "huggingface-cli download" not in message
    assert "cannot load model 'abm-test/tiny' with device_map = {" in message
    assert first in message
    assert f"its config.json and weights are in {snapshot}" in message


def test_a_hub_model_cached_without_weights_is_still_uncached(tiny_dir, hub_cache):
    from abm.llm.loading import load_model

    fake_hub_cache(hub_cache, "abm-test/tiny", tiny_dir, weights=False)
    with pytest.raises(ScenarioError) as info:
        load_model(resolve("abm-test/tiny"), torch.float32, False, {"device_map": DISK_MAP})
    message = str(info.value)
    assert "'abm-test/tiny' is not in the local Hugging Face cache and HF_HUB_OFFLINE" in message
    assert "huggingface-cli download abm-test/tiny" in message


def test_a_download_that_then_fails_to_place_gives_the_refusal(tiny_dir, hub_cache, monkeypatch):
    from transformers import AutoModelForCausalLM

    import abm.llm.loading as loading

    snapshot = fake_hub_cache(hub_cache, "abm-test/tiny", tiny_dir, weights=False)

    class Downloading:
        """Loads as transformers does; a load allowed to download fetches the weights first."""

        @staticmethod
        def from_pretrained(location, **kwargs):
            if not kwargs.get("local_files_only"):
                (snapshot / "model.safetensors").write_bytes(
                    (tiny_dir / "model.safetensors").read_bytes()
                )
            return AutoModelForCausalLM.from_pretrained(location, **kwargs)

    monkeypatch.setattr(loading, "AutoModelForCausalLM", Downloading)
    monkeypatch.setattr(loading, "_hub_unreachable", lambda: None)
    with pytest.raises(ScenarioError) as info:
        loading.load_model(resolve("abm-test/tiny"), torch.float32, False, {"device_map": DISK_MAP})
    message = str(info.value)
    assert "could not be downloaded" not in message
    assert "cannot load model 'abm-test/tiny' with device_map = {" in message
    assert real_refusal(snapshot, device_map=DISK_MAP) in message


def test_a_quantization_refusal_names_quantization_and_its_gpu(tiny_dir, monkeypatch):
    import abm.llm.loading as loading
    from abm.llm.placement import placement_options

    refusal = (
        "Some modules are dispatched on the CPU or the disk. Make sure you have enough GPU "
        "RAM to fit the quantized model."
    )
    seen = {}

    class Refusing:
        """Refuses as bitsandbytes does when the quantized weights do not fit the GPU."""

        @staticmethod
        def from_pretrained(location, **kwargs):
            seen.update(kwargs)
            raise ValueError(refusal)

    monkeypatch.setattr(loading, "AutoModelForCausalLM", Refusing)
    placement = placement_options("cuda:1", torch.bfloat16, None, "4bit")
    with pytest.raises(ScenarioError) as info:
        loading.load_model(resolve(str(tiny_dir)), torch.bfloat16, False, placement)
    assert seen["device_map"] == {"": 1} and seen["local_files_only"]
    message = str(info.value)
    assert f'with quantization = "4bit" on cuda:1: {refusal[:-1]} (its config.json' in message
    assert "change quantization, or use a smaller model" in message
    placement = placement_options("cuda:0", torch.bfloat16, "auto", "8bit")
    with pytest.raises(ScenarioError) as info:
        loading.load_model(resolve(str(tiny_dir)), torch.bfloat16, False, placement)
    message = str(info.value)
    assert 'with quantization = "8bit" and device_map = "auto": Some modules' in message
    assert "change device_map or quantization, or use a smaller model" in message
    # with neither set, the refusal is still not taken for missing files
    refusal = "rope_scaling must be a dictionary."
    with pytest.raises(ScenarioError) as info:
        loading.load_model(resolve(str(tiny_dir)), torch.float32, False)
    assert str(info.value) == (
        f"cannot load model {str(tiny_dir)!r} from {tiny_dir}: rope_scaling must be a "
        "dictionary (its config.json and weights are there; transformers refused them)"
    )


# ------------------------------------------------------------------ checkpoints saved quantized


def write_quantized_checkpoint(folder, quantization: dict, config: dict | None = None):
    """A folder with a config.json carrying ``quantization`` and packed safetensors weights.

    Its tensors store 816 bytes in 308 elements:
    int32 (4, 32): 128 x 4 = 512; int32 (1, 4): 4 x 4 = 16; bfloat16 (1, 32): 32 x 2 = 64;
    uint8 (64, 1): 64 x 1 = 64; bfloat16 (10, 8): 80 x 2 = 160.
    """
    from safetensors.torch import save_file

    folder.mkdir()
    tensors = {
        "model.layers.0.mlp.up_proj.qweight": torch.zeros(4, 32, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.qzeros": torch.zeros(1, 4, dtype=torch.int32),
        "model.layers.0.mlp.up_proj.scales": torch.zeros(1, 32, dtype=torch.bfloat16),
        "model.layers.0.mlp.down_proj.weight": torch.zeros(64, 1, dtype=torch.uint8),
        "model.embed_tokens.weight": torch.zeros(10, 8, dtype=torch.bfloat16),
    }
    save_file(tensors, str(folder / "model.safetensors"))
    body = dict(config or {}, quantization_config=quantization)
    (folder / "config.json").write_text(json.dumps(body), encoding="utf-8")
    return folder


GPTQ = {"quant_method": "gptq", "bits": 4, "group_size": 128}


def test_a_checkpoint_saved_quantized_counts_the_bytes_it_stores(tmp_path, monkeypatch):
    folder = write_quantized_checkpoint(tmp_path / "gptq", GPTQ)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 10 * GiB})
    source = resolve(str(folder))
    got = check_size(source, "cuda:0", "cuda:0", torch.float32)
    # 816 bytes as stored, not 308 elements x 4 bytes of float32 = 1,232
    assert got.size == 816
    assert got.stored_as == "gptq 4-bit"
    assert got.parameters == 308  # no architecture in its config: the elements stored
    # asking to quantize again changes nothing: the checkpoint keeps its own
    assert check_size(source, "cuda:0", "cuda:0", torch.bfloat16, quantization="4bit") == got
    # the unquantized count of the same files, for contrast, is elements x the dtype
    (folder / "config.json").write_text("{}", encoding="utf-8")
    assert check_size(source, "cuda:0", "cuda:0", torch.float32).size == 308 * 4


def test_a_checkpoint_saved_quantized_is_refused_in_its_stored_size(tmp_path, monkeypatch):
    bnb = {"quant_method": "bitsandbytes", "load_in_4bit": True, "bnb_4bit_quant_type": "nf4"}
    folder = write_quantized_checkpoint(tmp_path / "bnb", bnb)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 800})
    with pytest.raises(ScenarioError) as info:
        check_size(resolve(str(folder)), "cuda:0", "cuda:0", torch.bfloat16, quantization="4bit")
    message = str(info.value)
    assert f"{folder} is saved quantized (bitsandbytes 4-bit): about 0 GiB as stored" in message
    assert "(816 bytes in its safetensors files)" in message
    assert 'where device = "cuda:0" loads it: cuda:0 has 0.0 GiB free' in message
    assert 'device_map = "auto", or a smaller model' in message
    assert 'quantization = "8bit"' not in message


def test_a_checkpoint_saved_quantized_takes_its_parameters_from_its_config(tmp_path, monkeypatch):
    llama = {
        "model_type": "llama",
        "vocab_size": 10,
        "hidden_size": 8,
        "intermediate_size": 16,
        "num_hidden_layers": 1,
        "num_attention_heads": 2,
        "num_key_value_heads": 2,
        "tie_word_embeddings": False,
    }
    folder = write_quantized_checkpoint(tmp_path / "gptq", GPTQ, llama)
    monkeypatch.setattr(placement_module, "_gpu_free", lambda: {0: 10 * GiB})
    got = check_size(resolve(str(folder)), "cuda:0", "cuda:0", torch.bfloat16)
    # embeddings and head 2 x 10 x 8 = 160; q, k, v, o 4 x 8 x 8 = 256; MLP 3 x 8 x 16 = 384;
    # two norms 16 and the final one 8
    assert got.parameters == 160 + 256 + 384 + 16 + 8
    assert got.size == 816
    assert got.per_parameter == 816 / 824


def test_a_checkpoint_saved_quantized_without_safetensors_is_not_checked(tmp_path, capsys):
    folder = tmp_path / "bin"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"quantization_config": GPTQ}))
    (folder / "pytorch_model.bin").write_bytes(b"")
    assert check_size(resolve(str(folder)), "cuda:0", "cuda:0", torch.bfloat16) is None
    assert "saved quantized (gptq 4-bit) without safetensors files" in capsys.readouterr().err


# ------------------------------------------------------------------ GPU numbers


@pytest.fixture
def two_gpus(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    return monkeypatch


def test_a_gpu_number_past_those_torch_sees_is_refused(two_gpus, tiny_dir):
    from abm.llm.placement import pick_device

    assert [pick_device(d) for d in ("cuda:0", "cuda:1", "cuda")] == ["cuda:0", "cuda:1", "cuda"]
    with pytest.raises(ScenarioError) as info:
        pick_device("cuda:2")
    message = str(info.value)
    assert message == (
        'device = "cuda:2" asks for GPU 2, but torch sees 2 CUDA GPUs (cuda:0 to cuda:1), '
        'numbered from 0; use one of those, "cuda" (the current GPU) or "auto"'
    )
    with pytest.raises(ScenarioError, match=r'device = "cuda:7" asks for GPU 7'):
        Backend(resolve(str(tiny_dir)), device="cuda:7", dtype="float32")


def test_a_missing_gpu_names_cuda_visible_devices(two_gpus):
    from abm.llm.placement import pick_device

    two_gpus.setattr(torch.cuda, "device_count", lambda: 1)
    two_gpus.setenv("CUDA_VISIBLE_DEVICES", "3")
    with pytest.raises(ScenarioError) as info:
        pick_device("cuda:3")
    assert "torch sees 1 CUDA GPU (cuda:0, as CUDA_VISIBLE_DEVICES='3' lets it see)" in str(
        info.value
    )


def test_a_table_naming_a_gpu_torch_does_not_see_is_refused(two_gpus, tiny_dir):
    from abm.llm.placement import check_table

    check_table({"model.layers.0": 0, "model.layers.1": "cuda:1", "": "cpu"})
    check_table("auto")
    with pytest.raises(ScenarioError) as info:
        Backend(resolve(str(tiny_dir)), device_map={"model.layers.0": 2, "": 0})
    assert str(info.value) == (
        "device_map puts 'model.layers.0' on GPU 2, but torch sees 2 CUDA GPUs "
        '(cuda:0 to cuda:1), numbered from 0; use those numbers or device_map = "auto"'
    )
    two_gpus.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(ScenarioError, match=r"device_map puts '' on 'cuda:0', but torch sees no"):
        check_table({"": "cuda:0"})


# ------------------------------------------------------------------ threads


@pytest.fixture
def clean_thread_env(monkeypatch):
    monkeypatch.delenv("ABM_THREADS", raising=False)
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    return monkeypatch


def test_thread_count_order(clean_thread_env):
    assert thread_count() == (len(os.sched_getaffinity(0)), "cpus")
    clean_thread_env.setenv("OMP_NUM_THREADS", "2")
    assert thread_count() == (2, "OMP_NUM_THREADS")
    clean_thread_env.setenv("OMP_NUM_THREADS", "3,1")  # OpenMP's nested form: outer level
    assert thread_count() == (3, "OMP_NUM_THREADS")
    clean_thread_env.setenv("ABM_THREADS", "3")
    assert thread_count() == (3, "ABM_THREADS")
    assert thread_count(5) == (5, "threads")
    clean_thread_env.setenv("ABM_THREADS", "many")
    with pytest.raises(ScenarioError, match="ABM_THREADS='many' is not a positive whole number"):
        thread_count()


def test_set_threads_sets_torch_and_is_recorded(tiny_dir, clean_thread_env):
    backend = Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32")
    before = torch.get_num_threads()
    try:
        assert backend.set_threads(2) == 2
        assert torch.get_num_threads() == 2
        assert (backend.loading()["threads"], backend.loading()["threads_from"]) == (2, "threads")
    finally:
        torch.set_num_threads(before)


def test_pool_workers_get_one_thread_each_by_default(clean_thread_env):
    from abm.batch import backends

    cores = backends.default_workers()
    assert backends.worker_threads(cores) == 1
    assert backends.worker_threads(1) == cores
    backends._limit_threads(backends.worker_threads(cores))
    assert thread_count() == (1, "OMP_NUM_THREADS")


def test_summary_records_loading_and_threads(tiny_dir, tmp_path, clean_thread_env):
    from abm.run import run_scenario

    scenario = tmp_path / "tiny.toml"
    reflect = 'reflection = true, reflection_tokens = 6, reflection_stop = ["."]'
    scenario.write_text(
        f"""
name = "tiny"
seed = 1
[match]
rounds = 2
[graph]
kind = "complete"
[population]
players = [
  {{ name = "tit_for_tat" }},
  {{ name = "llm", model = "{tiny_dir}", device = "cpu", threads = 1, {reflect} }},]
[output]
charts = false
""",
        encoding="utf-8",
    )
    run_scenario(scenario, out=tmp_path / "run", quiet=True)
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    loading = summary["llm"][0]["loading"]
    assert loading["threads"] == 1
    assert loading["threads_from"] == "threads"
    assert loading["device_map"] is None and loading["quantization"] is None
    assert loading["dtype"] == "float32"
    assert summary["llm"][0]["reflection_stop"] == ["."]
    for line in (tmp_path / "run" / "transcripts.jsonl").read_text().splitlines():
        reflection = json.loads(line)["reflection_raw"]
        assert "." not in reflection.lstrip()


# ------------------------------------------------------------------ stop strings


def test_cut_keeps_the_text_before_the_first_stop_after_the_answer_began():
    assert _cut("  \n\nI cooperated.\n\nNext time", ["\n\n"]) == "  \n\nI cooperated."
    assert _cut("one two. three. four", [".", "three"]) == "one two"
    assert _cut("one two three", ["four"]) == "one two three"
    assert _cut("one two", []) == "one two"


def cut_by_hand(text: str, stops: list[str]) -> str:
    """The text before the earliest stop string (the text is already stripped)."""
    hits = [text.find(s) for s in stops if text.find(s) > 0]
    return text[: min(hits)].strip() if hits else text


def test_a_batch_stops_each_sequence_at_its_own_stop(tiny_dir):
    backend = Backend(resolve(str(tiny_dir)), device="cpu", dtype="float32")
    prompts = [
        backend.encode([{"role": "user", "content": t}])
        for t in ("You did this.", "They did that. Your points 9.", "score round history")
    ]
    full = backend.generate(prompts, max_new_tokens=10)
    words = [text.split() for text in full]
    assert all(len(w) >= 4 for w in words)  # the random model writes ten words or so
    # the third word of the first answer, the second of the second, with their spaces
    stops = [f" {words[0][2]} ", f" {words[1][1]} "]
    got = backend.generate(prompts, max_new_tokens=10, stop=stops)
    assert got == [cut_by_hand(text, stops) for text in full]
    assert len(got[0].split()) <= 2 and len(got[1].split()) <= 1
    assert all(g != f for g, f in zip(got[:2], full[:2], strict=True))
    # a stop that ends every sequence after a word or two saves decoding steps
    passes = backend.stats.forward_passes
    backend.generate(prompts, max_new_tokens=10)
    unstopped = backend.stats.forward_passes - passes
    every = [f" {w[1]} " for w in words]
    passes = backend.stats.forward_passes
    got = backend.generate(prompts, max_new_tokens=10, stop=every)
    assert got == [cut_by_hand(text, every) for text in full]
    assert backend.stats.forward_passes - passes < unstopped


def stop_scenario(folder, stop: str) -> object:
    path = folder / "stop.toml"
    path.write_text(
        f"""
name = "stop"
seed = 1
[match]
rounds = 2
[graph]
kind = "complete"
[population]
players = [
  {{ name = "tit_for_tat" }},
  {{ name = "llm", mode = "generate", reflection = true{stop} }},
]
[output]
charts = false
""",
        encoding="utf-8",
    )
    return path


def test_the_policy_passes_stop_strings_to_reflections_only(fake, monkeypatch, tmp_path):
    from fake_llm import FakeBackend

    from abm.run import run_scenario

    seen = []
    original = FakeBackend.generate

    def generate(self, prompts, *, stop=None, **kwargs):
        seen.append(stop)
        return original(self, prompts, **kwargs)

    monkeypatch.setattr(type(fake), "generate", generate)
    run_scenario(stop_scenario(tmp_path, ', reflection_stop = ["\\n\\n"]'), out=tmp_path / "a")
    # decisions are called as before (no stop argument); reflections get the strings
    assert None in seen and ["\n\n"] in seen
    assert set(map(str, seen)) == {"None", str(["\n\n"])}
    summary = json.loads((tmp_path / "a" / "summary.json").read_text())
    assert summary["llm"][0]["reflection_stop"] == ["\n\n"]
    seen.clear()
    run_scenario(stop_scenario(tmp_path, ""), out=tmp_path / "b")
    assert seen and set(map(str, seen)) == {"None"}  # the default: calls as before
    summary = json.loads((tmp_path / "b" / "summary.json").read_text())
    assert "reflection_stop" not in summary["llm"][0]
