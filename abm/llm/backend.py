"""A transformers causal LM that scores the two action labels or writes free text, in batches.

Two savings matter on a CPU: the key/value cache of the prompt prefix shared
by every prompt of a run (the rules) is computed once and reused, and
identical prompts are answered once (see ``abm.policies.llm``).
"""

from __future__ import annotations

import copy
import inspect
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from abm.errors import ScenarioError
from abm.llm.models import ModelSource

Messages = list[dict[str, str]]


@dataclass
class BackendStats:
    """Work done by one backend, for summary.json."""

    forward_passes: int = 0
    generate_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    prefix_hits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)


def _pick_device(device: str) -> str:
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ScenarioError(f"device {device!r} was asked for but torch sees no CUDA GPU; "
                            "use device = \"auto\" or \"cpu\"")
    return device


def _pick_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        if device.startswith("cuda"):
            return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
        return torch.float32
    return {"float32": torch.float32, "float16": torch.float16,
            "bfloat16": torch.bfloat16}[dtype]


class Backend:
    """One loaded model and tokenizer."""

    def __init__(self, source: ModelSource, *, device: str = "auto", dtype: str = "auto",
                 trust_remote_code: bool = False, prefix_cache: bool = True) -> None:
        self.source = source
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        self.prefix_cache = prefix_cache
        self.stats = BackendStats()
        started = time.perf_counter()
        self.tokenizer, self.model = _load(source, self.dtype, trust_remote_code)
        self.model.to(self.device).eval()
        self.revision = (source.revision or getattr(self.model.config, "_commit_hash", None)
                         or source.location)
        if self.tokenizer.pad_token_id is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self._cache_arg = ("cache" if "cache" in inspect.signature(self.model.forward).parameters
                           else "past_key_values")
        self._prefixes: dict[tuple[int, ...], Any] = {}
        self._anchor: list[int] | None = None
        self.load_seconds = time.perf_counter() - started

    # ---------------------------------------------------------------- prompts

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def encode(self, messages: Messages, answer_prefix: str = "") -> list[int]:
        """Token ids of a conversation ready for the assistant's answer."""
        if self.has_chat_template:
            ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                     tokenize=True)
            if not isinstance(ids, list):  # newer releases return a BatchEncoding
                ids = ids["input_ids"]
            ids = list(ids)
        else:
            text = "\n\n".join(m["content"] for m in messages) + "\n\n"
            ids = self.tokenizer(text).input_ids
        if answer_prefix:
            ids += self.tokenizer(answer_prefix, add_special_tokens=False).input_ids
        return ids

    def label_ids(self, label: str) -> list[int]:
        ids = self.tokenizer(label, add_special_tokens=False).input_ids
        if not ids:
            raise ScenarioError(f"the action label {label!r} is empty after tokenization")
        return ids

    # ---------------------------------------------------------------- scoring

    def score(self, prompts: list[list[int]], labels: tuple[list[int], list[int]],
              max_batch_size: int = 16) -> np.ndarray:
        """Log-probability of each label's full token sequence after each prompt, (n, 2)."""
        a, b = labels
        out = np.empty((len(prompts), 2))
        for start in range(0, len(prompts), max_batch_size):
            batch = prompts[start:start + max_batch_size]
            rows = slice(start, start + len(batch))
            if len(a) == 1 and len(b) == 1:  # both labels read off the last position
                logp = self._last_logprobs(batch)
                out[rows] = logp[:, [a[0], b[0]]]
            elif len(a) == 1 or len(b) == 1:  # one sequence: prompt + the longer label
                long, short = (a, b) if len(b) == 1 else (b, a)
                got = self._packed_logprobs(batch, long, short[0])
                out[rows] = got if long is a else got[:, ::-1]
            else:
                seqs = [p + lab for p in batch for lab in labels]
                totals = self._sequence_logprobs(seqs, [len(lab) for _ in batch for lab in labels])
                out[rows] = totals.reshape(-1, 2)
        return out

    def _packed_logprobs(self, prompts: list[list[int]], long: list[int], short: int) -> np.ndarray:
        """(log P(long), log P(short)) from one pass over prompt + long[:-1] per prompt."""
        k = len(long)
        logits, lengths, _ = self._forward([p + long[:-1] for p in prompts], [k] * len(prompts))
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = np.zeros((len(prompts), 2))
        targets = torch.tensor(long)
        for i, n in enumerate(lengths):
            first = n - k  # the prompt's last position: predicts long[0] and short
            out[i, 0] = logp[i, first + torch.arange(k), targets].sum().item()
            out[i, 1] = logp[i, first, short].item()
        return out

    def _last_logprobs(self, seqs: list[list[int]]) -> np.ndarray:
        logits, lengths, _ = self._forward(seqs, [1] * len(seqs))
        rows = torch.arange(len(seqs))
        last = logits[rows, torch.tensor(lengths) - 1].float()
        return torch.log_softmax(last, dim=-1).cpu().numpy()

    def _sequence_logprobs(self, seqs: list[list[int]], tail: list[int]) -> np.ndarray:
        # the position before the first label token must be in the suffix: keep k + 1
        logits, lengths, _ = self._forward(seqs, [k + 1 for k in tail])
        logp = torch.log_softmax(logits.float(), dim=-1)
        out = np.zeros(len(seqs))
        for i, (seq_len, k) in enumerate(zip(lengths, tail)):
            # label token j sits at suffix position seq_len - k + j, predicted one before
            pos = torch.arange(seq_len - k, seq_len)
            targets = torch.tensor(seqs[i][len(seqs[i]) - k:])
            out[i] = logp[i, pos - 1, targets].sum().item()
        return out

    def _forward(self, seqs: list[list[int]], keep: list[int]) -> tuple[torch.Tensor, list[int], int]:
        """Run the batch, reusing the cached KV of the prefix all sequences share.

        ``keep[i]`` is how many final tokens of sequence i must be computed (not
        taken from the cache). Returns logits over the suffix positions
        (right-padded), each sequence's suffix length, and the prefix length.
        """
        started = time.perf_counter()
        prefix_len = 0
        if self.prefix_cache:
            # Measure the shared prefix against the first prompt this backend ever saw,
            # not just within the batch: then the rules every prompt of a run starts
            # with map to the same cached prefix whatever else a batch shares.
            self._anchor = self._anchor or seqs[0]
            prefix_len = _common_prefix([self._anchor, *seqs])
            prefix_len = max(0, min(prefix_len, *(len(s) - k for s, k in zip(seqs, keep))))
        cache = self._prefix(tuple(seqs[0][:prefix_len])) if prefix_len > 0 else None
        suffixes = [s[prefix_len:] for s in seqs]
        lengths = [len(s) for s in suffixes]
        width = max(lengths)
        pad = self.tokenizer.pad_token_id
        ids = torch.tensor([s + [pad] * (width - len(s)) for s in suffixes], device=self.device)
        mask = torch.zeros((len(seqs), prefix_len + width), dtype=torch.long, device=self.device)
        mask[:, :prefix_len] = 1
        for i, n in enumerate(lengths):
            mask[i, prefix_len:prefix_len + n] = 1
        positions = (prefix_len + torch.arange(width, device=self.device)).expand(len(seqs), -1)
        kwargs: dict[str, Any] = {"input_ids": ids, "attention_mask": mask,
                                  "position_ids": positions, "use_cache": cache is not None}
        if cache is not None:
            batch_cache = copy.deepcopy(cache)
            batch_cache.batch_repeat_interleave(len(seqs))
            kwargs[self._cache_arg] = batch_cache
        with torch.inference_mode():
            logits = self.model(**kwargs).logits
        self.stats.forward_passes += 1
        self.stats.tokens += sum(lengths)
        self.stats.seconds += time.perf_counter() - started
        return logits, lengths, prefix_len

    def _prefix(self, key: tuple[int, ...]) -> Any:
        if key in self._prefixes:
            self.stats.prefix_hits += 1
            return self._prefixes[key]
        ids = torch.tensor([list(key)], device=self.device)
        with torch.inference_mode():
            out = self.model(input_ids=ids, use_cache=True)
        self.stats.forward_passes += 1
        self.stats.tokens += len(key)
        if len(self._prefixes) >= 8:  # a run has one or two shared prefixes; stay small
            self._prefixes.pop(next(iter(self._prefixes)))
        self._prefixes[key] = out.past_key_values
        return out.past_key_values

    # ---------------------------------------------------------------- generation

    def generate(self, prompts: list[list[int]], *, temperature: float = 0.0, top_p: float = 1.0,
                 max_new_tokens: int = 32, seed: int = 0, max_batch_size: int = 16) -> list[str]:
        """Free-text answers, batched with left padding; sampling is seeded per batch."""
        answers: list[str] = []
        pad = self.tokenizer.pad_token_id
        for start in range(0, len(prompts), max_batch_size):
            started = time.perf_counter()
            batch = prompts[start:start + max_batch_size]
            width = max(len(p) for p in batch)
            ids = torch.tensor([[pad] * (width - len(p)) + p for p in batch], device=self.device)
            mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch],
                                device=self.device)
            torch.manual_seed(seed + start)
            sampling = {"do_sample": True, "temperature": temperature, "top_p": top_p} \
                if temperature > 0 else {"do_sample": False}
            with torch.inference_mode():
                out = self.model.generate(input_ids=ids, attention_mask=mask,
                                          max_new_tokens=max_new_tokens, pad_token_id=pad,
                                          **sampling)
            new = out[:, width:]
            answers += [self.tokenizer.decode(row, skip_special_tokens=True).strip()
                        for row in new]
            self.stats.generate_calls += 1
            self.stats.tokens += int(mask.sum()) + int((new != pad).sum())
            self.stats.seconds += time.perf_counter() - started
        return answers


