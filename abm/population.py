"""Which policy sits on which node."""

from __future__ import annotations

import networkx as nx
import numpy as np
from pydantic import ValidationError

from abm.errors import ScenarioError
from abm.scenario import PolicySpec, PopulationConfig


def assign_policies(config: PopulationConfig, graph: nx.Graph, rng: np.random.Generator,
                    source: str = "<scenario>") -> list[PolicySpec]:
    """One policy spec per node, in node order."""
    n = graph.number_of_nodes()
    if config.players is not None:
        if len(config.players) != n:
            raise ScenarioError(
                f"{source}: field 'population.players': lists {len(config.players)} policies "
                f"but the graph has {n} nodes; give one policy per node")
        return list(config.players)
    if config.mix is not None:
        shares = np.array([s.share for s in config.mix])
        counts = np.floor(shares * n).astype(int)
        # largest remainder: exact counts that add up to n, ties to the earlier entry
        short = n - counts.sum()
        counts[np.argsort(-(shares * n - counts), kind="stable")[:short]] += 1
        specs = [s.policy for s, c in zip(config.mix, counts) for _ in range(c)]
        return [specs[i] for i in rng.permutation(n)]
    out = []
    for node in range(n):
        value = graph.nodes[node].get(config.attribute)
        name = graph.nodes[node].get("name", node)
        if value is None:
            raise ScenarioError(
                f"{source}: field 'population.attribute': node {name!r} of the graph file has "
                f"no attribute {config.attribute!r}; every node needs a policy name there")
        try:
            out.append(PolicySpec.model_validate(str(value)))
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ScenarioError(f"{source}: field 'population.attribute': node {name!r}: "
                                f"{msg}") from None
    return out
