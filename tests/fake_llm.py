"""A stand-in for the transformers backend: it reads the prompt text and answers like
Tit-for-tat, so engine, prompts, records and exports can be tested without a model."""

from __future__ import annotations

import json

import numpy as np

from abm.llm.backend import BackendStats


def last_history_line(text: str) -> str:
    lines = [line for line in text.split("\\n") if line.startswith("- ")]
    return lines[-1] if lines else ""


class FakeBackend:
    revision = "fake-1"
    load_seconds = 0.0

    def __init__(self, script=None):
        self.stats = BackendStats()
        self.script = script  # generate: function(prompt text, call number) -> answer
        self.score_batches: list[int] = []
        self.generate_batches: list[int] = []

    def encode(self, messages, answer_prefix=""):
        return [ord(c) for c in json.dumps(messages) + answer_prefix]

    @staticmethod
    def text(ids):
        return "".join(map(chr, ids))

    def label_ids(self, label):
        return [ord(c) for c in label]

    def provoked(self, ids) -> bool:
        last = last_history_line(self.text(ids))
        return "Suspect2: testify" in last or "the other player: F" in last

    def score(self, prompts, labels, max_batch_size=16):
        self.score_batches.append(len(prompts))
        out = np.empty((len(prompts), 2))
        for i, p in enumerate(prompts):
            out[i] = np.log([0.1, 0.9]) if self.provoked(p) else np.log([0.8, 0.2])
        return out

    def generate(self, prompts, *, temperature=0.0, top_p=1.0, max_new_tokens=32, seed=0,
                 max_batch_size=16):
        self.generate_batches.append(len(prompts))
        out = []
        for p in prompts:
            text = self.text(p)
            if "reflect on your decision" in text:
                out.append("I think it went as planned.")
            elif self.script is not None:
                out.append(self.script(text))
            else:
                out.append("I want to testify." if self.provoked(p) else "I want to remain silent.")
        return out