def _common_prefix(seqs: list[list[int]]) -> int:
    first = seqs[0]
    n = min(len(s) for s in seqs)
    for s in seqs[1:]:
        i = 0
        while i < n and s[i] == first[i]:
            i += 1
        n = i
    return n


def _load(source: ModelSource, dtype: torch.dtype, trust_remote_code: bool) -> tuple[Any, Any]:
    hf_logging.set_verbosity_error()  # conversion progress bars and notices are not ours
    hf_logging.disable_progress_bar()
    if source.converted is not None:
        if (source.converted / "config.json").is_file():
            return (AutoTokenizer.from_pretrained(source.converted),
                    AutoModelForCausalLM.from_pretrained(source.converted, dtype=dtype))
        print(f"abm: converting {source.name} from GGUF once (about 20 s); the copy is kept in "
              f"{source.converted}", file=sys.stderr)
        tokenizer = AutoTokenizer.from_pretrained(source.location, gguf_file=source.gguf_file)
        model = AutoModelForCausalLM.from_pretrained(source.location, gguf_file=source.gguf_file,
                                                     dtype=torch.float32)
        _save_converted(tokenizer, model, source.converted)
        return tokenizer, model.to(dtype)
    options = {"trust_remote_code": trust_remote_code}
    try:
        return (AutoTokenizer.from_pretrained(source.location, local_files_only=True, **options),
                AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype,
                                                     local_files_only=True, **options))
    except OSError:
        if not source.hub:
            raise ScenarioError(f"cannot load a model from {source.location}: it needs "
                                "config.json, tokenizer files and weights") from None
    try:
        return (AutoTokenizer.from_pretrained(source.location, **options),
                AutoModelForCausalLM.from_pretrained(source.location, dtype=dtype, **options))
    except OSError as exc:
        raise ScenarioError(
            f"model {source.name!r} is not in the local Hugging Face cache and could not be "
            f"downloaded (offline, or no such model?): {str(exc).splitlines()[0]}") from None


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
    partial = folder.with_name(folder.name + ".partial")
    partial.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(partial)
    tokenizer.save_pretrained(partial)
    if folder.exists():
        import shutil
        shutil.rmtree(folder)
    partial.rename(folder)
