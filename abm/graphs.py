"""Interaction graphs built with NetworkX from the scenario's [graph] table."""

from __future__ import annotations

from pathlib import Path

import networkx as nx
import numpy as np

from abm.errors import ScenarioError
from abm.scenario import (BarabasiAlbertGraph, CompleteGraph, ErdosRenyiGraph, FileGraph,
                          GridGraph, RandomRegularGraph, RingGraph, WattsStrogatzGraph)

AnyGraph = (CompleteGraph | RingGraph | GridGraph | WattsStrogatzGraph | BarabasiAlbertGraph
            | ErdosRenyiGraph | RandomRegularGraph | FileGraph)


def build_graph(config: AnyGraph, rng: np.random.Generator, source: str = "<scenario>",
                n_default: int | None = None) -> nx.Graph:
    """Build the graph with nodes 0..N-1; ``n_default`` sizes a complete graph with no n."""

    def fail(field: str, message: str) -> ScenarioError:
        return ScenarioError(f"{source}: field 'graph.{field}': {message}")

    # copies are independent draws, laid out one after another: copy i holds
    # nodes i*n .. (i+1)*n - 1, so a whole ensemble plays in one vectorised step
    parts = [_one_graph(config, int(rng.integers(2**31 - 1)), fail, n_default)
             for _ in range(config.copies)]
    graph = parts[0] if len(parts) == 1 else nx.disjoint_union_all(parts)
    if config.self_loops:
        graph.add_edges_from((v, v) for v in graph.nodes)
    return graph


def graph_size(config: AnyGraph, n_default: int | None = None) -> tuple[int, int, str] | None:
    """(nodes, edges, the field that sets the size) the graph will have, all copies and
    self-loops included, from the [graph] table alone (an upper bound where the
    graph is random); None for a graph file, whose size only reading it tells."""
    if isinstance(config, FileGraph):
        return None
    if isinstance(config, GridGraph):
        n = config.rows * config.cols
        field = "rows" if config.rows >= config.cols else "cols"
        edges = n * (4 if config.neighbourhood == "moore" else 2)
    else:
        n = config.n if config.n is not None else (n_default or 0)
        field = "n"
        if isinstance(config, CompleteGraph):
            edges = n * (n - 1) // 2
        elif isinstance(config, RingGraph):
            edges = n * config.k
        elif isinstance(config, WattsStrogatzGraph):
            edges = n * config.k // 2
        elif isinstance(config, BarabasiAlbertGraph):
            edges = max(n - config.m, 0) * config.m
        elif isinstance(config, ErdosRenyiGraph):
            edges = int(config.p * n * (n - 1) / 2)
        else:
            edges = n * config.d // 2
    if config.self_loops:
        edges += n
    if config.copies > n:  # many small copies: the number of copies is what is big
        field = "copies"
    return n * config.copies, edges * config.copies, field


def _one_graph(config: AnyGraph, seed: int, fail, n_default: int | None) -> nx.Graph:
    if isinstance(config, CompleteGraph):
        n = config.n if config.n is not None else n_default
        if n is None:
            raise fail("n", "a complete graph needs n, or a population.players list to count")
        graph = nx.complete_graph(n)
    elif isinstance(config, RingGraph):
        if 2 * config.k >= config.n:
            raise fail("k", f"a ring of n = {config.n} nodes allows k (neighbours on each side) "
                            f"up to {(config.n - 1) // 2}; got {config.k}")
        graph = nx.circulant_graph(config.n, range(1, config.k + 1))
    elif isinstance(config, GridGraph):
        graph = _grid(config)
    elif isinstance(config, WattsStrogatzGraph):
        if config.k >= config.n:
            raise fail("k", f"must be smaller than n = {config.n}; got {config.k}")
        graph = nx.watts_strogatz_graph(config.n, config.k, config.p, seed=seed)
    elif isinstance(config, BarabasiAlbertGraph):
        if config.m >= config.n:
            raise fail("m", f"must be smaller than n = {config.n}; got {config.m}")
        graph = nx.barabasi_albert_graph(config.n, config.m, seed=seed)
    elif isinstance(config, ErdosRenyiGraph):
        graph = nx.fast_gnp_random_graph(config.n, config.p, seed=seed)
    elif isinstance(config, RandomRegularGraph):
        if config.d >= config.n or (config.n * config.d) % 2:
            raise fail("d", f"a d-regular graph on n = {config.n} nodes needs d < n and n * d "
                            f"even; got d = {config.d}")
        graph = nx.random_regular_graph(config.d, config.n, seed=seed)
    else:
        graph = _from_file(config, fail)
    return graph


def _grid(config: GridGraph) -> nx.Graph:
    rows, cols = config.rows, config.cols
    r, c = np.divmod(np.arange(rows * cols), cols)
    offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if config.neighbourhood == "moore" else [])
    graph = nx.Graph()
    graph.add_nodes_from((int(i), {"pos": (int(ci), int(ri))})
                         for i, ri, ci in zip(np.arange(rows * cols), r, c))
    for dr, dc in offsets:
        r2, c2 = r + dr, c + dc
        if config.torus:
            r2, c2, ok = r2 % rows, c2 % cols, np.ones(r.shape, bool)
        else:
            ok = (r2 >= 0) & (r2 < rows) & (c2 >= 0) & (c2 < cols)
        u, v = (r * cols + c)[ok], (r2 * cols + c2)[ok]
        graph.add_edges_from((int(a), int(b)) for a, b in zip(u, v) if a != b)
    return graph


def _from_file(config: FileGraph, fail) -> nx.Graph:
    path = Path(config.path)
    fmt = config.format
    if fmt == "auto":
        fmt = "graphml" if path.suffix.lower() in (".graphml", ".xml") else "edgelist"
    if not path.exists():
        raise fail("path", f"no such file: {path}")
    if path.is_dir():
        raise fail("path", f"{path} is a folder; give a graph file (edge list or GraphML)")
    if not path.is_file():  # a device or a pipe, such as /dev/zero, may never end
        raise fail("path", f"{path} is not a regular file; give a graph file (edge list or "
                           "GraphML)")
    try:
        if fmt == "graphml":
            raw = nx.read_graphml(path)
        else:
            delimiter = "," if path.suffix.lower() == ".csv" else None
            raw = nx.read_edgelist(path, delimiter=delimiter, nodetype=str, data=False)
    except Exception as exc:  # NetworkX raises many kinds on a malformed file
        raise fail("path", f"cannot read {path} as {fmt}: {exc}") from None
    if raw.is_directed():
        raw = raw.to_undirected()
    if raw.is_multigraph():
        raw = nx.Graph(raw)
    if raw.number_of_nodes() == 0:
        raise fail("path", f"{path} holds no nodes")
    names = list(raw.nodes)
    if all(str(n).lstrip("-").isdigit() for n in names):
        names.sort(key=lambda n: int(n))
    index = {name: i for i, name in enumerate(names)}
    graph = nx.Graph()
    graph.add_nodes_from((index[n], {**raw.nodes[n], "name": str(n)}) for n in names)
    graph.add_edges_from((index[a], index[b]) for a, b in raw.edges)
    return graph


def edge_array(graph: nx.Graph) -> np.ndarray:
    """Edges as an (E, 2) int array with u <= v, sorted, so edge ids are stable."""
    if graph.number_of_edges() == 0:
        return np.zeros((0, 2), np.int64)
    edges = np.array(list(graph.edges()), dtype=np.int64)
    edges.sort(axis=1)
    return edges[np.lexsort((edges[:, 1], edges[:, 0]))]
