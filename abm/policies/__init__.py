"""Policies: the registry and everything registered in it."""

from abm.policies import axelrod_adapter, llm, rules  # noqa: F401  (registers the strategies)
from abm.policies.base import REGISTRY, Policy, PolicyInfo, View, lookup, make, register

__all__ = ["REGISTRY", "Policy", "PolicyInfo", "View", "lookup", "make", "register"]
