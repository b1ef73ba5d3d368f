"""The LLM policy: prompts from memory windows, one batched backend call per round, records.

Importing this module is cheap; torch and transformers load when a policy is built.
What is recorded is what the model did: an answer that cannot be read is
invalid (the engine plays nothing for it) unless the scenario names a
fallback rule, and then the played action is flagged as the rule's.
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path
from typing import Any

import numpy as np

from abm.game import EMPTY, INVALID, C, D, PayoffMatrix
from abm.llm.reflections import clean_reflection
from abm.policies.base import Decisions, Outcome, View, register
from abm.policies.base import make as make_policy
from abm.policies.llm_backends import shared_backend
from abm.policies.llm_params import LLMParams


@dataclasses.dataclass(frozen=True)
class Shown:
    """How one decision's options were presented.

    Which label meant C and which D, and which came first.
    """

    label_c: str
    label_d: str
    d_first: bool
    swapped: bool

    @property
    def order(self) -> tuple[str, str]:
        """The two labels in the order the prompt names them."""
        return (self.label_d, self.label_c) if self.d_first else (self.label_c, self.label_d)


@register(
    "llm",
    stochastic=True,
    uses_llm=True,
    params=LLMParams,
    description=(
        "A Hugging Face causal language model that reads its memory window "
        "as text; decides by scoring the two answers or by writing one."
    ),
)
class LLMPolicy:
    """Decides a whole batch of views with one backend call per round.

    It keeps a transcript record of every exchange.

    Args:
        game: The payoffs the prompts state.
        **options: The keys of the player's table (``LLMParams``).

    Raises:
        ValueError: When the parameters are invalid or a custom template cannot be read
            or uses fields abm does not provide.
        ScenarioError: When the model cannot be found or torch or transformers is not
            installed.
    """

    def __init__(self, game: PayoffMatrix, **options: Any) -> None:
        """Read the framing and get the shared backend, loading the model if needed."""
        from abm.llm import chat_formats, prompts

        self.params = params = LLMParams(**options)
        self.game = game
        make = prompts.FRAMINGS[params.framing]
        if params.template is None:  # a built-in framing: only its labels may change
            self.framing = make(**({"labels": params.labels} if params.labels else {}))
        else:  # a framing of the user's, read from the template file
            parts = params.parts.options() if params.parts is not None else {}
            try:
                self.framing = make(
                    template=Path(params.template),
                    labels=params.labels,
                    answer_prefix=params.answer_prefix or "",
                    **parts,
                )
            except OSError as exc:
                raise ValueError(
                    f"cannot read the template {params.template}: {exc.strerror}"
                ) from None
            prompts.check_template(self.framing)
        self.chat_template = (
            chat_formats.chat_template(params.chat_template) if params.chat_template else None
        )
        self.answer_prefix = (
            params.answer_prefix if params.answer_prefix is not None else self.framing.answer_prefix
        )
        self.backend = shared_backend(params)
        self.teacher = make_policy(params.rule_teacher, {}, game) if params.rule_teacher else None
        # a run's work must not depend on what an earlier run in this process cached
        if hasattr(self.backend, "reset_prefix_cache"):
            self.backend.reset_prefix_cache()
        self._stats_start = dataclasses.replace(self.backend.stats)
        # a loaded model serves several runs: this run's splits are those from now on
        self._splits_start = getattr(self.backend, "oom_splits", 0)
        self._capped_start = getattr(self.backend, "capped_calls", 0)
        # a model loads once per process: the first policy to use it reports the time
        self._load_seconds = (
            0.0 if getattr(self.backend, "claimed", False) else self.backend.load_seconds
        )
        self.backend.claimed = True
        self._phrase_ids: dict[bool, tuple[list[list[int]], np.ndarray, list[str]]] = {}
        self.progress: Any = None  # a tqdm bar, when the run shows one
        self.memo: dict[tuple, Any] = {}
        self.records: list[dict[str, Any]] = []
        self._pending: dict[tuple[int, int, int], dict[str, Any]] = {}
        self._reflections: dict[tuple[int, int, int], str] = {}
        self.counts = {
            "decisions": 0,
            "computed": 0,
            "memo_hits": 0,
            "invalid": 0,
            "retries": 0,
            "fallbacks": 0,
            "reflections": 0,
        }
        self._mass: list[float] = []
        self._reflection_seed = 0
        self._by_order = {"CD": [0, 0, 0.0], "DC": [0, 0, 0.0]}  # read, read as C, sum P(C)

    # ------------------------------------------------------------ prompts

    def _shown(self, n: int, rng: np.random.Generator) -> list[Shown]:
        p, f = self.params, self.framing
        d_first = np.full(n, p.option_order == "reversed")
        if p.option_order == "random":
            d_first = rng.random(n) < 0.5
        swapped = np.full(n, p.label_assignment == "swapped")
        if p.label_assignment == "random":
            swapped = rng.random(n) < 0.5
        out = []
        for first, swap in zip(d_first, swapped, strict=True):
            c, d = (f.label_d, f.label_c) if swap else (f.label_c, f.label_d)
            out.append(Shown(c, d, bool(first), bool(swap)))
        return out

    def messages(self, view: View, i: int, shown: Shown) -> list[dict[str, str]]:
        """The chat messages of decision ``i`` of ``view``, options as ``shown``."""
        f, g = self.framing, self.game
        r = int(view.round[i]) + 1
        total = int(view.rounds_total[i]) if view.rounds_total is not None else -1
        first, second = shown.order
        variables = {
            "R": f"{g.R:g}",
            "S": f"{g.S:g}",
            "T": f"{g.T:g}",
            "P": f"{g.P:g}",
            "length_rule": (
                f"There will be {total} {f.round_word}s."
                if total > 0
                else f"You do not know how many {f.round_word}s there will be."
            ),
            "round": r,
            "of_rounds": f" of {total}" if total > 0 else "",
            "rounds_left": total - r if total > 0 else "unknown",
            "history": self._history(view, i, shown),
            "score": f"{self._remembered_points(view, i):g}",
            "reflection": self._reflection_line(view, i),
            "label_c": shown.label_c,
            "label_d": shown.label_d,
            "first": first,
            "second": second,
            "answer_format": f.answer_format(
                self.params.mode, first, second, self.params.answer_format
            ),
        }
        user = f.rules.format(**variables) + "\n\n" + f.turn.format(**variables)
        out = []
        if self.params.system_prompt:
            out.append({"role": "system", "content": self.params.system_prompt})
        out.append({"role": "user", "content": user})
        return out

    def _history(self, view: View, i: int, shown: Shown) -> str:
        f = self.framing
        n = int(view.length[i])
        if n == 0:
            return "Nothing has happened yet."
        lines = [
            f"What you remember of the last {n} {f.round_word}{'s' if n > 1 else ''} "
            "(oldest first):"
        ]
        verbs = {C: shown.label_c, D: shown.label_d}
        table = self.game.table
        for mine, theirs in zip(view.mine[i, -n:], view.theirs[i, -n:], strict=True):
            lines.append(
                f"- {f.you}: {verbs[int(mine)]}; {f.other}: {verbs[int(theirs)]} "
                f"({f.you} got {table[mine, theirs]:g} points)"
            )
        return "\n".join(lines)

    def _remembered_points(self, view: View, i: int) -> float:
        """Points of the remembered rounds only.

        A whole-match score would tell the model about rounds its memory window has dropped.
        """
        n = int(view.length[i])
        if n == 0:
            return 0.0
        return float(self.game.table[view.mine[i, -n:], view.theirs[i, -n:]].sum())

    def _reflection_line(self, view: View, i: int) -> str:
        if not (self.params.reflection and self.params.feed_reflection):
            return ""
        text = self._reflections.get((view.step, int(view.match[i]), int(_side(view, i))))
        return f"Your reflection after the last {self.framing.round_word}: {text}\n" if text else ""

    # ------------------------------------------------------------ deciding

    def decide(self, view: View, rng: np.random.Generator) -> Decisions:
        """Ask the model for every row of ``view`` in one batch and record each exchange.

        Args:
            view: The batch of decisions to make.
            rng: The policy stream; option order, label assignment and sampling draw
                from it.

        Returns:
            One action per row (INVALID for an answer that could not be read, unless a
            fallback rule played it) and which rows the fallback rule played.

        Raises:
            ScenarioError: In score mode, when a phrasing begins with the tokens of one
                that stands for the other option.
        """
        n = len(view)
        if n == 0:
            return Decisions(np.zeros(0, np.int8), np.zeros(0, bool))
        started = time.perf_counter()
        shown = self._shown(n, rng)
        if self.params.reflection and self.params.reflection_temperature > 0:
            # the reflections after this round sample from the run's own stream
            self._reflection_seed = int(rng.integers(2**31 - 1))
        conversations = [self.messages(view, i, shown[i]) for i in range(n)]
        prefix = self.answer_prefix if self.params.mode == "score" else ""
        texts = [self.backend.render(c, prefix, self.chat_template) for c in conversations]
        ids = [self.backend.tokenize(t) for t in texts]
        if self.teacher is not None:
            actions, extra = self._teach(view, shown, texts, rng)
        elif self.params.mode == "score":
            actions, extra = self._score(ids, texts, shown, rng)
        else:
            actions, extra = self._generate(conversations, ids, shown, view, rng)
        fallback = np.array([e["fallback"] for e in extra], bool)
        latency = (time.perf_counter() - started) / n
        self.counts["decisions"] += n
        if self.progress is not None:
            self.progress.update(n)
        for i in range(n):
            s = shown[i]
            record = {
                "step": view.step + 1,
                "match": int(view.match[i]),
                "side": int(_side(view, i)),
                "round": int(view.round[i]) + 1,
                "agent": int(view.agent[i]),
                "opponent": int(view.opponent[i]),
                "mode": self.params.mode,
                "framing": self.framing.name,
                "prompt": conversations[i],
                "input": texts[i],
                "input_tokens": len(ids[i]),
                "labels": [s.label_c, s.label_d],
                "option_order": "DC" if s.d_first else "CD",
                **extra[i],
                "response": (
                    f"{self.answer_prefix} {extra[i]['answer']}".strip()
                    if self.params.mode == "score"
                    else extra[i]["answer"]
                ),
                "action": "invalid" if actions[i] == INVALID else "CD"[int(actions[i])],
                "reflection": None,
                "latency_s": round(latency, 4),
                "model": self.params.model,
                **({"adapter": self.params.adapter} if self.params.adapter else {}),
                "revision": self.backend.revision,
                # a server player: which server answered, and what it says it ran
                **(self.backend.provenance() if hasattr(self.backend, "provenance") else {}),
            }
            self.records.append(record)
            self._pending[(view.step, record["match"], record["side"])] = record
            if record["valid"]:
                tally = self._by_order[record["option_order"]]
                tally[0] += 1
                tally[1] += actions[i] == C
                tally[2] += record.get("p_cooperate", float(actions[i] == C))
        return Decisions(actions, fallback)

    def _teach(
        self, view: View, shown: list[Shown], texts: list[str], rng: np.random.Generator
    ) -> tuple[np.ndarray, list]:
        """The rule teacher's decisions, written as answers in the framing's words."""
        out = self.teacher.decide(view, rng)
        actions = np.asarray(out.actions if isinstance(out, Decisions) else out, np.int8)
        score = self.params.mode == "score"
        extra = [
            {
                "answer": s.label_c if a == C else s.label_d,
                "valid": True,
                "retries": 0,
                "fallback": False,
                "p_cooperate": float(a == C),
                "p_defect": float(a == D),
                "rule_teacher": self.params.rule_teacher,
                # what a student's score mode will sum for each option
                **({"phrasings": self._phrasing_sets(s.swapped, text)} if score else {}),
            }
            for a, s, text in zip(actions, shown, texts, strict=True)
        ]
        return actions, extra

    def _phrasing_sets(self, swapped: bool, context: str) -> list[list[str]]:
        """The phrasings score mode sums for C and for D, as texts."""
        _, owner, texts = self._phrasings(swapped, context)
        return [[t for t, o in zip(texts, owner, strict=True) if o == option] for option in (C, D)]

    def _phrasings(
        self, swapped: bool, context: str
    ) -> tuple[list[list[int]], np.ndarray, list[str]]:
        """Token ids of every phrasing as it continues ``context``, with its option and text.

        A phrasing that extends another is dropped: its probability is already inside
        the shorter one's.
        """
        if swapped in self._phrase_ids:
            return self._phrase_ids[swapped]
        f, p = self.framing, self.params
        if p.phrasings is not None:
            space = " " if self.answer_prefix and not self.answer_prefix.endswith(" ") else ""
            sets = (
                [space + t.strip() for t in p.phrasings.cooperate],
                [space + t.strip() for t in p.phrasings.defect],
            )
        else:
            sets = f.phrasings[::-1] if swapped else f.phrasings
        entries = sorted(
            {
                (tuple(self.backend.continuation_ids(context, text)), option, text)
                for option, texts in enumerate(sets)
                for text in texts
            },
            key=lambda e: len(e[0]),
        )
        kept: list[tuple[tuple[int, ...], int, str]] = []
        for tokens, option, text in entries:
            shorter = next((k for k in kept if tokens[: len(k[0])] == k[0]), None)
            if shorter is None:
                kept.append((tokens, option, text))
            elif shorter[1] != option:
                from abm.errors import ScenarioError

                raise ScenarioError(
                    f"the phrasing {text!r} begins with the tokens of {shorter[2]!r}, which "
                    "stands for the other option, so its probability would count for both; "
                    "change one of them"
                )
        result = ([list(k[0]) for k in kept], np.array([k[1] for k in kept]), [k[2] for k in kept])
        self._phrase_ids[swapped] = result
        return result

    def _score(
        self, ids: list[list[int]], texts: list[str], shown: list[Shown], rng: np.random.Generator
    ) -> tuple[np.ndarray, list]:
        n = len(ids)
        logp = np.empty((n, 2))
        sets: dict[bool, list[list[str]]] = {}
        for swapped in sorted({s.swapped for s in shown}):
            rows = [i for i in range(n) if shown[i].swapped == swapped]
            tokens, owner, _ = self._phrasings(swapped, texts[rows[0]])
            sets[swapped] = self._phrasing_sets(swapped, texts[rows[0]])
            per = np.array(
                self._memoized(
                    [(swapped, tuple(ids[i])) for i in rows],
                    lambda todo, tokens=tokens: list(
                        self.backend.score_phrasings(
                            [list(k[1]) for k in todo], tokens, self.params.max_batch_size
                        )
                    ),
                    deterministic=True,
                )
            )
            for option in (C, D):
                logp[rows, option] = np.logaddexp.reduce(per[:, owner == option], axis=1)
        mass = np.exp(logp).sum(axis=1)
        # probabilities of the two options, renormalised over the pair
        z = logp - logp.max(axis=1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(axis=1, keepdims=True)
        draws = rng.random(n)  # drawn at temperature 0 too: keeps the stream aligned
        if self.params.temperature == 0:
            actions = (probs[:, 1] > probs[:, 0]).astype(np.int8)
        else:
            tempered = np.exp(z / self.params.temperature)
            actions = (draws < tempered[:, 1] / tempered.sum(axis=1)).astype(np.int8)
        self._mass.extend(mass.tolist())
        extra = [
            {
                "answer": s.label_c if a == C else s.label_d,
                "valid": True,
                "retries": 0,
                "fallback": False,
                "p_cooperate": float(p[0]),
                "p_defect": float(p[1]),
                "logprob_cooperate": float(lp[0]),
                "logprob_defect": float(lp[1]),
                "label_mass": float(m),
                "phrasings": sets[s.swapped],
            }
            for a, p, lp, m, s in zip(actions, probs, logp, mass, shown, strict=True)
        ]
        return actions, extra

    def _generate(
        self,
        conversations: list,
        ids: list[list[int]],
        shown: list[Shown],
        view: View,
        rng: np.random.Generator,
    ) -> tuple[np.ndarray, list]:
        from abm.llm.parsing import label_words

        p, f = self.params, self.framing
        seed, retry_seed = (int(x) for x in rng.integers(2**31 - 1, size=2))
        sampling = p.temperature > 0
        words = {
            s.swapped: (f.words if not s.swapped else label_words(s.label_c, s.label_d))
            for s in shown
        }

        def read(text: str, s: Shown) -> Any:
            from abm.llm.parsing import parse_answer

            return parse_answer(text, words[s.swapped])

        answers = self._memoized(
            [tuple(k) for k in ids],
            lambda todo: self.backend.generate(
                [list(t) for t in todo],
                temperature=p.temperature,
                top_p=p.top_p,
                max_new_tokens=p.max_new_tokens,
                seed=seed,
                max_batch_size=p.max_batch_size,
            ),
            deterministic=not sampling,
        )
        readings = [read(a, s) for a, s in zip(answers, shown, strict=True)]
        extra = [
            {
                "answer": a,
                "valid": r.action is not None,
                "parse": r.reason,
                "parsed_from": r.evidence,
                "retries": 0,
                "fallback": False,
                "first_answer": None,
            }
            for a, r in zip(answers, readings, strict=True)
        ]
        bad = [i for i, r in enumerate(readings) if r.action is None]
        if bad:
            self.counts["retries"] += len(bad)
            again = [
                conversations[i]
                + [
                    {"role": "assistant", "content": answers[i]},
                    {
                        "role": "user",
                        "content": f.reminder(p.mode, *shown[i].order, p.answer_format),
                    },
                ]
                for i in bad
            ]
            texts = [self.backend.render(c, "", self.chat_template) for c in again]
            retry = self.backend.generate(
                [self.backend.tokenize(t) for t in texts],
                temperature=p.temperature,
                top_p=p.top_p,
                max_new_tokens=p.max_new_tokens,
                seed=retry_seed,
                max_batch_size=p.max_batch_size,
            )
            for i, text, rendered, conversation in zip(bad, retry, texts, again, strict=True):
                reading = read(text, shown[i])
                extra[i].update(
                    first_answer=answers[i],
                    answer=text,
                    retries=1,
                    valid=reading.action is not None,
                    parse=reading.reason,
                    parsed_from=reading.evidence,
                    retry_input=rendered,
                    retry_prompt=conversation[-1]["content"],
                )
                readings[i] = reading
        actions = np.zeros(len(ids), np.int8)
        coin = rng.random(len(ids))
        for i, reading in enumerate(readings):
            if reading.action is not None:
                actions[i] = reading.action
                continue
            self.counts["invalid"] += 1
            if p.fallback == "invalid":
                actions[i] = INVALID
            else:
                self.counts["fallbacks"] += 1
                extra[i]["fallback"] = True
                actions[i] = self._fallback(view, i, coin[i])
        return actions, extra

    def _fallback(self, view: View, i: int, coin: float) -> int:
        rule = self.params.fallback
        if rule == "repeat_last":
            last = int(view.mine[i, -1]) if view.mine.shape[1] else EMPTY
            return C if last == EMPTY else last
        return {"cooperate": C, "defect": D}.get(rule, D if coin < 0.5 else C)

    def _memoized(self, keys: list[tuple], compute, deterministic: bool) -> list:
        """Answer each distinct prompt once when answers are deterministic.

        With ``memoize`` the answers are also kept across calls; sampled answers are
        drawn once per decision, so independent players never share a draw.
        """
        if not deterministic:
            self.counts["computed"] += len(keys)
            return list(compute(keys)) if keys else []
        use_memo = self.params.memoize
        todo = list(dict.fromkeys(k for k in keys if not (use_memo and k in self.memo)))
        results = dict(zip(todo, compute(todo), strict=True)) if todo else {}
        self.counts["computed"] += len(todo)
        self.counts["memo_hits"] += len(keys) - len(todo)
        if use_memo:
            self.memo.update(results)
            results = {**self.memo, **results}
        return [results[k] for k in keys]

    # ------------------------------------------------------------ after the round

    def observe(self, outcome: Outcome) -> None:
        """Attach what happened to the pending records; ask for reflections in one batch."""
        keys = [
            (outcome.step, int(m), int(s)) for m, s in zip(outcome.match, outcome.side, strict=True)
        ]
        records = [self._pending.pop(k) for k in keys]
        played = []
        for key, record, mine, theirs, pay in zip(
            keys, records, outcome.mine, outcome.theirs, outcome.payoff, strict=True
        ):
            if mine == EMPTY:  # the match stopped on an unreadable answer: nothing happened
                record.update(actual=None, opponent_action=None, payoff=None)
                continue
            record.update(
                actual="CD"[int(mine)], opponent_action="CD"[int(theirs)], payoff=float(pay)
            )
            played.append((key, record, int(mine), int(theirs)))
        if not self.params.reflection or not played:
            return
        f, p = self.framing, self.params
        conversations = []
        for _, record, mine, theirs in played:
            # the framing's words for C and D, in the order the labels were assigned
            did = f.did if record["labels"][0] == f.label_c else f.did[::-1]
            ask = f.reflect.format(other=f.other, you=f.you, theirs=did[theirs], mine=did[mine])
            conversations.append(
                record["prompt"]
                + [
                    {"role": "assistant", "content": record["response"]},
                    {"role": "user", "content": ask},
                ]
            )
        rendered = [self.backend.render(c, "", self.chat_template) for c in conversations]
        sampling = p.reflection_temperature > 0
        seed = self._reflection_seed
        # only when set: a run without stop strings calls the backend as it always did
        stop = {"stop": list(p.reflection_stop)} if p.reflection_stop else {}
        texts = self._memoized(
            [tuple(self.backend.tokenize(t)) for t in rendered],
            lambda todo: self.backend.generate(
                [list(t) for t in todo],
                temperature=p.reflection_temperature,
                top_p=p.top_p,
                max_new_tokens=p.reflection_tokens,
                seed=seed,
                max_batch_size=p.max_batch_size,
                **stop,
            ),
            deterministic=not sampling,
        )
        self.counts["reflections"] += len(texts)
        if self.progress is not None:
            self.progress.update(len(texts))
        for (key, record, _, _), conversation, text, inp in zip(
            played, conversations, texts, rendered, strict=True
        ):
            clean = clean_reflection(text, (f.you, f.other, f.speaker.strip(" :")))
            record["reflection"] = clean
            record["reflection_raw"] = text
            record["reflection_prompt"] = conversation[-1]["content"]
            record["reflection_input"] = inp
            self._reflections[key] = clean

    # ------------------------------------------------------------ reporting

    def drain(self) -> list[dict[str, Any]]:
        """The records made since the last call (the run writes them after each step)."""
        out, self.records = self.records, []
        self._reflections.clear()  # keyed by step: nothing carries over
        return out

    def stats(self) -> dict[str, Any]:
        """This run's work and measurement quality.

        The backend's counters since this policy was made (a loaded model serves every
        run of a process), the load time if this run loaded the model, the invalid rate,
        the label mass (score mode), cooperation by option order, and warnings.
        """
        b, start = self.backend.stats, self._stats_start
        decisions = self.counts["decisions"]
        out = {
            **self.counts,
            "model": self.params.model,
            "mode": self.params.mode,
            "fallback_rule": self.params.fallback,
            "invalid_rate": self.counts["invalid"] / decisions if decisions else 0.0,
            "tokens": b.tokens - start.tokens,
            "forward_passes": b.forward_passes - start.forward_passes,
            "generate_calls": b.generate_calls - start.generate_calls,
            "prefix_cache_hits": b.prefix_hits - start.prefix_hits,
            "llm_seconds": round(b.seconds - start.seconds, 3),
            "load_seconds": round(self._load_seconds, 3),
        }
        if hasattr(self.backend, "loading"):
            loading = self.backend.loading()
            for key, start in (
                ("out_of_memory_splits", self._splits_start),
                ("capped_calls", self._capped_start),
            ):
                if key in loading:
                    loading[key] -= start
                    if not loading[key]:
                        del loading[key]
            out["loading"] = loading
        if hasattr(self.backend, "provenance"):
            out["server"] = self.backend.summary()
        if self.params.reflection_stop:
            out["reflection_stop"] = list(self.params.reflection_stop)
        if self.params.rule_teacher:  # the decisions are the rule's, not the model's
            out["rule_teacher"] = self.params.rule_teacher
        if self.params.adapter:
            out["adapter"] = self.params.adapter
        if self._mass:
            mass = np.array(self._mass)
            out["label_mass"] = {
                "mean": float(mass.mean()),
                "min": float(mass.min()),
                "median": float(np.median(mass)),
                "below_threshold": int((mass < self.params.warn_label_mass).sum()),
            }
        out["by_option_order"] = {
            order: {"decisions": n, "cooperate": int(c), "p_cooperate": (s / n if n else None)}
            for order, (n, c, s) in self._by_order.items()
            if n
        }
        out["warnings"] = self._warnings(out)
        return out

    def _warnings(self, stats: dict[str, Any]) -> list[str]:
        p, out = self.params, []
        if stats["decisions"] and stats["invalid_rate"] > p.warn_invalid_rate:
            played = (
                "nothing was played for them and their matches stopped"
                if p.fallback == "invalid"
                else f"the fallback rule ({p.fallback}) played them, flagged in every table"
            )
            out.append(
                f"{stats['invalid']} of {stats['decisions']} answers of {p.model} "
                f"({stats['invalid_rate']:.0%}) could not be read as a decision "
                f"(threshold {p.warn_invalid_rate:.0%}); {played}. Read them in "
                "transcripts.jsonl (answer, parse)."
            )
        mass = stats.get("label_mass")
        if mass and mass["mean"] < p.warn_label_mass:
            out.append(
                f"{p.model} put on average {mass['mean']:.0%} (least {mass['min']:.0%}) "
                "of its next-token probability on the option phrasings (threshold "
                f"{p.warn_label_mass:.0%}): its choices are relative preferences "
                "between two unlikely answers; consider more phrasings or another "
                "framing."
            )
        loading = stats.get("loading") or {}
        if loading.get("out_of_memory_splits"):
            out.append(
                f"{p.model} ran out of GPU memory and its batches were split "
                f"{loading['out_of_memory_splits']} times (at most {loading.get('batch_cap')} "
                "prompts a batch since); scores and greedy answers are those of whole "
                "batches up to rounding, but sampled answers were drawn in other batches "
                "than a run without the split would draw them. Lower max_batch_size to keep "
                "batches whole."
            )
        elif loading.get("capped_calls"):
            out.append(
                f"{p.model} ran at most {loading['batch_cap']} prompts a batch in this run, "
                "because an earlier run of this process ran out of GPU memory with it; "
                "sampled answers were drawn in those smaller batches. Lower max_batch_size "
                "to keep batches the same from run to run."
            )
        return out


def _side(view: View, i: int) -> int:
    return int(view.side[i]) if view.side is not None else 0
