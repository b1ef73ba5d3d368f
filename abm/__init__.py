"""abm: agent-based simulations of repeated social dilemmas on networks."""

__version__ = "0.1.0"
