"""Reflections as the model meant them: one turn, whole sentences, no echoed prompt."""

from __future__ import annotations

import re

# Where a model that keeps writing starts the next turn of the conversation
ROLE_MARKERS = (
    "USER:",
    "ASSISTANT:",
    "Human:",
    "### Instruction",
    "### Response",
    "[INST]",
    "[/INST]",
    "<|im_start|>",
    "<|im_end|>",
    "<|user|>",
    "<|assistant|>",
)
_SENTENCE_END = re.compile(r"[.!?][\"')\]]*(?=\s|$)")
_ENDS_WHOLE = re.compile(r"[.!?][\"')\]]*$")


def clean_reflection(text: str, speakers: tuple[str, ...] = ()) -> str:
    """A reflection as the model meant it, from its raw text.

    A leading speaker tag of its own is dropped; the text is cut where the model
    starts another turn (a role marker, or a speaker's tag such as ``Police:``, after
    the start), and a last sentence that the token limit cut off is dropped unless
    it is the only one. The raw text is kept beside it in the transcript.

    Args:
        text: The model's raw reflection.
        speakers: The framing's speaker names (``Suspect1``, ``Police``).

    Returns:
        The cleaned reflection.
    """
    tags = [f"{s}:" for s in speakers if s]
    text = text.strip()
    for tag in tags:
        if text.startswith(tag):
            text = text[len(tag) :].lstrip()
            break
    cut = min(
        (i for i in (text.find(m) for m in (*ROLE_MARKERS, *tags)) if i > 0), default=len(text)
    )
    text = text[:cut].rstrip()
    if text and not _ENDS_WHOLE.search(text):
        ends = list(_SENTENCE_END.finditer(text))
        if ends:
            text = text[: ends[-1].end()]
    return text.strip()
