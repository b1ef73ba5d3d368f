"""Prompt framings: the experiment's police story, a neutral game, or a custom template.

A template file has two parts separated by a line ``---``: the rules (the
same in every prompt of a run, so their key/value cache is reused) and the
turn (this decision). Both are ``str.format`` templates over these variables:

``R``, ``S``, ``T``, ``P``   the payoffs
``length_rule``              one sentence on the match length
``round``                    this round's number in the match, from 1
``of_rounds``                " of N" when the length is fixed, else ""
``rounds_left``              rounds left after this one, or "unknown"
``history``                  the memory window as text, oldest first
``score``                    points in the current match so far
``reflection``               the last reflection line (empty when off or none yet)
``label_c``, ``label_d``     the labels of the cooperative and the defecting option
``first``, ``second``        the two labels in the order shown this time
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Framing:
    """Everything a framing decides: texts, labels and how answers are read."""

    name: str
    rules: str
    turn: str
    label_c: str
    label_d: str
    answer_prefix: str
    c_words: tuple[str, ...]
    d_words: tuple[str, ...]
    you: str
    other: str
    round_word: str
    reminder: str
    reflect: str = ("In this round, {other} chose {theirs}, while {you} chose {mine}. Based "
                    "on this outcome, please reflect on your decision-making in this game.")
    did: tuple[str, str] = ("", "")


def split_template(text: str) -> tuple[str, str]:
    """(rules, turn) of a template file; ValueError without the ``---`` line."""
    head, sep, tail = text.partition("\n---\n")
    if not sep:
        raise ValueError("a prompt template needs a line '---' between the rules and the turn")
    return head.strip(), tail.strip()


def police() -> Framing:
    rules, turn = split_template((HERE / "police.txt").read_text(encoding="utf-8"))
    return Framing("police", rules, turn, "remain silent", "testify", "Suspect1: I want to",
                   ("remain silent", "stay silent", "keep silent", "silent", "cooperate"),
                   ("testify", "testified", "confess", "defect"), "Suspect1", "Suspect2",
                   "interrogation",
                   'Police: Please answer with exactly "remain silent" or "testify".',
                   "Police: In this simulation, {other} {theirs}, while {you} {mine}. Based on "
                   "this outcome, please reflect on your decision-making in this simulation.",
                   ("remained silent", "testified against the other"))


def neutral(labels: tuple[str, str]) -> Framing:
    rules, turn = split_template((HERE / "neutral.txt").read_text(encoding="utf-8"))
    c, d = labels
    return Framing("neutral", rules, turn, c, d, "I choose option", (c,), (d,), "you",
                   "the other player", "round",
                   f"Please answer with exactly one option: {c} or {d}.", did=(c, d))


def custom(path: Path, labels: tuple[str, str], answer_prefix: str) -> Framing:
    rules, turn = split_template(path.read_text(encoding="utf-8"))
    c, d = labels
    return Framing("custom", rules, turn, c, d, answer_prefix, (c,), (d,), "you",
                   "the other player", "round",
                   f"Please answer with exactly one of: {c} or {d}.", did=(c, d))


VARIABLES = ("R", "S", "T", "P", "length_rule", "round", "of_rounds", "rounds_left", "history",
             "score", "reflection", "label_c", "label_d", "first", "second")


def check_template(framing: Framing) -> None:
    """ValueError naming any variable a template uses that abm does not provide."""
    values = {name: "" for name in VARIABLES}
    for part in (framing.rules, framing.turn):
        try:
            part.format(**values)
        except KeyError as exc:
            raise ValueError(f"the template uses {{{exc.args[0]}}}, which is not a template "
                             f"variable; allowed: {', '.join(VARIABLES)}") from None
        except (IndexError, ValueError) as exc:
            raise ValueError(f"the template is not a valid format string ({exc}); write "
                             "literal braces as {{ and }}") from None
