"""Pairing schemes: who meets whom in each step."""

import networkx as nx
import numpy as np
import pytest

from abm.graphs import edge_array
from abm.pairing import AllEdges, RandomMatching, RoundRobin


def edges_of(graph: nx.Graph) -> np.ndarray:
    return edge_array(graph)


def complete(n: int, loops: bool) -> np.ndarray:
    g = nx.complete_graph(n)
    if loops:
        g.add_edges_from((v, v) for v in g)
    return edges_of(g)


def is_matching(edges: np.ndarray, chosen: np.ndarray) -> bool:
    ends = np.concatenate(
        [edges[chosen, 0], edges[chosen[edges[chosen, 0] != edges[chosen, 1]], 1]]
    )
    return len(ends) == len(set(ends.tolist()))


def test_all_edges_plays_every_edge_every_step():
    edges = complete(4, True)
    pairing = AllEdges(edges, 4)
    rng = np.random.default_rng(0)
    for step in range(3):
        assert pairing.matches(step, rng).tolist() == list(range(len(edges)))


@pytest.mark.parametrize("n", [2, 3, 4, 5, 6, 7, 10])
@pytest.mark.parametrize("loops", [True, False])
def test_round_robin_on_complete_graphs(n, loops):
    edges = complete(n, loops)
    pairing = RoundRobin(edges, n)
    # fewest possible steps: every node has n - 1 opponents (+ itself), one match a step;
    # without self-play an odd n needs n steps since one node must sit out each step
    fewest = n if loops else (n - 1 if n % 2 == 0 else n)
    assert pairing.default_steps == fewest
    played = []
    for step in range(pairing.default_steps):
        chosen = pairing.matches(step, None)
        assert is_matching(edges, chosen)
        played += chosen.tolist()
    assert sorted(played) == list(range(len(edges)))  # every edge exactly once
    # the cycle starts again afterwards
    assert (
        pairing.matches(pairing.default_steps, None).tolist() == pairing.matches(0, None).tolist()
    )


def test_round_robin_greedy_on_other_graphs():
    g = nx.barabasi_albert_graph(60, 2, seed=3)
    g.add_edges_from((v, v) for v in list(g)[:10])
    edges = edges_of(g)
    pairing = RoundRobin(edges, 60)
    played = []
    for step in range(pairing.default_steps):
        chosen = pairing.matches(step, None)
        assert is_matching(edges, chosen)
        played += chosen.tolist()
    assert sorted(played) == list(range(len(edges)))
    # a greedy colouring never needs more than 2 * max degree - 1 colours
    max_degree = max(d for _, d in nx.barabasi_albert_graph(60, 2, seed=3).degree) + 1
    assert pairing.default_steps <= 2 * max_degree - 1


def greedy_reference(edges: np.ndarray, priority: np.ndarray, n: int) -> list[int]:
    taken, out = set(), []
    for e in np.argsort(priority):
        u, v = edges[e]
        if u not in taken and v not in taken:
            out.append(int(e))
            taken.update((int(u), int(v)))
    return sorted(out)


@pytest.mark.parametrize("seed", range(5))
def test_random_matching_is_the_greedy_matching_in_priority_order(seed):
    g = nx.gnp_random_graph(40, 0.15, seed=seed)
    g.add_edges_from([(1, 1), (7, 7)])
    edges = edges_of(g)
    pairing = RandomMatching(edges, 40)
    rng = np.random.default_rng(seed)
    chosen = pairing.matches(0, rng)
    # same stream again: the priorities RandomMatching drew
    priority = np.random.default_rng(seed).permutation(len(edges))
    assert chosen.tolist() == greedy_reference(edges, priority, 40)
    assert is_matching(edges, chosen)
    # maximal: every unchosen edge touches a matched node
    ends = set(edges[chosen].ravel().tolist())
    for e in set(range(len(edges))) - set(chosen.tolist()):
        assert edges[e, 0] in ends or edges[e, 1] in ends


def test_random_matching_varies_between_steps():
    edges = edges_of(nx.complete_graph(10))
    pairing = RandomMatching(edges, 10)
    rng = np.random.default_rng(1)
    draws = {tuple(pairing.matches(s, rng).tolist()) for s in range(20)}
    assert len(draws) > 10
    assert all(len(d) == 5 for d in draws)  # a perfect matching on 10 nodes
