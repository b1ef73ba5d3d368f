"""The model behind the visualization.

``VizModel`` is a ``DilemmaModel`` (the same model the CLI runs) built from a scenario
file plus the page's control values, with what the page needs and the model does not
keep. Every constructor argument has a default, so Mesa's SolaraViz can rebuild it from
its controls' keyword arguments on Reset. Each control left at ``None`` keeps the
scenario's value.
"""

from __future__ import annotations

import collections
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from abm.errors import ScenarioError
from abm.graphs import GRAPH_KINDS
from abm.model import DilemmaModel
from abm.scenario import Scenario, load_scenario, validate_scenario
from abm.viz.layout import drawing_for

DEFAULT_SCENARIO = "scenarios/round_robin_rules.toml"
SCENARIO_ENV = "ABM_VIZ_SCENARIO"
LLM_LOG_LIMIT = 500  # exchanges kept for the page; older ones are dropped
# the graph-size box's bounds: past MAX_DRAWN_NODES (2,000) the page draws a sample, and
# up to these sizes building a graph, a step and the drawing take a few seconds at most
MIN_PAGE_AGENTS = 2
MAX_PAGE_AGENTS = 100_000
MAX_PAGE_LINKS = 2_000_000  # a complete graph reaches it at 2,000 agents

# progress(text, fraction) while a step or a build runs; fraction None = unknown;
# progress(None, None) when done. The app points this at the page's progress bar.
ProgressHook = Callable[[str | None, float | None], None]


def default_scenario() -> str:
    """The scenario the page shows.

    $ABM_VIZ_SCENARIO, else the round robin of rules (looked up from the working
    directory, then next to the package).
    """
    chosen = os.environ.get(SCENARIO_ENV)
    if chosen:
        return chosen
    here = Path(DEFAULT_SCENARIO)
    if here.is_file():
        return str(here)
    return str(Path(__file__).resolve().parents[1] / DEFAULT_SCENARIO)


def graph_families() -> list[str]:
    """The graph kinds the page's "Graph family" selector offers.

    Those are the kinds of ``abm.graphs.GRAPH_KINDS`` with page defaults; the page adds
    a graph file only where the scenario has one.
    """
    return [name for name, kind in GRAPH_KINDS.items() if kind.page is not None]


def scenario_nodes(scenario: Scenario) -> int | None:
    """The number of agents the scenario's graph has (None for a graph file)."""
    players = scenario.population.players
    return scenario.graph.nodes(len(players) if players else None)


def graph_table(kind: str, n: int, base: dict[str, Any]) -> dict[str, Any]:
    """A [graph] table of family ``kind`` with about ``n`` nodes.

    The same family keeps the other keys of ``base`` (the scenario's [graph] table); a
    new one gets the kind's page defaults.

    Raises:
        ScenarioError: for a kind the page does not offer.
    """
    if kind not in graph_families():
        raise ScenarioError(
            f"field 'graph.kind': unknown graph family {kind!r}; "
            f"allowed: {', '.join(graph_families())}"
        )
    return GRAPH_KINDS[kind].page_table(n, base)


def size_problem(text: str | int | None) -> str | None:
    """Why the graph-size box's value is refused, or None (empty: the scenario's size)."""
    if text in (None, ""):
        return None
    try:
        n = int(text)
    except (TypeError, ValueError):
        return f"must be a whole number of agents; got {text!r}"
    if not MIN_PAGE_AGENTS <= n <= MAX_PAGE_AGENTS:
        bigger = " (run bigger graphs with python -m abm.run)" if n > MAX_PAGE_AGENTS else ""
        return f"the page takes {MIN_PAGE_AGENTS} to {MAX_PAGE_AGENTS:,} agents; got {n:,}{bigger}"
    return None


def _check_page_size(path: str, scenario: Scenario) -> None:
    """ScenarioError when a graph the page's controls ask for is too big for the page."""
    from abm.graphs import graph_size

    size = graph_size(scenario.graph)
    if size is None:  # a graph file keeps the size it has
        return
    nodes, links, _ = size
    if scenario.graph.self_loops:  # the page counts links between agents
        links -= nodes
    if nodes > MAX_PAGE_AGENTS or links > MAX_PAGE_LINKS:
        raise ScenarioError(
            f"{path}: field 'graph.n': the page takes at most {MAX_PAGE_AGENTS:,} agents and "
            f"about {MAX_PAGE_LINKS:,} links; a {scenario.graph.kind} graph of {nodes:,} "
            f"agents has about {links:,} links (run bigger graphs with python -m abm.run)"
        )


