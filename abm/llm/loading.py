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
        ScenarioError: The folder is not a model, or a hub model is neither cached
            nor downloadable.
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
        return (
            AutoTokenizer.from_pretrained(source.converted),
            AutoModelForCausalLM.from_pretrained(source.converted, dtype=dtype, **placement),
        )
    options = {"trust_remote_code": trust_remote_code}
    try:
        return (
            AutoTokenizer.from_pretrained(source.location, local_files_only=True, **options),
            AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype, local_files_only=True, **options, **placement
            ),
        )
    except (OSError, ValueError):  # ValueError: a folder with no tokenizer files at all
        if not source.hub:
            raise ScenarioError(
                f"cannot load a model from {source.location}: it needs "
                "config.json, tokenizer files and weights"
            ) from None
    why = _hub_unreachable()
    if why:  # transformers would retry for a minute before saying the same
        raise ScenarioError(
            f"model {source.name!r} is not in the local Hugging Face cache and {why}; "
            f"download it where the hub is reachable (huggingface-cli download {source.name}) "
            "and copy the cache (~/.cache/huggingface), or give a local folder as model"
        )
    try:
        return (
            AutoTokenizer.from_pretrained(source.location, **options),
            AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype, **options, **placement
            ),
        )
    except OSError as exc:
        raise ScenarioError(
            f"model {source.name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded (offline, or no such model?): {str(exc).splitlines()[0]}"
        ) from None


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
