"""Strategy updates between steps, vectorised over the graph's CSR adjacency.

Every rule maps (types, fitness) to new types with whole-array NumPy
operations: a random neighbour per agent is one index into the CSR arrays, a
best neighbour is a segment maximum (``np.maximum.reduceat``), a draw in
proportion to fitness is a search in a cumulative sum. No per-agent loop.
"""

from __future__ import annotations

import numpy as np

from abm.scenario import EvolutionConfig


class Adjacency:
    """Neighbour lists of an undirected graph as CSR arrays, self-loops left out
    (a self-loop is self-interaction in the game, not a neighbour to copy)."""

    def __init__(self, edges: np.ndarray, n_nodes: int) -> None:
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

    def weighted_neighbour(self, nodes: np.ndarray, weight: np.ndarray,
                           rng: np.random.Generator) -> np.ndarray:
        """One neighbour per node drawn in proportion to ``weight[neighbour]``
        (uniformly where all weights are 0); -1 for a node with no neighbours."""
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

    def best_neighbour(self, fitness: np.ndarray, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        """Per node: the fittest neighbour (ties broken at random) and its fitness;
        -1 and -inf for a node with no neighbours."""
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


class Evolution:
    """Applies one ``[evolution]`` rule to the population after each step.

    ``types`` are the model's player labels (each names one policy);
    ``payoff_span`` is the largest possible payoff difference in one match,
    which, times the number of matches, normalises the ``proportional`` rule.
    """

    def __init__(self, config: EvolutionConfig, edges: np.ndarray, n_nodes: int,
                 mutant_types: np.ndarray, payoff_span: float, rng: np.random.Generator) -> None:
        self.config = config
        self.adj = Adjacency(edges, n_nodes)
        self.mutant_types = np.asarray(mutant_types, np.int64)
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

    def update(self, types: np.ndarray, fitness: np.ndarray,
               matches: np.ndarray | None = None) -> np.ndarray:
        """New types after one update; ``types`` itself is left as it was. ``matches``
        counts each agent's matches in the step (default: its degree)."""
        cfg, rng, adj = self.config, self.rng, self.adj
        focal = self._focal()
        new = types.copy()
        if cfg.rule == "imitate_best":
            best, best_fit = adj.best_neighbour(fitness, rng)
            best, best_fit = best[focal], best_fit[focal]
            # keeping one's own policy wins a tie with the best neighbour
            switch = best_fit > fitness[focal]
            new[focal[switch]] = types[best[switch]]
        elif cfg.rule in ("proportional", "fermi"):
            model = adj.random_neighbour(focal, rng)
            ok = model >= 0
            i, j = focal[ok], model[ok]
            gain = fitness[j] - fitness[i]
            if cfg.rule == "proportional":
                scale = self.payoff_span
                if cfg.payoff == "accumulated":  # the largest possible gap in the step
                    played = adj.degree if matches is None else matches
                    scale = scale * np.maximum(1, np.maximum(played[i], played[j]))
                prob = np.clip(gain / scale, 0.0, 1.0)
            else:
                prob = 0.5 * (1.0 + np.tanh(gain / (2.0 * cfg.temperature)))  # = Fermi function
            adopt = rng.random(len(i)) < prob
            new[i[adopt]] = types[j[adopt]]
        elif cfg.rule == "death_birth":
            weight = np.maximum(0.0, 1.0 - cfg.intensity + cfg.intensity * fitness)
            parent = adj.weighted_neighbour(focal, weight, rng)
            ok = parent >= 0
            new[focal[ok]] = types[parent[ok]]
        else:  # moran: birth-death, a parent drawn from everyone by fitness
            weight = np.maximum(0.0, 1.0 - cfg.intensity + cfg.intensity * fitness)
            total = weight.sum()
            p = weight / total if total > 0 else None
            parent = rng.choice(self.n, size=len(focal), p=p)
            child = adj.random_neighbour(parent, rng)
            ok = child >= 0
            new[child[ok]] = types[parent[ok]]
            focal = child[ok]
        if cfg.mutation > 0 and len(self.mutant_types):
            mutate = focal[rng.random(len(focal)) < cfg.mutation]
            new[mutate] = self.mutant_types[rng.integers(len(self.mutant_types), size=len(mutate))]
        return new
