"""Reading a model's Prisoner's Dilemma decision out of its free-text answer.

abm asks a model to end its reply with a line ``Answer: <option>`` (or to reply
with JSON ``{"action": "<option>"}``). Models do not always comply, so
:func:`parse_answer` tries, in order, and the first rule that applies decides (the
numbers are those of docs/answer-parsing.md):

1. and 2. the last decision line (``Answer: testify``, ``Final answer: J``) or JSON
   object, whichever comes last;
3. an answer that is nothing but one option (``Testimony.``, ``1. Remain silent``, ``J``);
4. first-person decision clauses (``I will testify``, ``I choose J``);
5. when no such clause is found, a first line that is nothing but one option,
   followed by an explanation.

abm is a measuring instrument: the parser reads the model's decision, never its
narrative ("Suspect2 testified", "You chose J"), and never guesses. An answer it
cannot read is invalid (action None), which is recorded as data; a wrong reading
would silently corrupt the measurement. docs/answer-parsing.md holds the rules
and a table of examples that tests/test_llm_parsing.py checks row by row.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class AnswerWords:
    """How one framing's two options may be named in an answer.

    ``cooperate`` and ``defect`` name C and D as a decision (base verb, -ing form,
    noun ...). ``past`` are forms that are never read: the past tense, which only
    describes earlier rounds, and misleading phrases ("cooperate with the police").
    A phrasing of one letter is matched case-sensitively and only where a decision
    is expected; longer ones case-insensitively, as whole words, the longest first.
    """

    cooperate: tuple[str, ...]
    defect: tuple[str, ...]
    past: tuple[str, ...] = ()


@dataclass(frozen=True)
class Reading:
    """What :func:`parse_answer` read: ``action`` 0 (C), 1 (D) or None (invalid).

    ``reason`` is "decision_line", "json", "bare", "first_person" or "first_line" when
    valid and
    "empty", "neither", "both", "negated" or "conflict" when not; ``evidence`` is the
    text the reading rests on ("" when nothing was found).
    """

    action: int | None
    reason: str
    evidence: str


def police_words() -> AnswerWords:
    """The police framing: remain silent (C) or testify (D), with inflections and synonyms."""
    return AnswerWords(
        (
            "remain silent",
            "remaining silent",
            "stay silent",
            "staying silent",
            "keep silent",
            "keeping silent",
            "remain quiet",
            "stay quiet",
            "keep quiet",
            "silence",
            "silent",
        ),
        (
            "testify",
            "testifying",
            "testimony",
            "confess",
            "confessing",
            "confession",
            "defect",
            "defecting",
            "defection",
            "betray",
            "betraying",
        ),
        (
            "remained silent",
            "stayed silent",
            "kept silent",
            "kept quiet",
            "cooperated",
            "testified",
            "confessed",
            "defected",
            "betrayed",
            # in an interrogation "cooperate" may mean with the police (testifying) or with
            # the other suspect (silence): never read, rather than guessed
            "cooperate",
            "cooperating",
            "cooperation",
        ),
    )


def label_words(
    c: str, d: str, extra_c: tuple[str, ...] = (), extra_d: tuple[str, ...] = ()
) -> AnswerWords:
    """A neutral or custom framing: the labels ``c`` and ``d`` plus optional extra phrasings."""
    return AnswerWords((c, *extra_c), (d, *extra_d))


_TYPOGRAPHY = str.maketrans(
    {
        "\u2018": "'",
        "\u2019": "'",
        "\u201b": "'",
        "\u2032": "'",
        "\u201c": '"',
        "\u201d": '"',
        "\u201e": '"',
        "\u00ab": '"',
        "\u00bb": '"',
        "\u2013": "-",
        "\u2014": "-",
        "\u00a0": " ",
    }
)
# "**", "__", backticks, and a single "*" hugging a word ("*testify*"; not a bullet "* x")
_EMPHASIS = re.compile(r"\*\*|__|`|(?<![\w*])\*(?=[^\s*])|(?<=[^\s*])\*(?![\w*])")
# a line the model writes for someone else (continuing the dialogue) is not its decision
_OTHER_SPEAKER = re.compile(
    r"^[ \t]*(?:suspect[ \t]*[2-9]|player[ \t]*[2-9]|police|user)"
    r"[ \t]*:.*$",
    re.I | re.M,
)
_SELF_SPEAKER = re.compile(
    r"^[ \t]*(?:suspect[ \t]*1|player(?:[ \t]*1)?|assistant|model|ai)"
    r"[ \t]*:[ \t]*",
    re.I | re.M,
)
_KEY = r"(?:answer|decision|choice|action)"
# "is" only after "my": "The choice is between ..." is narrative, "My choice is J" is not
_DECISION_LINE = re.compile(
    rf"^[ \t]*[#>*\-\u2022]*[ \t]*(?P<head>(?:my[ \t]+)?(?:final[ \t]+)?{_KEY}"
    rf"(?:[ \t]*[:=]|[ \t]+-+|[ \t]*$)|my[ \t]+(?:final[ \t]+)?{_KEY}[ \t]+is\b[ \t]*:?)"
    r"[ \t]*(?P<value>.*)$",
    re.I | re.M,
)
_NEXT_LINE = re.compile(r"\S[^\n]*")
_OTHER_SUBJECT = re.compile(
    r"\b(?:suspect\s*[2-9]|player\s*[2-9]|the\s+other|opponent|partner"
    r"|they|he|she|you|police)\b",
    re.I,
)
_JSON = re.compile(r"\{[^{}]*\}")
_JSON_PAIR = re.compile(rf"""["']?\b{_KEY}\b["']?\s*:\s*(?:"([^"]*)"|'([^']*)')""", re.I)
# a closing "?" is kept: "Testify?" asks rather than answers
_BARE_JUNK = re.compile(
    r"^(?:\d+[.)]|[a-z][.)]|[-*\u2022>])\s+|^(?i:option)\s+|^[\"'(\[<]+"
    r"|[\"')\]>.!,;:]+$"
)
_AGAINST = (
    r"(?:\s+against\s+(?:the\s+other(?:\s+(?:suspect|player|one))?|suspect\s*\d+"
    r"|player\s*\d+|him|her|them|my\s+(?:partner|accomplice)))?"
)
_DISCOURSE = re.compile(r"^\s*(?:no|nope|yes|yeah|ok|okay|sure)\s*[,.!:;\-]+", re.I)
_NOT = (
    r"\b(?:not|never|no|nobody|none|neither|nor|cannot|won'?t|wouldn'?t|don'?t|doesn'?t"
    r"|can'?t)\b|n't\b"
)
_NOT_RX = re.compile(_NOT, re.I)
# "against", "refuse", "avoid" negate only before an option ("I refuse to testify");
# after one they are harmless ("testify against Suspect2")
_NEG_RX = re.compile(_NOT + r"|\b(?:against|refus\w*|declin\w*|avoid\w*)\b", re.I)
_SENTENCE = re.compile(r"(?:[^.!?;\n]|[.!?](?=[^\s.!?]))+[.!?;]*")
_CONDITIONAL = re.compile(
    r"\b(?:if|unless|when|whenever|provided|assuming|supposing|otherwise"
    r"|in\s+case|as\s+long\s+as)\b",
    re.I,
)
_CLAUSE_BOUNDARY = re.compile(r"[,:;()\-]")
# "I decided to testify" narrates an earlier round; "I have decided to" decides now
_NARRATED = re.compile(r"^(?!.*(?:\bhave|'ve)\s).*\bdecided\b", re.I | re.S)
# "Suspect2 thinks I will testify": someone else's belief about me, not my decision
_EMBEDDED = re.compile(
    r"\b(?:that|whether|what|think|thought|believ|expect|know|knew|assum"
    r"|predict|say|said|guess|hope|fear|want|doubt|imagin)\w*\s*$",
    re.I,
)
_COORDINATION = re.compile(r"\s*,?\s*(?:(?:or|and|nor|vs\.?|versus)(?!\w)|/)", re.I)
_CHOICE_VERB = re.compile(
    r"\b(?:choose|choosing|pick|picking|select|selecting|opt|opting|go|going"
    r"|stick|sticking|settle|settling)\b",
    re.I,
)
_SUBJECT = (
    r"(?<![\w'])(?:i(?:'m|'ll|'d|'ve)?(?![\w'])"
    r"|my\s+(?:final\s+)?(?:answer|choice|decision)(?:\s+is\b)?(?:\s*:)?)"
)
# words allowed between the subject and the option; anything else breaks the clause,
# which is what keeps "I think testifying is risky" from counting as a decision
_UNIT = (
    r"(?:will|shall|would|must|do|am|be|have|going|gonna|wanna|to|about|want|wish|prefer"
    r"|intend|plan|need|decide|decided|choose|choosing|pick|picking|select|selecting|opt"
    r"|opting|go|stick|sticking|settle|settling|continue|keep|keeping|for|with|on|the|option"
    r"|(?:like|love)\s+to|(?:think|believe|guess|suppose|feel|reckon|say)(?:\s+that)?\s+i"
    r"(?:'m|'ll|'d|'ve)?|not|never|no|longer|won'?t|wouldn'?t|don'?t|doesn'?t|can'?t|cannot"
    r"|shan'?t|neither|against|refus\w*|declin\w*|avoid\w*|\w+ly|still|also|just|now|then"
    r"|again|therefore|thus|hence|instead|rather|once)(?![\w']):?"
)


@dataclass(frozen=True)
class _Rules:
    option: re.Pattern
    past: re.Pattern | None
    bare: re.Pattern
    clause: re.Pattern
    cooperate: re.Pattern

    def action(self, phrase: str) -> int:
        """The action (0 = C, 1 = D) a matched phrasing stands for.

        The phrasing is matched again rather than looked up, since case folding can
        change the text ("teſtify" matches "testify").
        """
        return 0 if self.cooperate.fullmatch(phrase) else 1


def _alternation(phrases) -> str:
    parts = []
    for p in sorted(set(phrases), key=len, reverse=True):
        body = r"\s+".join(map(re.escape, p.split()))
        parts.append(f"(?-i:{body})" if len(p) == 1 else f"(?i:{body})")
    return r"(?<!\w)(?:" + "|".join(parts) + r")(?!\w)"


@functools.lru_cache(maxsize=64)
def _rules(words: AnswerWords) -> _Rules:
    c, d = (
        {p if len(p) == 1 else " ".join(p.lower().split()) for p in side}
        for side in (words.cooperate, words.defect)
    )
    if not (words.cooperate and words.defect) or "" in c | d or c & d:
        raise ValueError(f"each option needs phrasings, none empty or naming both: {words}")
    option = _alternation(words.cooperate + words.defect)
    return _Rules(
        re.compile(option),
        re.compile(_alternation(words.past)) if words.past else None,
        re.compile(rf"(?P<opt>{option}){_AGAINST}", re.I),
        re.compile(
            rf"(?P<subj>{_SUBJECT})(?P<chain>(?:\s+{_UNIT})*?)"
            rf"\s+(?P<opt>{option})",
            re.I,
        ),
        re.compile(_alternation(words.cooperate)),
    )


def _normalise(text: str) -> str:
    text = _EMPHASIS.sub("", text.translate(_TYPOGRAPHY))
    return _SELF_SPEAKER.sub("", _OTHER_SPEAKER.sub("", text))


def _read_value(value: str, rules: _Rules, reason: str, evidence: str) -> Reading:
    """Read a decision line's or JSON value: exactly one option, not negated."""
    value = _DISCOURSE.sub("", value, count=1)
    hits = list(rules.option.finditer(value))
    actions = {rules.action(h.group()) for h in hits}
    if len(actions) != 1:
        return Reading(None, "both" if actions else "neither", evidence)
    if _OTHER_SUBJECT.search(value[: hits[0].start()]):  # "Answer: Suspect2 will testify"
        return Reading(None, "neither", evidence)
    if _NEG_RX.search(value[: hits[0].start()]) or _NOT_RX.search(value[hits[0].end() :]):
        return Reading(None, "negated", evidence)
    return Reading(actions.pop(), reason, evidence)


def _declared(masked: str, text: str, rules: _Rules) -> Reading | None:
    """Rules 1 and 2: the last decision line or JSON object, whichever comes last."""
    found = []  # (position, value, reason, evidence)
    for m in _DECISION_LINE.finditer(masked):
        value, end = m.group("value"), m.end()
        if not value.strip():  # "Answer:" with the option on the next line
            nxt = _NEXT_LINE.search(masked, m.end())
            value, end = (nxt.group(), nxt.end()) if nxt else ("", end)
        found.append((m.start("head"), value, "decision_line", text[m.start("head") : end].strip()))
    for m in _JSON.finditer(masked):
        values = [a or b for a, b in _JSON_PAIR.findall(m.group())]
        if values:  # conflicting keys in one object read as "both"
            found.append((m.start(), " / ".join(values), "json", text[m.start() : m.end()]))
    if not found:
        return None
    position, value, reason, evidence = max(found, key=lambda f: f[0])
    line = masked.rfind("\n", 0, position)
    # '{"action": "remain silent"} or {"action": "testify"}' echoes the instruction
    same_line = [f for f in found if f[0] > line and f[2] == "json" and f[0] != position]
    if reason == "json" and same_line:
        values = " / ".join([value, *(f[1] for f in same_line)])
        return _read_value(values, rules, reason, masked[same_line[0][0] :].split("\n")[0])
    return _read_value(value, rules, reason, evidence)


def _bare(masked: str, rules: _Rules) -> Reading | None:
    """Rule 3: the whole answer, stripped of numbering, quotes and "option", is one option."""
    core, prev = masked.strip(), None
    while core != prev:
        prev, core = core, _BARE_JUNK.sub("", core).strip()
    m = rules.bare.fullmatch(core)
    # a fullmatch holds no masked past form, so the masked core is the answer's own text
    return Reading(rules.action(m.group("opt")), "bare", core) if m else None


def _first_person(masked: str, text: str, rules: _Rules) -> Reading:
    """Rule 4: unconditional first-person decision clauses, which must agree."""
    votes = []  # (action, or None for a clause naming both; negated; evidence)
    for s in _SENTENCE.finditer(masked):
        sentence = s.group()
        if sentence.rstrip().endswith("?") or _CONDITIONAL.search(sentence):
            continue  # questions and hypotheticals decide nothing
        for m in rules.clause.finditer(sentence):
            opt, subj, chain = m.group("opt", "subj", "chain")
            if len(opt) == 1 and not (_CHOICE_VERB.search(chain) or subj[:2].lower() == "my"):
                continue  # a lone letter is a decision only as the object of a choice
            prefix = _CLAUSE_BOUNDARY.split(sentence[: m.start()])[-1]
            if _EMBEDDED.search(prefix) or _NARRATED.search(subj + chain):
                continue
            # a negation before the subject in the same clause counts: "no way I testify"
            negated = bool(_NEG_RX.search(chain) or _NEG_RX.search(prefix))
            # "I will remain silent or testify" names both; "testify rather than remain
            # silent" and "testify, not remain silent" do not coordinate, so they stay D
            action, coord = rules.action(opt), _COORDINATION.match(sentence, m.end())
            rest = re.split(r"[,:;()]", sentence[coord.end() :])[0] if coord else ""
            if any(rules.action(h.group()) != action for h in rules.option.finditer(rest)):
                action = None
            votes.append((action, negated, text[s.start() + m.start() : s.start() + m.end()]))
    if not votes:
        return Reading(None, "neither", "")
    if any(a is None for a, *_ in votes):
        return Reading(None, "both", " | ".join(e for *_, e in votes))
    chosen = {a for a, neg, _ in votes if not neg}
    refused = {a for a, neg, _ in votes if neg}
    if len(chosen) == 1 and not chosen & refused:  # "I won't testify. I'll remain silent." is C
        action = chosen.pop()
        return Reading(action, "first_person", [e for a, _, e in votes if a == action][-1])
    return Reading(None, "conflict" if chosen else "negated", " | ".join(e for *_, e in votes))


def parse_answer(text: str, words: AnswerWords) -> Reading:
    """Read the decision in ``text``, an answer to a question about ``words``' two options.

    The rules, in order (docs/answer-parsing.md has them in full, with examples): the
    last decision line or JSON object; the whole answer being one option; agreeing,
    unconditional, unnegated first-person decision clauses; when there is no such
    clause, a first line that is one option followed by more lines (a clause naming
    the other option makes it a conflict). Anything else is invalid.

    Args:
        text: The model's answer.
        words: How the framing's two options may be named.

    Returns:
        The reading: the action (0 = C, 1 = D, None when invalid), the rule that read
        it or why it is invalid, and the text it rests on.
    """
    if not text or not text.strip():
        return Reading(None, "empty", "")
    rules = _rules(words)
    text = _normalise(text)
    # past forms ("testified") are blanked, keeping offsets, so no rule can read them
    masked = rules.past.sub(lambda m: "~" * len(m.group()), text) if rules.past else text
    found = _declared(masked, text, rules) or _bare(masked, rules)
    if found is not None:
        return found
    person = _first_person(masked, text, rules)
    # "Testify.\nBecause ..." answers first, then explains: the first line is bare
    lines = masked.strip().split("\n", 1)
    head = _bare(lines[0], rules) if len(lines) > 1 else None
    if head is None or (person.action is None and person.reason != "neither"):
        return person
    if person.action is None:
        return Reading(head.action, "first_line", head.evidence)
    if person.action == head.action:
        return person
    return Reading(None, "conflict", f"{head.evidence} | {person.evidence}")
