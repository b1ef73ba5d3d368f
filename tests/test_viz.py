"""The visualization without a browser: the model behind the page, the drawing cap, the
CLI's checks, and the SolaraViz page rendered headless with solara.render (as Mesa's own
visualization tests do)."""

import socket

import ipyvuetify as v
import ipywidgets as widgets
import networkx as nx
import numpy as np
import pytest
import solara
from conftest import SCENARIOS

from abm.viz import layout as viz_layout
from abm.viz.app import Page
from abm.viz.components import selected
from abm.viz.draw import heatmaps_png, network_png, timeseries_png
from abm.viz.model import VizModel, apply_controls
from abm.viz.server import main as viz_main

# Mesa's ComponentsView warns about its early return when the page brings its own components
pytestmark = pytest.mark.filterwarnings("ignore:.*ComponentsView")

RULES = str(SCENARIOS / "round_robin_rules.toml")
SMALL_WORLD = str(SCENARIOS / "small_world_rules.toml")


@pytest.fixture(autouse=True)
def no_selection():
    selected.set(None)
    yield
    selected.set(None)


def render(scenario):
    _, rc = solara.render(solara.AppLayout(children=[Page(scenario=scenario)]), handle_error=False)
    return rc


def text_of(rc, css):
    return rc.find(v.Html, class_=css).widget.children[0]


def image(rc, css):
    return rc.find(widgets.Image, _dom_classes=("solara-image", css)).widget.value


# ---------------------------------------------------------------- the model behind the page


def test_controls_override_the_scenario_file():
    s = apply_controls(SMALL_WORLD, noise=0.2, rounds=3, window=2, seed=5, steps=4)
    assert (s.game.noise, s.match.rounds, s.memory.window, s.seed, s.pairing.steps) == (
        0.2,
        3,
        2,
        5,
        4,
    )
    assert s.graph.kind == "watts_strogatz" and s.graph.n == 100  # untouched
    same = apply_controls(SMALL_WORLD, noise=0.05, rounds=5, window=3, n="100")
    assert same == apply_controls(SMALL_WORLD)  # values equal to the file change nothing


def test_graph_controls_resize_and_change_family():
    ring = apply_controls(SMALL_WORLD, graph_kind="ring", n="30")
    assert ring.graph.kind == "ring" and ring.graph.n == 30
    grid = apply_controls(SMALL_WORLD, graph_kind="grid", n=36)
    assert (grid.graph.rows, grid.graph.cols) == (6, 6)
    # a players list does not fit a bigger graph: it becomes a mix with the same shares
    bigger = apply_controls(RULES, n=50)
    assert bigger.population.players is None
    assert [m.share for m in bigger.population.mix] == [0.2] * 5
    assert [m.policy.display for m in bigger.population.mix] == [
        "All-D",
        "All-C",
        "Defect Once",
        "Trigger",
        "Tit-for-tat",
    ]
    model = VizModel(scenario=RULES, n=50)
    assert model.n_nodes == 50 and np.bincount(model.label_of_node).tolist() == [10] * 5


def test_a_rejected_combination_falls_back_to_the_file_and_says_why():
    # scope "opponent" needs a finite window; 0 means the whole match
    model = VizModel(scenario=SMALL_WORLD, window=0)
    assert model.scenario.memory.window == 3
    assert "memory" in model.viz_error and "scenario as written" in model.viz_error


def test_step_records_shares_actions_and_progress(monkeypatch):
    seen = []
    monkeypatch.setattr(VizModel, "progress_hook", staticmethod(lambda t, f: seen.append(t)))
    model = VizModel(scenario=SMALL_WORLD)
    assert model.share_history[0].tolist() == [20] * 5
    assert model.last_actions().tolist() == [-1] * 100
    seen.clear()
    model.step()
    assert seen and seen[0].startswith("step 1 of 50")
    assert len(model.share_history) == 2
    last = model.last_actions()
    r = model.last_result
    players = np.unique(r.agent)
    assert set(np.flatnonzero(last >= 0)) == set(players)  # random matching: some sit out
    all_d = np.flatnonzero(model.label_of_node == 0)
    played = [n for n in all_d if last[n] >= 0]
    # All-D intends D every round; with 5 % noise nearly all last actions are D
    assert np.mean(last[played]) > 0.7
    edges, share = model.match_cooperation()
    assert len(edges) == r.n_matches and ((share >= 0) & (share <= 1)).all()


def test_llm_exchanges_are_kept_per_agent(fake):
    model = VizModel(scenario=str(SCENARIOS / "round_robin.toml"))
    llm = model.llm_nodes().tolist()
    assert llm == [5]
    model.step()
    record = model.llm_last[5]
    assert record["round"] == 5 and record["agent"] == 5
    assert record["reflection"] == "I think it went as planned."
    assert any("Suspect1" in m["content"] for m in record["prompt"])
    assert len(model.llm_log) == 35  # 5 opponents + both sides of self-play, 5 rounds each
    assert model.llm_policies[0].drain() == []  # drained by the model, once


# ---------------------------------------------------------------- drawing


def test_small_graph_is_drawn_whole_and_clicks_find_agents():
    model = VizModel(scenario=SMALL_WORLD)
    model.step()
    drawing = viz_layout.drawing_for(model)
    assert len(drawing.nodes) == 100 and drawing.note is None
    assert viz_layout.drawing_for(VizModel(scenario=SMALL_WORLD)) is drawing  # computed once
    png, hits = network_png(model, selected=7)
    assert png.startswith(b"\x89PNG")
    for node in (0, 7, 42):
        x, y = hits.xy[node]
        assert hits.node_at(x + 1, y - 1) == node
    assert hits.node_at(-50, -50) is None
    assert timeseries_png(model).startswith(b"\x89PNG")
    assert heatmaps_png(model).startswith(b"\x89PNG")


