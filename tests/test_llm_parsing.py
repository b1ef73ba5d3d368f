"""parse_action: strict reading of a free-text answer.

The rules (abm/llm/parsing.py):
- only the first sentence counts: the text is stripped and cut at the first
  whitespace that follows ".", "!" or "?", or at the first newline;
- a label word matches only as a whole word (no letter, digit or "_" on either
  side); words of several letters match case-insensitively, single letters
  (option labels such as J/F) case-sensitively; of each side's words the
  longest one found counts;
- words of both sides -> (None, "both"); of neither -> (None, "neither");
- a negation (not, never, no, won't, wont, don't, dont, refuse(s), cannot,
  can't, or any word ending in n't) in the 30 characters before the label
  -> (None, "negated"); otherwise (0 for C / 1 for D, "ok").

Every expected value below was written from these rules by hand.
"""

import pytest

from abm.llm.parsing import parse_action
from abm.llm.prompts import neutral, police

C, D = 0, 1
POLICE = police()
JF = neutral(("J", "F"))

POLICE_CASES = [
    # (answer, expected action, expected reason)
    ("I want to remain silent.", C, "ok"),
    ("Suspect1: I want to testify.", D, "ok"),
    ("I will not testify", None, "negated"),
    ("I won't remain silent", None, "negated"),
    ("I will remain silent and not testify", None, "both"),
    ("", None, "neither"),
    ("   \n  ", None, "neither"),
    # "Silence" is not the word "silent"
    ("Silence is golden", None, "neither"),
    ("REMAIN SILENT", C, "ok"),
    ("TeStIfY!", D, "ok"),
    ("I remain silent. Later I might testify.", C, "ok"),
    ("I testify.\nActually, I remain silent.", D, "ok"),
    # the answer in the second sentence does not count
    ("Not sure.\nI testify", None, "neither"),
    ("I do not know. I remain silent.", None, "neither"),
    # "Never" is in the second sentence, so it negates nothing
    ("Testify? Never.", D, "ok"),
    # no whitespace after "!": still one sentence, holding both answers
    ("Testify!I mean, remain silent.", None, "both"),
    # "Mr." ends the first sentence (a known limit of the simple splitter)
    ("Mr. Smith, I testify.", None, "neither"),
    ("  \n I remain silent  ", C, "ok"),
    ("I refuse to testify", None, "negated"),
    ("I couldn't testify", None, "negated"),  # any n't
    ("I wont testify", None, "negated"),
    ("I dont remain silent", None, "negated"),
    ("I cannot remain silent", None, "negated"),
    ("I'd never testify", None, "negated"),
    ("There is no way I testify", None, "negated"),
    # negations about something else still count inside the 30-character window
    ("I have no choice, I testify", None, "negated"),
    ("It isn't easy: I testify", None, "negated"),
    ("I am not going to lie, I testify", None, "negated"),
    # "No" is 48 characters before "testify", outside the window
    ("No, after thinking about it for a long while, I testify", D, "ok"),
    # the longest word found counts: "remain silent" (at 51, its window free of
    # negations), not the earlier, negated "silent"
    ("Not silent for a moment; after thinking it over, I remain silent", C, "ok"),
    # "no" / "not" inside a longer word are not negations
    ("Nothing to hide: I remain silent", C, "ok"),
    ("Nope, I testify", D, "ok"),
    ("I know I testify", D, "ok"),
    ("Another day, I testify", D, "ok"),
    ("I'll keep silent", C, "ok"),
    ("I stay silent", C, "ok"),
    ("Silent.", C, "ok"),
    # "silent" inside "Silently" is not a whole word
    ("Silently, I testify", D, "ok"),
    # "-" is not a word character: "silent" matches on its own
    ("I choose remain-silent", C, "ok"),
    # "_" is a word character: no whole word here
    ("testify_now", None, "neither"),
    ("I testified against Suspect2", D, "ok"),
    ("I will cooperate", C, "ok"),
    ("I defect.", D, "ok"),
    ("I confess", D, "ok"),
    ("I will testify, not remain silent", None, "both"),
    ("I'd rather testify than stay silent", None, "both"),
    ("Cooperate or defect?", None, "both"),
]

NEUTRAL_CASES = [
    ("J", C, "ok"),
    ("Option F", D, "ok"),
    ("j", None, "neither"),          # single letters are case-sensitive
    ("option f", None, "neither"),
    ("I choose J or F", None, "both"),
    ("JF", None, "neither"),         # neither letter is a whole word
    ("F1", None, "neither"),         # a digit is a word character
    ("I choose option J.", C, "ok"),
    ("(F)", D, "ok"),
    ("J's the one", C, "ok"),        # an apostrophe is not a word character
    ("Fine, J", C, "ok"),            # the F of "Fine" is not a whole word
    ("J\nF", C, "ok"),               # the first line only
    ("I choose F. J would be worse.", D, "ok"),
    ("Not J", None, "negated"),
    ("No: F", None, "negated"),
    ("I won't pick F, J it is", None, "both"),
    ("", None, "neither"),
]


def test_the_framings_words():
    assert POLICE.c_words == ("remain silent", "stay silent", "keep silent", "silent",
                              "cooperate")
    assert POLICE.d_words == ("testify", "testified", "confess", "defect")
    assert (JF.c_words, JF.d_words) == (("J",), ("F",))


@pytest.mark.parametrize("text, action, reason", POLICE_CASES,
                         ids=[repr(t) for t, _, _ in POLICE_CASES])
def test_police_answers(text, action, reason):
    assert parse_action(text, POLICE.c_words, POLICE.d_words) == (action, reason)


@pytest.mark.parametrize("text, action, reason", NEUTRAL_CASES,
                         ids=[repr(t) for t, _, _ in NEUTRAL_CASES])
def test_neutral_single_letter_answers(text, action, reason):
    assert parse_action(text, JF.c_words, JF.d_words) == (action, reason)


@pytest.mark.parametrize("text, action, reason", [
    ("alpha", C, "ok"),              # several letters: case-insensitive
    ("BETA.", D, "ok"),
    ("Alphabet soup", None, "neither"),
    ("Alpha or Beta", None, "both"),
    ("I don't choose Beta", None, "negated"),
])
def test_neutral_word_labels(text, action, reason):
    f = neutral(("Alpha", "Beta"))
    assert parse_action(text, f.c_words, f.d_words) == (action, reason)


def test_labels_with_regex_characters_are_literal():
    assert parse_action("I pick (a)", ("(a)",), ("(b)",)) == (C, "ok")
    assert parse_action("I pick a", ("(a)",), ("(b)",)) == (None, "neither")
    assert parse_action("I pick a.b", ("a.b",), ("c.d",)) == (C, "ok")
    assert parse_action("I pick axb", ("a.b",), ("c.d",)) == (None, "neither")


@pytest.mark.parametrize("text", ["I won\u2019t testify", "I don\u2019t remain silent",
                                  "I can\u2019t testify"])
def test_negation_with_a_typographic_apostrophe(text):
    assert parse_action(text, POLICE.c_words, POLICE.d_words) == (None, "negated")
