"""Who plays what.

Which policy sits on which node (``assign_policies``), and the ``Population`` that owns
the labels, policies and per-node arrays of a run.
"""

from __future__ import annotations

import json
import re
from typing import TYPE_CHECKING

import networkx as nx
import numpy as np
from pydantic import ValidationError

from abm.errors import ScenarioError
from abm.policies import make
from abm.scenario import PolicySpec, PopulationConfig, Scenario

if TYPE_CHECKING:
    from abm.policies.base import Policy


def assign_policies(
    config: PopulationConfig, graph: nx.Graph, rng: np.random.Generator, source: str = "<scenario>"
) -> list[PolicySpec]:
    """One policy spec per node, in node order."""
    n = graph.number_of_nodes()
    if config.players is not None:
        if len(config.players) != n:
            raise ScenarioError(
                f"{source}: field 'population.players': lists {len(config.players)} policies "
                f"but the graph has {n} nodes; give one policy per node"
            )
        return list(config.players)
    if config.mix is not None:
        shares = np.array([s.share for s in config.mix])
        counts = np.floor(shares * n).astype(int)
        # largest remainder: exact counts that add up to n, ties to the earlier entry
        short = n - counts.sum()
        counts[np.argsort(-(shares * n - counts), kind="stable")[:short]] += 1
        specs = [s.policy for s, c in zip(config.mix, counts, strict=True) for _ in range(c)]
        return [specs[i] for i in rng.permutation(n)]
    out = []
    for node in range(n):
        value = graph.nodes[node].get(config.attribute)
        name = graph.nodes[node].get("name", node)
        if value is None:
            raise ScenarioError(
                f"{source}: field 'population.attribute': node {name!r} of the graph file has "
                f"no attribute {config.attribute!r}; every node needs a policy name there"
            )
        try:
            out.append(PolicySpec.model_validate(str(value)))
        except ValidationError as exc:
            msg = exc.errors()[0]["msg"].removeprefix("Value error, ")
            raise ScenarioError(
                f"{source}: field 'population.attribute': node {name!r}: {msg}"
            ) from None
    return out


def sourced_specs(scenario: Scenario, specs: list[PolicySpec]) -> list[tuple[PolicySpec, str]]:
    """Every policy that can play, with the scenario field it was given in.

    Args:
        scenario: the validated scenario.
        specs: the policy of each node, as ``assign_policies`` returned them.

    Returns:
        (spec, field) pairs: players, mix entries (those that round to no node too),
        mutants, and the policies read from a graph file's node attribute.
    """
    pop = scenario.population
    out: list[tuple[PolicySpec, str]] = []
    if pop.players is not None:
        out += [(s, f"population.players[{i}]") for i, s in enumerate(pop.players)]
    if pop.mix is not None:
        out += [(s.policy, f"population.mix[{i}].policy") for i, s in enumerate(pop.mix)]
    out += [(s, f"evolution.mutants[{i}]") for i, s in enumerate(scenario.mutants())]
    if pop.attribute is not None:
        out += [(s, "population.attribute") for s in specs]
    return out


def field_error(source: str, field: str, message: str) -> str:
    """One paragraph naming the file once and the full field path once.

    A message that came with a field of its own (``<scenario>: field 'model': ...`` from
    abm.llm.models.resolve) becomes ``FILE: field 'population.players[5].model': ...``.
    """
    for prefix in (f"{source}: ", "<scenario>: "):
        message = message.removeprefix(prefix)
    inner = re.match(r"field '([^']*)'(.*)$", message, re.S)
    if inner:
        sub, rest = inner.groups()
        if not (
            sub == field
            or sub.startswith((f"{field}.", f"{field}["))
            or sub.split(".")[0]
            in ("population", "evolution", "graph", "game", "match", "memory", "pairing", "output")
        ):
            sub = f"{field}.{sub}"  # a key of the policy's own table
        return f"{source}: field '{sub}'{rest}"
    return f"{source}: field '{field}': {message}"


