"""DilemmaModel: the Mesa model that ties graph, agents, pairing and engine together."""

from __future__ import annotations

import json
import math
from pathlib import Path

import mesa
import numpy as np
from mesa.discrete_space import Network

from abm.agents import Player
from abm.analysis import Tally
from abm.engine import Engine, StepResult
from abm.errors import ScenarioError
from abm.evolution import Evolution
from abm.graphs import build_graph, edge_array
from abm.pairing import make_pairing
from abm.policies import lookup, make
from abm.population import assign_policies
from abm.scenario import PolicySpec, Scenario, load_scenario
from abm.seeding import fresh_seed, stream


# agents x steps: Mesa's DataCollector walks every agent in Python each step
AGENT_ROWS_LIMIT = 1_000_000


def _mean_cooperation(model: DilemmaModel) -> float:
    return model.tally.steps[-1]["cooperation_rate"] if model.tally.steps else float("nan")


def _mean_payoff(model: DilemmaModel) -> float:
    return model.tally.steps[-1]["mean_payoff"] if model.tally.steps else float("nan")


def _share_reporter(label: str):
    def share(model: DilemmaModel) -> float:  # the tally counted the step's players already
        return model.tally.steps[-1][f"share:{label}"] if model.tally.steps else float("nan")
    return share


