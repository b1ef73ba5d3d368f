"""Pairing schemes: which edges of the graph play a match at each step."""

from __future__ import annotations

import numpy as np


class AllEdges:
    """Every edge (self-loops included) plays one match every step."""

    def __init__(self, edges: np.ndarray, n_nodes: int) -> None:
        """Schedule these edges (an (m, 2) array of node ids) among ``n_nodes`` nodes."""
        self.n_edges = len(edges)
        self.default_steps = 1

    def matches(self, step: int, rng: np.random.Generator) -> np.ndarray:
        """Return the ids (rows of the edge array) of every edge, in order."""
        return np.arange(self.n_edges)


class RandomMatching:
    """A uniformly random greedy maximal matching each step.

    Edges get random priorities; an edge joins the matching when it has the
    lowest priority among the live edges at both its ends, its ends are then
    removed, and this repeats. That picks exactly the edges that a greedy pass
    over the edges in priority order would pick, in an expected O(log n) number of
    vectorised rounds. A self-loop occupies its node alone.
    """

    def __init__(self, edges: np.ndarray, n_nodes: int) -> None:
        """Schedule these edges (an (m, 2) array of node ids) among ``n_nodes`` nodes."""
        self.edges = edges
        self.n_nodes = n_nodes
        self.default_steps = 1

    def matches(self, step: int, rng: np.random.Generator) -> np.ndarray:
        """Return the sorted ids of this step's matching, drawn afresh with ``rng``."""
        u, v = self.edges[:, 0], self.edges[:, 1]
        priority = rng.permutation(len(self.edges))
        live = np.ones(len(self.edges), bool)
        taken = np.zeros(self.n_nodes, bool)
        chosen = []
        while live.any():
            ids = np.flatnonzero(live)
            best = np.full(self.n_nodes, len(self.edges), np.int64)
            np.minimum.at(best, u[ids], priority[ids])
            np.minimum.at(best, v[ids], priority[ids])
            win = ids[(best[u[ids]] == priority[ids]) & (best[v[ids]] == priority[ids])]
            chosen.append(win)
            taken[u[win]] = True
            taken[v[win]] = True
            live &= ~(taken[u] | taken[v])
        return np.sort(np.concatenate(chosen)) if chosen else np.zeros(0, np.int64)


class RoundRobin:
    """A schedule in which each step is a matching and every edge plays once per cycle.

    On a complete graph the classic circle method gives the fewest steps
    (n - 1 or n, plus one step of self-play when n is even and the graph has
    self-loops); other graphs get a greedy edge colouring. Steps beyond one
    cycle start the cycle again.
    """

    def __init__(self, edges: np.ndarray, n_nodes: int) -> None:
        """Colour these edges (an (m, 2) array of node ids) into one matching per step.

        ``default_steps`` is the number of colours: the steps of one cycle.
        """
        self.colour = _complete_colouring(edges, n_nodes)
        if self.colour is None:
            self.colour = _greedy_colouring(edges, n_nodes)
        self.default_steps = int(self.colour.max()) + 1 if len(edges) else 1
        order = np.argsort(self.colour, kind="stable")
        self._by_colour = np.split(
            order, np.searchsorted(self.colour[order], np.arange(1, self.default_steps))
        )

    def matches(self, step: int, rng: np.random.Generator) -> np.ndarray:
        """Return the sorted ids of the edges of colour ``step`` modulo the cycle length."""
        return np.sort(self._by_colour[step % self.default_steps])


def _complete_colouring(edges: np.ndarray, n: int) -> np.ndarray | None:
    loops = edges[:, 0] == edges[:, 1]
    if (~loops).sum() != n * (n - 1) // 2 or loops.sum() not in (0, n) or n < 2:
        return None
    u, v = edges[:, 0], edges[:, 1]
    if n % 2:
        return (u + v) % n  # the bye of colour c is the node i with 2i = c: its self-loop
    m = n - 1
    colour = (u + v) % m
    last = v == m  # the node left out of the odd circle takes each step's bye
    colour[last] = (2 * u[last]) % m
    colour[loops] = m  # with n even, self-play needs a step of its own
    return colour


def _greedy_colouring(edges: np.ndarray, n: int) -> np.ndarray:
    degree = np.bincount(edges.ravel(), minlength=n)
    order = np.argsort(-np.maximum(degree[edges[:, 0]], degree[edges[:, 1]]), kind="stable")
    used: list[set[int]] = [set() for _ in range(n)]
    colour = np.zeros(len(edges), np.int64)
    for e in order.tolist():
        a, b = int(edges[e, 0]), int(edges[e, 1])
        busy = used[a] | used[b]
        c = 0
        while c in busy:
            c += 1
        colour[e] = c
        used[a].add(c)
        used[b].add(c)
    return colour


SCHEMES = {"all_edges": AllEdges, "random_matching": RandomMatching, "round_robin": RoundRobin}


def make_pairing(
    scheme: str, edges: np.ndarray, n_nodes: int
) -> AllEdges | RandomMatching | RoundRobin:
    """Build the pairing scheme called ``scheme`` over these edges.

    Args:
        scheme: A key of ``SCHEMES``.
        edges: The graph's edges as an (m, 2) array of node ids, self-loops included.
        n_nodes: The number of nodes.

    Returns:
        The scheme; its ``matches(step, rng)`` gives the edge ids that play at a step.
    """
    return SCHEMES[scheme](edges, n_nodes)
