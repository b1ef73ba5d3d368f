"""Charts of what LLM players did: cooperation by round and opponent, and fingerprints."""

from __future__ import annotations

import altair as alt
import pandas as pd

from abm.behaviour import CONDITIONS


def round_chart(table: pd.DataFrame) -> alt.Chart:
    """Cooperation by opponent and round, one panel per player.

    Rows are opponents, columns rounds, the colour the share of C among readable
    decisions; a cell holding a single decision shows the move itself (X: an answer
    that could not be read or that the fallback rule played), others the share.

    Args:
        table: Rows of ``abm.behaviour.round_by_round`` for one or more players.

    Returns:
        The faceted chart.
    """
    data = table.copy()
    data["text"] = [
        ("X" if inv else ("C" if coop else "D"))
        if n == 1
        else ("no data" if pd.isna(p) else f"{p:.2f}")
        for n, coop, inv, p in zip(
            data["decisions"], data["cooperate"], data["invalid"], data["p_cooperate"], strict=True
        )
    ]
    opponents = list(dict.fromkeys(data["opponent"]))
    base = alt.Chart(data).encode(
        x=alt.X("round:O", title="round"),
        y=alt.Y("opponent:N", sort=opponents, title="opponent"),
    )
    tooltip = [
        "player",
        "opponent",
        "round",
        "decisions",
        "cooperate",
        "invalid",
        alt.Tooltip("p_cooperate:Q", format=".2f", title="share C"),
        alt.Tooltip("p_model:Q", format=".2f", title="model P(C)"),
    ]
    cells = base.mark_rect().encode(
        color=alt.Color(
            "p_cooperate:Q", title="share C", scale=alt.Scale(domain=[0, 1], scheme="redblue")
        ),
        tooltip=tooltip,
    )
    text = base.mark_text(fontSize=12).encode(text="text:N")
    return (
        alt.layer(cells, text)
        .properties(width=max(160, 48 * int(data["round"].max())), height=28 * len(opponents))
        .facet(row=alt.Row("player:N", title=None))
        .properties(
            title=alt.TitleParams(
                "What the LLM chose, round by round",
                subtitle=[
                    "C/D: its move in the one match against that "
                    "opponent; a number: the share of C over matches; "
                    "X: an answer that could not be read"
                ],
            )
        )
    )


def fingerprint_chart(table: pd.DataFrame) -> alt.Chart:
    """P(C) in the first round and after each last-round outcome, one panel per player.

    Bars carry 95 % Wilson intervals; diamonds mark the model's own mean probability
    (score mode).

    Args:
        table: Fingerprint tables (``abm.behaviour.Fingerprint.table``) stacked with a
            ``player`` column, indexed by situation.

    Returns:
        The faceted chart.
    """
    data = table.reset_index()
    base = alt.Chart(data).encode(
        x=alt.X(
            "situation:N",
            sort=list(CONDITIONS),
            title="situation (first round, or last round: mine then theirs)",
        )
    )
    bars = base.mark_bar(opacity=0.7).encode(
        y=alt.Y("p:Q", scale=alt.Scale(domain=[0, 1]), title="P(cooperate)"),
        tooltip=[
            "player",
            "situation",
            "n",
            "cooperate",
            alt.Tooltip("p:Q", format=".2f"),
            alt.Tooltip("low:Q", format=".2f"),
            alt.Tooltip("high:Q", format=".2f"),
        ],
    )
    errors = base.mark_rule().encode(y="low:Q", y2="high:Q")
    model = base.mark_point(shape="diamond", filled=True, color="black").encode(y="p_model:Q")
    return (
        alt.layer(bars, errors, model)
        .properties(width=220, height=180)
        .facet(column=alt.Column("player:N", title=None))
        .properties(
            title=alt.TitleParams(
                "Memory-one fingerprint",
                subtitle=[
                    "bars: share of C with 95 % Wilson intervals; diamonds: the model's mean P(C)"
                ],
            )
        )
    )


def cooperation_chart(
    table: pd.DataFrame,
    group: str = "condition",
    share: str = "share",
    low: str = "low",
    high: str = "high",
    interval: str = "95 % Wilson",
) -> alt.Chart:
    """The LLM's share of C against each opponent, a point and its interval per group.

    Intervals are drawn clipped to [0, 1].

    Args:
        table: One row per opponent and group, with an ``opponent`` column.
        group: The column that tells the compared series apart (conditions, or
            players).
        share: The column of shares of C.
        low: The column of interval lower bounds.
        high: The column of interval upper bounds.
        interval: What the interval is, for the axis title.

    Returns:
        The layered chart.
    """
    data = table.assign(**{low: table[low].clip(0, 1), high: table[high].clip(0, 1)})
    base = alt.Chart(data).encode(
        y=alt.Y("opponent:N", title="opponent"),
        color=alt.Color(
            f"{group}:N", legend=alt.Legend(labelLimit=400, orient="bottom", columns=1)
        ),
        yOffset=f"{group}:N",
    )
    points = base.mark_point(filled=True, size=60).encode(
        x=alt.X(f"{share}:Q", scale=alt.Scale(domain=[0, 1]), title=f"share of C ({interval})"),
        tooltip=[group, "opponent", alt.Tooltip(f"{share}:Q", format=".2f")],
    )
    return (base.mark_rule().encode(x=f"{low}:Q", x2=f"{high}:Q") + points).properties(
        width=360, title="Cooperation of the LLM against each opponent"
    )
