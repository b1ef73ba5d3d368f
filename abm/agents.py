"""Mesa agents: one Player per node, a window onto the model's per-node arrays."""

from __future__ import annotations

from typing import TYPE_CHECKING

from mesa.discrete_space import CellAgent

if TYPE_CHECKING:
    from abm.model import DilemmaModel


class Player(CellAgent):
    """The agent on one node.

    Its numbers live in the model's NumPy arrays, which the model updates for all
    agents at once after every step, and in the model's Population; the agent reads
    them on demand. The model builds its Players on first use.

    Args:
        model: The model the agent belongs to.
        node: The graph node the agent sits on (its id in the tables).
    """

    def __init__(self, model: DilemmaModel, node: int) -> None:
        """Register the agent with the model."""
        super().__init__(model)
        self.node = node

    @property
    def label(self) -> str:
        """The player's name in tables and charts (changes when evolution copies a policy)."""
        population = self.model.population
        return population.labels[population.label_of_node[self.node]]

    @property
    def policy_name(self) -> str:
        """The policy's name and parameters."""
        population = self.model.population
        return population.policy_name_of_label[population.label_of_node[self.node]]

    @property
    def score(self) -> float:
        """Total payoff over every match played so far (the self-play twin excluded)."""
        return float(self.model.scores[self.node])

    @property
    def cooperation_rate(self) -> float:
        """Share of this agent's actual actions so far that were C (NaN before any)."""
        n = self.model.decisions[self.node]
        return float(self.model.cooperations[self.node] / n) if n else float("nan")
