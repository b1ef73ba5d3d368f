"""Re-run the classic network-reciprocity results with abm and draw the figures.

    python docs/reproductions.py            # all three, about 7 minutes on 2 cores
    python docs/reproductions.py nowak_may  # one of nowak_may, santos_pacheco, ohtsuki

Each study starts from its scenario in scenarios/ and changes only the swept
parameter (and, where stated, size and length to keep the run short). Writes
docs/reproductions/<study>.csv and .png; docs/reproductions.md discusses them.
"""

from __future__ import annotations

import sys
import tomllib
from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd
from tqdm import tqdm

from abm import charts
from abm.model import DilemmaModel
from abm.scenario import apply_overrides, validate_scenario

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "reproductions"


def run(name: str, overrides: list[str], graph: dict | None = None) -> DilemmaModel:
    path = ROOT / "scenarios" / f"{name}.toml"
    data = apply_overrides(tomllib.loads(path.read_text()), overrides)
    if graph is not None:  # another graph family: its own fields, not the scenario's
        data["graph"] = graph
    model = DilemmaModel(validate_scenario(data, str(path)), collect_agents=False)
    while model.running:
        model.step()
    return model


def late_share(model: DilemmaModel, label: str = "all_c") -> float:
    last = model.scenario.evolution.average_last
    return float(np.mean([s[f"share:{label}"] for s in model.tally.steps[-last:]]))


def save(chart: alt.Chart, stem: str) -> None:
    chart.save(str(OUT / f"{stem}.png"), scale_factor=2)


def nowak_may() -> None:
    # b on a fine grid, so the plateaus between the payoff thresholds show
    bs = np.round(np.arange(1.05, 2.41, 0.05), 2)
    rows = []
    for b in tqdm(bs, desc="nowak_may"):
        model = run(
            "nowak_may",
            [
                f"game.T={b}",
                "graph.rows=60",
                "graph.cols=60",
                "pairing.steps=150",
                "evolution.average_last=50",
            ],
        )
        rows.append({"b": b, "cooperators": late_share(model)})
    data = pd.DataFrame(rows)
    data.to_csv(OUT / "nowak_may.csv", index=False)
    line = (
        alt.Chart(data, title="Nowak & May: cooperators vs b (60 x 60, Moore, self)")
        .mark_line(point=True)
        .encode(
            x=alt.X("b:Q", scale=alt.Scale(zero=False)),
            y=alt.Y(
                "cooperators:Q",
                title="cooperator share, last 50 generations",
                scale=alt.Scale(domain=[0, 1]),
            ),
        )
    )
    rule = alt.Chart(pd.DataFrame({"y": [0.318]})).mark_rule(strokeDash=[4, 4]).encode(y="y:Q")
    save((line + rule).properties(width=480, height=260), "nowak_may")
    model = run("nowak_may", ["game.T=1.85", "pairing.steps=200"])
    step, grid = model.snapshots[-1]
    save(
        charts.lattice_chart(grid.reshape(model.grid_shape), model.labels, step),
        "nowak_may_lattice",
    )


def santos_pacheco() -> None:
    bs = np.round(np.arange(1.0, 2.01, 0.1), 2)
    # 5 independent graphs of 1,000 agents side by side: 5 replicates in one run
    graphs = {
        "scale-free (Barabasi-Albert, m = 2)": {
            "kind": "barabasi_albert",
            "n": 1000,
            "m": 2,
            "copies": 5,
        },
        "regular (random 4-regular)": {"kind": "random_regular", "n": 1000, "d": 4, "copies": 5},
    }
    rows = []
    for label, graph in graphs.items():
        for b in tqdm(bs, desc=label[:12]):
            model = run(
                "santos_pacheco",
                [f"game.T={b}", "pairing.steps=1500", "evolution.average_last=500"],
                graph,
            )
            rows.append({"graph": label, "b": b, "cooperators": late_share(model)})
    data = pd.DataFrame(rows)
    data.to_csv(OUT / "santos_pacheco.csv", index=False)
    chart = (
        alt.Chart(data, title="Santos & Pacheco: cooperators vs b, mean degree 4")
        .mark_line(point=True)
        .encode(
            x="b:Q",
            y=alt.Y(
                "cooperators:Q",
                scale=alt.Scale(domain=[0, 1]),
                title="cooperator share, last 500 generations",
            ),
            color=alt.Color("graph:N", legend=alt.Legend(orient="bottom")),
        )
    )
    save(chart.properties(width=480, height=260), "santos_pacheco")


def ohtsuki() -> None:
    k, n = 4, 50
    rows = []
    for b in tqdm([2, 3, 4, 5, 6, 7, 8], desc="ohtsuki"):
        model = run("ohtsuki_bc", [f"game.b={b}"])
        copies = model.scenario.graph.copies
        coop = (model.label_of_node.reshape(copies, n) == model.labels.index("all_c")).mean(axis=1)
        rows.append(
            {
                "b/c": b,
                "all cooperators": float((coop == 1).mean()),
                "all defectors": float((coop == 0).mean()),
                "cooperator share": float(coop.mean()),
            }
        )
    data = pd.DataFrame(rows)
    data.to_csv(OUT / "ohtsuki.csv", index=False)
    long = data.melt(id_vars="b/c", var_name="measure", value_name="share")
    lines = (
        alt.Chart(long, title="Ohtsuki et al.: death-birth on 4-regular graphs (N = 50)")
        .mark_line(point=True)
        .encode(
            x="b/c:Q",
            y=alt.Y(
                "share:Q",
                scale=alt.Scale(domain=[0, 1]),
                title="share of the 200 copies (or of agents)",
            ),
            color=alt.Color("measure:N", legend=alt.Legend(orient="bottom")),
        )
    )
    # b/c > k for large N; (N - 2) / (N / k - 2) for N agents
    marks = pd.DataFrame({"b/c": [k, (n - 2) / (n / k - 2)], "rule": ["k", "finite N"]})
    rules = alt.Chart(marks).mark_rule(strokeDash=[4, 4]).encode(x="b/c:Q")
    half = alt.Chart(pd.DataFrame({"y": [0.5]})).mark_rule(color="gray").encode(y="y:Q")
    save((lines + rules + half).properties(width=480, height=260), "ohtsuki")


STUDIES = {"nowak_may": nowak_may, "santos_pacheco": santos_pacheco, "ohtsuki": ohtsuki}

if __name__ == "__main__":
    OUT.mkdir(parents=True, exist_ok=True)
    for study in sys.argv[1:] or list(STUDIES):
        STUDIES[study]()
