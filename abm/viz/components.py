"""Solara components of the page.

Status and progress, the clickable network, the agent panel (with an LLM agent's last
prompt, answer and reflection), the time series and the heatmaps. Each re-renders when
Mesa's controls step or reset the model.
"""

from __future__ import annotations

import base64
import math
import time
import warnings
from typing import Any

# Mesa's ComponentsView returns early when, as here, the page brings its own components;
# Solara's hook check warns about that when Mesa's visualization module is imported
warnings.filterwarnings("ignore", message=r".*ComponentsView: `use_state` found despite")

import numpy as np  # noqa: E402
import solara  # noqa: E402
from mesa.visualization import SolaraViz  # noqa: E402, F401  (re-exported for the app)
from mesa.visualization import solara_viz as _mesa_solara_viz  # noqa: E402
from mesa.visualization.utils import update_counter  # noqa: E402

from abm.scenario import load_scenario  # noqa: E402
from abm.viz.draw import NETWORK_SIZE, heatmaps_png, network_png, timeseries_png  # noqa: E402
from abm.viz.layout import drawing_for  # noqa: E402
from abm.viz.model import (  # noqa: E402
    MAX_PAGE_AGENTS,
    MAX_PAGE_LINKS,
    MIN_PAGE_AGENTS,
    VizModel,
    graph_families,
    scenario_nodes,
    size_problem,
)

# (text, fraction or None) while the model steps or builds; None when idle
progress: solara.Reactive[tuple[str, float | None] | None] = solara.reactive(None)
# the agent shown in the agent panel (clicked in the network or picked)
selected: solara.Reactive[int | None] = solara.reactive(None)
_shown_at = [0.0]

PRE = (
    "white-space: pre-wrap; word-break: break-word; font-size: 12px; margin: 2px 0 8px; "
    "padding: 6px; background: rgba(127,127,127,0.1); border-radius: 4px; max-height: 260px; "
    "overflow-y: auto"
)


def report_progress(text: str | None, fraction: float | None) -> None:
    """VizModel's progress hook: start, updates (at most 10 a second) and done."""
    now = time.monotonic()
    if text is not None and progress.peek() is not None and now - _shown_at[0] < 0.1:
        return
    _shown_at[0] = now
    progress.set(None if text is None else (text, fraction))


VizModel.progress_hook = staticmethod(report_progress)


def model_params(model: VizModel) -> dict[str, Any]:
    """Mesa SolaraViz controls for the scenario's main parameters (applied on Reset)."""
    base = load_scenario(model.scenario_path)
    nodes = scenario_nodes(base)
    kinds = graph_families()
    if base.graph.kind not in kinds:  # a graph file: offered only where the scenario has one
        kinds.append(base.graph.kind)
    params: dict[str, Any] = {
        "scenario": model.scenario_path,
        "noise": {
            "type": "SliderFloat",
            "label": "Noise (flip probability)",
            "value": base.game.noise,
            "min": 0.0,
            "max": max(0.5, base.game.noise),
            "step": 0.01,
        },
    }
    if base.match.rounds is not None:  # geometric match lengths keep the scenario's
        params["rounds"] = {
            "type": "SliderInt",
            "label": "Rounds per match",
            "value": base.match.rounds,
            "min": 1,
            "max": max(50, base.match.rounds),
            "step": 1,
        }
    params.update(
        {
            "window": {
                "type": "SliderInt",
                "label": "Memory window (0 = whole match)",
                "value": base.memory.window or 0,
                "min": 0,
                "max": max(20, base.memory.window or 0),
                "step": 1,
            },
            "graph_kind": {
                "type": "Select",
                "label": "Graph family",
                "value": base.graph.kind,
                "values": kinds,
            },
            "n": {
                "type": "InputText",
                "label": "Graph size (agents)",
                "value": str(nodes) if nodes else "",
                # read by UserInputs below (Mesa's own ignores them)
                "message": f"{MIN_PAGE_AGENTS} to {MAX_PAGE_AGENTS:,} agents (and about "
                f"{MAX_PAGE_LINKS:,} links at most); larger sizes are refused",
                "check": size_problem,
            },
            "steps": {
                "type": "SliderInt",
                "label": "Steps",
                "value": model.total_steps,
                "min": 1,
                "max": max(200, model.total_steps),
                "step": 1,
            },
            "seed": {"type": "InputText", "label": "Seed", "value": str(model.master_seed)},
        }
    )
    return params


