"""Decoding steps on a preallocated key/value cache whose shapes never change.

The eager loop in ``abm.llm.backend`` grows its cache and attention mask by one
column per token, so every step has new shapes and pays Python and kernel-launch
overhead that dwarfs the arithmetic on a GPU. Here the cache (transformers'
``StaticCache``) is allocated once per (batch bucket, length bucket), the mask is
full length and filled in place, and a step is one call with fixed shapes; that
call can be compiled (``torch.compile``, CUDA graphs on CUDA). Batches are padded
to a power of two and lengths rounded up to ``LENGTH_BUCKET``, so a run compiles
a handful of graphs rather than one per batch.

The prefill stays where it was (the shared-prefix cache and the batch's own
suffixes, padded in the middle so all rows end in the same column); its keys and
values are copied into the static cache, whose column counter then advances with
every step for all rows at once.
"""

from __future__ import annotations

import sys
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

import torch

DECODE_PATHS = ("auto", "eager", "static", "compiled")

# cache lengths are rounded up to this: fewer compiled shapes, at most this many
# masked columns read per step
LENGTH_BUCKET = 128

# static caches kept for reuse (each holds batch x length keys and values per layer)
KEPT_CACHES = 4

# one graph per (batch bucket, length bucket, cache): more than dynamo's default of 8
RECOMPILE_LIMIT = 64


def is_out_of_memory(exc: BaseException) -> bool:
    """Whether ``exc`` is torch running out of accelerator memory.

    Such an error says the batch was too big, not that compiling failed, so it is
    never a reason to give up the compiled path.
    """
    # torch.OutOfMemoryError is the name from torch 2.5 on; the CUDA one is older
    return isinstance(exc, getattr(torch, "OutOfMemoryError", torch.cuda.OutOfMemoryError))


class UnsupportedModel(Exception):
    """The model's cache is not plain full attention (sliding windows, linear layers...)."""


def batch_bucket(n: int) -> int:
    """The padded batch size for ``n`` rows: the next power of two (1, 2, 4, 8, 16, ...).

    Args:
        n: Rows in the batch, at least 1.

    Returns:
        The smallest power of two not below ``n``.
    """
    return 1 << max(0, n - 1).bit_length()


