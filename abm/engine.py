"""The lockstep engine: all matches of a step advance round by round together.

Each round, every policy is called once with the views of all the sides it
plays, so rule strategies decide with NumPy over the whole step and an LLM
policy sees one batch. Sides are laid out as [first ends of the matched
edges, second ends], so the partner of side s is s +/- M.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from abm.game import EMPTY, INVALID, PayoffMatrix, apply_noise
from abm.memory import Memory
from abm.policies.base import Decisions, Outcome, Policy, View

if TYPE_CHECKING:
    from abm.population import Population


@dataclass(frozen=True)
class StepResult:
    """Everything that happened in one step; round arrays are (rounds, sides).

    Sides are in the canonical order: the first ends of the matched edges, then the
    second ends, so side s plays side s +/- ``n_matches``. Rounds a match did not
    reach hold EMPTY actions and payoff 0.

    Attributes:
        step: The 0-based step.
        edge: Per match, the row of the engine's edge array it was played on.
        agent: Per side, the node that plays it.
        opponent: Per side, the node on the other side.
        twin: Per side, True for the second side of a self-play match (a node
            against an independent copy of itself).
        length: Per match, the number of rounds it played.
        intended: The actions decided (0 = C, 1 = D, INVALID for an answer that
            could not be read).
        actual: The actions played, after noise; EMPTY in the round that stopped a
            match, where nothing was played.
        payoff: Each side's payoff per round.
        fallback: True where the scenario's fallback rule chose the action for an
            unreadable answer (None: not recorded).
        void: Per match, True when it stopped early because a decision could not
            be read (None: not recorded).
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
        """The number of matches played in the step."""
        return len(self.edge)

    @property
    def side_length(self) -> np.ndarray:
        """Per side, the number of rounds its match played (``length`` for both ends)."""
        return np.concatenate([self.length, self.length])

    def totals(self) -> dict[str, np.ndarray]:
        """Per-side sums over the rounds of the step.

        Returns:
            One array per key, one entry per side: ``payoff`` (total payoff),
            ``cooperations`` and ``defections`` (actions played), ``intended_defections``
            (rounds played with D decided, before noise), ``invalid`` (decisions not
            read from a model: unreadable answers, whether left unplayed or played by
            the fallback rule), ``fallbacks`` (those the fallback rule played) and
            ``decided`` (decisions made).
        """
        n = self.actual.shape[1]
        fallbacks = _count(self.fallback) if self.fallback is not None else np.zeros(n, np.int64)
        return {  # rounds a match did not reach hold payoff 0 and action EMPTY
            "payoff": _sum_rounds(self.payoff),
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


def _sum_rounds(values: np.ndarray) -> np.ndarray:
    """Per-column sum of a (rounds, sides) array, adding round after round.

    That is the order NumPy's ``sum(axis=0)`` adds in, so the floats are the same,
    but this is several times faster on millions of sides.
    """
    out = np.zeros(values.shape[1], np.int64 if values.dtype.kind in "biu" else values.dtype)
    for row in values:
        out += row
    return out


def _count(mask: np.ndarray) -> np.ndarray:
    """Per-column True count."""
    return _sum_rounds(mask.view(np.int8))


@dataclass
class _Step:
    """One step laid out for play.

    It holds the sides in an order where each policy's sides are contiguous (the
    ``s_*`` arrays; ``order`` maps that grouped order to the canonical one and ``pos``
    back), the round arrays being filled (in the canonical side order, as the
    StepResult holds them), and what changes between rounds (match lengths once a
    match stops early, the running scores).
    """

    step: int
    edge_ids: np.ndarray
    agent: np.ndarray
    opponent: np.ndarray
    twin: np.ndarray
    lengths: np.ndarray
    order: np.ndarray
    pos: np.ndarray
    groups: list[tuple[int, int, int]]
    s_agent: np.ndarray
    s_opponent: np.ndarray
    s_match: np.ndarray
    s_side: np.ndarray
    s_total: np.ndarray
    s_score: np.ndarray
    s_partner: np.ndarray
    s_len: np.ndarray
    memory: Memory
    s_slots: np.ndarray | None
    intended: np.ndarray
    actual: np.ndarray
    payoff: np.ndarray
    fallback: np.ndarray
    void: np.ndarray
    # fixed-length matches take the slice fast path until one stops early
    dynamic: bool

    @property
    def n_rounds(self) -> int:
        """The rounds of the longest match: the round arrays' first dimension."""
        return self.intended.shape[0]

    def result(self) -> StepResult:
        """What the step's rounds filled in."""
        return StepResult(
            step=self.step,
            edge=self.edge_ids,
            agent=self.agent,
            opponent=self.opponent,
            twin=self.twin,
            length=self.lengths,
            intended=self.intended,
            actual=self.actual,
            payoff=self.payoff,
            fallback=self.fallback,
            void=self.void,
        )


class Engine:
    """Plays the matches of one step for the policies of a ``Population``.

    The engine reads the population's policies and node -> policy array at every
    step, so it plays whatever the last ``Population.relabel`` set. Memory windows
    that outlive a match (scope "opponent" or "all") are kept in ``memory`` from
    step to step; with scope "match" each step gets fresh ones.

    Args:
        game: The payoff matrix.
        noise: The probability that an intended action is flipped.
        population: Who plays what; read at every step.
        edges: The graph's edges as an (E, 2) array of node ids; a match is played
            on a row of it.
        window: Rounds a memory slot remembers (None: the whole match; scopes
            "opponent" and "all" need a window).
        scope: What a memory window covers: "match" (the current match),
            "opponent" (one edge side, across matches) or "all" (one node, against
            anyone; a self-play copy has a window of its own).
        rounds: The fixed match length, or None for geometric match lengths.
        continuation_probability: The chance of one more round when ``rounds`` is
            None.
        rngs: The "noise", "policy" and "match_length" random streams.
    """

    def __init__(
        self,
        *,
        game: PayoffMatrix,
        noise: float,
        population: Population,
        edges: np.ndarray,
        window: int | None,
        scope: str,
        rounds: int | None,
        continuation_probability: float | None,
        rngs: dict[str, np.random.Generator],
    ) -> None:
        """Set up the engine; see the class docstring for the arguments."""
        self.game = game
        self.table = game.table
        self.flat_table = game.table.ravel()
        self.noise = noise
        self.population = population
        self.edges = edges
        self.n_nodes = population.n_nodes
        self.window = window
        self.scope = scope
        self.rounds = rounds
        self.continuation = continuation_probability
        self.rngs = rngs
        self._cached_sides: dict[str, Any] | None = None
        self.memory: Memory | None = None
        if scope == "opponent":
            self.memory = Memory(2 * len(edges), window or 0)
        elif scope == "all":
            self.memory = Memory(2 * self.n_nodes, window or 0)

    @property
    def policies(self) -> list[Policy]:
        """The population's policy objects."""
        return self.population.policies

    def _lengths(self, m: int) -> np.ndarray:
        if self.rounds is not None:
            return np.full(m, self.rounds, np.int64)
        return self.rngs["match_length"].geometric(1.0 - self.continuation, size=m)

    def play(self, step: int, edge_ids: np.ndarray) -> StepResult:
        """Play one match on each of ``edge_ids`` and return what happened.

        The match lengths are drawn first, then every live match advances one round
        at a time: the policies decide, unreadable decisions stop their matches, noise
        flips actions, payoffs are paid and the memory windows updated.

        Args:
            step: The 0-based step, passed on to the policies.
            edge_ids: Rows of ``edges``, one match each (repeats allowed).

        Returns:
            The step's round arrays, in the canonical side order.
        """
        s = self._layout(step, edge_ids)
        for r in range(s.n_rounds):
            self._round(s, r)
        return s.result()

    def _sides(self, edge_ids: np.ndarray) -> dict[str, Any]:
        """Who plays on which side of the matches of ``edge_ids``, grouped by policy.

        The same matches under the same population give the same sides, so the last
        answer is kept and reused (with all_edges, every step); its arrays are
        read-only, as they go out in the StepResult and the policies' views.
        """
        version = (self.population.version, len(self.policies))
        cached = self._cached_sides
        if (
            cached is not None
            and cached["version"] == version
            and np.array_equal(cached["edge_ids"], edge_ids)
        ):
            return cached
        m = len(edge_ids)
        n = 2 * m
        ends = self.edges[edge_ids]
        agent = np.concatenate([ends[:, 0], ends[:, 1]])
        opponent = np.concatenate([ends[:, 1], ends[:, 0]])
        twin = np.concatenate([np.zeros(m, bool), ends[:, 0] == ends[:, 1]])
        partner = np.concatenate([np.arange(m, n), np.arange(m)])
        # Work in an order where each policy's sides are contiguous, so that a
        # policy's batch is a slice (a view, no copy) of every per-side array.
        order, groups = _group(self.population.policy_of_node[agent], len(self.policies))
        pos = np.empty(n, np.int64)
        pos[order] = np.arange(n)
        s_slots = None
        if self.scope == "opponent":
            s_slots = np.concatenate([2 * edge_ids, 2 * edge_ids + 1])[order]
        elif self.scope == "all":
            s_slots = np.where(twin, self.n_nodes + agent, agent)[order]
        sides = {
            "edge_ids": np.array(edge_ids),
            "agent": agent,
            "opponent": opponent,
            "twin": twin,
            "order": order,
            "pos": pos,
            "s_agent": agent[order],
            "s_opponent": opponent[order],
            "s_match": np.concatenate([np.arange(m), np.arange(m)])[order],
            "s_side": (order >= m).astype(np.int8),
            "s_total": np.full(n, self.rounds if self.rounds is not None else -1, np.int32),
            "s_partner": pos[partner[order]],
            "s_slots": s_slots,
        }
        for value in sides.values():
            if value is not None:
                value.flags.writeable = False
        self._cached_sides = {**sides, "groups": groups, "version": version}
        return self._cached_sides

    def _layout(self, step: int, edge_ids: np.ndarray) -> _Step:
        """The step laid out for play, with its match lengths drawn.

        The sides come grouped by policy with their memory slots, and the round
        arrays empty; scope "match" gets fresh memory windows.
        """
        sides = self._sides(edge_ids)
        m = len(edge_ids)
        n = 2 * m
        lengths = self._lengths(m)
        n_rounds = int(lengths.max()) if m else 0
        fixed = self.rounds is not None
        memory = Memory(n, self.window or n_rounds) if self.scope == "match" else self.memory
        order = sides["order"]
        return _Step(
            step=step,
            edge_ids=edge_ids,
            agent=sides["agent"],
            opponent=sides["opponent"],
            twin=sides["twin"],
            lengths=lengths,
            order=order,
            pos=sides["pos"],
            groups=sides["groups"],
            s_agent=sides["s_agent"],
            s_opponent=sides["s_opponent"],
            s_match=sides["s_match"],
            s_side=sides["s_side"],
            s_total=sides["s_total"],
            s_score=np.zeros(n),
            s_partner=sides["s_partner"],
            s_len=np.concatenate([lengths, lengths])[order],
            memory=memory,
            s_slots=sides["s_slots"],
            intended=np.full((n_rounds, n), EMPTY, np.int8),
            actual=np.full((n_rounds, n), EMPTY, np.int8),
            payoff=np.zeros((n_rounds, n), np.float64),
            fallback=np.zeros((n_rounds, n), bool),
            void=np.zeros(m, bool),
            dynamic=not fixed,
        )

    def _round(self, s: _Step, r: int) -> None:
        """Play round ``r`` of every live match.

        Decide, stop the matches with an unreadable decision, apply noise, pay,
        remember, and tell the policies that keep notes. The policies decide in the
        grouped order (``s_*``); what the round keeps is moved to the canonical order
        once per round, and the noise is drawn there.
        """
        n = len(s.order)
        live = slice(None) if not s.dynamic else np.flatnonzero(s.s_len > r)
        intended = np.full(n, EMPTY, np.int8)  # this round, grouped order
        fallback = np.zeros(n, bool)
        decided = self._decide(s, r, live, intended, fallback)
        s.intended[r] = intended[s.pos]
        if fallback.any():
            s.fallback[r] = fallback[s.pos]
        stopped = None
        unread = s.intended[r] == INVALID
        if unread.any():
            # No move can be invented for an unreadable answer, and every later
            # round would depend on one: the match ends here, nothing is played.
            m = len(s.lengths)
            s.void |= unread[:m] | unread[m:]
            s.lengths = np.where(s.void, np.minimum(s.lengths, r), s.lengths)
            s.s_len = np.concatenate([s.lengths, s.lengths])[s.order]
            stopped = np.concatenate([s.void, s.void]) & (np.concatenate([s.lengths] * 2) == r)
            s.dynamic = True
            live = np.flatnonzero(s.s_len > r)
        # noise is drawn in the canonical side order, whatever the policy grouping
        actual = self._noisy(s.intended[r])
        if stopped is not None:
            actual[stopped] = EMPTY
        s.actual[r] = actual
        self._pay(s, r, live)
        grouped = actual[s.order]
        mine_now, theirs_now = grouped[live], grouped[s.s_partner[live]]
        if isinstance(live, slice):
            payoff = self.flat_table[2 * mine_now + theirs_now]
        else:
            payoff = np.zeros(n)
            payoff[live] = self.flat_table[2 * mine_now + theirs_now]
        s.s_score += payoff
        if s.s_slots is None and not s.dynamic:
            s.memory.push(None, mine_now, theirs_now)
        else:
            s.memory.push(
                live if s.s_slots is None else s.s_slots[live],
                mine_now,
                theirs_now,
                unique=self.scope != "all",
            )
        self._observe(s, r, decided, intended, grouped, payoff)

    def _noisy(self, intended: np.ndarray) -> np.ndarray:
        """The actual actions: ``apply_noise`` of the intended ones.

        Without noise, on a PCG64 stream, the intended actions are copied and the
        stream is moved on by the one draw per side ``apply_noise`` would have made
        (PCG64 draws one 64-bit number per uniform), so later draws stay the same.
        """
        rng = self.rngs["noise"]
        if self.noise == 0 and type(rng.bit_generator) is np.random.PCG64:
            rng.bit_generator.advance(len(intended))
            return intended.copy()
        return apply_noise(intended, self.noise, rng)

    def _pay(self, s: _Step, r: int, live_grouped: np.ndarray | slice) -> None:
        """Round ``r``'s payoffs in the canonical order, for the sides still playing."""
        actual = s.actual[r]
        m = len(s.lengths)
        if isinstance(live_grouped, slice):  # side s plays side s +/- m
            first, second = actual[:m], actual[m:]
            s.payoff[r, :m] = self.flat_table[2 * first + second]
            s.payoff[r, m:] = self.flat_table[2 * second + first]
        else:
            partner = np.concatenate([actual[m:], actual[:m]])
            live = np.concatenate([s.lengths, s.lengths]) > r
            s.payoff[r, live] = self.flat_table[2 * actual[live] + partner[live]]

    def _decide(
        self, s: _Step, r: int, live: np.ndarray | slice, intended: np.ndarray, fallback: np.ndarray
    ) -> list[tuple[int, Any]]:
        """Ask each policy for its live sides' round-``r`` decisions.

        The policies are asked in policy order, which fixes the order of the policy
        stream's draws; the answers go into ``intended`` and ``fallback`` (grouped
        order). Returns (policy index, rows) for each policy that decided.
        """
        decided = []
        policies = self.policies
        for p, a, b in s.groups:
            rows = slice(a, b) if not s.dynamic else live[(live >= a) & (live < b)]
            if s.dynamic and len(rows) == 0:
                continue
            mine, theirs, length = s.memory.read(rows if s.s_slots is None else s.s_slots[rows])
            view = View(
                mine=mine,
                theirs=theirs,
                length=length,
                round=np.broadcast_to(np.int32(r), length.shape),
                agent=s.s_agent[rows],
                opponent=s.s_opponent[rows],
                match=s.s_match[rows],
                step=s.step,
                side=s.s_side[rows],
                score=s.s_score[rows],
                rounds_total=s.s_total[rows],
            )
            out = policies[p].decide(view, self.rngs["policy"])
            if isinstance(out, Decisions):
                intended[rows] = out.actions
                fallback[rows] = out.fallback
            else:
                intended[rows] = out
            decided.append((p, rows))
        return decided

    def _observe(
        self,
        s: _Step,
        r: int,
        decided: list[tuple[int, Any]],
        intended: np.ndarray,
        actual: np.ndarray,
        payoff: np.ndarray,
    ) -> None:
        """Tell the policies that keep notes what happened to their sides in round ``r``.

        ``intended``, ``actual`` and ``payoff`` are the round's, in the grouped order.
        """
        policies = self.policies
        for p, rows in decided:
            if not hasattr(policies[p], "observe"):
                continue
            policies[p].observe(
                Outcome(
                    step=s.step,
                    round=r,
                    match=s.s_match[rows],
                    side=s.s_side[rows],
                    agent=s.s_agent[rows],
                    opponent=s.s_opponent[rows],
                    intended=intended[rows],
                    mine=actual[rows],
                    theirs=actual[s.s_partner[rows]],
                    payoff=payoff[rows],
                )
            )


# up to this many policies, one pass per policy beats a sort of millions of sides
GROUP_BY_PASSES = 16


def _group(
    side_policy: np.ndarray, n_policies: int
) -> tuple[np.ndarray, list[tuple[int, int, int]]]:
    """A stable order of the sides by policy, and each present policy's [start, end)."""
    if n_policies <= GROUP_BY_PASSES:
        parts = [np.flatnonzero(side_policy == p) for p in range(n_policies)]
        order = np.concatenate(parts) if parts else np.zeros(0, np.int64)
        bounds = np.cumsum([0] + [len(part) for part in parts])
    else:
        # a stable sort of small integers is a radix sort
        small = side_policy.astype(np.int16 if n_policies < 2**15 else np.int64)
        order = np.argsort(small, kind="stable")
        bounds = np.searchsorted(side_policy[order], np.arange(n_policies + 1))
    return order, [
        (p, int(bounds[p]), int(bounds[p + 1]))
        for p in range(n_policies)
        if bounds[p + 1] > bounds[p]
    ]
