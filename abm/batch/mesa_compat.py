"""``mesa.batch_run`` with abm scenarios, for users who know Mesa's batch runner.

``DilemmaModel`` already works with ``mesa.batch_run``: its keyword arguments are
``scenario`` (a path) and ``seed``, so ``parameters={"scenario": path, "seed": [1, 2, 3]}``
runs it over seeds. To vary scenario values as well, use ``SweepModel``: every other
keyword argument is a dotted scenario key, as in ``--set``::

    import mesa
    from abm.batch.mesa_compat import SweepModel

    rows = mesa.batch_run(SweepModel, parameters={
        "scenario": "scenarios/round_robin_rules.toml",
        "game.noise": [0.0, 0.05], "match.rounds": [5, 10], "seed": range(3)},
        number_processes=1, data_collection_period=-1)

(``game__noise`` is accepted for ``game.noise`` where a key must be an identifier.)

``SweepModel`` also makes Mesa's step index line up: ``DilemmaModel``'s DataCollector
keeps model rows by position (0 = after the first step) but agent rows by Mesa's step
counter (1 = after the first step), and Mesa 3.3's ``batch_run`` reads both at the same
``Step``. ``SweepModel`` files agent rows like model rows (in ``batch_run`` and in
``get_agent_vars_dataframe``), so the row with ``Step = k`` holds model and agent values
after step k + 1, and the last row of a run is its final state. It adds the model
reporter ``overall_cooperation_rate`` (the run's cooperation rate so far,
``cooperation_rate`` in summary.json and results.parquet).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from abm.batch.keys import toml_value
from abm.model import DilemmaModel
from abm.scenario import load_scenario


class SweepModel(DilemmaModel):
    """A DilemmaModel built from a scenario file plus dotted-key overrides.

    Args:
        scenario: The scenario file.
        seed: Overrides the scenario's seed.
        collect_agents: As for ``DilemmaModel``.
        **overrides: Scenario values by dotted key (``game.noise`` or
            ``game__noise``), applied as ``--set`` applies them.
    """

    def __init__(
        self,
        scenario: str | Path,
        seed: int | None = None,
        *,
        collect_agents: bool | None = None,
        **overrides: Any,
    ) -> None:
        """Load the scenario with the overrides and add the run-wide reporter."""
        sets = [f"{key.replace('__', '.')}={toml_value(value)}" for key, value in overrides.items()]
        self.overrides = sets
        loaded = load_scenario(scenario, sets, seed)
        super().__init__(loaded, seed=seed, collect_agents=collect_agents, source=str(scenario))
        reporters = dict(self.datacollector.model_reporters)
        reporters["overall_cooperation_rate"] = lambda m: m.tally.cooperation_rate()
        agents = self.datacollector.agent_reporters or None
        import mesa

        self.datacollector = mesa.DataCollector(model_reporters=reporters, agent_reporters=agents)

    def step(self) -> None:
        """Play a step, then file its agent rows under the model rows' step index."""
        super().step()
        records = self.datacollector._agent_records
        index = self.played_steps - 1
        if self.steps != index and self.steps in records:
            # file the agent rows (and their own step field) under the model rows' index
            records[index] = [(index, *row[1:]) for row in records.pop(self.steps)]
