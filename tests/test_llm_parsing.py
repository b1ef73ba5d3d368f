"""parse_answer: reading a decision, never a narrative, out of a free-text answer.

The examples table in docs/answer-parsing.md is read and checked row by row, so the
documentation cannot drift from the code; the tests below pin the reasons and evidence,
robustness, and that history and the other player are never read as a decision. Every
expected value was written by hand from the rules in that document.
"""

import re
from pathlib import Path

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from abm.llm.parsing import AnswerWords, Reading, label_words, parse_answer, police_words

C, D = 0, 1
DOC = Path(__file__).parents[1] / "docs" / "answer-parsing.md"
POLICE = police_words()
JF = label_words("J", "F")
AB = label_words("A", "B")
READ_AS = {"C": C, "D": D, "invalid": None}


def words_for(framing: str) -> AnswerWords:
    """The table's framing column: "police", or "neutral C/D" / "custom C/D" labels."""
    if framing == "police":
        return POLICE
    kind, _, labels = framing.partition(" ")
    assert kind in ("neutral", "custom"), framing
    c, d = labels.split("/")
    return label_words(c, d)


def table_rows() -> list[tuple[str, str, str, str]]:
    rows = []
    for line in DOC.read_text(encoding="utf-8").splitlines():
        if not line.startswith("|") or line.startswith(("| framing", "|---")):
            continue
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line)[1:-1]]
        assert len(cells) == 4, line
        framing, answer, read_as, why = cells
        assert answer.startswith("`") and answer.endswith("`"), line
        answer = answer[1:-1].replace("\\n", "\n").replace("\\|", "|")
        rows.append((framing, answer, read_as, why))
    return rows


ROWS = table_rows()


def test_the_table_is_there_and_covers_every_framing():
    assert len(ROWS) >= 45
    assert {f for f, *_ in ROWS} >= {"police", "neutral J/F", "neutral A/B", "custom HOLD/BUY"}
    assert {r for _, _, r, _ in ROWS} == set(READ_AS)
    assert len({(f, a) for f, a, *_ in ROWS}) == len(ROWS), "a row is repeated"


@pytest.mark.parametrize(
    "framing, answer, read_as, why", ROWS, ids=[f"{f}: {a!r}" for f, a, *_ in ROWS]
)
def test_documented_example(framing, answer, read_as, why):
    assert parse_answer(answer, words_for(framing)).action == READ_AS[read_as], why


VALID = [(f, a) for f, a, r, _ in ROWS if r != "invalid"]


@pytest.mark.parametrize("framing, answer", VALID, ids=[f"{f}: {a!r}" for f, a in VALID])
def test_a_final_decision_line_overrides_any_valid_answer(framing, answer):
    words = words_for(framing)
    action = parse_answer(answer, words).action
    other = (words.cooperate, words.defect)[1 - action][0]
    assert parse_answer(f"{answer}\nAnswer: {other}", words) == Reading(
        1 - action, "decision_line", f"Answer: {other}"
    )


