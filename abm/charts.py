"""Altair charts of a run: the two heatmaps of the experiment and cooperation over steps."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

# Past this many players a grid of numbers is unreadable; the colours still tell.
_MAX_ANNOTATED = 25


def heatmap(matrix: pd.DataFrame, title: str, value: str, fmt: str = ".2~f") -> alt.Chart:
    """Row player vs column opponent, colour and printed value per cell."""
    labels = list(matrix.index)
    data = matrix.reset_index().melt(id_vars="player", var_name="opponent", value_name=value)
    data = data.dropna()
    lo, hi = float(data[value].min()), float(data[value].max())
    size = max(24, min(60, 600 // max(1, len(labels))))
    base = alt.Chart(data, title=title).encode(
        x=alt.X("opponent:N", sort=labels, title="opponent", axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("player:N", sort=labels, title="player"),
    )
    cells = base.mark_rect().encode(
        color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="viridis", domain=[lo, hi])),
        tooltip=["player", "opponent", alt.Tooltip(f"{value}:Q", format=fmt)],
    )
    chart = cells
    if len(labels) <= _MAX_ANNOTATED:
        middle = (lo + hi) / 2
        text = base.mark_text(fontSize=12).encode(
            text=alt.Text(f"{value}:Q", format=fmt),
            color=alt.condition(alt.datum[value] > middle, alt.value("black"), alt.value("white")),
        )
        chart = cells + text
    return chart.properties(width=size * len(labels), height=size * len(labels))


def cooperation_chart(steps: pd.DataFrame) -> alt.Chart:
    """Share of C actions per step."""
    return alt.Chart(steps, title="Cooperation rate per step").mark_line(point=True).encode(
        x=alt.X("step:Q", title="step", axis=alt.Axis(tickMinStep=1)),
        y=alt.Y("cooperation_rate:Q", title="share of actions that were C",
                scale=alt.Scale(domain=[0, 1])),
        tooltip=["step", alt.Tooltip("cooperation_rate:Q", format=".3f")],
    ).properties(width=480, height=240)


def shares_chart(steps: pd.DataFrame, labels: list[str]) -> alt.Chart:
    """Share of the agents holding each policy, per step."""
    data = steps.melt(id_vars="step", value_vars=[f"share:{label}" for label in labels],
                      var_name="policy", value_name="share")
    data["policy"] = data["policy"].str.removeprefix("share:")
    return alt.Chart(data, title="Policy shares per step").mark_line().encode(
        x=alt.X("step:Q", title="step"),
        y=alt.Y("share:Q", title="share of agents", scale=alt.Scale(domain=[0, 1])),
        color=alt.Color("policy:N", sort=labels),
        tooltip=["step", "policy", alt.Tooltip("share:Q", format=".3f")],
    ).properties(width=480, height=240)


def lattice_chart(grid: np.ndarray, labels: list[str], step: int) -> alt.Chart:
    """Who holds which policy on a lattice, one square per agent."""
    rows, cols = grid.shape
    r, c = np.divmod(np.arange(rows * cols), cols)
    data = pd.DataFrame({"row": r, "col": c, "policy": np.array(labels)[grid.ravel()]})
    size = max(2, min(20, 600 // max(rows, cols)))
    return alt.Chart(data, title=f"Policies on the lattice after step {step}").mark_rect().encode(
        x=alt.X("col:O", axis=None), y=alt.Y("row:O", axis=None),
        color=alt.Color("policy:N", sort=labels),
    ).properties(width=size * cols, height=size * rows)


def save(chart: alt.Chart, folder: Path, stem: str) -> list[str]:
    """Write ``stem.html`` (self-contained, works offline) and ``stem.png``."""
    chart.save(str(folder / f"{stem}.html"), inline=True)
    chart.save(str(folder / f"{stem}.png"), scale_factor=2)
    return [f"{stem}.html", f"{stem}.png"]
