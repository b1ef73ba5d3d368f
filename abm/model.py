"""DilemmaModel: the Mesa model that ties graph, agents, pairing and engine together."""

from __future__ import annotations

import math
import os
from pathlib import Path

import mesa
import numpy as np
from mesa.discrete_space import Network

from abm.agents import Player
from abm.engine import Engine, StepResult
from abm.errors import ScenarioError
from abm.evolution import Evolution
from abm.graphs import build_graph, edge_array, graph_size
from abm.pairing import make_pairing
from abm.policies import Policy, lookup
from abm.population import Population, assign_policies, sourced_specs
from abm.scenario import PolicySpec, Scenario, load_scenario
from abm.seeding import fresh_seed, stream
from abm.tally import Tally

# agents x steps: Mesa's DataCollector walks every agent in Python each step
AGENT_ROWS_LIMIT = 1_000_000

# What a run holds, measured (peak RSS) on NetworkX 3 / Mesa 3 with some margin: a node
# (NetworkX node, Mesa cell and agent, per-node arrays) about 1.7 KB, an edge 260 B;
# a round of one match side in the engine's step arrays 25 B, and 85 B more while
# rounds.parquet is written.
BYTES_PER_NODE = 2_000
BYTES_PER_EDGE = 300
BYTES_PER_ROUND_SIDE = 25
BYTES_PER_ROUND_ROW = 85
# a geometric match length is taken at this upper quantile (of the longest match of a step)
LENGTH_QUANTILE_TAIL = 1e-6
FALLBACK_MEMORY = 8 * 2**30  # when neither psutil nor /proc/meminfo says what is free