# Mesa's own, kept once (a reload of this module must not wrap the wrapper)
_MESA_USER_INPUTS = getattr(_mesa_solara_viz, "_abm_mesa_user_inputs", _mesa_solara_viz.UserInputs)
_mesa_solara_viz._abm_mesa_user_inputs = _MESA_USER_INPUTS


@solara.component
def CheckedInput(label: str, value: str, on_value, message: str, check):
    """A text box that says under it what it takes, and in red why a value is refused."""
    text, set_text = solara.use_state(value)

    def changed(new):
        set_text(new)
        on_value(new)

    problem = check(text)
    solara.InputText(
        label,
        value=text,
        on_value=changed,
        message=message,
        error=f"{problem}; Reset keeps the scenario's size" if problem else False,
    )


def slider_text(value: float, step: float | None) -> str:
    """A slider's value as shown next to it, to the precision of its step."""
    if isinstance(value, int) or step is None or float(step).is_integer():
        return f"{value:g}" if isinstance(value, float) else str(value)
    decimals = max(0, -math.floor(math.log10(float(step))))
    return f"{value:.{decimals}f}"


@solara.component
def ShownSlider(kind: str, label: str, value, on_value, min, max, step):
    """A slider with its value written next to it (Mesa's show it only while dragged)."""
    current, set_current = solara.use_state(value)

    def changed(new):
        set_current(new)
        on_value(new)

    slider = solara.SliderInt if kind == "SliderInt" else solara.SliderFloat
    with solara.Row(gap="6px", style={"align-items": "center", "flex-wrap": "nowrap"}):
        with solara.Div(style={"flex": "1 1 auto", "min-width": "0"}):
            slider(label, value=current, on_value=changed, min=min, max=max, step=step)
        solara.Text(
            slider_text(current, step),
            classes=["abm-slider-value"],
            style={"min-width": "2.5em", "text-align": "right", "font-weight": "bold"},
        )


@solara.component
def UserInputs(user_params, on_change=None):
    """Mesa's model controls (its ``UserInputs``), with two changes.

    Every slider has its value written next to it, and a text box with a ``check``
    says its bounds and why a value is refused.
    """
    for name, options in user_params.items():

        def change(value, name=name):
            on_change(name, value)

        kind = options.get("type") if isinstance(options, dict) else None
        if kind in ("SliderInt", "SliderFloat"):
            ShownSlider(
                kind,
                options.get("label", name),
                options.get("value"),
                change,
                options.get("min"),
                options.get("max"),
                options.get("step"),
            )
        elif kind == "InputText" and callable(options.get("check")):
            CheckedInput(
                options.get("label", name),
                options.get("value") or "",
                change,
                options.get("message", ""),
                options["check"],
            )
        else:
            _MESA_USER_INPUTS({name: options}, on_change=on_change)


# Mesa's ModelCreator looks UserInputs up in its module when it renders the controls
_mesa_solara_viz.UserInputs = UserInputs


@solara.component
def ProgressBar():
    """Shows what the model is doing while a step (or a rebuild) runs."""
    state = progress.value
    with solara.Div(classes=["abm-progress"], style={"min-height": "30px"}):
        if state is None:
            solara.ProgressLinear(False)
            solara.Text("ready", style={"font-size": "12px", "color": "grey"})
        else:
            text, fraction = state
            solara.ProgressLinear(True if fraction is None else 100 * fraction)
            solara.Text(text, classes=["abm-busy"], style={"font-size": "12px"})


@solara.component
def StatusBar(model: VizModel):
    """The step count, what the scenario is, progress, and notes on the run."""
    counter = update_counter.get()
    # a step or a rebuild leaves its progress message up until the new pictures are made
    solara.use_effect(lambda: progress.set(None), [model, model.played_steps, counter])
    scenario = model.scenario
    loops = int((model.edges[:, 0] == model.edges[:, 1]).sum())
    edges = len(model.edges) - loops
    links = f"{edges:,} links" + (f" + {loops:,} self-play loops" if loops else "")
    with solara.Column(gap="4px"):
        solara.Text(
            f"Step {model.played_steps} of {model.total_steps}",
            classes=["abm-step"],
            style={"font-size": "20px", "font-weight": "bold"},
        )
        solara.Text(
            f"{scenario.name}: {scenario.description or model.scenario_path} "
            f"({model.n_nodes:,} agents, {links}, {scenario.pairing.scheme}, "
            f"seed {model.master_seed}). Parameter changes apply on Reset.",
            style={"font-size": "13px"},
        )
        ProgressBar()
        note = drawing_for(model).note
        if note:
            solara.Info(f"Big graph: {note}.", dense=True)
        if model.viz_error:
            solara.Warning(model.viz_error, dense=True)
        if not model.running:
            solara.Success(
                f"All {model.total_steps} steps played; press Reset to start again.", dense=True
            )