def _read_only(array: np.ndarray) -> np.ndarray:
    """A view of ``array`` that cannot be written through.

    It still sees every change the owner makes to ``array`` in place.
    """
    view = array.view()
    view.flags.writeable = False
    return view


class Population:
    """Who plays what: the player labels, the policy behind each label and each node's label.

    The one owner of this state. ``relabel`` is the only way to change who plays
    what; the arrays handed out (``label_of_node``, ``policy_of_node``,
    ``played_label_of_node``, ``policy_of_label``) are read-only views of the
    owner's arrays, so they follow every relabel and a stray ``x[:] = ...``
    raises ValueError instead of putting one array out of step with the others.

    A label names exactly one policy (evolution copies labels between nodes); several
    labels may share a policy object. ``labels``, ``policies`` and
    ``policy_name_of_label`` are lists the population keeps as they are.

    Args:
        labels: the player label of each label index, in the scenario's order.
        label_of_node: each node's label index.
        policies: the policy objects (default: none, for tables that only name players).
        policy_of_label: each label's index into ``policies`` (default: label i plays
            policy i).
        policy_names: each label's policy as name and parameters, its label left out
            (default: the labels themselves).

    Raises:
        ValueError: a label index or policy index out of range, or lists of unequal length.
    """

    def __init__(
        self,
        labels: list[str],
        label_of_node: np.ndarray,
        *,
        policies: list[Policy] | None = None,
        policy_of_label: np.ndarray | None = None,
        policy_names: list[str] | None = None,
    ) -> None:
        """Check the arrays and keep read-only views of them; see the class docstring."""
        self.labels = list(labels)
        self.policies = list(policies) if policies is not None else []
        self.llm_policies = [p for p in self.policies if hasattr(p, "drain")]
        k = len(self.labels)
        self.policy_name_of_label = (
            list(policy_names) if policy_names is not None else list(self.labels)
        )
        of_label = (
            np.arange(k, dtype=np.int64)
            if policy_of_label is None
            else np.array(policy_of_label, np.int64)
        )
        if len(self.policy_name_of_label) != k or of_label.shape != (k,):
            raise ValueError(
                f"a population of {k} labels needs one policy and one policy name per label"
            )
        if self.policies and k and (of_label.min() < 0 or of_label.max() >= len(self.policies)):
            raise ValueError(f"policy_of_label must index the {len(self.policies)} policies")
        self._label = np.array(label_of_node, np.int64)
        if self._label.ndim != 1:
            raise ValueError("label_of_node must be one label index per node")
        self._check_labels(self._label)
        self._policy_of_label = of_label
        self._policy = of_label[self._label] if self.policies else np.zeros_like(self._label)
        # who played the last step: tables written after an update must still name them
        self._played = self._label.copy()
        self.label_of_node = _read_only(self._label)
        self.policy_of_node = _read_only(self._policy)
        self.played_label_of_node = _read_only(self._played)
        self.policy_of_label = _read_only(self._policy_of_label)
        # counts the relabels, so that a reader can tell whether what it derived is stale
        self.version = 0

    @classmethod
    def of_policies(cls, policies: list[Policy], policy_of_node: np.ndarray) -> Population:
        """A population with one label per policy, named by its index ("0", "1", ...).

        Args:
            policies: the policy objects.
            policy_of_node: each node's index into ``policies``.

        Returns:
            The population; label i plays policy i.
        """
        labels = [str(i) for i in range(len(policies))]
        return cls(labels, policy_of_node, policies=policies)

    @classmethod
    def from_specs(
        cls, scenario: Scenario, specs: list[PolicySpec], source: str = "<scenario>"
    ) -> Population:
        """Labels and policy objects for a scenario whose nodes hold ``specs``.

        The policies that mutation may bring in get labels up front; under evolution
        a policy on no node now gets one too, since it may spread.

        Args:
            scenario: the validated scenario (its game's payoffs build the policies).
            specs: the policy of each node, in node order.
            source: the scenario file, for error messages.

        Returns:
            The population, labels in the order the scenario names them.

        Raises:
            ScenarioError: two different policies share a label, or a policy cannot be
                built from its parameters (the message names the field).
        """
        game = scenario.game.payoffs
        # one display string per distinct spec object: a mix repeats a few objects
        shown: dict[int, str] = {}
        node_display = [
            shown[id(s)] if id(s) in shown else shown.setdefault(id(s), s.display) for s in specs
        ]
        named = scenario.policies() + scenario.mutants()
        present = set(shown.values()) | {s.display for s in scenario.mutants()}
        if scenario.evolution is not None:  # a policy on no node now may spread by mutation
            present |= {s.display for s in scenario.policies()}
        distinct = list({id(s): s for s in specs}.values())
        key_of_label: dict[str, tuple] = {}
        spec_of_label: dict[str, PolicySpec] = {}
        field_of_key: dict[tuple, str] = {}
        for s, field in sourced_specs(scenario, distinct):
            field_of_key.setdefault((s.name, json.dumps(s.params, sort_keys=True)), field)
        for s in named + distinct:
            # JSON, not a tuple of items: parameters may be lists or tables
            key = (s.name, json.dumps(s.params, sort_keys=True))
            if key_of_label.setdefault(s.display, key) != key:
                field = (
                    "evolution.mutants"
                    if any(m.display == s.display for m in scenario.mutants())
                    else "population"
                )
                raise ScenarioError(
                    f"{source}: field '{field}': the label {s.display!r} is given to "
                    "two different policies; give each policy its own label"
                )
            spec_of_label.setdefault(s.display, s)
        # labels in the order the scenario names them, not the random order of the nodes
        labels = [label for label in key_of_label if label in present]
        keys = list(dict.fromkeys(key_of_label[label] for label in labels))
        policies = []
        for key in keys:
            try:
                policies.append(make(key[0], json.loads(key[1]), game))
            except (ValueError, ScenarioError) as exc:
                raise ScenarioError(
                    field_error(source, field_of_key.get(key, "population"), str(exc))
                ) from None
        index = {label: i for i, label in enumerate(labels)}
        return cls(
            labels,
            np.array([index[d] for d in node_display], np.int64),
            policies=policies,
            policy_of_label=np.array(
                [keys.index(key_of_label[label]) for label in labels], np.int64
            ),
            policy_names=[
                spec_of_label[label].model_copy(update={"label": None}).display for label in labels
            ],
        )

    def _check_labels(self, labels: np.ndarray) -> None:
        if len(labels) and (labels.min() < 0 or labels.max() >= len(self.labels)):
            raise ValueError(f"label indices must lie in 0..{len(self.labels) - 1}")

    @property
    def n_nodes(self) -> int:
        """The number of nodes."""
        return len(self._label)

    def relabel(self, new_labels: np.ndarray) -> None:
        """Give every node a new label, and with it that label's policy.

        The only way to change who plays what. The labels in force until now become
        ``played_label_of_node`` (who played the step just finished).

        Args:
            new_labels: one label index per node.

        Raises:
            ValueError: the wrong number of labels, or an index out of range.
        """
        new = np.asarray(new_labels)
        if new.shape != self._label.shape:
            raise ValueError(
                f"relabel needs one label per node ({self.n_nodes}); "
                f"got an array of shape {new.shape}"
            )
        self._check_labels(new)
        self._played[:] = self._label
        self._label[:] = new
        if self.policies:
            self._policy[:] = self._policy_of_label[new]
        self.version += 1

    def label_index(self, label: str) -> int:
        """The index of a player label."""
        return self.labels.index(label)

    def policy_name_of_node(self) -> list[str]:
        """Each node's policy as name and parameters (its label left out)."""
        return np.array(self.policy_name_of_label, object)[self._label].tolist()

    def counts(self) -> np.ndarray:
        """Nodes under each label now, in ``labels`` order."""
        return np.bincount(self._label, minlength=len(self.labels))

    def shares(self) -> np.ndarray:
        """Share of the nodes under each label now, in ``labels`` order."""
        return self.counts() / self.n_nodes