def test_big_graphs_are_capped_with_a_note(monkeypatch):
    monkeypatch.setattr(viz_layout, "MAX_DRAWN_NODES", 300)
    model = VizModel(scenario=SMALL_WORLD, graph_kind="barabasi_albert", n=3000)
    drawing = viz_layout.drawing_for(model)
    assert len(drawing.nodes) == 300 and "drawing 300 of them" in drawing.note
    sub = model.graph.subgraph(drawing.nodes.tolist())
    assert max(len(c) for c in nx.connected_components(sub)) == 300
    u, v_ = model.edges[drawing.edges].T
    assert (drawing.index[u] >= 0).all() and (drawing.index[v_] >= 0).all()
    lattice = VizModel(scenario=SMALL_WORLD, graph_kind="grid", n=900)
    drawing = viz_layout.drawing_for(lattice)
    assert drawing.grid == (30, 30) and "one pixel per agent" in drawing.note
    lattice.step()
    _, hits = network_png(lattice)
    x0, y0, x1, y1 = hits.extent
    assert hits.node_at(x0 + 1, y0 + 1) == 0
    assert hits.node_at(x1 - 1, y1 - 1) == 899


# ---------------------------------------------------------------- the CLI's checks


def test_cli_refuses_a_taken_port_in_one_line(capsys):
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        port = sock.getsockname()[1]
        assert viz_main([RULES, "--port", str(port)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: port {port} on 127.0.0.1 is already in use")
    assert "Traceback" not in err and err.count("\n") == 1


def test_cli_reports_a_broken_scenario(scenario_file, capsys):
    path = scenario_file("[graph]\nkind = 'ring'\nn = 10\n[game]\nnosie = 0.1\n")
    assert viz_main([str(path), "--port", "0"]) == 2
    assert "unknown key 'game.nosie'" in capsys.readouterr().err


# ---------------------------------------------------------------- the page, headless


@pytest.mark.slow
def test_page_builds_and_a_step_updates_the_plots():
    rc = render(SMALL_WORLD)
    assert text_of(rc, "abm-step") == "Step 0 of 50"
    rc.find(v.Btn, children=["Reset"]).assert_single()
    rc.find(v.Btn, children=["▶"]).assert_single()
    labels = (
        {w.label for w in rc.find(v.Slider).widgets}
        | {w.label for w in rc.find(v.TextField).widgets}
        | {w.label for w in rc.find(v.Select).widgets}
    )
    assert {
        "Noise (flip probability)",
        "Rounds per match",
        "Memory window (0 = whole match)",
        "Graph family",
        "Graph size (agents)",
        "Seed",
        "Steps",
    } <= labels
    plots = image(rc, "abm-timeseries"), image(rc, "abm-heatmaps")
    network = rc.find(v.Html, class_="abm-network").widget.attributes["src"]
    step = rc.find(v.Btn, children=["Step"])
    step.widget.click()
    step.widget.click()
    assert text_of(rc, "abm-step") == "Step 2 of 50"
    rc.find(v.Html, children=["Step: 2"]).assert_single()  # Mesa's own counter
    assert image(rc, "abm-timeseries") != plots[0]
    assert image(rc, "abm-heatmaps") != plots[1]
    assert rc.find(v.Html, class_="abm-network").widget.attributes["src"] != network


@pytest.mark.slow
def test_reset_rebuilds_the_model_from_the_controls():
    rc = render(SMALL_WORLD)
    rc.find(v.Select, label="Graph family").widget.v_model = "ring"
    size = rc.find(v.TextField, label="Graph size (agents)").widget
    size.v_model = "30"
    size.fire_event("focusout")
    rc.find(v.Btn, children=["Step"]).widget.click()
    assert text_of(rc, "abm-step") == "Step 1 of 50"
    rc.find(v.Btn, children=["Reset"]).widget.click()
    assert text_of(rc, "abm-step") == "Step 0 of 50"
    status = rc.find(v.Html, tag="span").widgets
    assert any("(30 agents, 60 links" in str(w.children) for w in status)  # ring, k = 2


@pytest.mark.slow
def test_llm_agent_panel_shows_prompt_answer_and_reflection(fake):
    rc = render(str(SCENARIOS / "round_robin.toml"))
    rc.find(v.Html, children=["No decisions yet: press Step."]).assert_single()
    rc.find(v.Btn, children=["Step"]).widget.click()
    assert text_of(rc, "abm-agent-title").startswith("Agent 5: LLM")
    prompt = text_of(rc, "abm-prompt")
    assert "[user]" in prompt and "This is interrogation 5 of 5." in prompt
    assert text_of(rc, "abm-answer") == "Suspect1: I want to remain silent"
    assert text_of(rc, "abm-reflection") == "I think it went as planned."
    # clicking a rule agent in the network shows that agent instead
    img = rc.find(v.Html, class_="abm-network").widget
    model = VizModel(scenario=str(SCENARIOS / "round_robin.toml"))  # same layout, same seed
    _, hits = network_png(model)
    x, y = hits.xy[0]
    img.fire_event("click", {"offsetX": float(x), "offsetY": float(y)})
    assert text_of(rc, "abm-agent-title") == "Agent 0: All-D (all_d)"
    rc.find(v.Html, class_="abm-prompt").assert_empty()
