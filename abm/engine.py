"""The lockstep engine: all matches of a step advance round by round together.

Each round, every policy is called once with the views of all the sides it
plays, so rule strategies decide with NumPy over the whole step and an LLM
policy sees one batch. Sides are laid out as [first ends of the matched
edges, second ends], so the partner of side s is s +/- M.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from abm.game import EMPTY, PayoffMatrix, apply_noise
from abm.memory import Memory
from abm.policies.base import Policy, View


@dataclass(frozen=True)
class StepResult:
    """Everything that happened in one step; round arrays are (rounds, sides)."""

    step: int
    edge: np.ndarray
    agent: np.ndarray
    opponent: np.ndarray
    twin: np.ndarray
    length: np.ndarray
    intended: np.ndarray
    actual: np.ndarray
    payoff: np.ndarray

    @property
    def n_matches(self) -> int:
        return len(self.edge)

    @property
    def side_length(self) -> np.ndarray:
        return np.concatenate([self.length, self.length])

    def totals(self) -> dict[str, np.ndarray]:
        """Per side: total payoff, actual C and D counts, intended D count."""
        played = self.actual != EMPTY
        return {
            "payoff": np.where(played, self.payoff, 0.0).sum(axis=0),
            "cooperations": ((self.actual == 0) & played).sum(axis=0),
            "defections": (self.actual == 1).sum(axis=0),
            "intended_defections": (self.intended == 1).sum(axis=0),
        }


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
        ends = self.edges[edge_ids]
        agent = np.concatenate([ends[:, 0], ends[:, 1]])
        opponent = np.concatenate([ends[:, 1], ends[:, 0]])
        loop = ends[:, 0] == ends[:, 1]
        twin = np.concatenate([np.zeros(m, bool), loop])
        partner = np.concatenate([np.arange(m, 2 * m), np.arange(m)])
        lengths = self._lengths(m)
        n_rounds = int(lengths.max()) if m else 0
        side_len = np.concatenate([lengths, lengths])

        if self.scope == "match":
            memory = Memory(2 * m, self.window or n_rounds)
            slots = np.arange(2 * m)
        elif self.scope == "opponent":
            memory = self.memory
            slots = np.concatenate([2 * edge_ids, 2 * edge_ids + 1])
        else:
            memory = self.memory
            slots = np.where(twin, self.n_nodes + agent, agent)
        unique_slots = self.scope != "all"

        side_policy = self.policy_of_node[agent]
        match_of_side = np.concatenate([np.arange(m), np.arange(m)])
        intended = np.full((n_rounds, 2 * m), EMPTY, np.int8)
        actual = np.full((n_rounds, 2 * m), EMPTY, np.int8)
        payoff = np.zeros((n_rounds, 2 * m), np.float64)
        fixed = self.rounds is not None
        groups = _group(side_policy, len(self.policies))
        for r in range(n_rounds):
            if not fixed:
                active = side_len > r
                groups = _group(np.where(active, side_policy, -1), len(self.policies))
            for p, idx in groups:
                mine, theirs, length = memory.read(slots[idx])
                view = View(mine=mine, theirs=theirs, length=length,
                            round=np.full(len(idx), r, np.int32), agent=agent[idx],
                            opponent=opponent[idx], match=match_of_side[idx], step=step)
                intended[r, idx] = self.policies[p].decide(view, self.rngs["policy"])
            live = np.arange(2 * m) if fixed else np.flatnonzero(active)
            actual[r, live] = apply_noise(intended[r, live], self.noise, self.rngs["noise"])
            theirs_now = actual[r, partner[live]]
            payoff[r, live] = self.table[actual[r, live], theirs_now]
            # a fresh per-step memory whose slots are the sides in order can shift in place
            whole = fixed and self.scope == "match"
            memory.push(None if whole else slots[live], actual[r, live], theirs_now,
                        unique=unique_slots)
        return StepResult(step=step, edge=edge_ids, agent=agent, opponent=opponent, twin=twin,
                          length=lengths, intended=intended, actual=actual, payoff=payoff)


def _group(side_policy: np.ndarray, n_policies: int) -> list[tuple[int, np.ndarray]]:
    """Side indices per policy, skipping policies with no side (and the -1 of ended sides)."""
    order = np.argsort(side_policy, kind="stable")
    bounds = np.searchsorted(side_policy[order], np.arange(n_policies + 1))
    return [(p, order[bounds[p]:bounds[p + 1]]) for p in range(n_policies)
            if bounds[p + 1] > bounds[p]]
