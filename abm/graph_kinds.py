"""The graph kinds a scenario's ``[graph]`` table may name, one pydantic class each.

Each class validates its table, builds its graph with NetworkX (nodes 0..N-1),
knows the graph's size from the table alone (for the memory check before a
build), and says how the page offers it (``page``) and draws it (``drawing``).
``GRAPH_KINDS`` maps each ``kind`` name to its class; the scenario's ``graph``
union, its error messages and the page's graph-family selector are all built from
it, so a kind added here is known everywhere.
"""

from __future__ import annotations

import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Literal

import networkx as nx
import numpy as np
from pydantic import BaseModel, ConfigDict, Field

from abm.errors import ScenarioError

Fail = Callable[[str, str], ScenarioError]


@dataclass(frozen=True)
class PageDefaults:
    """How the page offers a graph kind in its "Graph family" selector.

    Attributes:
        size_fields: the fields the page's "Graph size (agents)" box sets.
        min_nodes: the fewest agents the kind's defaults allow; a smaller size is raised
            to it when the page switches to this kind.
        values: the kind's other fields when the page switches to it from another kind.
    """

    size_fields: tuple[str, ...] = ("n",)
    min_nodes: int = 2
    values: Mapping[str, Any] = field(default_factory=dict)


class GraphKind(BaseModel):
    """The base of every graph kind: the shared keys, building, size and page.

    A kind subclasses it with a ``kind: Literal["name"]`` field, its own fields, and
    ``build_one`` and ``edges`` (and ``nodes`` where its size is not ``n``), and is
    listed in ``GRAPH_KINDS``.
    """

    # the scenario's rules for every table (abm.scenario._Strict): TOML says what type a
    # value is, unknown keys are errors, no NaN or infinity
    model_config = ConfigDict(
        extra="forbid", frozen=True, strict=True, allow_inf_nan=False, use_attribute_docstrings=True
    )

    self_loops: bool = False
    """Link every agent to itself too, so it also plays itself (self-interaction)."""
    copies: int = Field(1, ge=1, le=1_000_000)
    """Independent copies of the graph side by side: an ensemble of replicates in one run."""

    page: ClassVar[PageDefaults | None] = PageDefaults()
    """How the page offers this kind; None: only when the scenario itself has it."""
    drawing: ClassVar[Literal["lattice", "circle", "force"]] = "force"
    """How the page lays the graph out: its grid, a circle in node order, force-directed."""

    @classmethod
    def kind_name(cls) -> str:
        """The ``kind`` value that selects this class."""
        return typing.get_args(cls.model_fields["kind"].annotation)[0]

    def build(
        self, rng: np.random.Generator, source: str = "<scenario>", n_default: int | None = None
    ) -> nx.Graph:
        """The graph with nodes 0..N-1, all copies and self-loops included.

        Args:
            rng: draws one seed per copy (a copy's seed is drawn even where the kind is
                not random, so every kind uses the stream alike).
            source: the scenario file, named in errors.
            n_default: the size of a kind with no size of its own (a complete graph
                with no n takes the number of listed players).

        Raises:
            ScenarioError: naming the field when the table asks for an impossible graph.
        """

        def fail(name: str, message: str) -> ScenarioError:
            return ScenarioError(f"{source}: field 'graph.{name}': {message}")

        # copies are independent draws, laid out one after another: copy i holds
        # nodes i*n .. (i+1)*n - 1, so a whole ensemble plays in one vectorised step
        parts = [
            self.build_one(int(rng.integers(2**31 - 1)), fail, n_default)
            for _ in range(self.copies)
        ]
        graph = parts[0] if len(parts) == 1 else nx.disjoint_union_all(parts)
        if self.self_loops:
            graph.add_edges_from((v, v) for v in graph.nodes)
        return graph

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """One copy of the graph, drawn with ``seed``.

        Args:
            seed: the copy's seed for NetworkX's generator.
            fail: ``fail(field, message)`` makes the error for an impossible table.
            n_default: as in ``build``.
        """
        raise NotImplementedError

    def nodes(self, n_default: int | None = None) -> int | None:
        """Agents in one copy, from the table alone (None where only building tells)."""
        n = getattr(self, "n", None)
        return n if n is not None else n_default

    def edges(self, n: int) -> int:
        """Links in one copy of ``n`` nodes without self-loops.

        The expected count where the number of links is random (``erdos_renyi``); the
        count of the wrapped lattice, an upper bound, for a grid that is not a torus.
        """
        raise NotImplementedError

    def size_field(self) -> str:
        """The field that sets the graph's size, named when it is too big."""
        return "n"

    def size(self, n_default: int | None = None) -> tuple[int, int, str] | None:
        """The size of the whole graph, copies and self-loops included, from the table alone.

        Returns:
            (nodes, links, the field that sets the size), the links counted as ``edges``
            counts them; None where only reading a file tells.
        """
        n = self.nodes(n_default) or 0
        edges, name = self.edges(n), self.size_field()
        if self.self_loops:
            edges += n
        if self.copies > n:  # many small copies: the number of copies is what is big
            name = "copies"
        return n * self.copies, edges * self.copies, name

    def lattice_shape(self) -> tuple[int, int] | None:
        """(rows, cols) of a lattice the page may draw as an image; None otherwise."""
        return None

    @classmethod
    def page_table(cls, n: int, base: dict[str, Any]) -> dict[str, Any]:
        """The ``[graph]`` table the page builds for about ``n`` agents.

        The scenario's own table ``base`` resized when it is of this kind, else this
        kind's defaults (keeping the scenario's self-loops).
        """
        n = max(int(n), 2)
        if base.get("kind") == cls.kind_name():
            return {**base, **cls.sized(n)}
        loops = {"self_loops": True} if base.get("self_loops") else {}
        page = cls.page or PageDefaults()
        return {
            "kind": cls.kind_name(),
            **cls.sized(max(n, page.min_nodes)),
            **cls.page_values(n),
            **loops,
        }

    @classmethod
    def sized(cls, n: int) -> dict[str, Any]:
        """The size fields for ``n`` agents."""
        return {"n": n}

    @classmethod
    def page_values(cls, n: int) -> dict[str, Any]:
        """The other fields the page gives this kind for ``n`` agents."""
        return dict((cls.page or PageDefaults()).values)


