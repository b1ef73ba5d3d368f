"""The two options' log-probabilities under a model, and the distillation loss on them."""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from typing import Any

import torch


def option_rows(
    backend: Any, prompts: Sequence[str], options: Sequence[tuple[str, str]]
) -> list[tuple[list[int], int]]:
    """Each prompt followed by each of its two options: ``(token ids, option length)``.

    Two rows per prompt, C then D, tokenized as score mode tokenizes a decision: the
    prompt as a whole (``backend.tokenize``), then the option as it continues it
    (``backend.continuation_ids``).
    """
    rows = []
    for prompt, pair in zip(prompts, options, strict=True):
        head = backend.tokenize(prompt)
        for option in pair:
            tail = backend.continuation_ids(prompt, option)
            rows.append((head + tail, len(tail)))
    return rows


def shared_prefix(rows: Sequence[Sequence[int]], keep: int = 1) -> int:
    """How many leading tokens every row shares, leaving at least ``keep`` of each row."""
    first = rows[0]
    n = min(len(r) for r in rows) - keep
    for row in rows[1:]:
        i = 0
        while i < n and row[i] == first[i]:
            i += 1
        n = i
    return max(0, n)


def option_batch(
    rows: Sequence[tuple[list[int], int]], prefix: int, pad: int, device: str
) -> dict[str, Any]:
    """Rows after a shared ``prefix`` of tokens, padded so that they all end in one column.

    The padding sits between the prefix and each row's own tokens, so the prefix's
    keys and values can be computed once and the options' tokens line up at the end.

    Returns:
        ``input_ids`` (the tokens after the prefix), ``attention_mask`` (prefix
        included), ``position_ids``, ``scored`` (1 on the options' tokens) and ``k``,
        the longest option in tokens.
    """
    tails = [ids[prefix:] for ids, _ in rows]
    width = max(len(t) for t in tails)
    k = max(n for _, n in rows)
    ids = torch.full((len(rows), width), pad, dtype=torch.long)
    mask = torch.zeros((len(rows), prefix + width), dtype=torch.long)
    mask[:, :prefix] = 1
    positions = torch.zeros((len(rows), width), dtype=torch.long)
    scored = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (tail, (_, n)) in enumerate(zip(tails, rows, strict=True)):
        ids[i, width - len(tail) :] = torch.tensor(tail)
        mask[i, prefix + width - len(tail) :] = 1
        positions[i, width - len(tail) :] = prefix + torch.arange(len(tail))
        scored[i, width - n :] = 1
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": positions.to(device),
        "scored": scored.to(device),
        "k": k,
    }


def _forward_args(model: Any) -> tuple[str | None, str]:
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    names = inspect.signature(base.forward).parameters
    keep = next((a for a in ("logits_to_keep", "num_logits_to_keep") if a in names), None)
    return keep, "cache" if "cache" in names else "past_key_values"


def prefix_cache(model: Any, ids: Sequence[int], copies: int, device: str) -> Any:
    """The keys and values of a shared prefix under the model as it is now, for ``copies`` rows.

    Computed without gradients: training then learns through each row's own tokens,
    while the prefix still comes from the current weights, adapter included.
    """
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(ids)], device=device), use_cache=True)
    cache = out.past_key_values
    cache.batch_repeat_interleave(copies)
    return cache


def option_logprobs(model: Any, batch: dict[str, Any], cache: Any = None) -> torch.Tensor:
    """Log-probability of each option's tokens after its prompt: a (B, 2) tensor.

    ``cache`` holds the keys and values of the prefix ``batch`` was built after (None
    for no prefix). The LM head runs on the last ``k + 1`` positions only, which
    keeps the memory of a 50,000-word vocabulary small.
    """
    k = batch["k"]
    keep, cache_arg = _forward_args(model)
    kwargs: dict[str, Any] = {keep: k + 1} if keep else {}
    if cache is not None:
        kwargs[cache_arg] = cache
    logits = model(
        input_ids=batch["input_ids"],
        attention_mask=batch["attention_mask"],
        position_ids=batch["position_ids"],
        use_cache=cache is not None,
        **kwargs,
    ).logits[:, -(k + 1) : -1]
    tokens = batch["input_ids"][:, -k:]
    logp = logits.float().log_softmax(-1).gather(-1, tokens[..., None])[..., 0]
    return (logp * batch["scored"][:, -k:]).sum(-1).view(-1, 2)


def option_kl(target: torch.Tensor, option_logp: torch.Tensor) -> torch.Tensor:
    """KL(teacher || student) over the two options, averaged over the batch.

    The student's probabilities are its option log-probabilities renormalised over the
    pair, as score mode reads them: ``q = softmax(option_logp)``; then
    ``sum_o p_o (log p_o - log q_o)``, with ``0 log 0 = 0`` for a one-hot teacher.

    Args:
        target: The teacher's (P(C), P(D)) per example, (B, 2).
        option_logp: The student's log-probabilities of the two options, (B, 2).
    """
    log_q = option_logp.log_softmax(-1)
    return (torch.xlogy(target, target) - target * log_q).sum(-1).mean()
