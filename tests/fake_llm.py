"""A stand-in for the transformers backend: it reads the prompt text and answers like
Tit-for-tat, so engine, prompts, records and exports can be tested without a model.

Token ids are the characters of the rendered text, so every method can read
back exactly what the real backend would have been given.
"""

from __future__ import annotations

import re

import numpy as np

from abm.llm.stats import BackendStats

_PAYOFF_LINE = re.compile(r"- you both choose (.+?): you get")


def last_history_line(text: str) -> str:
    lines = [line for line in text.split("\n") if line.startswith("- ") and "(" in line]
    return lines[-1] if lines else ""


def labels_in(text: str) -> tuple[str, str]:
    """(C label, D label) as a prompt defines them: police answers, or the neutral
    payoff list, whose first line is mutual C and last mutual D."""
    found = _PAYOFF_LINE.findall(text)
    return (found[0], found[-1]) if found else ("remain silent", "testify")


class FakeBackend:
    revision = "fake-1"
    load_seconds = 0.0

    def __init__(self, script=None, phrase_probs=None):
        self.stats = BackendStats()
        self.script = script  # generate: function(prompt text) -> answer
        # score: function(prompt text) -> {phrasing text: probability}
        self.phrase_probs = phrase_probs
        self.score_batches: list[int] = []
        self.generate_batches: list[int] = []
        self.generate_temperatures: list[float] = []
        self.generate_seeds: list[int] = []

    # ------------------------------------------------------------ prompts

    def render(self, messages, answer_prefix="", chat_template=None):
        turns = "".join(f"<{m['role']}>\n{m['content']}\n" for m in messages)
        return turns + "<assistant>\n" + answer_prefix

    def tokenize(self, text):
        return [ord(c) for c in text]

    def encode(self, messages, answer_prefix="", chat_template=None):
        return self.tokenize(self.render(messages, answer_prefix, chat_template))

    def continuation_ids(self, context, text):
        return [ord(c) for c in text]

    @staticmethod
    def text(ids):
        return "".join(map(chr, ids))

    def provoked(self, text: str) -> bool:
        """The opponent's last remembered move was D."""
        last = last_history_line(text)
        _, d = labels_in(text)
        return bool(last) and last.split(";")[1].split("(")[0].strip().endswith(": " + d)

    # ------------------------------------------------------------ scoring

    def default_probs(self, text: str) -> dict[str, float]:
        c, d = labels_in(text)
        pc = 0.1 if self.provoked(text) else 0.8
        return {c: pc, d: 1 - pc}

    def score_phrasings(self, prompts, phrasings, max_batch_size=16):
        self.score_batches.append(len(prompts))
        out = np.empty((len(prompts), len(phrasings)))
        for i, p in enumerate(prompts):
            text = self.text(p)
            probs = (self.phrase_probs or self.default_probs)(text)
            for k, phrase in enumerate(phrasings):
                out[i, k] = np.log(probs.get(self.text(phrase).strip(), 1e-9))
        return out

    # ------------------------------------------------------------ generation

    def generate(
        self, prompts, *, temperature=0.0, top_p=1.0, max_new_tokens=32, seed=0, max_batch_size=16
    ):
        self.generate_batches.append(len(prompts))
        self.generate_temperatures.append(temperature)
        self.generate_seeds.append(seed)
        out = []
        for p in prompts:
            text = self.text(p)
            if "reflect on your decision" in text.rsplit("<user>", 1)[-1]:
                out.append("I think it went as planned.")
            elif self.script is not None:
                out.append(self.script(text))
            else:
                c, d = labels_in(text)
                out.append(f"Answer: {d if self.provoked(text) else c}")
        return out
