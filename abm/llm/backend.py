"""A transformers causal LM that scores answer phrasings or writes free text, in batches.

Two savings matter on a CPU: the key/value cache of the prompt prefix shared
by every prompt of a run (the rules) is computed once and reused, and
identical prompts are answered once (see ``abm.policies.llm``).
"""

from __future__ import annotations

import copy
import gc
import inspect
import sys
import time
from collections import deque
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from abm.errors import ScenarioError
from abm.llm.loading import load_model, with_adapter
from abm.llm.models import ModelSource
from abm.llm.placement import (
    check_size,
    check_table,
    kv_cache_bytes_per_token,
    pick_device,
    pick_dtype,
    placement_options,
    thread_count,
)
from abm.llm.static_decode import (
    DECODE_PATHS,
    StaticDecoder,
    UnsupportedModel,
    is_out_of_memory,
    resolve_decode,
)

# kept importable from here; it lives in a torch-free module
from abm.llm.stats import BackendStats as BackendStats

Messages = list[dict[str, str]]


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
        self.device = pick_device(device)
        check_table(device_map)
        self.dtype = pick_dtype(dtype, self.device)
        self.prefix_cache = prefix_cache
        self.device_map = device_map
        self.quantization = quantization
        self.threads: int | None = None
        self.threads_from: str | None = None
        self.stats = BackendStats()
        self.estimate = check_size(
            source,
            device,
            self.device,
            self.dtype,
            device_map=device_map,
            quantization=quantization,
            trust_remote_code=trust_remote_code,
        )
        placement = placement_options(self.device, self.dtype, device_map, quantization)
        started = time.perf_counter()
        self.tokenizer, self.model = load_model(source, self.dtype, trust_remote_code, placement)
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
        self.kv_bytes_per_token = kv_cache_bytes_per_token(self.model.config, self.dtype)
        # after running out of GPU memory: the most prompts a batch gets from then on
        self.batch_cap: int | None = None
        self.oom_splits = 0
        self.capped_calls = 0  # calls whose batches the cap made smaller than asked
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
            if self.estimate.stored_as:  # saved quantized: the size is what the files store
                out["weights_stored_as"] = self.estimate.stored_as
        if self.kv_bytes_per_token is not None:
            out["kv_cache_kib_per_token"] = self.kv_bytes_per_token / 1024
        out["decode"] = self.decode
        out["decode_path"] = self.decode_path
        if self.decode_fallback:
            out["decode_fallback"] = self.decode_fallback
        if self.oom_splits:
            out["out_of_memory_splits"] = self.oom_splits
            out["batch_cap"] = self.batch_cap
            out["capped_calls"] = self.capped_calls
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
        width = len(phrasings)
        rows = self._in_batches(
            prompts,
            max_batch_size,
            lambda start, batch: list(self._score_batch(batch, phrasings, levels)),
            "scoring",
        )
        return np.array(rows).reshape(len(prompts), width)

    def _score_batch(
        self,
        batch: list[list[int]],
        phrasings: list[list[int]],
        levels: list[list[tuple[int, ...]]],
    ) -> np.ndarray:
        """``score_phrasings`` of one batch, (len(batch), len(phrasings))."""
        out = np.empty((len(batch), len(phrasings)))
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
            tokens = torch.tensor([node[-1] for _ in batch for node in level], device=self.device)
            step = self._forward(tokens, mask, position, cache)
            self.stats.tokens += len(rows)
            position = position + 1
            step = torch.log_softmax(step.float(), dim=-1).view(len(batch), len(level), -1)
            for j, node in enumerate(level):
                logp[node] = step[:, j]
            parents = level
        for k, phrase in enumerate(phrasings):
            out[:, k] = (
                sum(logp[tuple(phrase[:t])][:, token] for t, token in enumerate(phrase))
                .cpu()
                .numpy()
            )
        self.stats.seconds += time.perf_counter() - started
        return out

    def _in_batches(
        self,
        prompts: list[list[int]],
        max_batch_size: int,
        run: Callable[[int, list[list[int]]], list[Any]],
        work: str,
        new_tokens: int = 0,
    ) -> list[Any]:
        """``run(start, batch)`` over consecutive batches of the prompts; results in order.

        A batch that runs out of GPU memory is let go; it is run again as it was
        when static caches kept from earlier batches could be dropped (once since
        the last batch that ran), else in two halves, and no later batch of this
        backend is bigger than the half (``batch_cap``, recorded in ``loading()``).
        Scores and greedy answers are those of the unsplit batch up to rounding
        (every prompt has its own row; padding differs); sampled answers are drawn
        from a generator seeded by their batch's first position, so after a split
        they are other draws of the same model. A single prompt that does not fit
        is an error saying what to change.

        Raises:
            ScenarioError: One prompt alone does not fit in the memory left.
        """
        cap = min(max_batch_size, self.batch_cap or max_batch_size)
        if cap < max_batch_size and len(prompts) > cap:
            self.capped_calls += 1
        pending = deque((s, prompts[s : s + cap]) for s in range(0, len(prompts), cap))
        out: list[Any] = []
        cleaned = False  # since the last batch that ran: kept caches were dropped once
        while pending:
            start, batch = pending.popleft()
            if self.batch_cap is not None and len(batch) > self.batch_cap:
                cut = self.batch_cap  # extendleft reverses: the first part ends up leftmost
                pending.extendleft([(start + cut, batch[cut:]), (start, batch[:cut])])
                continue
            try:
                out.extend(run(start, batch))
                cleaned = False
                continue
            except Exception as exc:
                if not is_out_of_memory(exc):
                    raise
                reason = (str(exc).strip().splitlines() or ["out of memory"])[0]
            # out of the except block: the failed attempt's tensors are unreferenced now
            if self._free_memory() and not cleaned:
                # static caches kept from earlier batches held memory: try once without them
                cleaned = True
                pending.appendleft((start, batch))
                continue
            if len(batch) == 1:
                raise ScenarioError(self._too_big(batch[0], new_tokens, work, reason))
            half = (len(batch) + 1) // 2
            self.oom_splits += 1
            if self.oom_splits == 1:
                print(
                    f"abm: warning: {self.source.name} ran out of memory {work} a batch of "
                    f"{len(batch)} prompts on {', '.join(self.placed_on)}; running it in "
                    f"halves, and at most {half} prompts a batch from now on (summary.json's "
                    "loading block records it)",
                    file=sys.stderr,
                )
            self.batch_cap = half
            pending.extendleft([(start + half, batch[half:]), (start, batch[:half])])
        return out

    def _free_memory(self) -> bool:
        """Drop the kept static caches and return free memory to CUDA.

        The prefix caches stay: one row of the shared rules is small, and rebuilding
        it would cost a prefill per retry.

        Returns:
            Whether any static cache was kept (so that a retry may now fit).
        """
        dropped = [decoder.drop_caches() for decoder in self._decoders.values()]
        # a compiled step keeps its cache in a reference cycle: only the collector frees it
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        return any(dropped)

    def _too_big(self, prompt: list[int], new_tokens: int, work: str, reason: str) -> str:
        tokens = f"{len(prompt)} tokens" + (f" and {new_tokens} new ones" if new_tokens else "")
        per_token = (
            f"; its key/value cache takes {self.kv_bytes_per_token / 1024:g} KiB a token"
            if self.kv_bytes_per_token
            else ""
        )
        return (
            f"{self.source.name} ran out of memory on {', '.join(self.placed_on)} {work} a "
            f"single prompt of {tokens} ({reason}){per_token}. Free the GPU of other work, "
            'load the weights smaller (quantization = "8bit" or "4bit"), spread them over '
            'more GPUs (device_map = "auto"), shorten the prompt (a smaller memory window) '
            "or max_new_tokens, or use a smaller model"
        )

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

        def run(start: int, batch: list[list[int]]) -> list[str]:
            generator = torch.Generator(device=self.device).manual_seed(seed + start)
            return self._decode(batch, temperature, top_p, max_new_tokens, generator, tuple(stop))

        return self._in_batches(prompts, max_batch_size, run, "writing answers to", max_new_tokens)

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
