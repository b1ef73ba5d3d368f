"""A transformers causal LM that scores answer phrasings or writes free text, in batches.

Two savings matter on a CPU: the key/value cache of the prompt prefix shared
by every prompt of a run (the rules) is computed once and reused, and
identical prompts are answered once (see ``abm.policies.llm``).
"""

from __future__ import annotations

import contextlib
import copy
import inspect
import os
import shutil
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from abm.errors import ScenarioError
from abm.llm.models import ModelSource

# kept importable from here; it lives in a torch-free module
from abm.llm.stats import BackendStats as BackendStats

Messages = list[dict[str, str]]


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(
            f"device {device!r} was asked for but torch sees no CUDA GPU; "
            'use device = "auto" or "cpu"'
        )
    return device


def _pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[dtype]


class Backend:
    """One loaded model and tokenizer.

    ``stats`` counts the work done (forward passes, tokens, seconds), ``load_seconds``
    the time the load took, and ``revision`` names the weights (the source's revision,
    else the hub commit, else the location).

    Args:
        source: Where the model comes from (a hub name, a local folder or a GGUF file,
            which is converted once and the copy kept).
        device: "auto" (CUDA when torch sees a GPU, else the CPU), "cpu" or "cuda[:i]".
        dtype: "auto" (bfloat16 or float16 on a GPU, float32 on the CPU), "float32",
            "float16" or "bfloat16".
        trust_remote_code: Passed to transformers: run the model's own code from the hub.
        prefix_cache: Keep the key/value cache of the prompt prefix every prompt
            shares, and reuse it.

    Raises:
        ScenarioError: CUDA asked for but not available, a model too big for the CPU
            on device "auto", or a model that cannot be loaded or downloaded.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        prefix_cache: bool = True,
    ) -> None:
        """Load the model and tokenizer onto the device."""
        self.source = source
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        self.prefix_cache = prefix_cache
        self.stats = BackendStats()
        _check_size(source, device, self.device, self.dtype)
        started = time.perf_counter()
        self.tokenizer, self.model = _load(source, self.dtype, trust_remote_code)
        self.model.to(self.device).eval()
        self.revision = (
            source.revision or getattr(self.model.config, "_commit_hash", None) or source.location
        )
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._cache_arg = (
            "cache"
            if "cache" in inspect.signature(self.model.forward).parameters
            else "past_key_values"
        )
        self._keep_arg = next(
            (
                a
                for a in ("logits_to_keep", "num_logits_to_keep")
                if a in inspect.signature(self.model.forward).parameters
            ),
            None,
        )
        eos = self.model.generation_config.eos_token_id
        self._stop_ids = {self.tokenizer.eos_token_id, *(eos if isinstance(eos, list) else [eos])}
        self._stop_ids.discard(None)
        self._prefixes: dict[tuple[int, ...], Any] = {}
        self._anchor: list[int] | None = None
        self._warned_template = False
        self.load_seconds = time.perf_counter() - started

    # ---------------------------------------------------------------- prompts

    @property
    def has_chat_template(self) -> bool:
        """Whether the tokenizer brings a chat template of its own."""
        return bool(getattr(self.tokenizer, "chat_template", None))

    def render(
        self, messages: Messages, answer_prefix: str = "", chat_template: str | None = None
    ) -> str:
        """The exact text the model reads.

        Args:
            messages: The conversation, as role/content dictionaries.
            answer_prefix: Text that opens the assistant's answer.
            chat_template: The scenario's chat format (a Jinja template); None uses the
                tokenizer's own, else "plain" with a warning.

        Returns:
            The conversation in the chat format, ready for the assistant's turn, then
            ``answer_prefix``.
        """
        template = chat_template
        if template is None and not self.has_chat_template:
            from abm.llm.chat_formats import NAMED

            if not self._warned_template:
                print(
                    f"abm: warning: {self.source.name} has no chat template; using the "
                    '"plain" format. Set chat_template (e.g. "vicuna", "llama-2") '
                    "to the format the model was trained with.",
                    file=sys.stderr,
                )
                self._warned_template = True
            template = NAMED["plain"]
        text = self.tokenizer.apply_chat_template(
            messages, chat_template=template, add_generation_prompt=True, tokenize=False
        )
        if answer_prefix:
            # "ASSISTANT:" + "Suspect1: ..." needs the space a human turn would have
            joined = text[-1:].isspace() or answer_prefix[:1].isspace()
            text += answer_prefix if joined or not text else " " + answer_prefix
        return text

    def tokenize(self, text: str) -> list[int]:
        """Token ids of rendered text; templates write their own special tokens."""
        return list(self.tokenizer(text, add_special_tokens=False).input_ids)

    def encode(
        self, messages: Messages, answer_prefix: str = "", chat_template: str | None = None
    ) -> list[int]:
        """Token ids of a conversation ready for the assistant's answer."""
        return self.tokenize(self.render(messages, answer_prefix, chat_template))

    def continuation_ids(self, context: str, text: str) -> list[int]:
        """Token ids ``text`` gets when it follows ``context``, as the model would see them.

        Tokenizing it alone adds a word-start marker under SentencePiece (Llama)
        tokenizers and splits differently from the joined text.

        Raises:
            ScenarioError: ``text`` comes out as no tokens.
        """
        whole, head = self.tokenize(context + text), self.tokenize(context)
        n = _common_prefix([whole, head])
        if n == len(head):
            tail = whole[n:]
        else:  # the joined text merges across the boundary: tokenize the text alone,
            tail = self.tokenize(text)  # without the lone word-start marker it gets
            if len(tail) > 1 and text[:1].isspace() and not self.tokenizer.decode(tail[:1]).strip():
                tail = tail[1:]
        if not tail:
            raise ScenarioError(f"the answer phrasing {text!r} is empty after tokenization")
        return tail

    def label_ids(self, label: str) -> list[int]:
        """Token ids of an action label tokenized on its own.

        Raises:
            ScenarioError: The label comes out as no tokens.
        """
        ids = self.tokenizer(label, add_special_tokens=False).input_ids
        if not ids:
            raise ScenarioError(f"the action label {label!r} is empty after tokenization")
        return ids

    def reset_prefix_cache(self) -> None:
        """Forget cached prefixes, so a new run's work does not depend on earlier runs."""
        self._prefixes.clear()
        self._anchor = None

    # ---------------------------------------------------------------- scoring

    def score(
        self,
        prompts: list[list[int]],
        labels: tuple[list[int], list[int]],
        max_batch_size: int = 16,
    ) -> np.ndarray:
        """Log-probability of each label's full token sequence after each prompt, (n, 2)."""
        return self.score_phrasings(prompts, list(labels), max_batch_size)

    def score_phrasings(
        self, prompts: list[list[int]], phrasings: list[list[int]], max_batch_size: int = 16
    ) -> np.ndarray:
        """Log P(phrasing | prompt) for every prompt and phrasing, shape (n, len(phrasings)).

        The phrasings form a trie: one prefill gives every first token's
        probability, then each deeper level of the trie is one batched decode
        step over the cache rows of its parents, so ten phrasings of one or two
        tokens cost one prefill and one small step, not ten prefills.
        """
        levels: list[list[tuple[int, ...]]] = []
        for depth in range(1, max(map(len, phrasings))):
            levels.append(sorted({tuple(p[:depth]) for p in phrasings if len(p) > depth}))
        out = np.empty((len(prompts), len(phrasings)))
        for start in range(0, len(prompts), max_batch_size):
            batch = prompts[start : start + max_batch_size]
            logits, state = self._prefill(batch, 1)
            logp = {(): torch.log_softmax(logits[:, -1].float(), dim=-1)}
            started = time.perf_counter()
            cache, mask, position = state["cache"], state["mask"], state["next_position"]
            parents: list[tuple[int, ...]] = [()]
            for level in levels:
                parent_row = {node: i for i, node in enumerate(parents)}
                rows = torch.tensor(
                    [
                        b * len(parents) + parent_row[node[:-1]]
                        for b in range(len(batch))
                        for node in level
                    ],
                    device=self.device,
                )
                cache.reorder_cache(rows)
                mask = torch.cat(
                    [mask[rows], torch.ones((len(rows), 1), dtype=mask.dtype, device=self.device)],
                    dim=1,
                )
                position = position[rows]
                tokens = torch.tensor(
                    [node[-1] for _ in batch for node in level], device=self.device
                )
                step = self._forward(tokens, mask, position, cache)
                self.stats.tokens += len(rows)
                position = position + 1
                step = torch.log_softmax(step.float(), dim=-1).view(len(batch), len(level), -1)
                for j, node in enumerate(level):
                    logp[node] = step[:, j]
                parents = level
            rows = slice(start, start + len(batch))
            for k, phrase in enumerate(phrasings):
                out[rows, k] = (
                    sum(logp[tuple(phrase[:t])][:, token] for t, token in enumerate(phrase))
                    .cpu()
                    .numpy()
                )
            self.stats.seconds += time.perf_counter() - started
        return out

    def _forward(
        self, tokens: torch.Tensor, mask: torch.Tensor, position: torch.Tensor, cache: Any
    ) -> torch.Tensor:
        """One new token per row on top of ``cache``; the next-token logits (B, V)."""
        kwargs = {
            "input_ids": tokens[:, None],
            "attention_mask": mask,
            "position_ids": position[:, None],
            "use_cache": True,
            self._cache_arg: cache,
        }
        with torch.inference_mode():
            logits = self.model(**kwargs).logits[:, -1]
        self.stats.forward_passes += 1
        return logits

    def _prefill(self, seqs: list[list[int]], k: int) -> tuple[torch.Tensor, dict[str, Any]]:
        """Run the batch, reusing the cached KV of the prefix all sequences share.

        Sequences are padded in the middle, between the shared prefix and their
        own suffix, so that they all end in the same column: the last ``k``
        positions then line up, the LM head runs on those alone, and generation
        can append one column at a time. Returns the logits (B, k, V) and the
        state generation continues from.
        """
        started = time.perf_counter()
        prefix_len = 0
        if self.prefix_cache:
            # Measure the shared prefix against the first prompt this backend ever saw,
            # not just within the batch: then the rules every prompt of a run starts
            # with map to the same cached prefix whatever else a batch shares.
            self._anchor = self._anchor or seqs[0]
            prefix_len = _common_prefix([self._anchor, *seqs])
            prefix_len = max(0, min(prefix_len, *(len(s) - k for s in seqs)))
        cache = self._prefix(tuple(seqs[0][:prefix_len])) if prefix_len > 0 else None
        suffixes = [s[prefix_len:] for s in seqs]
        lengths = [len(s) for s in suffixes]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor(
            [[pad] * (width - n) + s for s, n in zip(suffixes, lengths, strict=True)],
            device=self.device,
        )
        mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long, device=self.device)
        mask[:, :prefix_len] = 1
        positions = torch.zeros((len(seqs), width), dtype=torch.long, device=self.device)
        for i, n in enumerate(lengths):
            mask[i, prefix_len + width - n :] = 1
            positions[i, width - n :] = prefix_len + torch.arange(n, device=self.device)
        if cache is None:
            cache = self._new_cache()
        else:
            cache = copy.deepcopy(cache)
            cache.batch_repeat_interleave(len(seqs))
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            self._cache_arg: cache,
        }
        if self._keep_arg:
            kwargs[self._keep_arg] = k
        with torch.inference_mode():
            logits = self.model(**kwargs).logits[:, -k:]
        self.stats.forward_passes += 1
        self.stats.tokens += sum(lengths)
        self.stats.seconds += time.perf_counter() - started
        state = {
            "cache": cache,
            "mask": mask,
            "next_position": torch.tensor([prefix_len + n for n in lengths], device=self.device),
        }
        return logits, state

    def _new_cache(self) -> Any:
        from transformers import DynamicCache

        try:
            return DynamicCache(config=self.model.config)
        except TypeError:  # older releases take no config
            return DynamicCache()

    def _prefix(self, key: tuple[int, ...]) -> Any:
        if key in self._prefixes:
            self.stats.prefix_hits += 1
            return self._prefixes[key]
        ids = torch.tensor([list(key)], device=self.device)
        kwargs = {self._keep_arg: 1} if self._keep_arg else {}
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True, **kwargs)
        self.stats.forward_passes += 1
        self.stats.tokens += len(key)
        if len(self._prefixes) >= 8:  # a run has one or two shared prefixes; stay small
            self._prefixes.pop(next(iter(self._prefixes)))
        self._prefixes[key] = out.past_key_values
        return out.past_key_values

    # ---------------------------------------------------------------- generation

    def generate(
        self,
        prompts: list[list[int]],
        *,
        temperature: float = 0.0,
        top_p: float = 1.0,
        max_new_tokens: int = 32,
        seed: int = 0,
        max_batch_size: int = 16,
    ) -> list[str]:
        """Free-text answers, batched, on top of the shared-prefix cache.

        Greedy when ``temperature`` is 0; otherwise temperature and nucleus
        (``top_p``) sampling from a torch generator seeded with ``seed`` (and the
        batch's position), so a run is reproducible.
        """
        answers: list[str] = []
        for start in range(0, len(prompts), max_batch_size):
            batch = prompts[start : start + max_batch_size]
            generator = torch.Generator(device=self.device).manual_seed(seed + start)
            answers += self._decode(batch, temperature, top_p, max_new_tokens, generator)
        return answers

    def _decode(
        self,
        batch: list[list[int]],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        generator: torch.Generator,
    ) -> list[str]:
        logits, state = self._prefill(batch, 1)
        started = time.perf_counter()
        stop = torch.tensor(sorted(self._stop_ids), device=self.device)
        done = torch.zeros(len(batch), dtype=torch.bool, device=self.device)
        new: list[torch.Tensor] = []
        cache, mask, position = state["cache"], state["mask"], state["next_position"]
        for step in range(max_new_tokens):
            token = self._pick(logits[:, -1].float(), temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, self.tokenizer.pad_token_id), token)
            new.append(token)
            done |= torch.isin(token, stop)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            mask = torch.cat(
                [mask, torch.ones((len(batch), 1), dtype=mask.dtype, device=self.device)], dim=1
            )
            logits = self._forward(token, mask, position, cache)[:, None]
            position = position + 1
        rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in batch]
        self.stats.generate_calls += 1
        self.stats.tokens += sum(len(r) for r in rows)
        self.stats.seconds += time.perf_counter() - started
        return [
            self.tokenizer.decode(
                _until_stop(row, self._stop_ids), skip_special_tokens=True
            ).strip()
            for row in rows
        ]

    @staticmethod
    def _pick(
        logits: torch.Tensor, temperature: float, top_p: float, generator: torch.Generator
    ) -> torch.Tensor:
        if temperature <= 0:
            return logits.argmax(dim=-1)
        probs = torch.softmax(logits / temperature, dim=-1)
        if top_p < 1.0:
            sorted_probs, order = probs.sort(dim=-1, descending=True)
            # keep the smallest set of tokens whose mass reaches top_p (always the first)
            drop = sorted_probs.cumsum(dim=-1) - sorted_probs > top_p
            sorted_probs[drop] = 0.0
            probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
        return torch.multinomial(probs, 1, generator=generator)[:, 0]


