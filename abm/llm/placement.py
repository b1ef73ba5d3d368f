"""Where a model's weights go, and whether they fit there, decided before loading.

The device and dtype a scenario's "auto" means on this machine, torch's CPU thread
count, the size of the weights counted from safetensors headers or a config (no
weights read), and the from_pretrained options that spread them over GPUs or
quantize them.
"""

from __future__ import annotations

import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from abm.errors import ScenarioError
from abm.llm.loading import indexed_shards, model_folder
from abm.llm.models import ModelSource


def pick_device(device: str) -> str:
    """The device a scenario's ``device`` means here ("auto": CUDA when torch sees a GPU).

    Raises:
        ScenarioError: CUDA asked for, and torch sees no CUDA GPU; or "cuda:N" with
            no GPU N among those torch sees.
    """
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(
            f"device {device!r} was asked for but torch sees no CUDA GPU; "
            'use device = "auto" or "cpu"'
        )
    index = device.partition(":")[2]
    if device.startswith("cuda:") and index.isdigit():
        count = torch.cuda.device_count()
        if int(index) >= count:
            raise ScenarioError(_missing_gpu(device, int(index), count))
    return device


def _missing_gpu(device: str, index: int, count: int) -> str:
    """Why ``device`` names GPU ``index`` that is not among the ``count`` torch sees."""
    return (
        f'device = "{device}" asks for GPU {index}, but {_gpus_seen(count)}; use one of '
        'those, "cuda" (the current GPU) or "auto"'
    )


def _gpus_seen(count: int) -> str:
    """Which GPUs torch sees, e.g. "torch sees 2 CUDA GPUs (cuda:0 to cuda:1), numbered from 0"."""
    seen = "cuda:0" if count == 1 else f"cuda:0 to cuda:{count - 1}"
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    # torch numbers only the GPUs this variable lets it see, from 0
    mask = f", as CUDA_VISIBLE_DEVICES={visible!r} lets it see" if visible is not None else ""
    return f"torch sees {count} CUDA GPU{'s' if count != 1 else ''} ({seen}{mask}), numbered from 0"


def check_table(device_map: str | dict[str, int | str] | None) -> None:
    """Refuse a device_map table that names a GPU torch does not see.

    Raises:
        ScenarioError: The table puts a module on CUDA and torch sees no CUDA GPU, or
            on a GPU number past those it sees.
    """
    if not isinstance(device_map, dict):
        return
    for module, where in device_map.items():
        name = f"cuda:{where}" if isinstance(where, int) else str(where)
        if not name.startswith("cuda"):
            continue
        if not torch.cuda.is_available():
            raise ScenarioError(
                f"device_map puts {module!r} on {where!r}, but torch sees no CUDA GPU; "
                'use device_map = "auto" (the CPU where there is no GPU) or remove device_map'
            )
        index = name.partition(":")[2]
        if index.isdigit() and int(index) >= torch.cuda.device_count():
            raise ScenarioError(
                f"device_map puts {module!r} on GPU {index}, but "
                f"{_gpus_seen(torch.cuda.device_count())}; use those numbers or "
                'device_map = "auto"'
            )


def pick_dtype(dtype: str, device: str) -> torch.dtype:
    """The torch dtype a scenario's ``dtype`` means on ``device``.

    "auto" is bfloat16 on a GPU that has it (else float16) and float32 on the CPU,
    where half precision is slow.
    """
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


