"""The visualization page: Mesa's SolaraViz over a VizModel, with the views beside it.

SolaraViz gives the controls and the step counter; the network, agent panel, time
series and heatmaps sit beside it.

    python -m abm.viz [SCENARIO]          # serves it on http://127.0.0.1:8765
    solara run abm/viz/app.py             # the same page, Mesa's way; the scenario comes
                                          # from $ABM_VIZ_SCENARIO (default: the round robin)
"""

from __future__ import annotations

import solara

# SolaraViz is Mesa's (mesa.visualization.SolaraViz), imported there after a warning filter
from abm.viz.components import Dashboard, SolaraViz, model_params
from abm.viz.model import VizModel, default_scenario


@solara.component
def Page(scenario: str | None = None):
    """The page: one model per browser session, rebuilt by Mesa's Reset from the controls.

    Args:
        scenario: The scenario file; default: ``$ABM_VIZ_SCENARIO``, else the round robin.
    """
    path = scenario or default_scenario()
    initial = solara.use_memo(lambda: VizModel(scenario=path), [path])
    model = solara.use_reactive(initial)
    params = solara.use_memo(lambda: model_params(initial), [initial])
    solara.Title(f"abm: {initial.scenario.name}")
    SolaraViz(
        model,
        components=[],
        model_params=params,
        play_interval=150,
        name=f"abm: {initial.scenario.name}",
    )
    Dashboard(model.value)