class CompleteGraph(GraphKind):
    """Every agent linked to every other.

    The well-mixed population of a round-robin tournament (Axelrod 1980, "Effective
    Choice in the Prisoner's Dilemma", J. Conflict Resolution 24(1)). Without n it has
    one node per listed player.
    """

    kind: Literal["complete"]
    """The complete graph."""
    n: int | None = Field(None, ge=1)
    """Agents; leave out to take one per entry of population.players."""

    drawing: ClassVar[Literal["lattice", "circle", "force"]] = "circle"

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """The complete graph on ``n`` nodes, or ``n_default`` without ``n``."""
        n = self.n if self.n is not None else n_default
        if n is None:
            raise fail("n", "a complete graph needs n, or a population.players list to count")
        return nx.complete_graph(n)

    def edges(self, n: int) -> int:
        """Every pair: n (n - 1) / 2."""
        return n * (n - 1) // 2


class RingGraph(GraphKind):
    """A ring lattice: n agents on a circle, each linked to its k nearest on each side.

    NetworkX's circulant graph; the regular start of Watts & Strogatz (1998),
    "Collective dynamics of 'small-world' networks", Nature 393:440.
    """

    kind: Literal["ring"]
    """The ring lattice."""
    n: int = Field(ge=3)
    """Agents on the ring."""
    k: int = Field(1, ge=1)
    """Neighbours on each side (degree 2k); at most (n - 1) // 2."""

    drawing: ClassVar[Literal["lattice", "circle", "force"]] = "circle"
    page: ClassVar[PageDefaults | None] = PageDefaults(min_nodes=3)

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """The circulant graph linking each node to the k nearest on each side."""
        if 2 * self.k >= self.n:
            raise fail(
                "k",
                f"a ring of n = {self.n} nodes allows k (neighbours on each side) "
                f"up to {(self.n - 1) // 2}; got {self.k}",
            )
        return nx.circulant_graph(self.n, range(1, self.k + 1))

    def edges(self, n: int) -> int:
        """Each of the n nodes has degree 2k, so n k links."""
        return n * self.k

    @classmethod
    def page_values(cls, n: int) -> dict[str, Any]:
        """The ring's k: 2 where there is room for it (5 agents or more), else 1."""
        return {"k": 2 if n >= 5 else 1}