def _until_stop(row: list[int], stop: set[int]) -> list[int]:
    for i, token in enumerate(row):
        if token in stop:
            return row[:i]
    return row


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


# Past this many bytes of weights a CPU run is a mistake more often than a plan
CPU_WEIGHT_LIMIT = 8 * 2**30


def _check_size(source: ModelSource, asked: str, device: str, dtype: torch.dtype) -> None:
    """Refuse a multi-billion-parameter model on the CPU only because no GPU was found.

    That is device = "auto"; when the scenario asks for the CPU itself, warn instead.

    Raises:
        ScenarioError: Device "auto", no GPU, and weights past ``CPU_WEIGHT_LIMIT``.
    """
    if device != "cpu":
        return
    params = _parameter_count(source)
    if params is None:
        return
    size = params * torch.empty(0, dtype=dtype).element_size()
    if size <= CPU_WEIGHT_LIMIT:
        return
    what = (
        f"{source.name} has about {params / 1e9:.1f} billion parameters, about "
        f"{size / 2**30:.0f} GiB in {str(dtype).removeprefix('torch.')} on the CPU"
    )
    if asked == "auto":
        raise ScenarioError(
            f'{what}, and torch sees no CUDA GPU, so device = "auto" would '
            "run it on the CPU (slowly, if it fits in memory at all); run on a "
            'machine with a GPU, or set device = "cpu" to insist'
        )
    print(f"abm: warning: {what}; expect minutes per round", file=sys.stderr)


