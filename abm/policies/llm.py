"""The LLM policy: prompts from memory windows, one batched backend call per round, records.

Importing this module is cheap; torch and transformers load when a policy is built.
"""

from __future__ import annotations

import dataclasses

import time
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, model_validator

from abm.game import C, D, EMPTY, PayoffMatrix
from abm.policies.base import Outcome, View, register


class LLMParams(BaseModel):
    """The TOML table of an LLM player (see the README for each key)."""

    model_config = ConfigDict(extra="forbid", protected_namespaces=())
    model: str = "smollm2-135m-instruct"
    mode: Literal["score", "generate"] = "score"
    framing: Literal["police", "neutral", "custom"] = "police"
    template: str | None = None
    labels: tuple[str, str] | None = None
    answer_prefix: str | None = None
    shuffle_labels: bool = False
    system_prompt: str | None = None
    reflection: bool = False
    feed_reflection: bool = True
    reflection_tokens: int = Field(48, ge=1, le=1024)
    temperature: float = Field(0.0, ge=0.0, le=5.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_new_tokens: int = Field(16, ge=1, le=1024)
    fallback: Literal["cooperate", "defect", "random", "repeat_last"] = "cooperate"
    max_batch_size: int = Field(16, ge=1, le=4096)
    device: str = "auto"
    dtype: Literal["auto", "float32", "float16", "bfloat16"] = "auto"
    trust_remote_code: bool = False
    prefix_cache: bool = True
    memoize: bool = True

    @model_validator(mode="after")
    def _framing_needs(self) -> LLMParams:
        if self.framing == "custom" and (self.template is None or self.labels is None):
            raise ValueError("framing = \"custom\" needs template (a file) and labels "
                             "(two strings, C first)")
        if self.framing != "custom" and self.template is not None:
            raise ValueError("template is only used with framing = \"custom\"")
        if self.framing == "police" and self.labels is not None:
            raise ValueError("the police framing has fixed answers (remain silent, testify); "
                             "labels are for the neutral and custom framings")
        if self.labels is not None and (self.labels[0] == self.labels[1] or not all(self.labels)):
            raise ValueError("labels must be two different, non-empty strings")
        return self


_BACKENDS: dict[tuple, Any] = {}


def shared_backend(params: LLMParams) -> Any:
    """One loaded model per (model, device, dtype, options), whoever asks for it."""
    from abm.llm.backend import Backend
    from abm.llm.models import resolve

    key = (params.model, params.device, params.dtype, params.trust_remote_code,
           params.prefix_cache)
    if key not in _BACKENDS:
        _BACKENDS[key] = Backend(resolve(params.model), device=params.device, dtype=params.dtype,
                                 trust_remote_code=params.trust_remote_code,
                                 prefix_cache=params.prefix_cache)
    return _BACKENDS[key]


@register("llm", stochastic=True, uses_llm=True, params=LLMParams,
          description=("A Hugging Face causal language model that reads its memory window "
                       "as text; decides by scoring the two answers or by writing one."))
class LLMPolicy:
    """Decides a whole batch of views with one backend call per round and keeps a
    transcript record of every exchange."""

    def __init__(self, game: PayoffMatrix, **options: Any) -> None:
        from abm.llm import prompts

        self.params = params = LLMParams(**options)
        self.game = game
        if params.framing == "police":
            self.framing = prompts.police()
        elif params.framing == "neutral":
            self.framing = prompts.neutral(params.labels or ("J", "F"))
        else:
            try:
                self.framing = prompts.custom(Path(params.template), params.labels,
                                              params.answer_prefix or "")
            except OSError as exc:
                raise ValueError(f"cannot read the template {params.template}: "
                                 f"{exc.strerror}") from None
            prompts.check_template(self.framing)
        self.answer_prefix = (params.answer_prefix if params.answer_prefix is not None
                              else self.framing.answer_prefix)
        self.backend = shared_backend(params)
        self._stats_start = dataclasses.replace(self.backend.stats)
        # a model loads once per process: the first policy to use it reports the time
        self._load_seconds = 0.0 if getattr(self.backend, "claimed", False) \
            else self.backend.load_seconds
        self.backend.claimed = True
        prefix = self.answer_prefix
        self.label_tokens = (self.backend.label_ids(self._continuation(prefix, self.framing.label_c)),
                             self.backend.label_ids(self._continuation(prefix, self.framing.label_d)))
        self.progress: Any = None  # a tqdm bar, when the run shows one
        self.memo: dict[tuple, Any] = {}
        self.records: list[dict[str, Any]] = []
        self._pending: dict[tuple[int, int, int], dict[str, Any]] = {}
        self._reflections: dict[tuple[int, int, int], str] = {}
        self.counts = {"decisions": 0, "computed": 0, "memo_hits": 0, "invalid": 0,
                       "retries": 0, "fallbacks": 0, "reflections": 0}

    @staticmethod
    def _continuation(prefix: str, label: str) -> str:
        return (" " + label) if prefix and not prefix.endswith(" ") else label

    # ------------------------------------------------------------ prompts

    def messages(self, view: View, i: int, order: tuple[str, str]) -> list[dict[str, str]]:
        """The chat messages of decision ``i`` of ``view``."""
        f, g = self.framing, self.game
        r = int(view.round[i]) + 1
        total = int(view.rounds_total[i]) if view.rounds_total is not None else -1
        variables = {
            "R": f"{g.R:g}", "S": f"{g.S:g}", "T": f"{g.T:g}", "P": f"{g.P:g}",
            "length_rule": (f"There will be {total} {f.round_word}s." if total > 0 else
                            f"You do not know how many {f.round_word}s there will be."),
            "round": r, "of_rounds": f" of {total}" if total > 0 else "",
            "rounds_left": total - r if total > 0 else "unknown",
            "history": self._history(view, i),
            "score": f"{float(view.score[i]):g}" if view.score is not None else "0",
            "reflection": self._reflection_line(view, i),
            "label_c": f.label_c, "label_d": f.label_d, "first": order[0], "second": order[1],
        }
        user = f.rules.format(**variables) + "\n\n" + f.turn.format(**variables)
        out = []
        if self.params.system_prompt:
            out.append({"role": "system", "content": self.params.system_prompt})
        out.append({"role": "user", "content": user})
        return out

    def _history(self, view: View, i: int) -> str:
        f = self.framing
        n = int(view.length[i])
        if n == 0:
            return "Nothing has happened yet."
        lines = [f"What you remember of the last {n} {f.round_word}{'s' if n > 1 else ''} "
                 "(oldest first):"]
        verbs = {0: f.label_c, 1: f.label_d}
        table = self.game.table
        for mine, theirs in zip(view.mine[i, -n:], view.theirs[i, -n:]):
            lines.append(f"- {f.you}: {verbs[int(mine)]}; {f.other}: {verbs[int(theirs)]} "
                         f"({f.you} got {table[mine, theirs]:g} points)")
        return "\n".join(lines)

    def _reflection_line(self, view: View, i: int) -> str:
        if not (self.params.reflection and self.params.feed_reflection):
            return ""
        text = self._reflections.get((view.step, int(view.match[i]), int(_side(view, i))))
        return f"Your reflection after the last {self.framing.round_word}: {text}\n" if text else ""

    # ------------------------------------------------------------ deciding

    def decide(self, view: View, rng: np.random.Generator) -> np.ndarray:
        n = len(view)
        if n == 0:
            return np.zeros(0, np.int8)
        started = time.perf_counter()
        f = self.framing
        orders = [(f.label_c, f.label_d)] * n
        if self.params.shuffle_labels:
            flips = rng.random(n) < 0.5
            orders = [(f.label_d, f.label_c) if flip else (f.label_c, f.label_d) for flip in flips]
        conversations = [self.messages(view, i, orders[i]) for i in range(n)]
        if self.params.mode == "score":
            actions, extra = self._score(conversations, rng)
        else:
            actions, extra = self._generate(conversations, view, rng)
        latency = (time.perf_counter() - started) / n
        self.counts["decisions"] += n
        if self.progress is not None:
            self.progress.update(n)
        for i in range(n):
            record = {
                "step": view.step + 1, "match": int(view.match[i]), "side": int(_side(view, i)),
                "round": int(view.round[i]) + 1, "agent": int(view.agent[i]),
                "opponent": int(view.opponent[i]), "mode": self.params.mode,
                "framing": f.name, "prompt": conversations[i], **extra[i],
                "response": (f"{self.answer_prefix} {extra[i]['answer']}".strip()
                             if self.params.mode == "score" else extra[i]["answer"]),
                "action": "CD"[int(actions[i])], "reflection": None,
                "latency_s": round(latency, 4), "model": self.params.model,
                "revision": self.backend.revision,
            }
            self.records.append(record)
            self._pending[(view.step, record["match"], record["side"])] = record
        return actions

    def _score(self, conversations: list, rng: np.random.Generator) -> tuple[np.ndarray, list]:
        keys = [self.backend.encode(c, self.answer_prefix) for c in conversations]
        logp = self._memoized(keys, lambda todo: list(self.backend.score(
            todo, self.label_tokens, self.params.max_batch_size)), always=True)
        logp = np.array(logp)
        temperature = self.params.temperature
        # probabilities of the two answers, renormalised over the pair
        z = logp - logp.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        if temperature == 0:
            actions = (probs[:, 1] > probs[:, 0]).astype(np.int8)
            draws = rng.random(len(keys))  # keeps the stream aligned with sampling runs
        else:
            tempered = np.exp(z / temperature)
            p_defect = tempered[:, 1] / tempered.sum(axis=1)
            draws = rng.random(len(keys))
            actions = (draws < p_defect).astype(np.int8)
        f = self.framing
        extra = [{"answer": f.label_c if a == C else f.label_d, "valid": True, "retries": 0,
                  "fallback": False, "p_cooperate": float(p[0]), "p_defect": float(p[1]),
                  "logprob_cooperate": float(lp[0]), "logprob_defect": float(lp[1])}
                 for a, p, lp in zip(actions, probs, logp)]
        return actions, extra

    def _generate(self, conversations: list, view: View,
                  rng: np.random.Generator) -> tuple[np.ndarray, list]:
        from abm.llm.parsing import parse_action

        p, f = self.params, self.framing
        seed = int(rng.integers(2**31 - 1))
        keys = [self.backend.encode(c) for c in conversations]
        answers = self._memoized(keys, lambda todo: self.backend.generate(
            todo, temperature=p.temperature, top_p=p.top_p, max_new_tokens=p.max_new_tokens,
            seed=seed, max_batch_size=p.max_batch_size), always=p.temperature == 0)
        parsed = [parse_action(a, f.c_words, f.d_words) for a in answers]
        extra = [{"answer": a, "valid": act is not None, "parse": why, "retries": 0,
                  "fallback": False, "first_answer": None} for a, (act, why) in zip(answers, parsed)]
        bad = [i for i, (act, _) in enumerate(parsed) if act is None]
        if bad:
            self.counts["retries"] += len(bad)
            again = [conversations[i] + [{"role": "assistant", "content": answers[i]},
                                         {"role": "user", "content": f.reminder}] for i in bad]
            retry = self.backend.generate([self.backend.encode(c) for c in again],
                                          temperature=p.temperature, top_p=p.top_p,
                                          max_new_tokens=p.max_new_tokens, seed=seed + 1,
                                          max_batch_size=p.max_batch_size)
            for i, text in zip(bad, retry):
                act, why = parse_action(text, f.c_words, f.d_words)
                extra[i].update(first_answer=answers[i], answer=text, retries=1,
                                valid=act is not None, parse=why)
                parsed[i] = (act, why)
        actions = np.zeros(len(keys), np.int8)
        coin = rng.random(len(keys))
        for i, (act, _) in enumerate(parsed):
            if act is None:
                self.counts["invalid"] += 1
                self.counts["fallbacks"] += 1
                extra[i]["fallback"] = True
                act = self._fallback(view, i, coin[i])
            actions[i] = act
        return actions, extra

    def _fallback(self, view: View, i: int, coin: float) -> int:
        rule = self.params.fallback
        if rule == "repeat_last":
            last = int(view.mine[i, -1]) if view.mine.shape[1] else EMPTY
            return C if last == EMPTY else last
        return {"cooperate": C, "defect": D}.get(rule, D if coin < 0.5 else C)

    def _memoized(self, keys: list[list[int]], compute, always: bool) -> list:
        """Answer each distinct prompt once; with ``always`` also across calls."""
        use_memo = always and self.params.memoize
        tuples = [tuple(k) for k in keys]
        todo = list(dict.fromkeys(t for t in tuples if not (use_memo and t in self.memo)))
        results = dict(zip(todo, compute([list(t) for t in todo]))) if todo else {}
        self.counts["computed"] += len(todo)
        self.counts["memo_hits"] += len(keys) - len(todo)
        if use_memo:
            self.memo.update(results)
            results = {**self.memo, **results}
        return [results[t] for t in tuples]

    # ------------------------------------------------------------ after the round

    def observe(self, outcome: Outcome) -> None:
        """Attach what happened to the pending records; ask for reflections in one batch."""
        keys = [(outcome.step, int(m), int(s)) for m, s in zip(outcome.match, outcome.side)]
        records = [self._pending.pop(k) for k in keys]
        for record, mine, theirs, pay in zip(records, outcome.mine, outcome.theirs,
                                             outcome.payoff):
            record.update(actual="CD"[int(mine)], opponent_action="CD"[int(theirs)],
                          payoff=float(pay))
        if not self.params.reflection or not records:
            return
        f = self.framing
        conversations = []
        for record, mine, theirs in zip(records, outcome.mine, outcome.theirs):
            ask = f.reflect.format(other=f.other, you=f.you, theirs=f.did[int(theirs)],
                                   mine=f.did[int(mine)])
            conversations.append(record["prompt"] + [
                {"role": "assistant", "content": record["response"]},
                {"role": "user", "content": ask}])
        encoded = [self.backend.encode(c) for c in conversations]
        texts = self._memoized(encoded, lambda todo: self.backend.generate(
            todo, temperature=0.0, max_new_tokens=self.params.reflection_tokens,
            max_batch_size=self.params.max_batch_size), always=True)
        self.counts["reflections"] += len(texts)
        for key, record, conversation, text in zip(keys, records, conversations, texts):
            record["reflection"] = text
            record["reflection_prompt"] = conversation[-1]["content"]
            self._reflections[key] = text

    # ------------------------------------------------------------ reporting

    def drain(self) -> list[dict[str, Any]]:
        """The records made since the last call (the run writes them after each step)."""
        out, self.records = self.records, []
        self._reflections.clear()  # keyed by step: nothing carries over
        return out

    def stats(self) -> dict[str, Any]:
        """This run's work: the backend's counters since this policy was made (a
        loaded model serves every run of a process), and the load time if this run
        loaded the model."""
        b, start = self.backend.stats, self._stats_start
        decisions = self.counts["decisions"]
        return {**self.counts, "model": self.params.model, "mode": self.params.mode,
                "invalid_rate": self.counts["invalid"] / decisions if decisions else 0.0,
                "tokens": b.tokens - start.tokens,
                "forward_passes": b.forward_passes - start.forward_passes,
                "generate_calls": b.generate_calls - start.generate_calls,
                "prefix_cache_hits": b.prefix_hits - start.prefix_hits,
                "llm_seconds": round(b.seconds - start.seconds, 3),
                "load_seconds": round(self._load_seconds, 3)}


def _side(view: View, i: int) -> int:
    return int(view.side[i]) if view.side is not None else 0