def available_memory() -> int | None:
    """Bytes of memory free now (psutil, else /proc/meminfo), or None when unknown."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # not installed, or no answer on this platform
        try:
            for line in Path("/proc/meminfo").read_text().splitlines():
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
        except (OSError, ValueError, IndexError):
            pass
    return None


def memory_limit() -> tuple[int, str]:
    """How many bytes a run may use, and where the number comes from.

    The memory available now (psutil, else /proc/meminfo, else 8 GiB), lowered by
    ABM_MEMORY_LIMIT_GB if set.

    Returns:
        (bytes, a phrase naming the source, for error messages).

    Raises:
        ScenarioError: ABM_MEMORY_LIMIT_GB is not a positive number.
    """
    available, why = available_memory(), "the memory available now"
    if available is None:
        available, why = FALLBACK_MEMORY, "a default, since the free memory is unknown"
    text = os.environ.get("ABM_MEMORY_LIMIT_GB", "").strip()
    if text:
        try:
            gb = float(text)
            if not math.isfinite(gb) or gb <= 0:
                raise ValueError
        except ValueError:
            raise ScenarioError(
                f"ABM_MEMORY_LIMIT_GB: must be a positive number of GiB; got {text!r}"
            ) from None
        if gb * 2**30 < available:
            available, why = int(gb * 2**30), f"ABM_MEMORY_LIMIT_GB={text}"
    return available, why


def longest_match(match, matches: int) -> int:
    """The rounds of the longest match of a step, as the engine sizes its arrays.

    The fixed length, or for geometric lengths a high quantile of the longest of
    ``matches`` draws (the 1 - 1e-6 quantile of one match, or the median of the
    longest when there are so many matches that this is larger).

    Args:
        match (abm.scenario.MatchConfig): The scenario's ``[match]`` table.
        matches: The matches played in one step.
    """
    if match.rounds is not None:
        return int(match.rounds)
    delta = match.continuation_probability
    if delta <= 0:
        return 1
    tail = min(LENGTH_QUANTILE_TAIL, math.log(2) / max(matches, 1))
    return max(1, math.ceil(math.log(tail) / math.log(delta)))


def _gib(n: float) -> str:
    return f"{n / 2**30:,.1f} GiB" if n >= 2**30 / 10 else f"{n / 2**20:,.0f} MiB"


def check_size(scenario: Scenario, nodes: int, edges: int, graph_field: str, source: str) -> None:
    """Refuse, before anything is built, a scenario too big for the memory.

    The estimate covers the graph, one step's round arrays and the memory windows
    kept across matches; the limit is ``memory_limit``'s.

    Args:
        scenario: The validated scenario.
        nodes: The graph's node count.
        edges: The graph's edge count.
        graph_field: The scenario field that sets the graph's size, for the message.
        source: The scenario file, for the message.

    Raises:
        ScenarioError: The estimate exceeds the limit; the message names the field
            that makes the scenario big.
    """
    pairing = scenario.pairing
    matches = edges if pairing.scheme == "all_edges" else min(edges, nodes)
    matches *= pairing.repetitions
    rounds = longest_match(scenario.match, matches)
    per_round = BYTES_PER_ROUND_SIDE + (BYTES_PER_ROUND_ROW if scenario.output.rounds else 0)
    parts = {
        graph_field: nodes * BYTES_PER_NODE + edges * BYTES_PER_EDGE,
        "match": 2 * matches * rounds * per_round,
        "memory.window": 0,
    }
    memory = scenario.memory
    if memory.scope != "match":  # windows kept across steps, two int8 tables
        slots = 2 * edges if memory.scope == "opponent" else 2 * nodes
        parts["memory.window"] = 2 * slots * (memory.window or 0)
    total = sum(parts.values())
    limit, why = memory_limit()
    if total <= limit:
        return
    field = max(parts, key=parts.get)
    if field == "match":
        if scenario.match.rounds is None:
            field = "match.continuation_probability"
        else:
            field = (
                "pairing.repetitions"
                if pairing.repetitions > scenario.match.rounds
                else "match.rounds"
            )
    length = (
        ""
        if scenario.match.rounds is not None
        else ", a 1 - 1e-6 quantile of the geometric match length"
    )
    raise ScenarioError(
        f"{source}: field '{field}': this scenario needs about {_gib(total)} of memory "
        f"(the graph {_gib(parts[graph_field])} for {nodes:,} nodes and {edges:,} edges; a "
        f"step's matches {_gib(parts['match'])} for {matches:,} matches of up to "
        f"{rounds:,} rounds{length}"
        + (f"; memory windows {_gib(parts['memory.window'])}" if parts["memory.window"] else "")
        + f") but the limit is {_gib(limit)} ({why}); allowed: a scenario that fits, with a "
        "smaller graph, shorter matches (a smaller continuation_probability) or fewer "
        "repetitions"
    )


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

    Who plays what lives in ``population`` (a ``Population``): the engine, the tally
    and the tables read it, and evolution changes it through ``Population.relabel``
    alone. ``labels``, ``label_of_node`` and the like are read-only shortcuts to it.
    Mesa's Network (``space``) and the Players (``players``, ``agents``) are built on
    first use: the simulation itself never reads them.

    Per-node totals (``scores``, ``decisions``, ``cooperations``) are NumPy arrays
    summed after every step; ``tally`` keeps the tables by label, ``last_result``
    and ``last_totals`` the last step's ``StepResult`` and per-side totals.

    Args:
        scenario: A validated ``Scenario``, or the path of a scenario file.
        seed: Overrides the scenario's seed; a fresh one is drawn (and recorded in
            ``scenario``) when neither gives one.
        collect_agents: Mesa's per-agent DataCollector rows on or off; by default
            they are collected while agents x steps stays within
            ``AGENT_ROWS_LIMIT``, because the DataCollector walks every agent in
            Python each step.
        source: The scenario file named in error messages (default: the path given,
            or the scenario's name).

    Raises:
        ScenarioError: The scenario cannot be read or is too big for the memory, the
            graph has no edges, or a policy cannot be built or needs a longer memory
            window; the message names the file and the field.
    """

    def __init__(
        self,
        scenario: Scenario | str | Path,
        *,
        seed: int | None = None,
        collect_agents: bool | None = None,
        source: str | None = None,
    ) -> None:
        """Build the graph, the population, the engine and the DataCollector."""
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
        n_default = len(pop.players) if pop.players else None
        size = graph_size(scenario.graph, n_default)
        if size is not None:  # before building: a graph too big to hold fails fast
            nodes, edges, field = size
            field = (
                "population.players"
                if field == "n" and scenario.graph.kind == "complete" and scenario.graph.n is None
                else f"graph.{field}"
            )
            check_size(scenario, nodes, edges, field, self.source)
        graph = build_graph(scenario.graph, stream(seed, "graph"), self.source, n_default=n_default)
        self.graph = graph
        if size is None:  # a graph file: its size is known now
            check_size(
                scenario,
                graph.number_of_nodes(),
                graph.number_of_edges(),
                "graph.path",
                self.source,
            )
        specs = assign_policies(pop, graph, stream(seed, "population"), self.source)
        self._check_memory(specs)
        self.edges = edge_array(graph)
        self.n_nodes = graph.number_of_nodes()
        if len(self.edges) == 0:
            raise ScenarioError(
                f"{self.source}: field 'graph': the graph has no edges, so "
                "nobody would play; use a denser graph or self_loops = true"
            )

        self.population = Population.from_specs(scenario, specs, self.source)
        game = scenario.game.payoffs
        self.scores = np.zeros(self.n_nodes)
        self.decisions = np.zeros(self.n_nodes, np.int64)
        self.cooperations = np.zeros(self.n_nodes, np.int64)
        self.tally = Tally(self.population, track_shares=scenario.evolution is not None)
        self.last_result: StepResult | None = None
        # the LLM records of the last step (prompts, answers ...), replaced every step, so
        # that a long run through the Python API or mesa.batch_run holds one step's worth
        self.last_exchanges: list[dict] = []
        self.played_steps = 0  # Mesa's own counter moved between 3.x releases
        # Mesa's Network and one Player per node: nothing in the simulation reads them,
        # so they are built on first use (see ``players``)
        self._space: Network | None = None
        self._players: list[Player] | None = None

        self.pairing = make_pairing(scenario.pairing.scheme, self.edges, self.n_nodes)
        self.total_steps = scenario.pairing.steps or self.pairing.default_steps
        # the resolved config names the step count the pairing scheme chose
        self.scenario = scenario = scenario.model_copy(
            update={"pairing": scenario.pairing.model_copy(update={"steps": self.total_steps})}
        )
        self._pairing_rng = stream(seed, "pairing")
        self.engine = Engine(
            game=game,
            noise=scenario.game.noise,
            population=self.population,
            edges=self.edges,
            window=scenario.memory.window,
            scope=scenario.memory.scope,
            rounds=scenario.match.rounds,
            continuation_probability=scenario.match.continuation_probability,
            rngs={p: stream(seed, p) for p in ("noise", "policy", "match_length")},
        )
        self.evolution = None
        if scenario.evolution is not None:
            span = float(game.table.max() - game.table.min()) * self._mean_rounds()  # a match
            self.evolution = Evolution(
                scenario.evolution,
                self.edges,
                self.n_nodes,
                # each policy once, however many nodes start with it
                list(
                    dict.fromkeys(
                        self.population.label_index(s.display)
                        for s in (scenario.mutants() or scenario.policies() or specs)
                    )
                ),
                span,
                stream(seed, "evolution"),
            )
        self.snapshots: list[tuple[int, np.ndarray]] = []
        if scenario.evolution is not None and self.grid_shape is not None:
            self.snapshots.append((0, self.label_of_node.copy()))
        reporters = {"cooperation_rate": _mean_cooperation, "mean_payoff": _mean_payoff}
        if self.evolution is not None:  # without it, shares never change
            reporters.update({f"share:{label}": _share_reporter(label) for label in self.labels})
        if collect_agents is None:
            collect_agents = self.n_nodes * self.total_steps <= AGENT_ROWS_LIMIT
        self.datacollector = mesa.DataCollector(
            model_reporters=reporters,
            agent_reporters={
                "score": "score",
                "cooperation_rate": "cooperation_rate",
                "player": "label",
            }
            if collect_agents
            else None,
        )

    # ------------------------------------------------------------ Mesa's agents

    def _build_agents(self) -> None:
        """Mesa's Network over the graph and one Player per node, in node order.

        Building them draws nothing from the model's random streams, so building
        them late changes no result; the agents still get AgentIDs 1..n, since
        nothing else in the model is a Mesa agent.
        """
        if self._players is not None:
            return
        self._space = Network(self.graph, random=self.random)
        self._players = [Player(self, node) for node in range(self.n_nodes)]
        for player in self._players:
            player.cell = self._space[player.node]

    @property
    def space(self) -> Network:
        """Mesa's Network over the graph (built on first use)."""
        self._build_agents()
        return self._space

    @property
    def players(self) -> list[Player]:
        """The Mesa agent of each node, in node order (built on first use)."""
        self._build_agents()
        return self._players

    @property
    def agents(self) -> mesa.agent.AgentSet:
        """Mesa's set of all agents.

        The Players are built on first use, so that the DataCollector's agent rows
        and ``mesa.batch_run`` find them.
        """
        self._build_agents()
        return super().agents

    @property
    def agents_by_type(self) -> dict[type, mesa.agent.AgentSet]:
        """Mesa's agents by class (the Players, built on first use)."""
        self._build_agents()
        return super().agents_by_type

    @property
    def agent_types(self) -> list[type]:
        """Mesa's agent classes present (the Players, built on first use)."""
        self._build_agents()
        return super().agent_types

    # ------------------------------------------------------------ who plays what

    @property
    def labels(self) -> list[str]:
        """The player labels, in the scenario's order (the population's list)."""
        return self.population.labels

    @property
    def policies(self) -> list[Policy]:
        """The policy objects; several labels may share one."""
        return self.population.policies

    @property
    def llm_policies(self) -> list[Policy]:
        """The policies that ask a language model."""
        return self.population.llm_policies

    @property
    def policy_of_label(self) -> np.ndarray:
        """Each label's index into ``policies`` (read-only)."""
        return self.population.policy_of_label

    @property
    def label_of_node(self) -> np.ndarray:
        """Each node's label index now (read-only; changed by ``Population.relabel``)."""
        return self.population.label_of_node

    @property
    def policy_of_node(self) -> np.ndarray:
        """Each node's index into ``policies`` now (read-only)."""
        return self.population.policy_of_node

    @property
    def played_label_of_node(self) -> np.ndarray:
        """Each node's label in the last step played, before any update (read-only)."""
        return self.population.played_label_of_node

    @property
    def policy_name_of_label(self) -> list[str]:
        """Each label's policy as name and parameters."""
        return self.population.policy_name_of_label

    @property
    def policy_names(self) -> list[str]:
        """Each node's policy as name and parameters (its label left out)."""
        return self.population.policy_name_of_node()

    @property
    def grid_shape(self) -> tuple[int, int] | None:
        """(rows, cols) when the graph is a lattice, for snapshots of who is where."""
        return self.scenario.graph.lattice_shape()

    def policy_counts(self) -> np.ndarray:
        """Agents under each label now, in ``labels`` order."""
        return self.population.counts()

    def shares(self) -> np.ndarray:
        """Share of the agents under each label now, in ``labels`` order."""
        return self.population.shares()

    def _mean_rounds(self) -> float:
        match = self.scenario.match
        if match.rounds is not None:
            return float(match.rounds)
        return 1.0 / (1.0 - match.continuation_probability)

    def _check_memory(self, specs: list[PolicySpec]) -> None:
        """Refuse a policy that remembers more rounds than the memory window holds.

        Every policy that can play counts, mutants and mix entries on no node included.
        """
        window = self.scenario.memory.window
        if window is None:
            return
        seen = set()
        for spec, field in sourced_specs(self.scenario, specs):
            if spec.name in seen:
                continue
            seen.add(spec.name)
            depth = lookup(spec.name).memory_depth
            if math.isfinite(depth) and depth > window:
                raise ScenarioError(
                    f"{self.source}: field 'memory.window': policy {spec.name!r} (in {field}) "
                    f"needs to remember {depth:g} rounds but the window is {window}; allowed: "
                    f"a window >= {depth:g}, or leave it out to remember the whole match"
                )

    def step(self) -> None:
        """Pick this step's matches, play them all in lockstep, fold in the results.

        The step's LLM records become ``last_exchanges``; the tally, the per-node
        totals and the DataCollector take the results; under evolution the population
        is then updated (a match stopped by an unreadable answer counts for neither
        side's fitness). ``running`` turns False after the last step.
        """
        index = self.played_steps
        for policy in self.llm_policies:
            policy.drain()  # the last step's records, handed out as last_exchanges
        edge_ids = self.pairing.matches(index, self._pairing_rng)
        if self.scenario.pairing.repetitions > 1:
            edge_ids = np.repeat(edge_ids, self.scenario.pairing.repetitions)
        result = self.engine.play(index, edge_ids)
        exchanges: list[dict] = []
        for policy in self.llm_policies:
            # read, not drained: policy.drain() after a step still returns that step's
            # records; they are dropped when the next step starts
            records = getattr(policy, "records", None)
            exchanges += list(records) if isinstance(records, list) else policy.drain()
        self.last_exchanges = exchanges
        totals = self.tally.add(result)
        self.last_totals = totals
        own_mask = ~result.twin
        # without self-play every side is an agent's own: a slice spares the copies
        own = slice(None) if own_mask.all() else own_mask
        agents = result.agent[own]
        payoff = np.bincount(agents, totals["payoff"][own], minlength=self.n_nodes)
        self.scores += payoff
        self.decisions += np.bincount(
            agents, result.side_length[own], minlength=self.n_nodes
        ).astype(np.int64)
        self.cooperations += np.bincount(
            agents, totals["cooperations"][own], minlength=self.n_nodes
        ).astype(np.int64)
        self.last_result = result
        self.datacollector.collect(self)
        self.played_steps += 1
        if self.evolution is not None:
            # a match stopped by an unreadable answer is no sample of either side's fitness
            whole = (
                own_mask if result.void is None else own_mask & ~np.concatenate([result.void] * 2)
            )
            matches = np.bincount(result.agent[whole], minlength=self.n_nodes)
            earned = np.bincount(
                result.agent[whole], totals["payoff"][whole], minlength=self.n_nodes
            )
            self._evolve(self.evolution.fitness(earned, matches), matches)
        if self.played_steps >= self.total_steps:
            self.running = False

    def _evolve(self, fitness: np.ndarray, matches: np.ndarray) -> None:
        self.population.relabel(self.evolution.update(self.label_of_node, fitness, matches))
        every = self.scenario.evolution.snapshot_every
        if self.grid_shape is not None and (
            self.played_steps == self.total_steps
            or (every is not None and self.played_steps % every == 0)
        ):
            self.snapshots.append((self.played_steps, self.label_of_node.copy()))
