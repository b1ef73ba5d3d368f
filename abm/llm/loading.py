"""Loading a model and its tokenizer: a local folder, the hub's cache, a GGUF file, an adapter.

A GGUF file is converted once and the copy kept (one process converts while the
others wait); a hub model is read from the local cache, and downloaded only
when the hub answers.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from abm.errors import ScenarioError
from abm.llm.models import ModelSource

HUB_HOST = ("huggingface.co", 443)


def _hub_unreachable(timeout: float = 3.0) -> str | None:
    """Why the Hugging Face hub cannot be used now, or None.

    It cannot when offline mode is set, or when a connection to it does not open
    within ``timeout`` seconds.
    """
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "") not in ("", "0"):
        return "HF_HUB_OFFLINE is set"
    import socket

    try:
        socket.create_connection(HUB_HOST, timeout=timeout).close()
    except OSError as exc:
        return f"the hub cannot be reached ({exc.strerror or exc})"
    return None


def load_model(
    source: ModelSource,
    dtype: torch.dtype,
    trust_remote_code: bool,
    placement: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
    """The tokenizer and model of ``source``, in ``dtype``, placed as ``placement`` says.

    Args:
        source: A local folder, a hub name (read from the local cache; downloaded
            only when the hub answers) or a GGUF file (converted once, the copy kept).
        dtype: The dtype the weights load in.
        trust_remote_code: Passed to transformers.
        placement: ``placement_options``'s from_pretrained options (device_map,
            quantization), or None to load on the CPU and move later.

    Raises:
        ScenarioError: The folder is not a model, a hub model is neither cached nor
            downloadable, or its files are all here and transformers refuses to load
            them (then with transformers' own first line, and the device_map or
            quantization that placed them).
    """
    placement = placement or {}
    hf_logging.set_verbosity_error()  # conversion progress bars and notices are not ours
    hf_logging.disable_progress_bar()
    if source.converted is not None:
        with _conversion_lock(source.converted):
            if not (source.converted / "config.json").is_file():
                print(
                    f"abm: converting {source.name} from GGUF once (about 20 s); the copy "
                    f"is kept in {source.converted}",
                    file=sys.stderr,
                )
                tokenizer = AutoTokenizer.from_pretrained(
                    source.location, gguf_file=source.gguf_file
                )
                model = AutoModelForCausalLM.from_pretrained(
                    source.location, gguf_file=source.gguf_file, dtype=torch.float32
                )
                _save_converted(tokenizer, model, source.converted)
                if not placement:
                    return tokenizer, model.to(dtype)
        tokenizer = AutoTokenizer.from_pretrained(source.converted)
        try:
            model = AutoModelForCausalLM.from_pretrained(source.converted, dtype=dtype, **placement)
        except (OSError, ValueError) as exc:  # the copy is whole: placement failed
            raise _load_failure(source, source.converted, exc, placement) from None
        return tokenizer, model
    options = {"trust_remote_code": trust_remote_code}
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, local_files_only=True, **options)
    except (OSError, ValueError):  # ValueError: a folder with no tokenizer files at all
        tokenizer = None
    if tokenizer is not None:
        try:
            return tokenizer, AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype, local_files_only=True, **options, **placement
            )
        except (OSError, ValueError) as exc:
            folder = complete_folder(source)
            if folder is not None:  # nothing is missing: saying so would send users astray
                raise _load_failure(source, folder, exc, placement) from None
    if not source.hub:
        raise ScenarioError(
            f"cannot load a model from {source.location}: it needs "
            "config.json, tokenizer files and weights"
        )
    why = _hub_unreachable()
    if why:  # transformers would retry for a minute before saying the same
        raise ScenarioError(
            f"model {source.name!r} is not in the local Hugging Face cache and {why}; "
            f"download it where the hub is reachable (huggingface-cli download {source.name}) "
            "and copy the cache (~/.cache/huggingface), or give a local folder as model"
        )
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.location, **options)
        return tokenizer, AutoModelForCausalLM.from_pretrained(
            source.location, dtype=dtype, **options, **placement
        )
    except (OSError, ValueError) as exc:
        folder = complete_folder(source) if tokenizer is not None else None
        if folder is not None:  # downloaded whole, then placement or quantization failed
            raise _load_failure(source, folder, exc, placement) from None
        raise ScenarioError(
            f"model {source.name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded (offline, or no such model?): {_first_line(exc)}"
        ) from None


def model_folder(source: ModelSource) -> Path | None:
    """The folder on this machine that holds ``source``'s files, or None.

    A local folder, a GGUF file's converted copy once it exists, or a hub model's
    snapshot in the local Hugging Face cache (None when nothing of it is cached).
    Nothing is downloaded.
    """
    if source.converted is not None:
        return source.converted if (source.converted / "config.json").is_file() else None
    if not source.hub:
        return Path(source.location)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(source.location, local_files_only=True))
    except Exception:  # not cached: whoever loads it will say so
        return None


WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")


def complete_folder(source: ModelSource) -> Path | None:
    """``model_folder`` when it holds config.json and every weight file, else None.

    Sharded weights count only when every shard their index names is there.
    """
    folder = model_folder(source)
    if folder is None or not (folder / "config.json").is_file():
        return None
    for weights in WEIGHT_FILES:
        index = folder / f"{weights}.index.json"
        if index.is_file():
            shards = indexed_shards(index)
            return folder if shards and all((folder / s).is_file() for s in shards) else None
        if (folder / weights).is_file():
            return folder
    return None


def indexed_shards(index: Path) -> set[str] | None:
    """The weight files a sharded checkpoint's index names; None when it cannot be read."""
    import json

    try:
        return set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
    except (OSError, UnicodeDecodeError, ValueError, KeyError, TypeError, AttributeError):
        return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _placement_words(placement: dict[str, Any]) -> tuple[str, list[str]]:
    """How the scenario wrote ``placement`` (e.g. 'quantization = "4bit" on cuda:0'), its fields."""
    import json

    words, fields = [], []
    device_map = placement.get("device_map")
    quantization = placement.get("quantization_config")
    if quantization is not None:
        bits = next(
            (b for b in ("4bit", "8bit") if getattr(quantization, f"load_in_{b}", False)), None
        )
        words.append(f'quantization = "{bits}"' if bits else "quantization")
        fields.append("quantization")
        if isinstance(device_map, dict) and list(device_map) == [""]:
            # the one-GPU table placement_options adds for quantized weights
            words[-1] += f" on {_device_name(device_map[''])}"
            device_map = None
    if isinstance(device_map, str):
        words.append(f'device_map = "{device_map}"')
    elif isinstance(device_map, dict):
        table = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in device_map.items())
        words.append(f"device_map = {{ {table} }}")
    if device_map is not None:
        fields.insert(0, "device_map")
    return " and ".join(words), fields


