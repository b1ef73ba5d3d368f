"""How often a model decides like the teacher on the same prompts."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

from abm.finetune.data import Example


def p_cooperate(
    backend: Any,
    prompts: Sequence[str],
    examples: Sequence[Example],
    *,
    batch_size: int = 16,
    progress: Any = None,
) -> np.ndarray:
    """The model's P(C) on each prompt, read as score mode reads a decision.

    Each option's phrasings (``Example.option_sets``) are scored after the prompt
    (``Backend.score_phrasings``: the shared prompt prefix computed once, every
    phrasing on one prefill and a step per level of their trie), summed per option
    and renormalised over the pair, with whatever model the backend holds now, an
    adapter included.
    """
    backend.reset_prefix_cache()  # the weights may have changed since the last call
    # the same prompt recurs (the same history in another match): score it once
    first: dict[tuple[str, tuple], int] = {}
    for i, (prompt, example) in enumerate(zip(prompts, examples, strict=True)):
        first.setdefault((prompt, example.option_sets), i)
    groups: dict[tuple, list[int]] = {}
    for (_, sets), i in first.items():
        groups.setdefault(sets, []).append(i)
    p_c: dict[int, float] = {}
    for sets, rows in groups.items():
        texts = [(t, option) for option, group in enumerate(sets) for t in group]
        tokens = [backend.continuation_ids(prompts[rows[0]], t) for t, _ in texts]
        owner = np.array([option for _, option in texts])
        for start in range(0, len(rows), batch_size):
            part = rows[start : start + batch_size]
            per = backend.score_phrasings(
                [backend.tokenize(prompts[i]) for i in part], tokens, batch_size
            )
            # as score mode: each option's phrasings summed, then renormalised over the pair
            logp = np.stack(
                [np.logaddexp.reduce(per[:, owner == o], axis=1) for o in (0, 1)], axis=1
            )
            z = logp - logp.max(axis=1, keepdims=True)
            p_c.update(zip(part, np.exp(z[:, 0]) / np.exp(z).sum(axis=1), strict=True))
            if progress is not None:
                progress.update(len(part))
    return np.array(
        [p_c[first[(p, e.option_sets)]] for p, e in zip(prompts, examples, strict=True)], float
    )


def agreement(
    examples: Sequence[Example],
    p_c: np.ndarray,
    prompts: Sequence[str],
    seen: set[str] | None = None,
) -> dict[str, Any]:
    """Agreement of the model's decisions (the likelier option) with the teacher's.

    Args:
        examples: The held-out examples (those whose answer could not be read count
            nowhere).
        p_c: The model's P(C) on each.
        prompts: The model's input for each.
        seen: Prompts the training data holds; agreement is also given on the others.

    Returns:
        ``n``, ``agree`` (a share), ``by_teacher`` (agreement where the teacher
        played C, and where it played D), ``by_round``, ``mean_p_teacher`` (the mean
        probability the model gave the teacher's choice) and, with ``seen``,
        ``unseen`` (the same on prompts not in the training data).
    """
    rows = [
        (e, float(p), text)
        for e, p, text in zip(examples, p_c, prompts, strict=True)
        if e.action in ("C", "D")
    ]

    def summary(part: list[tuple[Example, float, str]]) -> dict[str, Any]:
        if not part:
            return {"n": 0, "agree": None}
        hits = [(p > 0.5) == (e.action == "C") for e, p, _ in part]
        return {
            "n": len(part),
            "agree": round(float(np.mean(hits)), 4),
            "mean_p_teacher": round(
                float(np.mean([p if e.action == "C" else 1 - p for e, p, _ in part])), 4
            ),
        }

    out = summary(rows)
    out["by_teacher"] = {a: summary([r for r in rows if r[0].action == a]) for a in "CD"}
    rounds = sorted({r[0].metadata.get("round") for r in rows if r[0].metadata.get("round")})
    out["by_round"] = {
        str(k): summary([r for r in rows if r[0].metadata.get("round") == k]) for k in rounds
    }
    if seen is not None:
        out["unseen"] = summary([r for r in rows if r[2] not in seen])
    return out
