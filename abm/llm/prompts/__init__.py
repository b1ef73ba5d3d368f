"""Prompt framings: the experiment's police story, a neutral game, or a custom template.

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
from dataclasses import dataclass
from pathlib import Path

from abm.llm.parsing import AnswerWords, label_words, police_words

HERE = Path(__file__).resolve().parent

VARIABLES = ("R", "S", "T", "P", "length_rule", "round", "of_rounds", "rounds_left", "history",
             "score", "reflection", "label_c", "label_d", "first", "second", "answer_format")


@dataclass(frozen=True)
class Framing:
    """Everything a framing decides: texts, labels, how answers are read and scored.

    ``phrasings`` are the continuations of ``answer_prefix`` whose probabilities
    make up each option in score mode (C's first, then D's).
    """

    name: str
    rules: str
    turn: str
    label_c: str
    label_d: str
    answer_prefix: str
    words: AnswerWords
    phrasings: tuple[tuple[str, ...], tuple[str, ...]]
    you: str
    other: str
    round_word: str
    reflect: str = ("In this round, {other} chose {theirs}, while {you} chose {mine}. Based "
                    "on this outcome, please reflect on your decision-making in this game.")
    did: tuple[str, str] = ("", "")
    speaker: str = ""  # who asks the questions ("Police: "), for reminders

    def answer_format(self, mode: str, first: str, second: str, style: str = "line") -> str:
        """The sentence that tells the model how to answer, options in the order shown."""
        if mode == "score":
            return f'Answer with "{first}" or "{second}".'
        if style == "json":
            return (f'Reply with JSON only: {{"action": "{first}"}} or '
                    f'{{"action": "{second}"}}.')
        return f'Reply with one line: "Answer: {first}" or "Answer: {second}".'

    def reminder(self, mode: str, first: str, second: str, style: str = "line") -> str:
        """What a retry after an unreadable answer says."""
        return (f"{self.speaker}Your reply could not be read. "
                + self.answer_format(mode, first, second, style))


def split_template(text: str) -> tuple[str, str]:
    """(rules, turn) of a template file; ValueError without the ``---`` line."""
    head, sep, tail = text.partition("\n---\n")
    if not sep:
        raise ValueError("a prompt template needs a line '---' between the rules and the turn")
    return head.strip(), tail.strip()


def police() -> Framing:
    """The experiment's story: Suspect1 questioned by the Police; remain silent = C."""
    rules, turn = split_template((HERE / "police.txt").read_text(encoding="utf-8"))
    return Framing(
        "police", rules, turn, "remain silent", "testify", "Suspect1: I want to", police_words(),
        ((" remain silent", " stay silent", " keep silent", " remain quiet", " stay quiet",
          " keep quiet"),
         (" testify", " confess", " defect", " betray")),
        "Suspect1", "Suspect2", "interrogation",
        "Police: In this simulation, {other} {theirs}, while {you} {mine}. Based on this "
        "outcome, please reflect on your decision-making in this simulation.",
        ("remained silent", "testified against the other"), speaker="Police: ")


def neutral(labels: tuple[str, str]) -> Framing:
    """An abstract two-option game; ``labels`` name C and D."""
    rules, turn = split_template((HERE / "neutral.txt").read_text(encoding="utf-8"))
    c, d = labels
    return Framing("neutral", rules, turn, c, d, "I choose option", label_words(c, d),
                   ((" " + c,), (" " + d,)), "you", "the other player", "round", did=(c, d))


def custom(path: Path, labels: tuple[str, str], answer_prefix: str) -> Framing:
    """A template file of the user's; ``labels`` name C and D."""
    rules, turn = split_template(path.read_text(encoding="utf-8"))
    c, d = labels
    space = " " if answer_prefix and not answer_prefix.endswith(" ") else ""
    return Framing("custom", rules, turn, c, d, answer_prefix, label_words(c, d),
                   ((space + c,), (space + d,)), "you", "the other player", "round", did=(c, d))


def check_template(framing: Framing) -> None:
    """ValueError naming any field a template uses that abm does not provide, or uses
    with attribute access, indexing, a conversion or a format spec."""
    for part in (framing.rules, framing.turn):
        try:
            fields = list(string.Formatter().parse(part))
        except ValueError as exc:
            raise ValueError(f"the template is not a valid format string ({exc}); write "
                             "literal braces as {{ and }}") from None
        for _, name, spec, conversion in fields:
            if name is None:
                continue
            if name not in VARIABLES:
                plain = name.split(".")[0].split("[")[0]
                why = ("is not a template variable" if plain not in VARIABLES
                       else "uses attribute or index access, which templates do not allow")
                raise ValueError(f"the template uses {{{name}}}, which {why}; allowed: "
                                 f"{', '.join(VARIABLES)}")
            if spec or conversion:
                raise ValueError(f"the template field {{{name}}} has a conversion or format "
                                 "spec; write plain {name} fields only")