def thread_count(requested: int | None = None) -> tuple[int, str]:
    """The torch CPU threads a run uses, and where the number came from.

    An explicit ``threads`` option wins, then ``ABM_THREADS``, then ``OMP_NUM_THREADS``
    (a sweep's pool sets it to each worker's share of the cores), then the CPUs this
    process may run on.

    Args:
        requested: The LLM player's ``threads`` option, or None.

    Returns:
        The count and its source: "threads", "ABM_THREADS", "OMP_NUM_THREADS" or "cpus".

    Raises:
        ScenarioError: ABM_THREADS is set but not a positive whole number.
    """
    if requested is not None:
        return requested, "threads"
    value = os.environ.get("ABM_THREADS", "").strip()
    if value:
        if not value.isdigit() or int(value) < 1:
            raise ScenarioError(
                f"the environment variable ABM_THREADS={value!r} is not a positive whole "
                "number of threads; set it to e.g. 4, or unset it to use every CPU"
            )
        return int(value), "ABM_THREADS"
    # OpenMP's own syntax allows a list for nested levels ("4,2"): the first is ours
    outer = os.environ.get("OMP_NUM_THREADS", "").split(",")[0].strip()
    if outer.isdigit() and int(outer) > 0:
        return int(outer), "OMP_NUM_THREADS"
    try:
        return len(os.sched_getaffinity(0)), "cpus"
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1, "cpus"


@dataclass(frozen=True)
class WeightEstimate:
    """The memory a model's weights take once loaded, without loading them.

    Attributes:
        parameters: All parameters.
        quantizable: Those in the linear layers bitsandbytes quantizes (not the
            embeddings, norms or output head).
        size: Bytes, given the dtype and quantization it was made for.
        per_parameter: Bytes per parameter of the quantized layers (the dtype's size
            when not quantized).
        stored_as: For a checkpoint saved already quantized, how ("gptq 4-bit"); its
            size is then the bytes its safetensors files store, and ``parameters``
            the count its config gives (else the elements stored, several parameters
            to a packed element). None for weights quantized, if at all, as they load.
    """

    parameters: int
    quantizable: int
    size: int
    per_parameter: float
    stored_as: str | None = None


QUANTIZED_BYTES = {"8bit": 1.0, "4bit": 0.5}


def estimate_weights(
    parameters: int, quantizable: int, dtype: torch.dtype, quantization: str | None = None
) -> WeightEstimate:
    """Bytes of weights: parameters x bytes per parameter for the dtype or quantization.

    Quantization stores the linear layers' weights in 1 (8bit) or 0.5 (4bit) bytes
    each; everything else stays in ``dtype``. The small per-block scales of 4-bit
    weights are left out.

    Args:
        parameters: All parameters of the model.
        quantizable: Those in quantizable linear layers (ignored without quantization).
        dtype: The dtype the model loads in.
        quantization: "8bit", "4bit" or None.

    Returns:
        The estimate.
    """
    element = torch.empty(0, dtype=dtype).element_size()
    if quantization is None:
        return WeightEstimate(parameters, quantizable, parameters * element, float(element))
    per = QUANTIZED_BYTES[quantization]
    size = int(quantizable * per) + (parameters - quantizable) * element
    return WeightEstimate(parameters, quantizable, size, per)


def config_parameters(config: Any) -> tuple[int, int]:
    """(all parameters, those in quantizable linear layers) of a model built from a config.

    The model is built on torch's "meta" device: shapes only, no memory, no weights read.

    Args:
        config: A transformers model configuration.

    Returns:
        The two counts; the output head counts as not quantizable, as in bitsandbytes.
    """
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    skip = (
        {id(p) for p in model.get_output_embeddings().parameters()}
        if hasattr(model, "get_output_embeddings") and model.get_output_embeddings() is not None
        else set()
    )
    total = sum(p.numel() for p in model.parameters())
    linear = sum(
        m.weight.numel()
        for m in model.modules()
        if isinstance(m, torch.nn.Linear) and id(m.weight) not in skip
    )
    return total, linear


