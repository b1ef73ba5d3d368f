"""Prompt framings: the experiment's police story, a neutral game, or a custom template.

``FRAMINGS`` maps each ``framing`` name of an LLM player to the function that builds
its ``Framing`` from keyword arguments: ``police()``, ``neutral(labels=...)`` and
``custom(template=..., labels=..., answer_prefix=..., **parts)``, whose ``parts``
(``FramingParts``) set every other text of the framing.

A template file has two parts separated by a line ``---``: the rules (the
same in every prompt of a run that shows the options in one order, so their
key/value cache is reused) and the turn (this decision). Both are templates
over these plain ``{name}`` fields (no attribute, index or format spec):

``R``, ``S``, ``T``, ``P``   the payoffs
``length_rule``              one sentence on the match length
``round``                    this round's number in the match, from 1
``of_rounds``                " of N" when the length is fixed, else ""
``rounds_left``              rounds left after this one, or "unknown"
``history``                  the memory window as text, oldest first
``score``                    points earned in the remembered rounds
``reflection``               the last reflection line (empty when off or none yet)
``label_c``, ``label_d``     the labels of the cooperative and the defecting option
``first``, ``second``        the two labels in the order shown this time
``answer_format``            how to answer: one sentence that depends on the mode
"""

from __future__ import annotations

import string
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from abm.llm.parsing import AnswerWords, label_words, police_words

HERE = Path(__file__).resolve().parent

VARIABLES = (
    "R",
    "S",
    "T",
    "P",
    "length_rule",
    "round",
    "of_rounds",
    "rounds_left",
    "history",
    "score",
    "reflection",
    "label_c",
    "label_d",
    "first",
    "second",
    "answer_format",
)


# the fields a reflection question may use
REFLECT_VARIABLES = ("you", "other", "mine", "theirs")


@dataclass(frozen=True, kw_only=True)
class Framing:
    """Everything a framing decides: texts, labels, how answers are read and scored.

    Built with keywords only; the defaults are those of a neutral two-label game, and
    ``words``, ``phrasings`` and ``did`` left out follow from the labels.
    """

    name: str = "custom"
    """Recorded with every exchange (transcripts.jsonl ``framing``)."""
    rules: str
    """The template of the prompt's first part, the same in every prompt of a run."""
    turn: str
    """The template of the prompt's second part: this decision."""
    label_c: str
    """The cooperative option as the prompt names it."""
    label_d: str
    """The defecting option as the prompt names it."""
    answer_prefix: str = ""
    """Score mode: the start of the answer whose continuations are scored."""
    words: AnswerWords | None = None
    """Generate mode: the words read as each option (default: the two labels)."""
    phrasings: tuple[tuple[str, ...], tuple[str, ...]] | None = None
    """Score mode: the continuations of ``answer_prefix`` that count for C, then D
    (default: each label, after a space where the prefix does not end in one)."""
    you: str = "you"
    """The player, as the history lines and the reflection question name it."""
    other: str = "the other player"
    """The opponent, as the history lines and the reflection question name it."""
    round_word: str = "round"
    """What one round is called ("interrogation"): in the match length and the history."""
    reflect: str = (
        "In this round, {other} chose {theirs}, while {you} chose {mine}. Based "
        "on this outcome, please reflect on your decision-making in this game."
    )
    """The reflection question; fields {other}, {you}, {theirs}, {mine}."""
    did: tuple[str, str] | None = None
    """What {mine} and {theirs} say for C and D in the reflection (default: the labels)."""
    speaker: str = ""
    """Who asks the questions ("Police: "), before a reminder to answer."""

    def __post_init__(self) -> None:
        """Fill in ``words``, ``phrasings`` and ``did`` from the labels where left out."""
        # a frozen dataclass can set them only through object.__setattr__
        if self.words is None:
            object.__setattr__(self, "words", label_words(self.label_c, self.label_d))
        if self.phrasings is None:
            space = " " if self.answer_prefix and not self.answer_prefix.endswith(" ") else ""
            object.__setattr__(
                self, "phrasings", ((space + self.label_c,), (space + self.label_d,))
            )
        if self.did is None:
            object.__setattr__(self, "did", (self.label_c, self.label_d))

    def answer_format(self, mode: str, first: str, second: str, style: str = "line") -> str:
        """The sentence that tells the model how to answer, options in the order shown."""
        if mode == "score":
            return f'Answer with "{first}" or "{second}".'
        if style == "json":
            return f'Reply with JSON only: {{"action": "{first}"}} or {{"action": "{second}"}}.'
        return f'Reply with one line: "Answer: {first}" or "Answer: {second}".'

    def reminder(self, mode: str, first: str, second: str, style: str = "line") -> str:
        """What a retry after an unreadable answer says."""
        return f"{self.speaker}Your reply could not be read. " + self.answer_format(
            mode, first, second, style
        )


def split_template(text: str) -> tuple[str, str]:
    """Split a template file's text into its rules and its turn.

    Returns:
        (rules, turn), each stripped.

    Raises:
        ValueError: Without a ``---`` line between the two.
    """
    head, sep, tail = text.partition("\n---\n")
    if not sep:
        raise ValueError("a prompt template needs a line '---' between the rules and the turn")
    return head.strip(), tail.strip()


