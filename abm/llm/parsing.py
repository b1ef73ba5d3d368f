"""Reading an action out of free text, strictly: a negated, double or missing answer is invalid."""

from __future__ import annotations

import re

NEGATION = re.compile(r"\b(not|never|no|won't|wont|don't|dont|refuse|refuses|cannot|can't)\b|n't\b")


def parse_action(text: str, c_words: tuple[str, ...], d_words: tuple[str, ...]) -> tuple[int | None, str]:
    """(0 for C, 1 for D, or None, and why). Only the first sentence of the answer counts.

    "I will not testify" is invalid, not C: a negation next to a label makes the
    answer ambiguous, and guessing would put words in the model's mouth.
    """
    text = text.replace("\u2019", "'")  # a typographic apostrophe must not hide "won't"
    first = re.split(r"(?<=[.!?])\s|\n", text.strip(), maxsplit=1)[0]
    found = {}
    for action, words in ((0, c_words), (1, d_words)):
        for word in sorted(words, key=len, reverse=True):
            # single letters (option labels such as J/F) are matched case-sensitively
            flags = 0 if len(word) == 1 else re.IGNORECASE
            match = re.search(rf"(?<![\w]){re.escape(word)}(?![\w])", first, flags)
            if match:
                found[action] = match.start()
                break
    if len(found) == 2:
        return None, "both"
    if not found:
        return None, "neither"
    action, start = next(iter(found.items()))
    before = first[max(0, start - 30):start].lower()
    if NEGATION.search(before):
        return None, "negated"
    return action, "ok"