def _as_mix(players: list[Any]) -> list[dict[str, Any]]:
    """A players list as a mix with the same proportions (for a graph of another size)."""
    counts = collections.Counter(repr(p) for p in players)
    first = {repr(p): p for p in reversed(players)}
    return [{"policy": first[key], "share": c / len(players)} for key, c in counts.items()]


def apply_controls(
    path: str,
    *,
    noise: float | None = None,
    rounds: int | None = None,
    window: int | None = None,
    graph_kind: str | None = None,
    n: int | str | None = None,
    seed: int | str | None = None,
    steps: int | None = None,
) -> Scenario:
    """The scenario file with the page's control values applied (``None``: as in the file).

    ``window`` 0 means the whole match. A new graph family or size replaces the
    [graph] table, and a ``players`` list becomes a mix with the same proportions.

    Raises:
        ScenarioError: A control value the scenario cannot take, or a graph too big
            for the page; the message names the field.
    """
    base = load_scenario(path)
    data = base.to_toml_dict()
    if seed not in (None, ""):
        try:
            data["seed"] = int(seed)
        except ValueError:
            raise ScenarioError(
                f"{path}: field 'seed': must be an integer >= 0; got {seed!r}"
            ) from None
    if noise is not None and noise != base.game.noise:
        data.setdefault("game", {})["noise"] = float(noise)
    if rounds is not None and rounds != base.match.rounds:
        data["match"] = {"rounds": int(rounds)}
    if window is not None and (window or None) != base.memory.window:
        memory = dict(data.get("memory", {}))
        memory.pop("window", None)
        if window:
            memory["window"] = int(window)
        data["memory"] = memory
    if steps is not None:
        data.setdefault("pairing", {})["steps"] = int(steps)
    size = None
    if n not in (None, ""):
        problem = size_problem(n)
        if problem:
            raise ScenarioError(f"{path}: field 'graph.n': {problem}")
        size = int(n)
    kind = graph_kind or base.graph.kind
    nodes = scenario_nodes(base)  # None for a graph file
    resized = kind != base.graph.kind or (size is not None and size != nodes)
    if resized and kind == "file":
        raise ScenarioError(
            f"{path}: field 'graph': a graph file has its own size; pick "
            f"a graph family to change it ({', '.join(graph_families())})"
        )
    if resized:
        data["graph"] = graph_table(kind, size or nodes or 100, data["graph"])
        players = data["population"].get("players")
        if players is not None:
            data["population"] = {"mix": _as_mix(players)}
    scenario = validate_scenario(data, source=str(path))
    if resized:  # the file's own graph is the file's business
        _check_page_size(path, scenario)
    return scenario


