"""The work counters of an LLM backend.

They are kept free of torch so that code which only reads or fakes a backend (the
LLM policy's bookkeeping, a scripted test backend) imports without the llm extra.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class BackendStats:
    """Work done by one backend, for summary.json.

    Attributes:
        forward_passes: Model forward calls (scoring, prefix caching).
        generate_calls: Calls that wrote free text.
        tokens: Tokens read by the model, prompts and generated text together.
        seconds: Wall time spent inside the model.
        prefix_hits: Prompts whose shared prefix came from the key/value cache.
        extra: Backend-specific counters.
    """

    forward_passes: int = 0
    generate_calls: int = 0
    tokens: int = 0
    seconds: float = 0.0
    prefix_hits: int = 0
    extra: dict[str, Any] = field(default_factory=dict)
