"""Strategy updates between steps, vectorised over the graph's CSR adjacency.

Every rule maps (labels, fitness) to new labels with whole-array NumPy
operations: a random neighbour per agent is one index into the CSR arrays, a
best neighbour is a segment maximum (``np.maximum.reduceat``), a draw in
proportion to fitness is a search in a cumulative sum. No per-agent loop.

``UPDATE_RULES`` maps each ``[evolution]`` rule name to its rule; the scenario's
``rule`` field and the check of rule-specific parameters are built from it.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, ClassVar

import numpy as np

if TYPE_CHECKING:  # abm.scenario builds its rule names from UPDATE_RULES below
    from abm.scenario import EvolutionConfig


class Adjacency:
    """Neighbour lists of an undirected graph as CSR arrays, self-loops left out.

    A self-loop is self-interaction in the game, not a neighbour to copy.

    Args:
        edges: The graph's edges as an (m, 2) array of node indices, each edge once.
        n_nodes: The number of nodes, those without edges included.
    """

    def __init__(self, edges: np.ndarray, n_nodes: int) -> None:
        """Build the CSR arrays from the edge list."""
        u, v = edges[:, 0], edges[:, 1]
        keep = u != v
        src = np.concatenate([u[keep], v[keep]])
        dst = np.concatenate([v[keep], u[keep]])
        order = np.argsort(src, kind="stable")
        self.indices = dst[order].astype(np.int64)
        self.degree = np.bincount(src, minlength=n_nodes).astype(np.int64)
        self.indptr = np.concatenate([[0], np.cumsum(self.degree)]).astype(np.int64)
        self.row = np.repeat(np.arange(n_nodes), self.degree)
        self.n = n_nodes

    def random_neighbour(self, nodes: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        """One uniformly drawn neighbour per node; -1 for a node with none."""
        if not len(self.indices):
            return np.full(len(nodes), -1, np.int64)
        deg = self.degree[nodes]
        pick = self.indptr[nodes] + (rng.random(len(nodes)) * deg).astype(np.int64)
        return np.where(deg > 0, self.indices[np.minimum(pick, len(self.indices) - 1)], -1)

    def weighted_neighbour(
        self, nodes: np.ndarray, weight: np.ndarray, rng: np.random.Generator
    ) -> np.ndarray:
        """One neighbour per node, drawn in proportion to ``weight[neighbour]``.

        The draw is uniform where all of a node's neighbours weigh 0; a node with no
        neighbours gets -1.
        """
        if not len(self.indices):
            return np.full(len(nodes), -1, np.int64)
        w = weight[self.indices]
        cum = np.concatenate([[0.0], np.cumsum(w)])
        lo, hi = self.indptr[nodes], self.indptr[nodes + 1]
        total = cum[hi] - cum[lo]
        u = rng.random(len(nodes))
        target = cum[lo] + u * total
        pick = np.searchsorted(cum, target, side="right") - 1
        uniform = lo + (u * (hi - lo)).astype(np.int64)
        pick = np.where(total > 0, np.clip(pick, lo, hi - 1), uniform)
        return np.where(hi > lo, self.indices[np.minimum(pick, len(self.indices) - 1)], -1)

    def best_neighbour(
        self, fitness: np.ndarray, rng: np.random.Generator
    ) -> tuple[np.ndarray, np.ndarray]:
        """Per node, the fittest neighbour and its fitness.

        Ties are broken at random; a node with no neighbours gets -1 and -inf.

        Returns:
            The best neighbour of every node and that neighbour's fitness.
        """
        best_fit = np.full(self.n, -np.inf)
        best = np.full(self.n, -1, np.int64)
        has = self.degree > 0
        if not len(self.indices):
            return best, best_fit
        vals = fitness[self.indices]
        seg_max = np.maximum.reduceat(vals, self.indptr[:-1][has])
        best_fit[has] = seg_max
        # among the entries that reach their segment's maximum, the one with the
        # largest random key wins: a uniform choice among tied neighbours
        key = np.where(vals == best_fit[self.row], rng.random(len(vals)), -1.0)
        order = np.lexsort((key, self.row))
        best[has] = self.indices[order[self.indptr[1:][has] - 1]]
        return best, best_fit


class UpdateRule:
    """One way agents adopt policies between steps: an entry of ``UPDATE_RULES``.

    A rule subclasses it, says its source in its docstring and implements ``apply``;
    ``params`` are the rule's own ``[evolution]`` keys with their defaults; a key of
    another rule is refused when the scenario is read.
    """

    params: ClassVar[Mapping[str, float]] = {}

    def apply(
        self,
        evo: Evolution,
        labels: np.ndarray,
        fitness: np.ndarray,
        matches: np.ndarray | None,
        focal: np.ndarray,
        new: np.ndarray,
    ) -> np.ndarray:
        """Write the new labels of this update into ``new``.

        Args:
            evo: the configuration, adjacency and random stream of the run.
            labels: each node's label before the update (left as it is).
            fitness: each node's fitness this step.
            matches: each node's matches this step (None: its degree).
            focal: the nodes chosen to update this step.
            new: a copy of ``labels`` to write into.

        Returns:
            The nodes that updated, among which mutation then strikes.
        """
        raise NotImplementedError


class ImitateBest(UpdateRule):
    """Imitate the best: copy the fittest neighbour if it earned more than oneself.

    Ties among neighbours are broken at random; a tie with oneself keeps one's own
    policy. The deterministic imitation of Nowak & May (1992), "Evolutionary games and
    spatial chaos", Nature 359:826.
    """

    def apply(self, evo, labels, fitness, matches, focal, new):
        """Copy the fittest neighbour's label where it did better; see ``UpdateRule.apply``."""
        best, best_fit = evo.adj.best_neighbour(fitness, evo.rng)
        best, best_fit = best[focal], best_fit[focal]
        # keeping one's own policy wins a tie with the best neighbour
        switch = best_fit > fitness[focal]
        new[focal[switch]] = labels[best[switch]]
        return focal


