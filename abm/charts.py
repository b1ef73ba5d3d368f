"""Altair charts of a run: the two heatmaps of the experiment and cooperation over steps."""

from __future__ import annotations

from pathlib import Path

import altair as alt
import numpy as np
import pandas as pd

# Past this many players a grid of numbers is unreadable; the colours still tell.
_MAX_ANNOTATED = 25


def heatmap(
    matrix: pd.DataFrame,
    title: str,
    value: str,
    fmt: str = ".2~f",
    unread: pd.DataFrame | None = None,
    subtitle: list[str] | None = None,
    half: pd.DataFrame | None = None,
) -> alt.Chart:
    """A heatmap of row player vs column opponent, a colour and a printed value per cell.

    Values are printed in the cells only up to 25 players; beyond that the colours
    alone tell.

    Args:
        matrix: The values, indexed by player (index name ``player``), one column per
            opponent; NaN cells are left out unless ``unread`` has a value there.
        title: The chart's title.
        value: The name of the measured quantity, used as the colour field.
        fmt: A d3 number format for cells and tooltips (``~`` trims trailing zeros).
        unread: Share of the row player's decisions in each cell that no model answer
            decided, same layout. It marks cells: an orange frame and a "*" where it
            is above 0, and a grey "no data" cell where every match was stopped by
            an unreadable answer, so a measurement never passes for what the model
            chose.
        subtitle: Lines under the title (what was measured: match length, noise,
            matches per cell, models).
        half: Half-widths of 95 % intervals, same layout; cells then read
            "mean ± half", for means over replicates.

    Returns:
        The layered chart.
    """
    labels = list(matrix.index)
    data = matrix.reset_index().melt(id_vars="player", var_name="opponent", value_name=value)
    if unread is not None:
        flags = unread.reset_index().melt(
            id_vars="player", var_name="opponent", value_name="unread"
        )
        data = data.merge(flags, on=["player", "opponent"], how="left")
        # a cell with decisions but no complete match shows as "no data", not blank
        data = data[data[value].notna() | data["unread"].notna()]
        data["unread"] = data["unread"].fillna(0.0)
    else:
        data = data.dropna()
        data["unread"] = 0.0
    data["marked"] = data["unread"] > 0
    data["text"] = [
        "no data" if pd.isna(v) else _number(v, fmt) + ("*" if m else "")
        for v, m in zip(data[value], data["marked"], strict=True)
    ]
    if half is not None:
        widths = half.reset_index().melt(id_vars="player", var_name="opponent", value_name="half")
        data = data.merge(widths, on=["player", "opponent"], how="left")
        data["text"] = [
            t if pd.isna(h) or pd.isna(v) else f"{t}\u00b1{_number(h, fmt)}"
            for t, h, v in zip(data["text"], data["half"], data[value], strict=True)
        ]
    known = data[value].dropna()
    lo, hi = (float(known.min()), float(known.max())) if len(known) else (0.0, 1.0)
    size = max(24, min(60, 600 // max(1, len(labels))))
    base = alt.Chart(data).encode(
        x=alt.X("opponent:N", sort=labels, title="opponent", axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("player:N", sort=labels, title="player"),
    )
    tooltip = [
        "player",
        "opponent",
        alt.Tooltip(f"{value}:Q", format=fmt),
        alt.Tooltip("unread:Q", title="share not read from the model", format=".0%"),
    ]
    valid = f"isValid(datum['{value}'])"
    cells = (
        base.transform_filter(valid)
        .mark_rect()
        .encode(
            color=alt.Color(f"{value}:Q", scale=alt.Scale(scheme="viridis", domain=[lo, hi])),
            tooltip=tooltip,
        )
    )
    # Vega-Lite drops marks whose colour field is null, so cells without a value
    # get a layer of their own
    missing = base.transform_filter(f"!{valid}").mark_rect(color="#bbbbbb").encode(tooltip=tooltip)
    layers = [cells, missing]
    if data["marked"].any():
        layers.append(
            base.transform_filter("datum.marked")
            .mark_rect(fill=None, stroke="#ff7f0e", strokeWidth=3)
            .encode(tooltip=tooltip)
        )
    if len(labels) <= _MAX_ANNOTATED:
        middle = (lo + hi) / 2
        layers.append(
            base.mark_text(fontSize=12 if len(labels) <= 12 else 9).encode(
                text="text:N",
                color=alt.condition(
                    f"!{valid} || datum['{value}'] > {middle}",
                    alt.value("black"),
                    alt.value("white"),
                ),
            )
        )
    subtitle = list(subtitle or []) + (
        []
        if not data["marked"].any()
        else [
            "* and orange frame: some of the row player's decisions were not read from "
            "the model (invalid answers or the fallback rule); grey: no complete match"
        ]
    )
    chart = alt.layer(*layers).properties(
        title=alt.TitleParams(title, subtitle=subtitle) if subtitle else title
    )
    return chart.properties(
        width=int(size * len(labels) * (2 if half is not None else 1)), height=size * len(labels)
    )


def _number(v: float, fmt: str) -> str:
    """Python's rendering of a d3 format such as ".2~f" (``~``: trim trailing zeros)."""
    if "~" not in fmt:
        return format(v, fmt)
    text = format(v, fmt.replace("~", ""))
    return text.rstrip("0").rstrip(".") if "." in text else text


def cooperation_chart(steps: pd.DataFrame, by_round: pd.DataFrame | None = None) -> alt.Chart:
    """Share of C actions per step, or per round when the run has one step.

    Args:
        steps: One row per step, with columns ``step`` and ``cooperation_rate``.
        by_round: Columns ``round`` and ``cooperation_rate`` for a run of one step;
            when given and not empty it is drawn instead, since one step would be a
            single dot.

    Returns:
        The line chart.
    """
    if by_round is not None and len(by_round):
        title = alt.TitleParams(
            "Cooperation rate per round (one step)",
            subtitle=["share of the actual actions of each round that were C, over all matches"],
        )
        return _rate_line(by_round, "round", title)
    return _rate_line(steps, "step", "Cooperation rate per step")


def _rate_line(data: pd.DataFrame, x: str, title: str | alt.TitleParams) -> alt.Chart:
    """``cooperation_rate`` against ``x`` (step or round), on a 0..1 axis."""
    return (
        alt.Chart(data, title=title)
        .mark_line(point=True)
        .encode(
            x=alt.X(f"{x}:Q", title=x, axis=alt.Axis(tickMinStep=1)),
            y=alt.Y(
                "cooperation_rate:Q",
                title="share of actions that were C",
                scale=alt.Scale(domain=[0, 1]),
            ),
            tooltip=[x, alt.Tooltip("cooperation_rate:Q", format=".3f")],
        )
        .properties(width=480, height=240)
    )


def shares_chart(steps: pd.DataFrame, labels: list[str]) -> alt.Chart:
    """Share of the agents holding each policy, per step."""
    data = steps.melt(
        id_vars="step",
        value_vars=[f"share:{label}" for label in labels],
        var_name="policy",
        value_name="share",
    )
    data["policy"] = data["policy"].str.removeprefix("share:")
    return (
        alt.Chart(data, title="Policy shares per step")
        .mark_line()
        .encode(
            x=alt.X("step:Q", title="step"),
            y=alt.Y("share:Q", title="share of agents", scale=alt.Scale(domain=[0, 1])),
            color=alt.Color("policy:N", sort=labels),
            tooltip=["step", "policy", alt.Tooltip("share:Q", format=".3f")],
        )
        .properties(width=480, height=240)
    )


def lattice_chart(grid: np.ndarray, labels: list[str], step: int) -> alt.Chart:
    """Who holds which policy on a lattice, one square per agent."""
    rows, cols = grid.shape
    r, c = np.divmod(np.arange(rows * cols), cols)
    data = pd.DataFrame({"row": r, "col": c, "policy": np.array(labels)[grid.ravel()]})
    size = max(2, min(20, 600 // max(rows, cols)))
    return (
        alt.Chart(data, title=f"Policies on the lattice after step {step}")
        .mark_rect()
        .encode(
            x=alt.X("col:O", axis=None),
            y=alt.Y("row:O", axis=None),
            color=alt.Color("policy:N", sort=labels),
        )
        .properties(width=size * cols, height=size * rows)
    )


def save(chart: alt.Chart, folder: Path, stem: str) -> list[str]:
    """Write ``stem.html`` (self-contained, works offline) and ``stem.png`` into ``folder``.

    Returns:
        The two file names written.
    """
    chart.save(str(folder / f"{stem}.html"), inline=True)
    chart.save(str(folder / f"{stem}.png"), scale_factor=2)
    return [f"{stem}.html", f"{stem}.png"]