@solara.component
def NetworkView(model: VizModel):
    """The network picture; a click on an agent selects it."""
    counter = update_counter.get()
    chosen = selected.value

    def draw():
        data, hits = network_png(model, chosen)
        return "data:image/png;base64," + base64.b64encode(data).decode(), hits

    src, hits = solara.use_memo(draw, [model, model.played_steps, chosen, counter])
    width, height = NETWORK_SIZE
    image = solara.v.Html(
        tag="img",
        attributes={"src": src, "width": str(width), "height": str(height), "alt": "network"},
        class_="abm-network",
        style_=f"width: {width}px; height: {height}px; max-width: none; cursor: pointer",
    )

    def on_click(widget, event, data):
        node = hits.node_at(float(data.get("offsetX", -1)), float(data.get("offsetY", -1)))
        if node is not None:
            selected.set(node)

    solara.v.use_event(image, "click", on_click)
    with solara.Div(style={"overflow-x": "auto"}):
        solara.Text(
            "Click an agent to see it in the agent panel.",
            style={"font-size": "12px", "color": "grey"},
        )
        solara.Div(children=[image])


UNREAD_STYLE = {"font-size": "13px", "font-weight": "bold", "color": "#e65100"}


def unread_note(record: dict[str, Any]) -> str | None:
    """What the panel says about an answer that could not be read, or None."""
    if record.get("fallback"):
        return (
            f"fallback: the answer could not be read (invalid), so the fallback rule "
            f"played {record.get('action')}; not the model's decision"
        )
    if record.get("valid") is False or record.get("action") == "invalid":
        return "invalid: the answer could not be read, so nothing was played and the match stopped"
    return None


def _exchange(record: dict[str, Any]) -> None:
    p_c = record.get("p_cooperate")
    chance = f", p(C) = {p_c:.2f}" if isinstance(p_c, float) else ""
    head = (
        f"Step {record.get('step')}, round {record.get('round')}, against agent "
        f"{record.get('opponent')}: answered \u201c{record.get('answer')}\u201d"
    )
    note = unread_note(record)
    unplayed = "actual" in record and record["actual"] is None  # the match stopped
    if note and record.get("fallback"):
        what = (
            f", invalid; the fallback rule played {record.get('action')} (after noise "
            f"{record.get('actual', '?')}, the other played "
            f"{record.get('opponent_action', '?')})"
        )
    elif note:
        what = ", invalid: nothing played"
    elif unplayed:
        what = (
            f", so {record.get('action')}{chance}, not played: the match stopped on the "
            "other side's unreadable answer"
        )
    else:
        what = (
            f", so {record.get('action')} (after noise {record.get('actual', '?')}, the "
            f"other played {record.get('opponent_action', '?')}){chance}"
        )
    solara.Text(head + what, style={"font-size": "13px"})
    if note:
        solara.Text(note, classes=["abm-unread"], style=UNREAD_STYLE)
    solara.Text("Prompt", style={"font-weight": "bold", "font-size": "13px"})
    text = "\n\n".join(f"[{m.get('role')}]\n{m.get('content')}" for m in record.get("prompt", []))
    solara.v.Html(tag="pre", children=[text], class_="abm-prompt", style_=PRE)
    solara.Text("Answer", style={"font-weight": "bold", "font-size": "13px"})
    solara.v.Html(
        tag="pre",
        children=[str(record.get("response", record.get("answer")))],
        class_="abm-answer",
        style_=PRE,
    )
    solara.Text("Reflection", style={"font-weight": "bold", "font-size": "13px"})
    reflection = record.get("reflection")
    solara.v.Html(
        tag="pre",
        children=[reflection or "(no reflection: this player does not reflect)"],
        class_="abm-reflection",
        style_=PRE,
    )


def _matches_of(model: VizModel, node: int) -> list[str]:
    r = model.last_result
    if r is None:
        return []
    lines = []
    for side in np.flatnonzero((r.agent == node) & ~r.twin).tolist():
        other = side + r.n_matches if side < r.n_matches else side - r.n_matches
        n = int(r.side_length[side])
        mine = "".join("CD"[a] for a in r.actual[:n, side])
        theirs = "".join("CD"[a] for a in r.actual[:n, other])
        who = int(r.opponent[side])
        label = model.population.labels[int(model.population.label_of_node[who])]
        name = "itself (self-play)" if who == node else f"{who} ({label})"
        line = f"vs {name}: {mine} against {theirs}, payoff {r.payoff[:n, side].sum():g}"
        if r.fallback is not None and r.fallback[:n, side].any():
            which = np.flatnonzero(r.fallback[:n, side]) + 1
            rounds = ("round " if len(which) == 1 else "rounds ") + ", ".join(map(str, which))
            line += f" (fallback rule, not the model, in {rounds})"
        if r.void is not None and r.void[side % r.n_matches]:
            line += f" (stopped after {n} rounds: an answer could not be read)"
        lines.append(line)
    return lines