class VizModel(DilemmaModel):
    """DilemmaModel for the page, built from the keyword arguments Mesa's controls set.

    It drains the LLM policies' records after each step (DilemmaModel would only drop
    them when the next step starts): ``llm_last`` holds each LLM agent's last
    exchange, ``llm_log`` the latest ``LLM_LOG_LIMIT`` exchanges. ``share_history``
    holds the agents under each label at the start and after every step,
    ``step_seconds`` each step's wall time. A control combination the scenario
    rejects falls back to the scenario as written, with the reason in ``viz_error``.
    Progress goes to the class's ``progress_hook``, if set.

    Args:
        scenario: The scenario file (default: ``default_scenario()``).
        noise: Overrides ``game.noise``.
        rounds: Overrides ``match.rounds``.
        window: Overrides ``memory.window`` (0: the whole match).
        graph_kind: A graph family of ``graph_families()``.
        n: The graph's size in agents.
        seed: Overrides the scenario's seed.
        steps: Overrides ``pairing.steps``.
        collect_agents: As for ``DilemmaModel``.

    Raises:
        ScenarioError: The scenario as written is refused (with no control set, or
            after the controls were refused).
    """

    progress_hook: ProgressHook | None = None

    def __init__(
        self,
        scenario: str | None = None,
        noise: float | None = None,
        rounds: int | None = None,
        window: int | None = None,
        graph_kind: str | None = None,
        n: int | str | None = None,
        seed: int | str | None = None,
        steps: int | None = None,
        collect_agents: bool | None = None,
    ) -> None:
        """Build the model, lay out its graph and report progress while doing so."""
        path = scenario or default_scenario()
        self.viz_error: str | None = None
        self._report(f"building {Path(path).name}", None)
        controls = {
            "noise": noise,
            "rounds": rounds,
            "window": window,
            "graph_kind": graph_kind,
            "n": n,
            "seed": seed,
            "steps": steps,
        }
        try:
            resolved = apply_controls(path, **controls)
            super().__init__(resolved, source=path, collect_agents=collect_agents)
        except ScenarioError as exc:
            if all(v in (None, "") for v in controls.values()):
                self._report(None, None)
                raise
            self.viz_error = f"{exc} (showing the scenario as written instead)"
            super().__init__(load_scenario(path), source=path, collect_agents=collect_agents)
        self.scenario_path = path
        if self.datacollector.agent_reporters and "node" not in self.datacollector.agent_reporters:
            # Mesa's AgentID counts from 1; the node id (agents.csv and rounds.parquet
            # `agent`, the page's agent ids) is AgentID - 1
            self.datacollector._new_agent_reporter("node", "node")
        self.llm_last: dict[int, dict[str, Any]] = {}
        self.llm_log: collections.deque[dict[str, Any]] = collections.deque(maxlen=LLM_LOG_LIMIT)
        self.share_history: list[np.ndarray] = [self.population.counts()]
        self.step_seconds: list[float] = []
        self._llm_expected = 0
        self._llm_done = 0
        for policy in self.population.llm_policies:
            policy.progress = self  # the policy calls update(n) per batch of decisions
        self._report("laying out the graph", None)
        drawing_for(self)  # once per graph, while the progress bar says so
        self._report("drawing", None)  # the page clears it once drawn

    # ------------------------------------------------------------ progress

    def _report(self, text: str | None, fraction: float | None) -> None:
        hook = type(self).progress_hook
        if hook is not None:
            hook(text, fraction)

    def update(self, n: int) -> None:
        """Called by the LLM policies after each batch of decisions (like a tqdm bar)."""
        self._llm_done += n
        if self._llm_expected:
            text = (
                f"step {self.played_steps + 1}: {self._llm_done} of about "
                f"{self._llm_expected} LLM decisions"
            )
            self._report(text, min(1.0, self._llm_done / self._llm_expected))
        else:
            self._report(f"step {self.played_steps + 1}: {self._llm_done} LLM decisions", None)

    # ------------------------------------------------------------ stepping

    def step(self) -> None:
        """Play a step as DilemmaModel does, then keep what the page shows of it."""
        started = time.perf_counter()
        self._llm_done = 0
        self._report(f"step {self.played_steps + 1} of {self.total_steps}: playing", None)
        try:
            super().step()
            self._collect_llm()
            self.share_history.append(self.population.counts())
        finally:
            self._report(f"step {self.played_steps} played: drawing", None)  # the page clears it
        if self.population.llm_policies:
            self._llm_expected = self._llm_done  # the next step is usually as long
        self.step_seconds.append(time.perf_counter() - started)

    def _collect_llm(self) -> None:
        for policy in self.population.llm_policies:
            for record in policy.drain():
                self.llm_last[int(record["agent"])] = record
                self.llm_log.append(record)

    # ------------------------------------------------------------ reading

    def llm_nodes(self) -> np.ndarray:
        """Nodes whose current policy is an LLM."""
        population = self.population
        if not population.llm_policies:
            return np.zeros(0, np.int64)
        is_llm = np.array([hasattr(p, "drain") for p in population.policies])
        return np.flatnonzero(is_llm[population.policy_of_node])

    def last_actions(self) -> np.ndarray:
        """Per node: its last actual action in this step's matches.

        0 = C, 1 = D; -1 when it did not play this step.
        """
        out = np.full(self.n_nodes, -1, np.int8)
        r = self.last_result
        if r is None or r.n_matches == 0:
            return out
        lengths = r.side_length
        last = r.actual[np.maximum(lengths - 1, 0), np.arange(len(lengths))]
        own = ~r.twin
        out[r.agent[own]] = last[own]
        return out

    def match_cooperation(self) -> tuple[np.ndarray, np.ndarray]:
        """This step's matched edge ids and each match's share of C among actual actions."""
        r = self.last_result
        if r is None or r.n_matches == 0:
            return np.zeros(0, np.int64), np.zeros(0)
        m = r.n_matches
        coop = (r.actual == 0).sum(axis=0)
        both = coop[:m] + coop[m:]
        return np.asarray(r.edge), both / np.maximum(2 * r.length, 1)