@pytest.mark.parametrize(
    "text, words, expected",
    [
        ("Answer: testify", POLICE, Reading(D, "decision_line", "Answer: testify")),
        ("Thinking...\nFinal answer: J", JF, Reading(C, "decision_line", "Final answer: J")),
        (
            "Answer:\n  remain silent",
            POLICE,
            Reading(C, "decision_line", "Answer:\n  remain silent"),
        ),
        (
            "Answer: remain silent or testify",
            POLICE,
            Reading(None, "both", "Answer: remain silent or testify"),
        ),
        ("Answer: not testify", POLICE, Reading(None, "negated", "Answer: not testify")),
        ("Answer: no idea", POLICE, Reading(None, "neither", "Answer: no idea")),
        ('I think so. {"action": "F"} done', JF, Reading(D, "json", '{"action": "F"}')),
        ("1. Remain silent", POLICE, Reading(C, "bare", "Remain silent")),
        ("Option F.", JF, Reading(D, "bare", "F")),
        ("Testify against Suspect2.", POLICE, Reading(D, "bare", "Testify against Suspect2")),
        (
            "I am testifying against Suspect2.",
            POLICE,
            Reading(D, "first_person", "I am testifying"),
        ),
        ("Hmm. I choose option J, I think.", JF, Reading(C, "first_person", "I choose option J")),
        (
            "I will testify. I will testify again.",
            POLICE,
            Reading(D, "first_person", "I will testify"),
        ),
        ("I won't remain silent.", POLICE, Reading(None, "negated", "I won't remain silent")),
        (
            "I will testify. Actually, I will remain silent.",
            POLICE,
            Reading(None, "conflict", "I will testify | I will remain silent"),
        ),
        (
            "I will testify. I will not testify.",
            POLICE,
            Reading(None, "conflict", "I will testify | I will not testify"),
        ),
        ("I choose J or F.", JF, Reading(None, "both", "I choose J")),
        ("", POLICE, Reading(None, "empty", "")),
        (" \n\t ", JF, Reading(None, "empty", "")),
        ("Silence is golden", POLICE, Reading(None, "neither", "")),
        ("You chose J.", JF, Reading(None, "neither", "")),
        ("Testify.\nBecause it pays.", POLICE, Reading(D, "first_line", "Testify")),
        (
            "Testify.\nNo, I will remain silent.",
            POLICE,
            Reading(None, "conflict", "Testify | I will remain silent"),
        ),
    ],
)
def test_reason_and_evidence(text, words, expected):
    assert parse_answer(text, words) == expected


@pytest.mark.parametrize(
    "text, words, action",
    [
        ("\u201cremain silent\u201d", POLICE, C),  # typographic quotes
        ("I won\u2019t testify. I\u2019ll remain silent.", POLICE, C),
        ("__Answer__: testify", POLICE, D),
        ("`testify`", POLICE, D),
        ("Player: J", JF, C),
        ("Assistant: I choose F.", JF, D),
        ("Reasoning here.\nSuspect1: Answer: remain silent", POLICE, C),
        ("> Answer: testify", POLICE, D),
        ("Answer = testify", POLICE, D),
        ('Answer: "testify"', POLICE, D),
        ("My final answer is: remain silent", POLICE, C),
        ("Answer: No, testify.", POLICE, D),  # a leading "No," is a discourse marker
        ("Answer: testify against Suspect2", POLICE, D),  # "against" after the option is harmless
        ("Answer: against testifying", POLICE, None),
        ("The choice is between testifying and remaining silent.\nI will testify.", POLICE, D),
    ],
)
def test_normalisation_and_decision_lines(text, words, action):
    assert parse_answer(text, words).action == action


def test_the_longest_phrasing_wins():
    # a D phrasing that is a prefix of a C one must not hide the longer one
    words = AnswerWords(("keep out",), ("keep",))
    assert parse_answer("keep out", words).action == C
    assert parse_answer("keep", words).action == D
    assert parse_answer("Answer: keep out", words).action == C


def test_labels_with_regex_characters_are_literal():
    words = label_words("(a)", "(b)")
    assert parse_answer("Answer: (a)", words).action == C
    assert parse_answer("Answer: a", words).action is None
    dotted = label_words("a.b", "c.d")
    assert parse_answer("Answer: c.d", dotted).action == D
    assert parse_answer("Answer: cxd", dotted).action is None


def test_label_words_and_extra_phrasings():
    words = label_words("HOLD", "BUY", extra_c=("holding",), extra_d=("buying",))
    assert words == AnswerWords(("HOLD", "holding"), ("BUY", "buying"))
    assert parse_answer("I am holding.", words).action == C
    assert parse_answer("I am buying.", words).action == D
    assert parse_answer("I am holding.", label_words("HOLD", "BUY")).action is None