def length_bucket(n: int) -> int:
    """The static cache length for ``n`` columns: ``n`` rounded up to ``LENGTH_BUCKET``.

    Args:
        n: Columns needed (prompt columns plus new tokens).

    Returns:
        The smallest multiple of ``LENGTH_BUCKET`` not below ``n``.
    """
    return -(-max(n, 1) // LENGTH_BUCKET) * LENGTH_BUCKET


def resolve_decode(decode: str, device: str) -> str:
    """The decode path a backend starts with.

    Args:
        decode: The scenario's ``decode``: "auto", "eager", "static" or "compiled".
        device: Where the model's inputs go ("cpu", "cuda:0", ...).

    Returns:
        "eager" for "auto" (on every device, until the compiled path is verified on a
        GPU); otherwise ``decode``.

    Raises:
        ValueError: ``decode`` is not one of ``DECODE_PATHS``.
    """
    if decode not in DECODE_PATHS:
        raise ValueError(f"decode {decode!r} is not one of {', '.join(map(repr, DECODE_PATHS))}")
    if decode == "auto":
        # compiled steps have not yet been checked against eager ones on a GPU; until
        # they are, a run gets them only when it asks (an instrument does not guess)
        return "eager"
    return decode


@dataclass
class _Slot:
    """A static cache and the fixed-shape inputs that go with it."""

    cache: Any
    ids: torch.Tensor  # (batch, 1)
    positions: torch.Tensor  # (batch, 1)
    mask: torch.Tensor  # (batch, length)


@dataclass
class StaticRun:
    """One batch being decoded: its slot, real rows and the next cache column."""

    slot: _Slot
    rows: int
    column: int


class StaticDecoder:
    """Decoding steps of one model on reused static caches, compiled or not.

    ``path`` is "compiled" or "static"; it turns to "static" for good when
    compilation fails, and ``fallback`` then holds the reason (one warning on stderr
    says it too).

    Args:
        model: A transformers causal LM, in eval mode.
        cache_arg: The name of the forward's cache argument ("cache" or
            "past_key_values").
        keep_arg: The forward's "logits to keep" argument, or None.
        compiled: Compile the step with ``torch.compile`` (CUDA graphs on CUDA).

    Raises:
        UnsupportedModel: The installed transformers' static cache has no in-place
            column counter, or the model's layers are not all full attention.
    """

    def __init__(self, model: Any, cache_arg: str, keep_arg: str | None, compiled: bool) -> None:
        """Check that the model can decode on a static cache; compile nothing yet."""
        self.model = model
        self.cache_arg = cache_arg
        self.keep_arg = keep_arg
        self.path = "compiled" if compiled else "static"
        self.fallback: str | None = None
        self._slots: OrderedDict[tuple[int, int, torch.dtype], _Slot] = OrderedDict()
        self._compiled_call: Any = None
        self._new_cache(LENGTH_BUCKET)  # fails early on an unsupported model

    # ------------------------------------------------------------ caches

    def _new_cache(self, length: int) -> Any:
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        cache = StaticCache(config=self.model.config, max_cache_len=length)
        kinds = {type(layer).__name__ for layer in cache.layers}
        if any(type(layer) is not StaticLayer for layer in cache.layers):
            raise UnsupportedModel(
                f"its cache layers are {', '.join(sorted(kinds))}, not full attention alone"
            )
        if not all(
            isinstance(getattr(x, "cumulative_length", None), torch.Tensor) for x in cache.layers
        ):
            # older transformers releases index the cache by a cache_position argument
            raise UnsupportedModel("this transformers release's StaticCache has no column counter")
        return cache

    def _slot(self, batch: int, length: int, like: Any) -> _Slot:
        """A reused static cache for (batch, length), built on the devices of ``like``."""
        first = like.layers[0].keys
        key = (batch, length, first.dtype)
        if key in self._slots:
            self._slots.move_to_end(key)
            return self._slots[key]
        cache = self._new_cache(length)
        for layer, source in zip(cache.layers, like.layers, strict=True):
            # shapes, dtype and device of each layer (device_map puts layers apart)
            shape = (batch, source.keys.shape[1], 0, source.keys.shape[-1])
            fake_keys = torch.zeros(shape, dtype=source.keys.dtype, device=source.keys.device)
            shape = (batch, source.values.shape[1], 0, source.values.shape[-1])
            fake_values = torch.zeros(shape, dtype=source.values.dtype, device=source.values.device)
            layer.lazy_initialization(fake_keys, fake_values)
        device = self.model.get_input_embeddings().weight.device
        slot = _Slot(
            cache=cache,
            ids=torch.zeros((batch, 1), dtype=torch.long, device=device),
            positions=torch.zeros((batch, 1), dtype=torch.long, device=device),
            mask=torch.zeros((batch, length), dtype=torch.long, device=device),
        )
        self._slots[key] = slot
        while len(self._slots) > KEPT_CACHES:
            self._slots.popitem(last=False)
        return slot

    def drop_caches(self) -> bool:
        """Let go of every kept static cache (after running out of memory).

        Returns:
            Whether any was kept.
        """
        kept = bool(self._slots)
        self._slots.clear()
        return kept

    # ------------------------------------------------------------ decoding

    def start(
        self, prefill: Any, mask: torch.Tensor, next_position: torch.Tensor, max_new_tokens: int
    ) -> StaticRun:
        """Copy a prefill's cache into a static cache sized for the batch and its answers.

        Rows past the batch (up to the bucket) repeat the first row, so they compute
        something harmless instead of attending to nothing.

        Args:
            prefill: The prefill's DynamicCache, (rows, heads, columns, dim) per layer.
            mask: The prefill's attention mask, (rows, columns).
            next_position: Each row's position for its first new token, (rows,).
            max_new_tokens: The most tokens the batch will be fed back.

        Returns:
            The state ``step`` continues from.
        """
        rows, columns = mask.shape
        slot = self._slot(batch_bucket(rows), length_bucket(columns + max_new_tokens), prefill)
        with torch.no_grad():
            for layer, source in zip(slot.cache.layers, prefill.layers, strict=True):
                for static, filled in ((layer.keys, source.keys), (layer.values, source.values)):
                    static[:rows, :, :columns].copy_(filled)
                    static[rows:, :, :columns].copy_(
                        filled[:1].expand_as(static[rows:, :, :columns])
                    )
                layer.cumulative_length.fill_(columns)
            slot.mask.zero_()
            slot.mask[:rows, :columns].copy_(mask)
            slot.mask[rows:, :columns].copy_(mask[:1].expand(len(slot.mask) - rows, -1))
            slot.positions[:rows, 0].copy_(next_position)
            slot.positions[rows:, 0].fill_(int(next_position[0]))
        return StaticRun(slot, rows, columns)

    def step(self, run: StaticRun, token: torch.Tensor) -> torch.Tensor:
        """Feed one token per row; the next-token logits of the real rows, (rows, V).

        Args:
            run: The state ``start`` returned; advanced in place.
            token: The token each real row just produced, (rows,).

        Returns:
            A fresh tensor of logits (not a view into a compiled graph's buffers).
        """
        slot = run.slot
        with torch.no_grad():
            slot.ids[: run.rows, 0].copy_(token)
            slot.ids[run.rows :, 0].copy_(token[:1].expand(len(slot.ids) - run.rows))
            slot.mask[:, run.column] = 1
            # copied out: a compiled graph reuses its output buffers on the next step
            logits = self._call(slot, run.column)[: run.rows, -1].clone()
            slot.positions.add_(1)
        run.column += 1
        return logits

    def _call(self, slot: _Slot, column: int) -> torch.Tensor:
        """The step's logits, (batch, 1, V); compiled while that works."""
        if self.path == "compiled":
            try:
                if self._compiled_call is None:
                    self._compiled_call = _compile(self._forward)
                if torch.cuda.is_available():  # the graph's outputs may be overwritten next step
                    torch.compiler.cudagraph_mark_step_begin()
                return self._compiled_call(slot.cache, slot.ids, slot.positions, slot.mask)
            except Exception as exc:  # no compiler, an op it cannot trace, ...
                if is_out_of_memory(exc):  # the batch's problem: the caller splits it
                    raise
                self._give_up_compiling(exc)
                for layer in slot.cache.layers:  # a half-run step may have advanced them
                    layer.cumulative_length.fill_(column)
        return self._forward(slot.cache, slot.ids, slot.positions, slot.mask)

    def _forward(
        self, cache: Any, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor
    ) -> torch.Tensor:
        kwargs: dict[str, Any] = {
            "input_ids": ids,
            "attention_mask": mask,
            "position_ids": positions,
            "use_cache": True,
            self.cache_arg: cache,
        }
        if self.keep_arg:
            kwargs[self.keep_arg] = 1
        return self.model(**kwargs).logits

    def _give_up_compiling(self, exc: Exception) -> None:
        lines = str(exc).strip().splitlines()
        self.fallback = f"{type(exc).__name__}: {lines[0] if lines else ''}".strip().rstrip(":")
        self.path = "static"
        self._compiled_call = None
        print(
            f"abm: warning: compiled decoding failed ({self.fallback[:300]}); decoding on "
            'the static cache without compilation (decode = "static")',
            file=sys.stderr,
        )


def _compile(fn: Any) -> Any:
    """``torch.compile`` for fixed shapes: CUDA graphs on CUDA, one graph per shape."""
    import torch._dynamo

    config = torch._dynamo.config
    for name in ("recompile_limit", "cache_size_limit"):  # the name changed in torch 2.6
        if hasattr(config, name):
            setattr(config, name, max(getattr(config, name), RECOMPILE_LIMIT))
            break
    return torch.compile(fn, mode="reduce-overhead", fullgraph=True, dynamic=False)
