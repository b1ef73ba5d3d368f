"""Every graph builder, on sizes small enough to count edges by hand."""

import networkx as nx
import numpy as np
import pytest

from abm.errors import ScenarioError
from abm.graphs import build_graph, edge_array
from abm.scenario import validate_scenario


def graph_of(table: dict, players: int | None = None) -> nx.Graph:
    data = {"graph": table, "population": {"players": ["all_c"] * (players or 1)}}
    scenario = validate_scenario(data)
    return build_graph(scenario.graph, np.random.default_rng(0), "t.toml", n_default=players)


def test_complete_with_self_loops():
    g = graph_of({"kind": "complete", "self_loops": True}, players=4)
    assert g.number_of_nodes() == 4
    assert g.number_of_edges() == 4 * 3 // 2 + 4
    assert all(g.has_edge(v, v) for v in range(4))


def test_ring_k_neighbours_each_side():
    g = graph_of({"kind": "ring", "n": 10, "k": 2})
    assert all(d == 4 for _, d in g.degree)
    assert g.has_edge(0, 9) and g.has_edge(0, 8) and not g.has_edge(0, 7)


@pytest.mark.parametrize(
    "hood, torus, edges",
    [
        # 3x4 von Neumann, open: 3 rows * 3 horizontal + 2 * 4 vertical = 17
        ("von_neumann", False, 17),
        # torus: every node has 4 neighbours: 12 * 4 / 2 = 24
        ("von_neumann", True, 24),
        # Moore open: 17 + diagonals 2 * (2 * 3) = 29
        ("moore", False, 29),
        # Moore torus: 12 * 8 / 2 = 48
        ("moore", True, 48),
    ],
)
def test_grid(hood, torus, edges):
    g = graph_of({"kind": "grid", "rows": 3, "cols": 4, "torus": torus, "neighbourhood": hood})
    assert g.number_of_nodes() == 12
    assert g.number_of_edges() == edges
    assert g.nodes[5]["pos"] == (1, 1)  # node 5 = row 1, col 1 in row-major order


def test_watts_strogatz_without_rewiring_is_a_ring_lattice():
    g = graph_of({"kind": "watts_strogatz", "n": 20, "k": 4, "p": 0.0})
    assert all(d == 4 for _, d in g.degree)
    assert g.has_edge(0, 2) and g.has_edge(0, 18)


def test_barabasi_albert_edge_count():
    g = graph_of({"kind": "barabasi_albert", "n": 50, "m": 2})
    assert g.number_of_edges() == 2 * (50 - 2)


def test_erdos_renyi_extremes():
    assert graph_of({"kind": "erdos_renyi", "n": 6, "p": 1.0}).number_of_edges() == 15
    assert graph_of({"kind": "erdos_renyi", "n": 6, "p": 0.0}).number_of_edges() == 0


def test_random_regular():
    g = graph_of({"kind": "random_regular", "n": 10, "d": 3})
    assert all(d == 3 for _, d in g.degree)


def test_random_graphs_follow_the_seed():
    a = build_graph(
        validate_scenario(
            {
                "graph": {"kind": "barabasi_albert", "n": 40, "m": 2},
                "population": {"players": ["all_c"]},
            }
        ).graph,
        np.random.default_rng(5),
    )
    b = build_graph(
        validate_scenario(
            {
                "graph": {"kind": "barabasi_albert", "n": 40, "m": 2},
                "population": {"players": ["all_c"]},
            }
        ).graph,
        np.random.default_rng(5),
    )
    c = build_graph(
        validate_scenario(
            {
                "graph": {"kind": "barabasi_albert", "n": 40, "m": 2},
                "population": {"players": ["all_c"]},
            }
        ).graph,
        np.random.default_rng(6),
    )
    assert sorted(a.edges) == sorted(b.edges)
    assert sorted(a.edges) != sorted(c.edges)


def test_edge_list_file(tmp_path):
    path = tmp_path / "g.edgelist"
    path.write_text("# a triangle and a tail\n1 2\n2 3\n3 1\n3 10\n")
    g = graph_of({"kind": "file", "path": str(path)})
    assert g.number_of_nodes() == 4
    # numeric labels are sorted numerically: 1, 2, 3, 10 -> 0, 1, 2, 3
    assert g.nodes[3]["name"] == "10"
    assert sorted(g.edges) == [(0, 1), (0, 2), (1, 2), (2, 3)]


def test_graphml_file_with_policy_attribute(tmp_path):
    source = nx.path_graph(["a", "b", "c"])
    nx.set_node_attributes(source, {"a": "all_d", "b": "tit_for_tat", "c": "all_c"}, "strategy")
    path = tmp_path / "g.graphml"
    nx.write_graphml(source, path)
    g = graph_of({"kind": "file", "path": str(path), "self_loops": True})
    assert [g.nodes[i]["name"] for i in range(3)] == ["a", "b", "c"]
    assert g.number_of_edges() == 2 + 3
    assert g.nodes[1]["strategy"] == "tit_for_tat"


def test_unreadable_file_names_the_field(tmp_path):
    path = tmp_path / "g.graphml"
    path.write_text("<graphml><broken")
    with pytest.raises(ScenarioError, match=r"graph\.path.*cannot read"):
        graph_of({"kind": "file", "path": str(path)})


def test_edge_array_is_canonical():
    g = nx.Graph([(3, 1), (0, 2), (2, 2)])
    assert edge_array(g).tolist() == [[0, 2], [1, 3], [2, 2]]


def test_only_a_single_lattice_has_a_lattice_shape():
    from abm.graph_kinds import GridGraph, RingGraph

    one = GridGraph.model_validate({"kind": "grid", "rows": 3, "cols": 4})
    two = GridGraph.model_validate({"kind": "grid", "rows": 3, "cols": 4, "copies": 2})
    ring = RingGraph.model_validate({"kind": "ring", "n": 12})
    # 24 nodes in two 3 x 4 copies are no single 3 x 4 picture (snapshots, the page's image)
    assert one.lattice_shape() == (3, 4)
    assert two.lattice_shape() is None
    assert ring.lattice_shape() is None