def _device_name(where: int | str) -> str:
    return f"cuda:{where}" if isinstance(where, int) else str(where)


def _load_failure(
    source: ModelSource, folder: Path, exc: BaseException, placement: dict[str, Any]
) -> ScenarioError:
    """The error for a model whose files are all here but that transformers refused to load.

    Its message is the refusal's own first line, with the fields that placed or
    quantized the weights when the scenario set them.
    """
    words, fields = _placement_words(placement)
    if not fields:
        return ScenarioError(
            f"cannot load model {source.name!r} from {folder}: {_first_line(exc).rstrip('. ')} "
            "(its config.json and weights are there; transformers refused them)"
        )
    return ScenarioError(
        f"cannot load model {source.name!r} with {words}: {_first_line(exc).rstrip('. ')} "
        f"(its config.json and weights are in {folder}, so it is how they are placed or "
        f"quantized that failed); change {' or '.join(fields)}, or use a smaller model"
    )


def with_adapter(
    model: Any, folder: Path, source: ModelSource, quantization: str | None
) -> tuple[Any, str]:
    """The model with a PEFT adapter on top, merged into the weights unless they are quantized.

    The adapter's base model is read from its ``abm_adapter.json`` (written by
    ``python -m abm.finetune``), else from PEFT's ``adapter_config.json``, and must
    be ``source`` (its name or its folder).

    Returns:
        The model and the SHA-256 of the adapter's weights (it names them in records).

    Raises:
        ScenarioError: peft is missing, the folder holds no adapter or an unreadable
            one, or the adapter was trained on another base model.
    """
    import json
    import warnings

    from abm.llm.models import file_digest

    try:
        from peft import PeftModel
    except ModuleNotFoundError:
        raise ScenarioError(
            f"adapter {folder}: loading an adapter needs peft, which is not installed; "
            'pip install -e ".[finetune]"'
        ) from None
    weights = [folder / n for n in ("adapter_model.safetensors", "adapter_model.bin")]
    weights = [w for w in weights if w.is_file()]
    if not (folder / "adapter_config.json").is_file() or not weights:
        raise ScenarioError(
            f"adapter {folder}: not an adapter folder (it needs adapter_config.json and "
            "adapter_model.safetensors, as python -m abm.finetune writes them)"
        )
    try:
        about = folder / "abm_adapter.json"
        if about.is_file():
            base = json.loads(about.read_text(encoding="utf-8")).get("base_model")
        else:
            config = json.loads((folder / "adapter_config.json").read_text(encoding="utf-8"))
            base = config.get("base_model_name_or_path")
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, AttributeError) as exc:
        raise ScenarioError(f"adapter {folder}: cannot read its description ({exc})") from None
    known = {source.name, source.location, str(source.converted)}
    same = base in known or (
        isinstance(base, str)
        and any(Path(base).resolve() == Path(k).resolve() for k in known if k and k != "None")
    )
    if base and not same:
        raise ScenarioError(
            f"adapter {folder} was trained on {base!r}, not on model {source.name!r}; "
            f'set model = "{base}" or give an adapter of this model'
        )
    digest = file_digest(weights[0])
    try:
        with warnings.catch_warnings():  # peft asks transformers a deprecated question
            warnings.simplefilter("ignore", FutureWarning)
            model = PeftModel.from_pretrained(model, str(folder)).eval()
    except (RuntimeError, ValueError, KeyError) as exc:  # shapes of another model
        raise ScenarioError(
            f"adapter {folder} does not fit model {source.name!r}: {str(exc).splitlines()[0]}"
        ) from None
    # merged weights decode as fast as the base model; quantized ones cannot be merged
    return (model if quantization else model.merge_and_unload()), digest


def _save_converted(tokenizer: Any, model: Any, folder) -> None:
    """Keep a de-quantized copy so the next load skips the GGUF conversion (17 s -> 0.2 s)."""
    model.hf_quantizer = None  # the GGUF quantizer marks the model unserialisable
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    for obj in (model, model.config):
        if hasattr(obj, "_is_quantized"):
            obj._is_quantized = False
    if hasattr(model, "is_quantized"):
        model.is_quantized = False
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    if partial.exists():
        shutil.rmtree(partial)
    partial.mkdir(parents=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if folder.exists():  # a leftover without config.json (else we would not convert)
        shutil.rmtree(folder)
    partial.rename(folder)


@contextlib.contextmanager
def _conversion_lock(folder: Path) -> Iterator[None]:
    """Hold the lock on converting the model kept in ``folder``.

    One process converts a model while the others (pool workers, Ray actors on one
    machine) wait, then load the finished copy instead of converting it again.
    """
    folder.parent.mkdir(parents=True, exist_ok=True)
    try:
        import fcntl
    except ImportError:  # no advisory locks here: per-process partial folders still keep
        yield  # concurrent conversions from clashing
        return
    with open(folder.with_name(f"{folder.name}.lock"), "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
