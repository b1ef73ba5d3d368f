"""Examples for training: read from the export, tokenized for one model."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abm.errors import ScenarioError

FIELDS = ("prompt", "completion", "options", "target", "messages", "metadata")


@dataclass(frozen=True)
class Example:
    """One decision of the teacher as the student learns it.

    ``prompt`` is the exact model input; ``completion`` what the teacher wrote after
    it; ``options`` the texts of C and D as they continue the prompt; ``target`` the
    teacher's probabilities of C and D (None where the answer could not be read);
    ``phrasings`` every text score mode summed for C and for D, where recorded.
    """

    prompt: str
    completion: str
    options: tuple[str, str]
    target: tuple[float, float] | None
    action: str | None
    messages: list[dict[str, str]]
    metadata: dict[str, Any] = field(default_factory=dict)
    phrasings: tuple[tuple[str, ...], tuple[str, ...]] | None = None

    @property
    def option_sets(self) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The texts whose probabilities make up C and D.

        Every phrasing score mode summed for each, where the run recorded them; else
        the two options.
        """
        return self.phrasings or ((self.options[0],), (self.options[1],))

    @property
    def answer_prefix(self) -> str:
        """The text that opened the teacher's answer (score mode), else empty."""
        if self.metadata.get("mode") != "score":
            return ""
        response = self.messages[-1]["content"] if self.messages else ""
        chosen = self.completion.strip()
        return response[: -len(chosen)].rstrip() if chosen and response.endswith(chosen) else ""


def _fail(path: Path, number: int, why: str) -> ScenarioError:
    return ScenarioError(
        f"{path}: line {number} {why}; each line must be one example as python -m "
        "abm.export RUN writes it, with 'prompt', 'completion', 'options' (two strings), "
        "'target' (two probabilities or null), 'messages' and 'metadata'"
    )


def _example(path: Path, number: int, raw: Any) -> Example:
    if not isinstance(raw, dict):
        raise _fail(path, number, "is not a JSON object")
    missing = [k for k in FIELDS if k not in raw]
    if missing:
        raise _fail(
            path, number, "lacks " + ", ".join(repr(k) for k in missing) + " (an older export?)"
        )
    if not isinstance(raw["prompt"], str) or not raw["prompt"]:
        raise _fail(path, number, "has no 'prompt' text (the run kept no exact input)")
    if not isinstance(raw["completion"], str) or not raw["completion"].strip():
        raise _fail(path, number, "has an empty 'completion'")
    options = raw["options"]
    if not (
        isinstance(options, list) and len(options) == 2 and all(isinstance(o, str) for o in options)
    ):
        raise _fail(path, number, "has 'options' that are not two strings")
    target = raw["target"]
    if target is not None and not (
        isinstance(target, list)
        and len(target) == 2
        and all(isinstance(t, int | float) and 0 <= t <= 1 for t in target)
        and abs(sum(target) - 1) < 1e-6
    ):
        raise _fail(path, number, "has a 'target' that is not two probabilities adding to 1")
    meta = raw["metadata"] if isinstance(raw["metadata"], dict) else {}
    readable = meta.get("valid") is not False and not meta.get("fallback")
    action = meta.get("action") if readable and meta.get("action") in ("C", "D") else None
    sets = raw.get("phrasings")
    if sets is not None and not (
        isinstance(sets, list)
        and len(sets) == 2
        and all(isinstance(x, list) and x and all(isinstance(t, str) for t in x) for x in sets)
    ):
        raise _fail(path, number, "has 'phrasings' that are not two lists of strings")
    return Example(
        prompt=raw["prompt"],
        completion=raw["completion"],
        options=(options[0], options[1]),
        target=None if target is None else (float(target[0]), float(target[1])),
        action=action,
        messages=raw["messages"],
        metadata=meta,
        phrasings=None if sets is None else (tuple(sets[0]), tuple(sets[1])),
    )


def read_examples(paths: Sequence[Path], what: str = "training data") -> list[Example]:
    """Every example of the given export files, in order.

    Raises:
        ScenarioError: A file that is missing or unreadable, a line that is not an
            example (naming the file and line), or no examples at all.
    """
    out: list[Example] = []
    for path in paths:
        if not path.is_file():
            raise ScenarioError(
                f"{path}: no such file; give the JSONL files python -m abm.export RUN "
                "--validation 0.2 writes (RUN/sft.train.jsonl, RUN/sft.validation.jsonl)"
            )
        try:
            lines = path.read_text(encoding="utf-8").splitlines()
        except (OSError, UnicodeDecodeError) as exc:
            raise ScenarioError(f"{path}: cannot read it as UTF-8 text ({exc})") from None
        for number, line in enumerate(lines, 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise _fail(path, number, f"is not JSON ({exc})") from None
            out.append(_example(path, number, raw))
    if not out:
        raise ScenarioError(
            f"{', '.join(map(str, paths))}: no examples in the {what}; export a run with "
            "LLM players (python -m abm.export RUN --validation 0.2)"
        )
    return out