class Proportional(UpdateRule):
    """Proportional imitation: copy a random neighbour that earned more, in proportion.

    The probability is (its fitness - own fitness) / the largest possible gap (0 when
    the neighbour did no better): replicator-like imitation, as in Santos & Pacheco
    (2005), "Scale-free networks provide a unifying framework for the emergence of
    cooperation", Phys. Rev. Lett. 95:098104. The gap is the payoff span of a match,
    times the larger number of matches of the two with accumulated payoffs.
    """

    def apply(self, evo, labels, fitness, matches, focal, new):
        """Copy a random neighbour with probability gain / largest gap; see ``UpdateRule.apply``."""
        i, j = _pairs_with_a_neighbour(evo, focal)
        gain = fitness[j] - fitness[i]
        scale = evo.payoff_span
        if evo.config.payoff == "accumulated":  # the largest possible gap in the step
            played = evo.adj.degree if matches is None else matches
            scale = scale * np.maximum(1, np.maximum(played[i], played[j]))
        prob = np.clip(gain / scale, 0.0, 1.0)
        _adopt(evo, labels, new, i, j, prob)
        return focal


class Fermi(UpdateRule):
    """Fermi rule: copy a random neighbour with a noisy, fitness-driven probability.

    The probability is 1 / (1 + exp(-(its fitness - own fitness) / temperature)):
    pairwise comparison with noise, Szabo & Toke (1998), "Evolutionary prisoner's
    dilemma game on a square lattice", Phys. Rev. E 58:69.
    """

    params: ClassVar[Mapping[str, float]] = {"temperature": 0.1}

    def apply(self, evo, labels, fitness, matches, focal, new):
        """Copy a random neighbour with the Fermi probability; see ``UpdateRule.apply``."""
        i, j = _pairs_with_a_neighbour(evo, focal)
        gain = fitness[j] - fitness[i]
        prob = 0.5 * (1.0 + np.tanh(gain / (2.0 * evo.config.temperature)))  # = Fermi function
        _adopt(evo, labels, new, i, j, prob)
        return focal


class DeathBirth(UpdateRule):
    """Death-birth: an updating agent dies and a neighbour's offspring takes its place.

    The neighbours compete in proportion to fitness 1 - w + w * payoff (w = intensity;
    uniformly where all are 0): the death-birth updating of Ohtsuki, Hauert, Lieberman &
    Nowak (2006), "A simple rule for the evolution of cooperation on graphs and social
    networks", Nature 441:502.
    """

    params: ClassVar[Mapping[str, float]] = {"intensity": 1.0}

    def apply(self, evo, labels, fitness, matches, focal, new):
        """Replace each focal node by a neighbour's offspring; see ``UpdateRule.apply``."""
        weight = _selection_weight(evo, fitness)
        parent = evo.adj.weighted_neighbour(focal, weight, evo.rng)
        ok = parent >= 0
        new[focal[ok]] = labels[parent[ok]]
        return focal


