"""The lockstep engine: all matches of a step advance round by round together.

Each round, every policy is called once with the views of all the sides it
plays, so rule strategies decide with NumPy over the whole step and an LLM
policy sees one batch. Sides are laid out as [first ends of the matched
edges, second ends], so the partner of side s is s +/- M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from abm.game import EMPTY, INVALID, PayoffMatrix, apply_noise
from abm.memory import Memory
from abm.policies.base import Decisions, Outcome, Policy, View


@dataclass(frozen=True)
class StepResult:
    """Everything that happened in one step; round arrays are (rounds, sides).

    ``length`` is the number of rounds each match played; ``void`` marks the
    matches stopped early because a decision could not be read (``intended``
    holds INVALID there and that round has no actual action); ``fallback``
    marks actions the scenario's fallback rule chose for an unreadable answer.
    """

    step: int
    edge: np.ndarray
    agent: np.ndarray
    opponent: np.ndarray
    twin: np.ndarray
    length: np.ndarray
    intended: np.ndarray
    actual: np.ndarray
    payoff: np.ndarray
    fallback: np.ndarray | None = None
    void: np.ndarray | None = None

    @property
    def n_matches(self) -> int:
        return len(self.edge)

    @property
    def side_length(self) -> np.ndarray:
        return np.concatenate([self.length, self.length])

    def totals(self) -> dict[str, np.ndarray]:
        """Per side: total payoff, actual C and D counts, intended D count, and the
        decisions not read from a model: invalid ones and fallback-chosen ones."""
        n = self.actual.shape[1]
        fallbacks = (_count(self.fallback) if self.fallback is not None
                     else np.zeros(n, np.int64))
        return {  # rounds a match did not reach hold payoff 0 and action EMPTY
            "payoff": self.payoff.sum(axis=0),
            "cooperations": _count(self.actual == 0),
            "defections": _count(self.actual == 1),
            # played rounds only: the round that stopped a match was not played
            "intended_defections": _count((self.intended == 1) & (self.actual != EMPTY)),
            # answers that could not be read: those left unplayed and those the
            # fallback rule played
            "invalid": _count(self.intended == INVALID) + fallbacks,
            "fallbacks": fallbacks,
            "decided": _count(self.intended != EMPTY),
        }


def _count(mask: np.ndarray) -> np.ndarray:
    """Per-column True count; summing the bytes is several times faster than count_nonzero."""
    return mask.view(np.int8).sum(axis=0, dtype=np.int64)


class Engine:
    """Plays the matches of one step for a fixed population of policies."""

    def __init__(self, *, game: PayoffMatrix, noise: float, policies: list[Policy],
                 policy_of_node: np.ndarray, edges: np.ndarray, n_nodes: int,
                 window: int | None, scope: str, rounds: int | None,
                 continuation_probability: float | None,
                 rngs: dict[str, np.random.Generator]) -> None:
        self.game = game
        self.table = game.table
        self.noise = noise
        self.policies = policies
        self.policy_of_node = policy_of_node
        self.edges = edges
        self.n_nodes = n_nodes
        self.window = window
        self.scope = scope
        self.rounds = rounds
        self.continuation = continuation_probability
        self.rngs = rngs
        self.memory: Memory | None = None
        if scope == "opponent":
            self.memory = Memory(2 * len(edges), window or 0)
        elif scope == "all":
            self.memory = Memory(2 * n_nodes, window or 0)

    def _lengths(self, m: int) -> np.ndarray:
        if self.rounds is not None:
            return np.full(m, self.rounds, np.int64)
        return self.rngs["match_length"].geometric(1.0 - self.continuation, size=m)

    def play(self, step: int, edge_ids: np.ndarray) -> StepResult:
        """Play one match on each of ``edge_ids`` and return what happened."""
        m = len(edge_ids)
        n = 2 * m
        ends = self.edges[edge_ids]
        agent = np.concatenate([ends[:, 0], ends[:, 1]])
        opponent = np.concatenate([ends[:, 1], ends[:, 0]])
        twin = np.concatenate([np.zeros(m, bool), ends[:, 0] == ends[:, 1]])
        partner = np.concatenate([np.arange(m, n), np.arange(m)])
        lengths = self._lengths(m)
        n_rounds = int(lengths.max()) if m else 0
        fixed = self.rounds is not None

        # Work in an order where each policy's sides are contiguous, so that a
        # policy's batch is a slice (a view, no copy) of every per-side array.
        order, groups = _group(self.policy_of_node[agent], len(self.policies))
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        s_agent, s_opponent = agent[order], opponent[order]
        s_match = np.concatenate([np.arange(m), np.arange(m)])[order]
        s_side = (order >= m).astype(np.int8)
        s_total = np.full(n, self.rounds if fixed else -1, np.int32)
        s_score = np.zeros(n)
        s_partner = pos[partner[order]]
        s_len = np.concatenate([lengths, lengths])[order]
        if self.scope == "match":
            memory, s_slots = Memory(n, self.window or n_rounds), None
        elif self.scope == "opponent":
            memory = self.memory
            s_slots = np.concatenate([2 * edge_ids, 2 * edge_ids + 1])[order]
        else:
            memory = self.memory
            s_slots = np.where(twin, self.n_nodes + agent, agent)[order]

        intended = np.full((n_rounds, n), EMPTY, np.int8)
        actual = np.full((n_rounds, n), EMPTY, np.int8)
        payoff = np.zeros((n_rounds, n), np.float64)
        fallback = np.zeros((n_rounds, n), bool)
        void = np.zeros(m, bool)
        flat_table = self.table.ravel()
        # fixed-length matches take the slice fast path until one stops early
        dynamic = not fixed
        for r in range(n_rounds):
            live = slice(None) if not dynamic else np.flatnonzero(s_len > r)
            decided = []
            for p, a, b in groups:
                rows = slice(a, b) if not dynamic else live[(live >= a) & (live < b)]
                if dynamic and len(rows) == 0:
                    continue
                mine, theirs, length = memory.read(rows if s_slots is None else s_slots[rows])
                view = View(mine=mine, theirs=theirs, length=length,
                            round=np.broadcast_to(np.int32(r), length.shape),
                            agent=s_agent[rows], opponent=s_opponent[rows],
                            match=s_match[rows], step=step, side=s_side[rows],
                            score=s_score[rows], rounds_total=s_total[rows])
                out = self.policies[p].decide(view, self.rngs["policy"])
                if isinstance(out, Decisions):
                    intended[r, rows] = out.actions
                    fallback[r, rows] = out.fallback
                else:
                    intended[r, rows] = out
                decided.append((p, rows))
            stopped = None
            unread = intended[r] == INVALID
            if unread.any():
                # No move can be invented for an unreadable answer, and every later
                # round would depend on one: the match ends here, nothing is played.
                void[s_match[unread]] = True
                lengths = np.where(void, np.minimum(lengths, r), lengths)
                s_len = np.concatenate([lengths, lengths])[order]
                stopped = void[s_match] & (s_len == r)
                dynamic = True
                live = np.flatnonzero(s_len > r)
            # noise is drawn in the canonical side order, whatever the policy grouping
            actual[r] = apply_noise(intended[r, pos], self.noise, self.rngs["noise"])[order]
            if stopped is not None:
                actual[r, stopped] = EMPTY
            mine_now, theirs_now = actual[r, live], actual[r, s_partner[live]]
            payoff[r, live] = flat_table[2 * mine_now + theirs_now]
            s_score += payoff[r]
            if s_slots is None and not dynamic:
                memory.push(None, mine_now, theirs_now)
            else:
                memory.push(live if s_slots is None else s_slots[live], mine_now, theirs_now,
                            unique=self.scope != "all")
            for p, rows in decided:
                if not hasattr(self.policies[p], "observe"):
                    continue
                self.policies[p].observe(Outcome(
                    step=step, round=r, match=s_match[rows], side=s_side[rows],
                    agent=s_agent[rows], opponent=s_opponent[rows], intended=intended[r, rows],
                    mine=actual[r, rows], theirs=actual[r, s_partner[rows]],
                    payoff=payoff[r, rows]))
        return StepResult(step=step, edge=edge_ids, agent=agent, opponent=opponent, twin=twin,
                          length=lengths, intended=intended[:, pos], actual=actual[:, pos],
                          payoff=payoff[:, pos], fallback=fallback[:, pos], void=void)


def _group(side_policy: np.ndarray, n_policies: int) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A stable order of the sides by policy, and each present policy's [start, end)."""
    order = np.argsort(side_policy, kind="stable")
    bounds = np.searchsorted(side_policy[order], np.arange(n_policies + 1))
    return order, [(p, int(bounds[p]), int(bounds[p + 1])) for p in range(n_policies)
                   if bounds[p + 1] > bounds[p]]