def police() -> Framing:
    """The experiment's story: Suspect1 questioned by the Police; remain silent = C.

    The interrogation story A. W. Tucker told in 1950 to name the Prisoner's Dilemma
    (as in Luce & Raiffa 1957, "Games and Decisions"), told to Suspect1.
    """
    rules, turn = split_template((HERE / "police.txt").read_text(encoding="utf-8"))
    return Framing(
        name="police",
        rules=rules,
        turn=turn,
        label_c="remain silent",
        label_d="testify",
        answer_prefix="Suspect1: I want to",
        words=police_words(),
        phrasings=(
            (
                " remain silent",
                " stay silent",
                " keep silent",
                " remain quiet",
                " stay quiet",
                " keep quiet",
            ),
            (" testify", " confess", " defect", " betray"),
        ),
        you="Suspect1",
        other="Suspect2",
        round_word="interrogation",
        reflect="Police: In this simulation, {other} {theirs}, while {you} {mine}. Based on "
        "this outcome, please reflect on your decision-making in this simulation.",
        did=("remained silent", "testified against the other"),
        speaker="Police: ",
    )


def neutral(*, labels: tuple[str, str] = ("J", "F")) -> Framing:
    """An abstract two-option game with no story; ``labels`` name C and D."""
    rules, turn = split_template((HERE / "neutral.txt").read_text(encoding="utf-8"))
    c, d = labels
    return Framing(
        name="neutral",
        rules=rules,
        turn=turn,
        label_c=c,
        label_d=d,
        answer_prefix="I choose option",
    )


def custom(
    *, template: Path, labels: tuple[str, str], answer_prefix: str = "", **parts: Any
) -> Framing:
    """A template file of the user's.

    Args:
        template: the file: the rules, a line ``---``, the turn.
        labels: the names of C and D.
        answer_prefix: score mode: the start of the answer (phrasings follow it).
        **parts: any of the framing's other texts (the fields of ``FramingParts``).

    Raises:
        OSError: when the template cannot be read.
        ValueError: without the ``---`` line between the rules and the turn.
    """
    rules, turn = split_template(template.read_text(encoding="utf-8"))
    c, d = labels
    return Framing(
        name="custom",
        rules=rules,
        turn=turn,
        label_c=c,
        label_d=d,
        answer_prefix=answer_prefix,
        **parts,
    )


FRAMINGS: dict[str, Callable[..., Framing]] = {
    "police": police,
    "neutral": neutral,
    "custom": custom,
}


class FramingParts(BaseModel):
    """The texts a custom framing may set: an LLM player's ``parts`` table.

    Its template, labels, answer prefix and phrasings have keys of their own; each
    part left out keeps the default of ``Framing``.
    """

    model_config = ConfigDict(extra="forbid", frozen=True, use_attribute_docstrings=True)

    you: str | None = None
    """The player in the history lines and the reflection question (default "you")."""
    other: str | None = None
    """The opponent there (default "the other player")."""
    round_word: str | None = None
    """What a round is called in the match length and the history (default "round")."""
    reflect: str | None = None
    """The reflection question, with fields {other}, {you}, {theirs}, {mine}."""
    did: list[str] | None = Field(None, min_length=2, max_length=2)
    """What {mine} and {theirs} say for C and D in the reflection (default: the labels)."""
    speaker: str | None = None
    """Put before a reminder to answer, as in "Police: " (default none)."""

    @model_validator(mode="before")
    @classmethod
    def _known_parts(cls, data: Any) -> Any:
        if isinstance(data, dict):
            unknown = [k for k in data if k not in cls.model_fields]
            if unknown:
                raise ValueError(
                    f"unknown framing part {unknown[0]!r}; the parts a custom "
                    f"framing sets are {', '.join(cls.model_fields)}"
                )
        return data

    def options(self) -> dict[str, Any]:
        """The parts given, as keyword arguments of ``custom``."""
        given = self.model_dump(exclude_none=True)
        if "did" in given:
            given["did"] = tuple(given["did"])
        return given


def check_template(framing: Framing) -> None:
    """Check the fields that a framing's templates and reflection question use.

    Raises:
        ValueError: Naming any field a template uses that abm does not provide, or uses
            with attribute access, indexing, a conversion or a format spec, and a
            template that is no valid format string.
    """
    for what, part, variables in (
        ("the template", framing.rules, VARIABLES),
        ("the template", framing.turn, VARIABLES),
        ("the reflection question", framing.reflect, REFLECT_VARIABLES),
    ):
        try:
            fields = list(string.Formatter().parse(part))
        except ValueError as exc:
            raise ValueError(
                f"{what} is not a valid format string ({exc}); write "
                "literal braces as {{ and }}"
            ) from None
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in variables:
                plain = name.split(".")[0].split("[")[0]
                why = (
                    "is not a template variable"
                    if plain not in variables
                    else "uses attribute or index access, which templates do not allow"
                )
                raise ValueError(
                    f"{what} uses {{{name}}}, which {why}; allowed: {', '.join(variables)}"
                )
            if spec or conversion:
                raise ValueError(
                    f"the template field {{{name}}} has a conversion or format "
                    "spec; write plain {name} fields only"
                )