@solara.component
def AgentPanel(model: VizModel):
    """One agent: policy, score, this step's matches; for an LLM agent its last exchange."""
    update_counter.get()
    llm = [int(x) for x in model.llm_nodes()[:500]]
    chosen = selected.value
    if chosen is None or not 0 <= chosen < model.n_nodes:
        chosen = llm[0] if llm else None
    with solara.Column(gap="2px", classes=["abm-agent"]):
        with solara.Row():
            if llm:
                solara.Select(
                    "LLM agent",
                    values=[str(x) for x in llm],
                    value=str(chosen) if chosen in llm else None,
                    on_value=lambda v: selected.set(int(v) if v else None),
                )
            solara.InputInt(
                "Agent id", value=chosen, optional=True, on_value=lambda v: selected.set(v)
            )
        if chosen is None:
            solara.Text("Click an agent in the network, or type its id.")
            return
        population = model.population
        label = population.labels[int(population.label_of_node[chosen])]
        policy = population.policy_name_of_label[int(population.label_of_node[chosen])]
        if len(policy) > 40:  # an LLM's full parameter list; the panel shows its exchange
            policy = policy.split("(")[0]
        degree = sum(1 for nb in model.graph.neighbors(chosen) if nb != chosen)
        decisions = int(model.decisions[chosen])
        rate = f"{model.cooperations[chosen] / decisions:.2f}" if decisions else "-"
        solara.Text(
            f"Agent {chosen}: {label}" + (f" ({policy})" if policy != label else ""),
            classes=["abm-agent-title"],
            style={"font-weight": "bold"},
        )
        solara.Text(
            f"{degree} neighbours; score {model.scores[chosen]:g} over {decisions} "
            f"decisions; cooperation rate {rate}",
            style={"font-size": "13px"},
        )
        solara.Text(
            f"Agent ids here are node ids, as in agents.csv and rounds.parquet "
            f"(Mesa's AgentID is {model.players[chosen].unique_id})",
            classes=["abm-agent-ids"],
            style={"font-size": "12px", "color": "grey"},
        )
        lines = _matches_of(model, chosen)
        if lines:
            solara.Text(
                "This step: " + "; ".join(lines[:8]) + (" ..." if len(lines) > 8 else ""),
                style={"font-size": "13px"},
            )
        if chosen in llm or chosen in model.llm_last:
            record = model.llm_last.get(chosen)
            if record is None:
                solara.Text("No decisions yet: press Step.", style={"font-size": "13px"})
            else:
                _exchange(record)


@solara.component
def TimeSeries(model: VizModel):
    """The time series picture, redrawn after each step."""
    counter = update_counter.get()
    data = solara.use_memo(lambda: timeseries_png(model), [model, model.played_steps, counter])
    solara.Image(data, width="100%", classes=["abm-timeseries"])


@solara.component
def Heatmaps(model: VizModel):
    """The two heatmaps, redrawn after each step."""
    counter = update_counter.get()
    data = solara.use_memo(lambda: heatmaps_png(model), [model, model.played_steps, counter])
    solara.Image(data, width="100%", classes=["abm-heatmaps"])


@solara.component
def Dashboard(model: VizModel):
    """Everything below Mesa's app bar, next to its sidebar of controls."""
    with solara.Column(gap="12px", style={"padding": "8px"}):
        StatusBar(model)
        with solara.Row(gap="12px", style={"flex-wrap": "wrap", "align-items": "flex-start"}):
            with solara.Card("Network", style={"max-width": f"{NETWORK_SIZE[0] + 40}px"}):
                NetworkView(model)
            with solara.Card("Agent", style={"flex": "1 1 320px", "min-width": "300px"}):
                AgentPanel(model)
        with solara.Row(gap="12px", style={"flex-wrap": "wrap", "align-items": "flex-start"}):
            with solara.Card("Over time", style={"flex": "1 1 400px", "max-width": "600px"}):
                TimeSeries(model)
            with solara.Card("Matches so far", style={"flex": "1.5 1 600px", "max-width": "920px"}):
                Heatmaps(model)