class Moran(UpdateRule):
    """Moran birth-death: a parent drawn by fitness replaces a random neighbour.

    For each update a parent is drawn from all agents in proportion to fitness
    1 - w + w * payoff (w = intensity) and its offspring replaces a random neighbour:
    the Moran process of Nowak, Sasaki, Taylor & Fudenberg (2004), "Emergence of
    cooperation and evolutionary stability in finite populations", Nature 428:646, on
    graphs as in Lieberman, Hauert & Nowak (2005), "Evolutionary dynamics on graphs",
    Nature 433:312. The replaced agents are the ones that may mutate.
    """

    params: ClassVar[Mapping[str, float]] = {"intensity": 1.0}

    def apply(self, evo, labels, fitness, matches, focal, new):
        """Let parents drawn by fitness replace random neighbours; see ``UpdateRule.apply``.

        The nodes returned, those that may mutate, are the replaced ones, not ``focal``.
        """
        weight = _selection_weight(evo, fitness)
        total = weight.sum()
        p = weight / total if total > 0 else None
        parent = evo.rng.choice(evo.n, size=len(focal), p=p)
        child = evo.adj.random_neighbour(parent, evo.rng)
        ok = child >= 0
        new[child[ok]] = labels[parent[ok]]
        return child[ok]


def _pairs_with_a_neighbour(evo: Evolution, focal: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(updating agents that have a neighbour, the random neighbour each compares with)."""
    model = evo.adj.random_neighbour(focal, evo.rng)
    ok = model >= 0
    return focal[ok], model[ok]


def _adopt(
    evo: Evolution,
    labels: np.ndarray,
    new: np.ndarray,
    i: np.ndarray,
    j: np.ndarray,
    prob: np.ndarray,
) -> None:
    adopt = evo.rng.random(len(i)) < prob
    new[i[adopt]] = labels[j[adopt]]


def _selection_weight(evo: Evolution, fitness: np.ndarray) -> np.ndarray:
    w = evo.config.intensity
    return np.maximum(0.0, 1.0 - w + w * fitness)


UPDATE_RULES: dict[str, UpdateRule] = {
    "imitate_best": ImitateBest(),
    "proportional": Proportional(),
    "fermi": Fermi(),
    "death_birth": DeathBirth(),
    "moran": Moran(),
}


class Evolution:
    """Applies one ``[evolution]`` rule to the population after each step.

    Args:
        config: The scenario's ``[evolution]`` table.
        edges: The graph's edges as an (m, 2) array of node indices.
        n_nodes: The number of nodes.
        mutant_labels: The labels mutation draws from (each names one policy).
        payoff_span: The largest possible payoff difference in one match, which,
            times the number of matches, normalises the ``proportional`` rule.
        rng: The random stream of the updates.
    """

    def __init__(
        self,
        config: EvolutionConfig,
        edges: np.ndarray,
        n_nodes: int,
        mutant_labels: np.ndarray,
        payoff_span: float,
        rng: np.random.Generator,
    ) -> None:
        """Look up the rule and build the adjacency arrays."""
        self.config = config
        self.rule = UPDATE_RULES[config.rule]
        self.adj = Adjacency(edges, n_nodes)
        self.mutant_labels = np.asarray(mutant_labels, np.int64)
        self.payoff_span = payoff_span
        self.rng = rng
        self.n = n_nodes

    def fitness(self, payoff: np.ndarray, matches: np.ndarray) -> np.ndarray:
        """This step's payoff, summed or averaged over the agent's matches."""
        if self.config.payoff == "accumulated":
            return payoff
        return np.divide(payoff, matches, out=np.zeros(self.n), where=matches > 0)

    def _focal(self) -> np.ndarray:
        if self.config.update == "synchronous":
            return np.arange(self.n)
        fraction = self.config.update_fraction
        k = 1 if fraction is None else max(1, round(fraction * self.n))
        return self.rng.choice(self.n, size=k, replace=False)

    def update(
        self, labels: np.ndarray, fitness: np.ndarray, matches: np.ndarray | None = None
    ) -> np.ndarray:
        """New labels after one update; ``labels`` itself is left as it was.

        Args:
            labels: each node's label (the policy it plays).
            fitness: each node's fitness this step (see ``fitness``).
            matches: each node's matches in the step (default: its degree).

        Returns:
            A new label array.
        """
        cfg, rng = self.config, self.rng
        new = labels.copy()
        focal = self.rule.apply(self, labels, fitness, matches, self._focal(), new)
        if cfg.mutation > 0 and len(self.mutant_labels):
            mutate = focal[rng.random(len(focal)) < cfg.mutation]
            new[mutate] = self.mutant_labels[
                rng.integers(len(self.mutant_labels), size=len(mutate))
            ]
        return new
