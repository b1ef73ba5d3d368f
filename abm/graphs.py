"""Interaction graphs built with NetworkX from the scenario's [graph] table.

The graph kinds themselves (their tables, builders and sizes) live in
``abm.graph_kinds``; ``GRAPH_KINDS`` maps each ``kind`` name to its class.
"""

from __future__ import annotations

import itertools

import networkx as nx
import numpy as np

from abm.graph_kinds import (
    GRAPH_KINDS,
    BarabasiAlbertGraph,
    CompleteGraph,
    ErdosRenyiGraph,
    FileGraph,
    GraphKind,
    GridGraph,
    RandomRegularGraph,
    RingGraph,
    WattsStrogatzGraph,
)

__all__ = [
    "GRAPH_KINDS",
    "AnyGraph",
    "BarabasiAlbertGraph",
    "CompleteGraph",
    "ErdosRenyiGraph",
    "FileGraph",
    "GraphKind",
    "GridGraph",
    "RandomRegularGraph",
    "RingGraph",
    "WattsStrogatzGraph",
    "build_graph",
    "edge_array",
    "graph_size",
]

AnyGraph = GraphKind  # any entry of GRAPH_KINDS


def build_graph(
    config: AnyGraph,
    rng: np.random.Generator,
    source: str = "<scenario>",
    n_default: int | None = None,
) -> nx.Graph:
    """Build the graph of a ``[graph]`` table, with nodes 0..N-1.

    Args:
        config: The scenario's ``[graph]`` table.
        rng: The random stream of random graph kinds.
        source: The scenario file, named in errors.
        n_default: The size of a complete graph that gives no ``n``.

    Returns:
        The graph.

    Raises:
        ScenarioError: Naming the field when the table asks for an impossible graph.
    """
    return config.build(rng, source, n_default)


def graph_size(config: AnyGraph, n_default: int | None = None) -> tuple[int, int, str] | None:
    """The size the graph of a ``[graph]`` table will have, before building it.

    Args:
        config: The scenario's ``[graph]`` table.
        n_default: The size of a complete graph that gives no ``n``.

    Returns:
        (nodes, edges, the field that sets the size), all copies and self-loops
        included, from the table alone (the edges counted as ``GraphKind.edges``
        counts them); None for a graph file, whose size only reading it tells.
    """
    return config.size(n_default)


def edge_array(graph: nx.Graph) -> np.ndarray:
    """Edges as an (E, 2) int array with u <= v, sorted, so edge ids are stable."""
    m = graph.number_of_edges()
    if m == 0:
        return np.zeros((0, 2), np.int64)
    flat = np.fromiter(itertools.chain.from_iterable(graph.edges()), np.int64, count=2 * m)
    edges = flat.reshape(m, 2)
    edges.sort(axis=1)
    # one integer key per edge sorts like (u, v) pairs and is several times faster than
    # lexsort at a million nodes; a simple graph has no two equal keys
    n = int(edges[:, 1].max()) + 1
    keys = np.sort(edges[:, 0] * n + edges[:, 1])
    return np.column_stack((keys // n, keys % n))