def _parameter_count(source: ModelSource) -> int | None:
    """Parameters of a local model from its safetensors headers (no weights are read).

    None when the files are not here (hub models not yet cached, GGUF files).
    """
    folder: Path | None = None
    if source.converted is not None:
        folder = source.converted if (source.converted / "config.json").is_file() else None
    elif source.hub:
        try:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(source.location, local_files_only=True))
        except Exception:  # not cached: the load will say so
            return None
    else:
        folder = Path(source.location)
    files = sorted(folder.glob("*.safetensors")) if folder is not None else []
    index = folder / "model.safetensors.index.json" if folder is not None else None
    if index is not None and index.is_file():  # sharded: only the shards the index names
        import json

        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        files = [f for f in files if f.name in shards]
    if not files:
        return None
    from safetensors import safe_open

    total = 0
    for path in files:
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118 (a safetensors file, not a dict)
                total += int(np.prod(handle.get_slice(key).get_shape()))
    return total


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


def _load(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
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
                return tokenizer, model.to(dtype)
        return (
            AutoTokenizer.from_pretrained(source.converted),
            AutoModelForCausalLM.from_pretrained(source.converted, dtype=dtype),
        )
    options = {"trust_remote_code": trust_remote_code}
    try:
        return (
            AutoTokenizer.from_pretrained(source.location, local_files_only=True, **options),
            AutoModelForCausalLM.from_pretrained(
                source.location, dtype=dtype, local_files_only=True, **options
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
            AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **options),
        )
    except OSError as exc:
        raise ScenarioError(
            f"model {source.name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded (offline, or no such model?): {str(exc).splitlines()[0]}"
        ) from None


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