@pytest.mark.parametrize(
    "words",
    [
        AnswerWords(("go",), ("Go",)),
        AnswerWords(("",), ("x",)),
        AnswerWords(("  ",), ("x",)),
        AnswerWords((), ("x",)),
    ],
)
def test_phrasings_must_be_present_and_distinct(words):
    with pytest.raises(ValueError, match="both"):
        parse_answer("x", words)


def test_unicode_case_folding_does_not_break_the_reading():
    # re's case-insensitive matching lets "ſ" (long s) match "s": still D, no crash
    assert parse_answer("I will teſtify.", POLICE).action == D
    assert parse_answer("Answer: TEſTIFY", POLICE).action == D


def test_police_words():
    w = POLICE
    assert w.cooperate[0] == "remain silent" and w.defect[0] == "testify"
    assert {"silence", "staying silent"} <= set(w.cooperate)
    assert {"cooperate", "cooperation"} <= set(w.past)  # ambiguous: never read
    assert {"testimony", "defecting", "confession", "betraying"} <= set(w.defect)
    assert {"testified", "remained silent", "cooperated"} <= set(w.past)
    assert not set(w.cooperate) & set(w.defect)
    assert hash(w) == hash(police_words())  # frozen, so it can key the compiled-rule cache


PAST_TEMPLATES = [
    "I {p}.",
    "I {p} last time.",
    "{P}.",
    "Answer: {p}",
    '{{"action": "{p}"}}',
    "Suspect2 {p}.",
    "We both {p} in interrogation 2.",
    "Last round I {p}.",
]
OTHER_PLAYER = [
    "Suspect2 will testify.",
    "Suspect2 will remain silent.",
    "Suspect2 testifies.",
    "Suspect2 remains silent.",
    "They chose to testify.",
    "He wants to remain silent.",
    "You chose J.",
    "The other player chose F.",
    "They picked J.",
    "The other player will choose F.",
    "You will probably choose J next.",
]


@pytest.mark.parametrize("past", POLICE.past)
@pytest.mark.parametrize("template", PAST_TEMPLATES)
def test_a_past_form_is_never_a_decision(template, past):
    text = template.format(p=past, P=past.capitalize())
    assert parse_answer(text, POLICE).action is None


@pytest.mark.parametrize("text", OTHER_PLAYER)
def test_the_other_player_is_never_a_decision(text):
    for words in (POLICE, JF):
        assert parse_answer(text, words).action is None


FRAGMENTS = [
    "I",
    "I'll",
    "will",
    "not",
    "never",
    "want to",
    "choose",
    "testify",
    "remain silent",
    "silent",
    "testified",
    "J",
    "F",
    "A",
    "B",
    "a",
    "Answer:",
    "Final answer:",
    "\n",
    "{",
    "}",
    '"action":',
    '"J"',
    ".",
    ",",
    "?",
    "if",
    "No,",
    "or",
    "option",
    "1.",
    "Suspect2",
    "Police:",
    "**",
    "\u2019",
    "~",
    "-",
    "against",
    "my choice is",
    "\u017f",
    "te\u017ftify",
    "\u0130",
]


@pytest.mark.slow
@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(), st.lists(st.sampled_from(FRAGMENTS), max_size=25).map(" ".join)))
def test_any_text_reads_without_error(text):
    for words in (POLICE, JF, AB):
        reading = parse_answer(text, words)
        assert reading.action in (C, D, None)
        assert reading.reason in (
            {"decision_line", "json", "bare", "first_person", "first_line"}
            if reading.action is not None
            else {"empty", "neither", "both", "negated", "conflict"}
        )
        assert isinstance(reading.evidence, str)


@settings(max_examples=200, deadline=None)
@given(st.text(), st.sampled_from([("testify", D), ("remain silent", C)]))
def test_a_last_answer_line_decides_after_any_text(text, option):
    phrase, action = option
    assert parse_answer(f"{text}\nAnswer: {phrase}", POLICE).action == action
