"""Where each agent is drawn: a layout computed once per graph, and the cap on drawing.

Each graph kind says how it is drawn (``drawing`` in abm.graph_kinds): lattices keep
their grid; complete graphs and rings sit on a circle in node order; other graphs get a
force-directed layout. Past ``MAX_DRAWN_NODES`` agents
only a connected sample is drawn (a breadth-first ball around a seeded start node), and a
lattice that large is drawn as an image, one pixel per agent.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import networkx as nx
import numpy as np

MAX_DRAWN_NODES = 2000
MAX_DRAWN_EDGES = 20_000
_CACHE: OrderedDict[tuple, Drawing] = OrderedDict()
_CACHE_SIZE = 8


@dataclass(frozen=True)
class Drawing:
    """What the network view draws for one graph."""

    nodes: np.ndarray  # drawn node ids
    pos: np.ndarray  # (len(nodes), 2) positions in data units
    edges: np.ndarray  # ids into model.edges of the drawn edges (no self-loops)
    index: np.ndarray  # node id -> row in nodes/pos, -1 if not drawn
    grid: tuple[int, int] | None  # (rows, cols) when drawn as an image
    note: str | None  # said on the page when not everything is drawn


def force_layout(n: int, edges: np.ndarray, seed: int, iterations: int = 50) -> np.ndarray:
    """Lay a graph out with Fruchterman-Reingold in NumPy.

    Float32, repulsion in row blocks: about 1 s for 1,000 nodes on one core, the same
    picture for the same seed.

    Args:
        n: The number of nodes.
        edges: An (E, 2) array of node indices in 0..n-1.
        seed: Seeds the starting positions.
        iterations: Steps of the cooling schedule.

    Returns:
        An (n, 2) float32 array of positions.
    """
    rng = np.random.default_rng(seed)
    pos = rng.random((n, 2)).astype(np.float32)
    if n <= 1:
        return pos
    k2 = np.float32(1.0 / n)
    k = np.sqrt(k2)
    t, dt = 0.1, 0.1 / (iterations + 1)
    u, v = edges[:, 0], edges[:, 1]
    for _ in range(iterations):
        disp = np.zeros((n, 2), np.float32)
        for a in range(0, n, 512):
            delta = pos[a : a + 512, None, :] - pos[None, :, :]
            d2 = np.einsum("ijk,ijk->ij", delta, delta)
            np.maximum(d2, 1e-4, out=d2)
            disp[a : a + 512] = np.einsum("ijk,ij->ik", delta, k2 / d2)
        d = pos[u] - pos[v]
        f = d * (np.sqrt(np.einsum("ij,ij->i", d, d)) / k)[:, None]
        np.subtract.at(disp, u, f)
        np.add.at(disp, v, f)
        length = np.maximum(np.sqrt(np.einsum("ij,ij->i", disp, disp)), 1e-4)
        pos += disp * (np.minimum(length, t) / length)[:, None]
        t -= dt
    return pos


def _circle(n: int) -> np.ndarray:
    angle = np.pi / 2 - 2 * np.pi * np.arange(n) / max(n, 1)
    return np.column_stack([np.cos(angle), np.sin(angle)])


def _sample(graph: nx.Graph, cap: int, seed: int) -> np.ndarray:
    """A breadth-first ball of ``cap`` nodes around a seeded start, as sorted node ids.

    It is topped up with nodes drawn at random when the start's component is smaller.
    """
    rng = np.random.default_rng(seed)
    n = graph.number_of_nodes()
    start = int(rng.integers(n))
    picked = dict.fromkeys([start])
    for _, nbrs in nx.bfs_successors(graph, start):
        picked.update(dict.fromkeys(nbrs))
        if len(picked) >= cap:
            break
    nodes = list(picked)[:cap]
    if len(nodes) < cap:
        rest = np.setdiff1d(np.arange(n), nodes)
        nodes += list(rng.choice(rest, cap - len(nodes), replace=False))
    return np.sort(np.array(nodes, np.int64))


def drawing_for(model) -> Drawing:
    """The drawing of ``model``'s graph, computed once per graph and kept.

    A reset with the same graph and seed reuses it.
    """
    cached = getattr(model, "_viz_drawing", None)
    if cached is not None:
        return cached
    config = model.scenario.graph
    key = (config.model_dump_json(), model.master_seed, model.n_nodes, len(model.edges))
    drawing = _CACHE.get(key)
    if drawing is None:
        drawing = _compute(model.graph, model.edges, config, model.master_seed)
        _CACHE[key] = drawing
        while len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    model._viz_drawing = drawing
    return drawing


def _compute(graph: nx.Graph, edges: np.ndarray, config, seed: int) -> Drawing:
    n = graph.number_of_nodes()
    style = config.drawing  # each graph kind says how it is drawn (abm.graph_kinds)
    shape = config.lattice_shape()
    if style == "lattice" and shape is not None and n > MAX_DRAWN_NODES:
        rows, cols = shape
        return Drawing(
            nodes=np.arange(n),
            pos=np.zeros((0, 2)),
            edges=np.zeros(0, np.int64),
            index=np.arange(n),
            grid=shape,
            note=f"{n:,} agents on a {rows} x {cols} lattice, drawn "
            "as an image (one pixel per agent, darker where it last defected)",
        )
    note = None
    nodes = np.arange(n)
    if n > MAX_DRAWN_NODES:
        nodes = _sample(graph, MAX_DRAWN_NODES, seed)
        note = (
            f"{n:,} agents: drawing {len(nodes):,} of them (a connected sample around "
            f"agent {nodes[0]}, fixed for this graph); the plots and heatmaps cover all"
        )
    index = np.full(n, -1, np.int64)
    index[nodes] = np.arange(len(nodes))
    u, v = edges[:, 0], edges[:, 1]
    keep = np.flatnonzero((index[u] >= 0) & (index[v] >= 0) & (u != v))
    if len(keep) > MAX_DRAWN_EDGES:
        extra = f"{MAX_DRAWN_EDGES:,} of the {len(keep):,} links drawn"
        keep = np.sort(np.random.default_rng(seed).choice(keep, MAX_DRAWN_EDGES, replace=False))
        note = f"{note}; {extra}" if note else extra
    if style == "lattice":
        rc = np.array([graph.nodes[int(i)]["pos"] for i in nodes], float)
        pos = np.column_stack([rc[:, 0], -rc[:, 1]])
    elif style == "circle":
        pos = _circle(n)[nodes] if n <= MAX_DRAWN_NODES else _circle(len(nodes))
    else:
        local = np.column_stack([index[u[keep]], index[v[keep]]])
        pos = force_layout(len(nodes), local, seed, 50 if len(nodes) <= 1000 else 30)
    return Drawing(
        nodes=nodes, pos=np.asarray(pos, float), edges=keep, index=index, grid=None, note=note
    )