def kv_cache_bytes_per_token(config: Any, dtype: torch.dtype) -> int | None:
    """Bytes of key/value cache one token of one prompt takes, from a model's config.

    Keys and values, for every layer, of every key/value head (fewer than the
    attention heads under grouped-query attention): 2 x layers x kv heads x head
    size x the dtype's bytes. Llama-2-7B in bfloat16: 2 x 32 x 32 x 128 x 2 bytes =
    0.5 MiB; Llama-2-70B (8 key/value heads, 80 layers): 0.31 MiB.

    Args:
        config: A transformers model configuration (a multimodal one's text part counts).
        dtype: The dtype the cache is kept in (the model's).

    Returns:
        The bytes, or None when the config does not say its layers and heads.
    """
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    layers = getattr(text, "num_hidden_layers", None)
    heads = getattr(text, "num_attention_heads", None)
    hidden = getattr(text, "hidden_size", None)
    if not layers or not heads or getattr(text, "kv_lora_rank", None):
        return None  # latent attention (DeepSeek) caches compressed keys: not this formula
    if getattr(text, "multi_query", False) and not getattr(text, "new_decoder_architecture", False):
        kv_heads = 1  # Falcon-7B/40B's multi-query attention
    else:
        kv_heads = (
            getattr(text, "num_key_value_heads", None)
            or getattr(text, "num_kv_heads", None)
            or heads
        )
    head_dim = getattr(text, "head_dim", None) or (hidden // heads if hidden else None)
    if not head_dim:
        return None
    return 2 * layers * kv_heads * head_dim * torch.empty(0, dtype=dtype).element_size()


def _config_parameters(source: ModelSource, trust_remote_code: bool) -> tuple[int, int] | None:
    """``config_parameters`` of a model whose config.json is here; None when it is not."""
    from transformers import AutoConfig

    where: str | Path | None = source.location
    if source.converted is not None:
        where = source.converted if (source.converted / "config.json").is_file() else None
    if where is None:
        return None
    try:
        config = AutoConfig.from_pretrained(
            where, local_files_only=True, trust_remote_code=trust_remote_code
        )
        return config_parameters(config)
    except Exception:  # no config here, or an architecture transformers cannot build
        return None


# Past this many bytes of weights a CPU run is a mistake more often than a plan
CPU_WEIGHT_LIMIT = 8 * 2**30


def _cpu_free() -> int | None:
    """Bytes of memory available to new allocations (MemAvailable), None where unknown."""
    try:
        with open("/proc/meminfo", encoding="ascii") as handle:
            for line in handle:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def _gpu_free() -> dict[int, int]:
    """Free bytes of each visible CUDA GPU (empty without CUDA)."""
    if not torch.cuda.is_available():
        return {}
    return {i: torch.cuda.mem_get_info(i)[0] for i in range(torch.cuda.device_count())}


def _gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB"


def check_size(
    source: ModelSource,
    asked: str,
    device: str,
    dtype: torch.dtype,
    *,
    device_map: str | dict[str, int | str] | None = None,
    quantization: str | None = None,
    trust_remote_code: bool = False,
) -> WeightEstimate | None:
    """Refuse a model whose weights cannot fit where they would load, before loading it.

    The estimate is parameters x bytes per parameter (``estimate_weights``), counted
    from the safetensors headers or built from config.json on the meta device; a
    checkpoint saved already quantized (its config.json has a quantization_config)
    counts the bytes its safetensors files store, and is not checked without them. The
    limit is the free memory of the GPU (``device``), of every GPU (``device_map``),
    or of the CPU. A multi-billion-parameter model is also refused on the CPU when it
    landed there only because no GPU was found (device "auto"); when the scenario asks
    for the CPU itself, that is a warning.

    Returns:
        The estimate, or None when neither weights nor a config are here to count, or
        a checkpoint saved quantized has no safetensors files to count.

    Raises:
        ScenarioError: The weights do not fit, naming the field, the estimate and the
            limit; or device "auto", no GPU, and weights past ``CPU_WEIGHT_LIMIT``.
    """
    folder = model_folder(source)
    saved = _saved_quantization(folder)
    if saved is not None:
        # elements x the load dtype would count a packed int32 of eight 4-bit weights as one
        stored = _stored_size(folder)
        if stored is None or stored[1] is None:
            print(
                f"abm: note: {source.name} is saved quantized ({saved}) without safetensors "
                "files to read its size from; the check that its weights fit is skipped",
                file=sys.stderr,
            )
            return None
        split = _config_parameters(source, trust_remote_code)
        params = split[0] if split else stored[0]
        estimate = WeightEstimate(params, params, stored[1], stored[1] / max(params, 1), saved)
        counted = f"has about {params / 1e9:.1f} billion parameters, " if split else "is "
        what = (
            f"{source.name} {counted}saved quantized ({saved}): about "
            f"{estimate.size / 2**30:.0f} GiB as stored"
        )
    else:
        params = _parameter_count(source)
        split = (
            _config_parameters(source, trust_remote_code)
            if quantization or params is None
            else None
        )
        if params is None and split is None:
            return None
        if params is None:
            params = split[0]
        # the header count is exact; the config gives the share of quantizable layers
        quantizable = round(params * split[1] / split[0]) if split and split[0] else params
        estimate = estimate_weights(params, quantizable, dtype, quantization)
        kind = quantization or str(dtype).removeprefix("torch.")
        what = (
            f"{source.name} has about {params / 1e9:.1f} billion parameters, about "
            f"{estimate.size / 2**30:.0f} GiB in {kind}"
        )
    gpus = _gpu_free()
    if device_map is not None and gpus:
        named = (
            {
                # a bare "cuda" is the current GPU, as torch places it
                torch.cuda.current_device()
                if str(v) == "cuda"
                else int(str(v).removeprefix("cuda:"))
                for v in device_map.values()
                if str(v) not in ("cpu", "disk")
            }
            if isinstance(device_map, dict)
            else set(gpus)
        )
        limit = sum(free for i, free in gpus.items() if i in named)
        places = [f"cuda:{i} {_gib(gpus[i])}" for i in sorted(named) if i in gpus]
        offload = isinstance(device_map, dict) and "cpu" in map(str, device_map.values())
        if offload:  # layers the table puts in CPU memory on purpose
            free = _cpu_free() or 0
            limit += free
            places.append(f"cpu {_gib(free)}")
        field = f'device_map = "{device_map}"' if isinstance(device_map, str) else "device_map"
        where = f"the devices it uses have {_gib(limit)} free ({', '.join(places)})"
        _refuse_past(estimate, limit, what, field, where)
        return estimate
    if device.startswith("cuda"):
        index = int(device.partition(":")[2] or torch.cuda.current_device())
        free = gpus.get(index)
        if free is not None:
            # a checkpoint saved quantized keeps its own quantization, whatever is asked
            asks = quantization and not estimate.stored_as
            field = f'quantization = "{quantization}"' if asks else f'device = "{asked}"'
            _refuse_past(estimate, free, what, field, f"cuda:{index} has {_gib(free)} free")
        return estimate
    if device != "cpu":  # mps: no free-memory query
        return estimate
    if estimate.size > CPU_WEIGHT_LIMIT:
        if asked == "auto":
            placed = "device_map" if device_map is not None else 'device = "auto"'
            raise ScenarioError(
                f"{what} on the CPU, and torch sees no CUDA GPU, so {placed} would "
                "run it on the CPU (slowly, if it fits in memory at all); run on a "
                'machine with a GPU, or set device = "cpu" to insist'
            )
        print(f"abm: warning: {what} on the CPU; expect minutes per round", file=sys.stderr)
    free = _cpu_free()
    if free is not None:
        _refuse_past(
            estimate, free, what, f'device = "{asked}"', f"the CPU has {_gib(free)} available"
        )
    return estimate


def _refuse_past(estimate: WeightEstimate, limit: int, what: str, field: str, where: str) -> None:
    if estimate.size <= limit:
        return
    counted = f"{estimate.parameters:,} parameters x {estimate.per_parameter:g} bytes"
    smaller = 'quantization = "8bit" or "4bit", or a smaller model'
    if estimate.stored_as:  # quantizing again would not make it smaller
        counted = f"{estimate.size:,} bytes in its safetensors files"
        smaller = "or a smaller model"
    raise ScenarioError(
        f"{what} ({counted}), which does not fit where {field} loads it: {where} (the "
        'key/value cache needs more on top). Use more or bigger GPUs with device_map = "auto", '
        f"{smaller}"
    )


def placement_options(
    device: str,
    dtype: torch.dtype,
    device_map: str | dict[str, int | str] | None,
    quantization: str | None,
) -> dict[str, Any]:
    """The from_pretrained options that place or quantize the weights (empty for neither)."""
    out: dict[str, Any] = {}
    if device_map is not None:
        out["device_map"] = device_map
    if quantization is not None:
        from transformers import BitsAndBytesConfig

        if quantization == "8bit":
            out["quantization_config"] = BitsAndBytesConfig(load_in_8bit=True)
        else:
            out["quantization_config"] = BitsAndBytesConfig(
                load_in_4bit=True,
                bnb_4bit_quant_type="nf4",
                bnb_4bit_compute_dtype=dtype,
                bnb_4bit_use_double_quant=True,
            )
        # bitsandbytes weights are placed while loading; they cannot be moved after
        out.setdefault(
            "device_map", {"": int(device.partition(":")[2] or torch.cuda.current_device())}
        )
    return out


def _parameter_count(source: ModelSource) -> int | None:
    """Parameters of a local model from its safetensors headers (no weights are read).

    None when the files are not here (hub models not yet cached, GGUF files).
    """
    stored = _stored_size(model_folder(source))
    return stored[0] if stored else None


def _safetensors_files(folder: Path | None) -> list[Path]:
    """The safetensors files of the model in ``folder``: the shards its index names, if any.

    Empty when the index names a shard that is not there (an interrupted download):
    the shards present would count too little, and the config counts instead.
    """
    if folder is None:
        return []
    files = sorted(folder.glob("*.safetensors"))
    index = folder / "model.safetensors.index.json"
    if index.is_file():  # sharded: only the shards the index names
        shards = indexed_shards(index)
        files = [f for f in files if f.name in (shards or ())]
        if not shards or len(files) < len(shards):
            return []
    return files


def _saved_quantization(folder: Path | None) -> str | None:
    """How a checkpoint saved already quantized was ("gptq 4-bit"), from its config.json.

    None when its config.json has no quantization_config, or is not here.
    """
    if folder is None:
        return None
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError):
        return None
    saved = config.get("quantization_config") if isinstance(config, dict) else None
    if not isinstance(saved, dict) or not saved:
        return None
    method = str(saved.get("quant_method") or "quantized")
    bits = saved.get("bits")
    if method == "bitsandbytes":
        bits = 4 if saved.get("load_in_4bit") else 8 if saved.get("load_in_8bit") else None
    return f"{method} {bits}-bit" if isinstance(bits, int) else method


def _stored_size(folder: Path | None) -> tuple[int, int | None] | None:
    """(elements, bytes) the safetensors files in ``folder`` store, read from their headers.

    Each tensor counts its elements x its stored dtype's size: a uint8 or int32
    tensor of packed 4-bit weights counts the bytes it takes, not the parameters it
    holds. None without safetensors files; the bytes are None where a dtype's size is
    unknown.
    """
    files = _safetensors_files(folder)
    if not files:
        return None
    from safetensors import safe_open

    elements = size = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                tensor = handle.get_slice(key)
                count = int(np.prod(tensor.get_shape()))
                bits = _dtype_bits(tensor.get_dtype())
                elements += count
                if size is not None:
                    size = None if bits is None else size + (count * bits + 7) // 8
    return elements, size


def _dtype_bits(name: str) -> int | None:
    """Bits per element of a safetensors dtype name: "BF16" 16, "F8_E4M3" 8, "U8" 8, "BOOL" 8."""
    if name == "BOOL":
        return 8
    found = re.match(r"[A-Z]+(\d+)", name)
    return int(found.group(1)) if found else None