class DilemmaModel(mesa.Model):
    """Players on a NetworkX graph playing repeated 2x2 games, one step at a time.

    Build it from a validated ``Scenario`` or a path to a scenario file; ``seed``
    overrides the scenario's seed (a fresh one is drawn and recorded when neither
    gives one). ``collect_agents`` turns Mesa's per-agent DataCollector rows on or
    off; by default they are collected while agents x steps stays within
    ``AGENT_ROWS_LIMIT``, because the DataCollector walks every agent in Python
    each step.
    """

    def __init__(self, scenario: Scenario | str | Path, *, seed: int | None = None,
                 collect_agents: bool | None = None, source: str | None = None) -> None:
        if not isinstance(scenario, Scenario):
            source = source or str(scenario)
            scenario = load_scenario(scenario)
        self.source = source or f"<scenario {scenario.name}>"
        if seed is None:
            seed = scenario.seed if scenario.seed is not None else fresh_seed()
        if scenario.seed != seed:
            scenario = scenario.model_copy(update={"seed": seed})
        self.scenario = scenario
        self.master_seed = seed
        super().__init__(rng=int(stream(seed, "mesa").integers(2**63)))

        pop = scenario.population
        graph = build_graph(scenario.graph, stream(seed, "graph"), self.source,
                            n_default=len(pop.players) if pop.players else None)
        self.graph = graph
        specs = assign_policies(pop, graph, stream(seed, "population"), self.source)
        self._check_memory(specs)
        self.edges = edge_array(graph)
        self.n_nodes = graph.number_of_nodes()
        if len(self.edges) == 0:
            raise ScenarioError(f"{self.source}: field 'graph': the graph has no edges, so "
                                "nobody would play; use a denser graph or self_loops = true")

        self._build_types(specs)
        game = scenario.game.payoffs
        self.scores = np.zeros(self.n_nodes)
        self.decisions = np.zeros(self.n_nodes, np.int64)
        self.cooperations = np.zeros(self.n_nodes, np.int64)
        self.tally = Tally(self.labels, self.label_of_node,
                           track_shares=scenario.evolution is not None)
        self.last_result: StepResult | None = None
        self.played_steps = 0  # Mesa's own counter moved between 3.x releases

        self.space = Network(graph, random=self.random)
        self.players = [Player(self, node) for node in range(self.n_nodes)]
        for player in self.players:
            player.cell = self.space[player.node]

        self.pairing = make_pairing(scenario.pairing.scheme, self.edges, self.n_nodes)
        self.total_steps = scenario.pairing.steps or self.pairing.default_steps
        # the resolved config names the step count the pairing scheme chose
        self.scenario = scenario = scenario.model_copy(update={
            "pairing": scenario.pairing.model_copy(update={"steps": self.total_steps})})
        self._pairing_rng = stream(seed, "pairing")
        self.engine = Engine(
            game=game, noise=scenario.game.noise, policies=self.policies,
            policy_of_node=self.policy_of_node, edges=self.edges, n_nodes=self.n_nodes,
            window=scenario.memory.window, scope=scenario.memory.scope,
            rounds=scenario.match.rounds,
            continuation_probability=scenario.match.continuation_probability,
            rngs={p: stream(seed, p) for p in ("noise", "policy", "match_length")})
        self.evolution = None
        if scenario.evolution is not None:
            label_index = {label: i for i, label in enumerate(self.labels)}
            span = float(game.table.max() - game.table.min()) * self._mean_rounds()  # a match
            self.evolution = Evolution(
                scenario.evolution, self.edges, self.n_nodes,
                # each policy once, however many nodes start with it
                list(dict.fromkeys(label_index[s.display] for s in (
                    scenario.mutants() or scenario.policies() or specs))),
                span, stream(seed, "evolution"))
        self.snapshots: list[tuple[int, np.ndarray]] = []
        if scenario.evolution is not None and self.grid_shape is not None:
            self.snapshots.append((0, self.label_of_node.copy()))
        reporters = {"cooperation_rate": _mean_cooperation, "mean_payoff": _mean_payoff}
        if self.evolution is not None:  # without it, shares never change
            reporters.update({f"share:{label}": _share_reporter(label)
                              for label in self.labels})
        if collect_agents is None:
            collect_agents = self.n_nodes * self.total_steps <= AGENT_ROWS_LIMIT
        self.datacollector = mesa.DataCollector(
            model_reporters=reporters,
            agent_reporters={"score": "score", "cooperation_rate": "cooperation_rate",
                             "player": "label"} if collect_agents else None,
        )

    def _build_types(self, specs: list[PolicySpec]) -> None:
        """Player labels ("types") and the policy object behind each.

        Evolution copies labels between nodes, so a label must name exactly one
        policy; the policies that mutation may bring in get labels up front.
        """
        scenario, game = self.scenario, self.scenario.game.payoffs
        named = scenario.policies() + scenario.mutants() + specs
        present = {s.display for s in specs} | {s.display for s in scenario.mutants()}
        if scenario.evolution is not None:  # a policy on no node now may spread by mutation
            present |= {s.display for s in scenario.policies()}
        key_of_label: dict[str, tuple] = {}
        spec_of_label: dict[str, PolicySpec] = {}
        for s in named:
            # JSON, not a tuple of items: parameters may be lists or tables
            key = (s.name, json.dumps(s.params, sort_keys=True))
            if key_of_label.setdefault(s.display, key) != key:
                field = ("evolution.mutants" if any(m.display == s.display
                                                    for m in scenario.mutants())
                         else "population")
                raise ScenarioError(
                    f"{self.source}: field '{field}': the label {s.display!r} is given to "
                    "two different policies; give each policy its own label")
            spec_of_label.setdefault(s.display, s)
        # labels in the order the scenario names them, not the random order of the nodes
        self.labels = [label for label in key_of_label if label in present]
        keys = list(dict.fromkeys(key_of_label[label] for label in self.labels))
        try:
            self.policies = [make(name, json.loads(params), game) for name, params in keys]
        except (ValueError, ScenarioError) as exc:
            raise ScenarioError(f"{self.source}: field 'population': {exc}") from None
        self.llm_policies = [p for p in self.policies if hasattr(p, "drain")]
        self.policy_of_label = np.array([keys.index(key_of_label[label])
                                         for label in self.labels], np.int64)
        self.name_of_label = [spec_of_label[label].model_copy(update={"label": None}).display
                              for label in self.labels]
        label_index = {label: i for i, label in enumerate(self.labels)}
        # both arrays change in place under evolution: the engine and tally hold them
        self.label_of_node = np.array([label_index[s.display] for s in specs], np.int64)
        self.policy_of_node = self.policy_of_label[self.label_of_node]
        # who played the last step: the records read it after the step's update,
        # so under evolution it is a copy taken before the update
        self.played_label_of_node = (self.label_of_node.copy() if scenario.evolution
                                     else self.label_of_node)

    @property
    def policy_names(self) -> list[str]:
        """Each node's policy as name and parameters (its label left out)."""
        return [self.name_of_label[i] for i in self.label_of_node]

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """(rows, cols) when the graph is a lattice, for snapshots of who is where."""
        g = self.scenario.graph
        return (g.rows, g.cols) if g.kind == "grid" and g.copies == 1 else None

    def policy_counts(self) -> np.ndarray:
        """Agents under each label now, in ``labels`` order."""
        return np.bincount(self.label_of_node, minlength=len(self.labels))

    def shares(self) -> np.ndarray:
        """Share of the agents under each label now, in ``labels`` order."""
        return self.policy_counts() / self.n_nodes

    def _mean_rounds(self) -> float:
        match = self.scenario.match
        if match.rounds is not None:
            return float(match.rounds)
        return 1.0 / (1.0 - match.continuation_probability)

    def _check_memory(self, specs: list) -> None:
        window = self.scenario.memory.window
        if window is None:
            return
        for spec in {s.name: s for s in specs}.values():
            depth = lookup(spec.name).memory_depth
            if math.isfinite(depth) and depth > window:
                raise ScenarioError(
                    f"{self.source}: field 'memory.window': policy {spec.name!r} needs to "
                    f"remember {depth:g} rounds but the window is {window}; allowed: a window "
                    f">= {depth:g}, or leave it out to remember the whole match")

    def step(self) -> None:
        """Pick this step's matches, play them all in lockstep, fold in the results."""
        index = self.played_steps
        edge_ids = self.pairing.matches(index, self._pairing_rng)
        if self.scenario.pairing.repetitions > 1:
            edge_ids = np.repeat(edge_ids, self.scenario.pairing.repetitions)
        result = self.engine.play(index, edge_ids)
        totals = self.tally.add(result)
        self.last_totals = totals
        own = ~result.twin
        agents = result.agent[own]
        payoff = np.bincount(agents, totals["payoff"][own], minlength=self.n_nodes)
        self.scores += payoff
        self.decisions += np.bincount(agents, result.side_length[own],
                                      minlength=self.n_nodes).astype(np.int64)
        self.cooperations += np.bincount(agents, totals["cooperations"][own],
                                         minlength=self.n_nodes).astype(np.int64)
        self.last_result = result
        self.datacollector.collect(self)
        self.played_steps += 1
        if self.evolution is not None:
            # a match stopped by an unreadable answer is no sample of either side's fitness
            whole = own if result.void is None else own & ~np.concatenate([result.void] * 2)
            matches = np.bincount(result.agent[whole], minlength=self.n_nodes)
            earned = np.bincount(result.agent[whole], totals["payoff"][whole],
                                 minlength=self.n_nodes)
            self._evolve(self.evolution.fitness(earned, matches), matches)
        if self.played_steps >= self.total_steps:
            self.running = False

    def _evolve(self, fitness: np.ndarray, matches: np.ndarray) -> None:
        self.played_label_of_node[:] = self.label_of_node
        new = self.evolution.update(self.label_of_node, fitness, matches)
        self.label_of_node[:] = new
        self.policy_of_node[:] = self.policy_of_label[new]
        every = self.scenario.evolution.snapshot_every
        if self.grid_shape is not None and (
                self.played_steps == self.total_steps
                or (every is not None and self.played_steps % every == 0)):
            self.snapshots.append((self.played_steps, self.label_of_node.copy()))