class GridGraph(GraphKind):
    """A square lattice of rows x cols agents, optionally wrapped into a torus.

    Von Neumann (4 neighbours) or Moore (8 neighbours) neighbourhoods: the spatial game
    of Nowak & May (1992), "Evolutionary games and spatial chaos", Nature 359:826. Each
    node keeps its (column, row) as the attribute ``pos``.
    """

    kind: Literal["grid"]
    """The square lattice."""
    rows: int = Field(ge=1)
    """Rows of the lattice."""
    cols: int = Field(ge=1)
    """Columns of the lattice."""
    torus: bool = False
    """Wrap the edges around, so every agent has the same number of neighbours."""
    neighbourhood: Literal["von_neumann", "moore"] = "von_neumann"
    """von_neumann: the 4 orthogonal neighbours; moore: the 8 around, diagonals included."""

    drawing: ClassVar[Literal["lattice", "circle", "force"]] = "lattice"
    page: ClassVar[PageDefaults | None] = PageDefaults(
        size_fields=("rows", "cols"), values={"torus": True}
    )

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """The lattice, node ``row * cols + col`` at ``pos`` (col, row)."""
        rows, cols = self.rows, self.cols
        r, c = np.divmod(np.arange(rows * cols), cols)
        offsets = [(0, 1), (1, 0)] + ([(1, 1), (1, -1)] if self.neighbourhood == "moore" else [])
        graph = nx.Graph()
        graph.add_nodes_from(
            (int(i), {"pos": (int(ci), int(ri))})
            for i, ri, ci in zip(np.arange(rows * cols), r, c, strict=True)
        )
        for dr, dc in offsets:
            r2, c2 = r + dr, c + dc
            if self.torus:
                r2, c2, ok = r2 % rows, c2 % cols, np.ones(r.shape, bool)
            else:
                ok = (r2 >= 0) & (r2 < rows) & (c2 >= 0) & (c2 < cols)
            u, v = (r * cols + c)[ok], (r2 * cols + c2)[ok]
            graph.add_edges_from((int(a), int(b)) for a, b in zip(u, v, strict=True) if a != b)
        return graph

    def nodes(self, n_default: int | None = None) -> int | None:
        """The lattice's agents: rows x cols."""
        return self.rows * self.cols

    def edges(self, n: int) -> int:
        """Half the neighbourhood per node, as on a torus: 2n (von Neumann) or 4n (Moore)."""
        return n * (4 if self.neighbourhood == "moore" else 2)

    def size_field(self) -> str:
        """The larger of ``rows`` and ``cols`` (``rows`` on a tie)."""
        return "rows" if self.rows >= self.cols else "cols"

    def lattice_shape(self) -> tuple[int, int] | None:
        """(rows, cols) of one lattice; None for several copies, which are no one picture."""
        return (self.rows, self.cols) if self.copies == 1 else None

    @classmethod
    def sized(cls, n: int) -> dict[str, Any]:
        """About square: floor(sqrt(n)) rows and enough columns for ``n`` agents."""
        rows = max(1, int(np.sqrt(n)))
        return {"rows": rows, "cols": -(-n // rows)}


class WattsStrogatzGraph(GraphKind):
    """A small world: a ring lattice whose links are rewired with probability p.

    Each agent first links to its k nearest neighbours (k / 2 on each side); each link
    is then rewired to a random agent with probability p. Watts & Strogatz (1998),
    "Collective dynamics of 'small-world' networks", Nature 393:440.
    """

    kind: Literal["watts_strogatz"]
    """The Watts-Strogatz small world."""
    n: int = Field(ge=3)
    """Agents."""
    k: int = Field(ge=2)
    """Nearest neighbours each agent links to on the ring before rewiring (smaller than n)."""
    p: float = Field(ge=0.0, le=1.0)
    """The probability that a link is rewired."""

    page: ClassVar[PageDefaults | None] = PageDefaults(min_nodes=5, values={"k": 4, "p": 0.1})

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """NetworkX's Watts-Strogatz graph, drawn with ``seed``."""
        if self.k >= self.n:
            raise fail("k", f"must be smaller than n = {self.n}; got {self.k}")
        return nx.watts_strogatz_graph(self.n, self.k, self.p, seed=seed)

    def edges(self, n: int) -> int:
        """The ring's n k / 2 links: rewiring moves links without adding or removing any."""
        return n * self.k // 2


class BarabasiAlbertGraph(GraphKind):
    """A scale-free graph grown by preferential attachment.

    Each new agent links to m agents chosen in proportion to their degree. Barabasi &
    Albert (1999), "Emergence of scaling in random networks", Science 286:509.
    """

    kind: Literal["barabasi_albert"]
    """The Barabasi-Albert scale-free graph."""
    n: int = Field(ge=2)
    """Agents."""
    m: int = Field(ge=1)
    """Links each new agent makes (smaller than n)."""

    page: ClassVar[PageDefaults | None] = PageDefaults(min_nodes=3, values={"m": 2})

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """NetworkX's Barabasi-Albert graph, drawn with ``seed``."""
        if self.m >= self.n:
            raise fail("m", f"must be smaller than n = {self.n}; got {self.m}")
        return nx.barabasi_albert_graph(self.n, self.m, seed=seed)

    def edges(self, n: int) -> int:
        """(n - m) m: the m links of the first hub, then m for each later agent."""
        return max(n - self.m, 0) * self.m


class ErdosRenyiGraph(GraphKind):
    """A random graph G(n, p): each pair of agents linked with probability p.

    Erdos & Renyi (1959), "On random graphs I", Publ. Math. Debrecen 6:290 (this G(n, p)
    form is Gilbert's, 1959, "Random graphs", Ann. Math. Stat. 30:1141).
    """

    kind: Literal["erdos_renyi"]
    """The Erdos-Renyi random graph."""
    n: int = Field(ge=1)
    """Agents."""
    p: float = Field(ge=0.0, le=1.0)
    """The probability that a pair of agents is linked."""

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """NetworkX's G(n, p) graph, drawn with ``seed``."""
        return nx.fast_gnp_random_graph(self.n, self.p, seed=seed)

    def edges(self, n: int) -> int:
        """The expected count, p n (n - 1) / 2 rounded down."""
        return int(self.p * n * (n - 1) / 2)

    @classmethod
    def page_values(cls, n: int) -> dict[str, Any]:
        """The p that gives each agent about 6 neighbours."""
        return {"p": min(1.0, 6.0 / n)}  # about 6 neighbours each, whatever the size


class RandomRegularGraph(GraphKind):
    """A random graph where every agent has exactly d neighbours.

    Drawn uniformly (Steger & Wormald 1999, "Generating random regular graphs quickly",
    Combin. Probab. Comput. 8:377): the k-regular graphs of Ohtsuki et al. (2006),
    Nature 441:502.
    """

    kind: Literal["random_regular"]
    """The random d-regular graph."""
    n: int = Field(ge=1)
    """Agents."""
    d: int = Field(ge=0)
    """Neighbours of every agent: smaller than n, with n * d even."""

    page: ClassVar[PageDefaults | None] = PageDefaults(min_nodes=5, values={"d": 4})

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """NetworkX's random d-regular graph, drawn with ``seed``."""
        if self.d >= self.n or (self.n * self.d) % 2:
            raise fail(
                "d",
                f"a d-regular graph on n = {self.n} nodes needs d < n and n * d "
                f"even; got d = {self.d}",
            )
        return nx.random_regular_graph(self.d, self.n, seed=seed)

    def edges(self, n: int) -> int:
        """The n d / 2 links of a d-regular graph."""
        return n * self.d // 2


class FileGraph(GraphKind):
    """A graph of the user's, read from an edge list or a GraphML file.

    An edge list is whitespace or, for .csv, comma separated; the graph is read
    undirected. Nodes are numbered in their order in the file (numerically where all
    are integers) and keep their name as the attribute ``name``.
    """

    kind: Literal["file"]
    """A graph read from a file."""
    path: str
    """The file, relative to the scenario file."""
    format: Literal["auto", "edgelist", "graphml"] = "auto"
    """auto: GraphML for .graphml and .xml, else an edge list."""

    page: ClassVar[PageDefaults | None] = None  # a file has its own size

    def build_one(self, seed: int, fail: Fail, n_default: int | None) -> nx.Graph:
        """The graph read from ``path``, its nodes renumbered 0..N-1 in file order."""
        path = Path(self.path)
        fmt = self.format
        if fmt == "auto":
            fmt = "graphml" if path.suffix.lower() in (".graphml", ".xml") else "edgelist"
        if not path.exists():
            raise fail("path", f"no such file: {path}")
        if path.is_dir():
            raise fail("path", f"{path} is a folder; give a graph file (edge list or GraphML)")
        if not path.is_file():  # a device or a pipe, such as /dev/zero, may never end
            raise fail(
                "path", f"{path} is not a regular file; give a graph file (edge list or GraphML)"
            )
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

    def nodes(self, n_default: int | None = None) -> int | None:
        """None: only reading the file tells."""
        return None

    def size(self, n_default: int | None = None) -> tuple[int, int, str] | None:
        """None: only reading the file tells."""
        return None


GRAPH_KINDS: dict[str, type[GraphKind]] = {
    cls.kind_name(): cls
    for cls in (
        CompleteGraph,
        RingGraph,
        GridGraph,
        WattsStrogatzGraph,
        BarabasiAlbertGraph,
        ErdosRenyiGraph,
        RandomRegularGraph,
        FileGraph,
    )
}
