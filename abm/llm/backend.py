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
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer
from transformers.utils import logging as hf_logging

from abm.errors import ScenarioError
from abm.llm.models import ModelSource
from abm.llm.static_decode import DECODE_PATHS, StaticDecoder, UnsupportedModel, resolve_decode

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
        device_map: accelerate's placement of the layers over the devices present
            ("auto", "balanced", ... or a module-to-device table); None puts the whole
            model on ``device``.
        quantization: "8bit" or "4bit" (bitsandbytes, CUDA only), or None.
        decode: How ``generate`` steps through new tokens: "eager" (a growing cache,
            one plain call per token), "static" (a preallocated cache of fixed shapes,
            ``abm.llm.static_decode``), "compiled" (the static steps compiled with
            ``torch.compile``, CUDA graphs on CUDA) or "auto" (eager, until the
            compiled path is verified on a GPU). A model the static cache cannot
            hold decodes eagerly, and a failed compilation falls back to "static",
            each with one warning; ``loading()`` says which path ran.

    Raises:
        ScenarioError: CUDA asked for but not available, a model whose weights do not
            fit in the free memory it would load into (or too big for the CPU on
            device "auto"), a model that cannot be loaded or downloaded, or an
            unknown ``decode``.
    """

    def __init__(
        self,
        source: ModelSource,
        *,
        device: str = "auto",
        dtype: str = "auto",
        trust_remote_code: bool = False,
        prefix_cache: bool = True,
        device_map: str | dict[str, int | str] | None = None,
        quantization: str | None = None,
        decode: str = "auto",
        adapter: str | None = None,
    ) -> None:
        """Load the model and tokenizer onto the device."""
        _check_decode(decode)
        self.source = source
        self.device = _pick_device(device)
        self.dtype = _pick_dtype(dtype, self.device)
        self.prefix_cache = prefix_cache
        self.device_map = device_map
        self.quantization = quantization
        self.threads: int | None = None
        self.threads_from: str | None = None
        self.stats = BackendStats()
        self.estimate = _check_size(
            source,
            device,
            self.device,
            self.dtype,
            device_map=device_map,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
        )
        placement = _placement(self.device, self.dtype, device_map, quantization)
        started = time.perf_counter()
        self.tokenizer, self.model = _load(source, self.dtype, trust_remote_code, placement)
        if placement:  # accelerate placed the layers; inputs go where the embeddings are
            self.model.eval()
            self.device = str(self.model.get_input_embeddings().weight.device)
        else:
            self.model.to(self.device).eval()
        self.placed_on = sorted(
            {str(d) for d in (getattr(self.model, "hf_device_map", None) or {}).values()}
        ) or [self.device]
        self.revision = (
            source.revision or getattr(self.model.config, "_commit_hash", None) or source.location
        )
        self.adapter = adapter
        if adapter is not None:
            self.model, digest = with_adapter(self.model, Path(adapter), source, quantization)
            self.revision = f"{self.revision} + adapter {digest[:12]}"
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
        self._decoders: dict[str, StaticDecoder] = {}  # by path: "static", "compiled"
        self.set_decode(decode)
        self.load_seconds = time.perf_counter() - started

    def set_decode(self, decode: str) -> None:
        """Choose how ``generate`` steps through new tokens (see the class's ``decode``).

        Static decoders already built are kept, so switching back and forth (as a
        benchmark does) compiles nothing twice.

        Raises:
            ScenarioError: ``decode`` is not "auto", "eager", "static" or "compiled".
        """
        _check_decode(decode)
        self.decode = decode
        self.decode_path = resolve_decode(decode, self.device)
        self.decode_fallback: str | None = None

    def set_threads(self, requested: int | None = None) -> int:
        """Set torch's CPU thread count for this process (see ``thread_count``).

        Returns:
            The count now in force.
        """
        self.threads, self.threads_from = thread_count(requested)
        if torch.get_num_threads() != self.threads:
            torch.set_num_threads(self.threads)
        return self.threads

    def loading(self) -> dict[str, Any]:
        """How the model was loaded, for summary.json."""
        out: dict[str, Any] = {
            "device": self.device,
            "dtype": str(self.dtype).removeprefix("torch."),
            "device_map": self.device_map,
            "quantization": self.quantization,
            "placed_on": self.placed_on,
            "threads": self.threads if self.threads is not None else torch.get_num_threads(),
            "threads_from": self.threads_from or "torch",
        }
        if self.adapter is not None:
            out["adapter"] = self.adapter
        if self.estimate is not None:
            out["weights_gib_estimate"] = round(self.estimate.size / 2**30, 2)
        out["decode"] = self.decode
        out["decode_path"] = self.decode_path
        if self.decode_fallback:
            out["decode_fallback"] = self.decode_fallback
        return out

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
        stop: Sequence[str] = (),
    ) -> list[str]:
        """Free-text answers, batched, on top of the shared-prefix cache.

        Greedy when ``temperature`` is 0; otherwise temperature and nucleus
        (``top_p``) sampling from a torch generator seeded with ``seed`` (and the
        batch's position), so a run is reproducible.

        Args:
            prompts: Token ids of each prompt.
            temperature: 0 for greedy decoding, else the sampling temperature.
            top_p: Nucleus sampling mass.
            max_new_tokens: The most tokens an answer gets.
            seed: Seeds the sampling.
            max_batch_size: Prompts per forward pass.
            stop: Strings that end an answer once it has begun (leading white space
                does not count); each sequence of a batch stops on its own, and the
                answer is cut before the stop string.

        Returns:
            One answer per prompt, stripped of surrounding white space.
        """
        answers: list[str] = []
        for start in range(0, len(prompts), max_batch_size):
            batch = prompts[start : start + max_batch_size]
            generator = torch.Generator(device=self.device).manual_seed(seed + start)
            answers += self._decode(
                batch, temperature, top_p, max_new_tokens, generator, tuple(stop)
            )
        return answers

    def _decode(
        self,
        batch: list[list[int]],
        temperature: float,
        top_p: float,
        max_new_tokens: int,
        generator: torch.Generator,
        stop_strings: tuple[str, ...] = (),
    ) -> list[str]:
        logits, state = self._prefill(batch, 1)
        started = time.perf_counter()
        advance = self._stepper(state, max_new_tokens)
        del state  # the static path copied the prefill's cache; let it go
        stop = torch.tensor(sorted(self._stop_ids), device=self.device)
        done = torch.zeros(len(batch), dtype=torch.bool, device=self.device)
        new: list[torch.Tensor] = []
        for step in range(max_new_tokens):
            token = self._pick(logits[:, -1].float(), temperature, top_p, generator)
            token = torch.where(done, torch.full_like(token, self.tokenizer.pad_token_id), token)
            new.append(token)
            done |= torch.isin(token, stop)
            if stop_strings:
                done |= self._stopped(new, done, stop_strings)
            if bool(done.all()) or step == max_new_tokens - 1:
                break
            logits = advance(token)[:, None]
        rows = torch.stack(new, dim=1).tolist() if new else [[] for _ in batch]
        self.stats.generate_calls += 1
        self.stats.tokens += sum(len(r) for r in rows)
        self.stats.seconds += time.perf_counter() - started
        return [_cut(self._text(row), stop_strings).strip() for row in rows]

    def _stepper(self, state: dict[str, Any], max_new_tokens: int) -> Any:
        """A function from the tokens just picked (B,) to the next logits (B, V).

        It continues from ``_prefill``'s state on the decode path in force: a growing
        cache and mask, or a static cache (``abm.llm.static_decode``).
        """
        decoder = self._static_decoder()
        if decoder is not None:
            run = decoder.start(
                state["cache"], state["mask"], state["next_position"], max_new_tokens
            )

            def static(token: torch.Tensor) -> torch.Tensor:
                logits = decoder.step(run, token)
                self.stats.forward_passes += 1
                if decoder.fallback and not self.decode_fallback:
                    self.decode_path, self.decode_fallback = decoder.path, decoder.fallback
                    # it runs uncompiled from now on: keep it, and its caches, as the static one
                    self._decoders.pop("compiled", None)
                    self._decoders.setdefault("static", decoder)
                return logits

            return static
        cache, mask, position = state["cache"], state["mask"], state["next_position"]

        def eager(token: torch.Tensor) -> torch.Tensor:
            nonlocal mask, position
            mask = torch.cat(
                [mask, torch.ones((len(mask), 1), dtype=mask.dtype, device=self.device)], dim=1
            )
            logits = self._forward(token, mask, position, cache)
            position = position + 1
            return logits

        return eager

    def _static_decoder(self) -> StaticDecoder | None:
        """The static-cache decoder when the decode path wants one, built once.

        A model whose cache the static path cannot hold switches the backend to the
        eager path, with one warning.
        """
        if self.decode_path == "eager":
            return None
        if self.decode_path not in self._decoders:
            try:
                self._decoders[self.decode_path] = StaticDecoder(
                    self.model,
                    self._cache_arg,
                    self._keep_arg,
                    compiled=self.decode_path == "compiled",
                )
            except UnsupportedModel as exc:
                self.decode_path, self.decode_fallback = "eager", f"no static cache: {exc}"
                print(
                    f'abm: warning: decode = "{self.decode}" needs a static key/value cache, '
                    f"and {self.source.name} cannot use one ({exc}); decoding eagerly",
                    file=sys.stderr,
                )
                return None
        return self._decoders[self.decode_path]

    def _text(self, row: list[int]) -> str:
        return self.tokenizer.decode(_until_stop(row, self._stop_ids), skip_special_tokens=True)

    def _stopped(
        self, new: list[torch.Tensor], done: torch.Tensor, stop_strings: tuple[str, ...]
    ) -> torch.Tensor:
        """Which rows' text so far holds a stop string (rows already done stay as they are)."""
        rows = torch.stack(new, dim=1).tolist()
        hit = [
            not finished and _stop_at(self._text(row), stop_strings) is not None
            for row, finished in zip(rows, done.tolist(), strict=True)
        ]
        return torch.tensor(hit, dtype=torch.bool, device=self.device)

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


def _check_decode(decode: str) -> None:
    if decode not in DECODE_PATHS:
        allowed = ", ".join(map(repr, DECODE_PATHS))
        raise ScenarioError(f"decode {decode!r} is not one of {allowed}")


def _stop_at(text: str, stop_strings: Sequence[str]) -> int | None:
    """Where the first stop string begins in ``text``, once the answer has begun.

    Leading white space is skipped, so a paragraph break before the first word does
    not end an answer that has not started.
    """
    body = text.lstrip()
    hits = [i for s in stop_strings if (i := body.find(s)) >= 0]
    return len(text) - len(body) + min(hits) if hits else None


def _cut(text: str, stop_strings: Sequence[str]) -> str:
    at = _stop_at(text, stop_strings) if stop_strings else None
    return text if at is None else text[:at]


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
    """

    parameters: int
    quantizable: int
    size: int
    per_parameter: float


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


def _check_size(
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
    from the safetensors headers or built from config.json on the meta device. The
    limit is the free memory of the GPU (``device``), of every GPU (``device_map``),
    or of the CPU. A multi-billion-parameter model is also refused on the CPU when it
    landed there only because no GPU was found (device "auto"); when the scenario asks
    for the CPU itself, that is a warning.

    Returns:
        The estimate, or None when neither weights nor a config are here to count.

    Raises:
        ScenarioError: The weights do not fit, naming the field, the estimate and the
            limit; or device "auto", no GPU, and weights past ``CPU_WEIGHT_LIMIT``.
    """
    params = _parameter_count(source)
    split = (
        _config_parameters(source, trust_remote_code) if quantization or params is None else None
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
            field = f'quantization = "{quantization}"' if quantization else f'device = "{asked}"'
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
    raise ScenarioError(
        f"{what} ({estimate.parameters:,} parameters x {estimate.per_parameter:g} bytes), "
        f"which does not fit where {field} loads it: {where} (the key/value cache needs "
        'more on top). Use more or bigger GPUs with device_map = "auto", quantization = '
        '"8bit" or "4bit", or a smaller model'
    )


def _placement(
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


def _load(
    source: ModelSource,
    dtype: torch.dtype,
    trust_remote_code: bool,
    placement: dict[str, Any] | None = None,
) -> tuple[Any, Any]:
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
