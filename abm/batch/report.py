"""A sweep's report: aggregate.csv (mean, std, 95 % CI per parameter point) and charts.

aggregate.csv holds the t-interval as computed, which for a rate or share of few
replicates can reach below 0 or above 1; the charts clip such intervals to [0, 1] and
say so in their titles.
"""

from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Any

import altair as alt
import pandas as pd

from abm.atomic import atomic_file
from abm.batch.stats import mean_ci
from abm.batch.storage import (
    BOOKKEEPING,
    RESULTS,
    SWEEP_JSON,
    _reason,
    read_results,
    read_sweep_json,
)
from abm.errors import ScenarioError

AGGREGATE = "aggregate.csv"
CHARTS = "charts"
_MAX_SERIES = 12  # past this many lines a chart is unreadable; the table still has them


def metric_columns(results: pd.DataFrame, keys: list[str]) -> list[str]:
    """Numeric columns that measure a run (not its parameters or bookkeeping)."""
    skip = set(BOOKKEEPING) | set(keys)
    return [
        c
        for c in results.columns
        if c not in skip
        and pd.api.types.is_numeric_dtype(results[c])
        and not pd.api.types.is_bool_dtype(results[c])
    ]


def aggregate(
    results: pd.DataFrame, keys: list[str], metrics: list[str] | None = None
) -> pd.DataFrame:
    """Summarise the successful runs per parameter point and metric.

    Args:
        results: The results table (results.parquet).
        keys: The swept parameter columns.
        metrics: The metric columns to summarise; default every ``metric_columns``.

    Returns:
        One row per point and metric: the point, its parameter values, ``metric``,
        ``n`` (runs with a value), ``mean``, ``std`` (sample, n - 1), ``sem`` and the
        95 % t-interval of the mean (``ci95_low``, ``ci95_high``).
    """
    ok = results[results["status"] == "ok"]
    metrics = metrics or metric_columns(results, keys)
    rows: list[dict[str, Any]] = []
    for point, group in ok.groupby("point", sort=True):
        params = {key: group[key].iloc[0] for key in keys}
        for metric in metrics:
            stats = mean_ci(group[metric].tolist())
            rows.append(
                {
                    "point": int(point),
                    **params,
                    "metric": metric,
                    "n": stats["n"],
                    "mean": stats["mean"],
                    "std": stats["std"],
                    "sem": stats["sem"],
                    "ci95_low": stats["ci_low"],
                    "ci95_high": stats["ci_high"],
                }
            )
    columns = ["point", *keys, "metric", "n", "mean", "std", "sem", "ci95_low", "ci95_high"]
    return pd.DataFrame(rows, columns=columns)


def write_report(out: str | Path, charts: bool = True) -> list[Path]:
    """Write ``aggregate.csv`` and the charts of the sweep in ``out``.

    Each metric that sweep.json names gets a chart against each swept key, and a
    heatmap when two keys are crossed in a grid.

    Args:
        out: The sweep folder.
        charts: Also write the charts (into ``charts/``).

    Returns:
        The files written.

    Raises:
        ScenarioError: ``out`` is not a sweep folder, its sweep.json or results.parquet
            cannot be read, or the report cannot be written there.
    """
    out = Path(out)
    meta_file, results_file = out / SWEEP_JSON, out / RESULTS
    if not meta_file.is_file() or not results_file.is_file():
        raise ScenarioError(
            f"{out}: not a sweep output folder ({SWEEP_JSON} and {RESULTS} "
            "are written by python -m abm.batch SWEEP_FILE)"
        )
    meta = read_sweep_json(meta_file, str(out))
    keys: list[str] = meta.get("keys", [])
    results = read_results(results_file, str(out))
    keys = [k for k in keys if k in results.columns]
    table = aggregate(results, keys)
    try:
        return _write(out, meta, keys, table, charts)
    except OSError as exc:
        raise ScenarioError(
            f"{out}: cannot write the report there ({_reason(exc)}); "
            f"{RESULTS} and the run folders are untouched; make the folder "
            "writable, or copy it and run python -m abm.batch report on the "
            "copy"
        ) from None


def _write(
    out: Path, meta: dict[str, Any], keys: list[str], table: pd.DataFrame, charts: bool
) -> list[Path]:
    written = [out / AGGREGATE]
    with atomic_file(out / AGGREGATE) as tmp:
        table.to_csv(tmp, index=False)
    if charts and len(table):
        folder = out / CHARTS
        folder.mkdir(exist_ok=True)
        crossed = _crossed_pairs(meta, keys)
        known = set(table["metric"])
        for metric in meta.get("metrics", []):
            if metric not in known:
                print(
                    f"note: report metric {metric!r} is not a column of {RESULTS}; known: "
                    f"{', '.join(sorted(known))}",
                    file=sys.stderr,
                )
                continue
            data = table[table["metric"] == metric]
            if data.empty or data["mean"].isna().all():
                continue
            for key in keys:
                written += _save(
                    _line_chart(data, metric, key, [k for k in keys if k != key]),
                    folder,
                    f"{_safe(metric)}_vs_{_safe(key)}",
                )
            if len(keys) == 2 and crossed:
                written += _save(
                    _heatmap(data, metric, keys[0], keys[1]), folder, f"{_safe(metric)}_heatmap"
                )
    return written


def _crossed_pairs(meta: dict[str, Any], keys: list[str]) -> bool:
    """The two swept keys vary independently (a grid), not together (zipped)."""
    axes = [axis for axis in meta.get("axes", []) if any(k in keys for k in axis)]
    return len(axes) == 2


def _is_number(series: pd.Series) -> bool:
    return pd.api.types.is_numeric_dtype(series) and not pd.api.types.is_bool_dtype(series)


def is_share(metric: str) -> bool:
    """Whether a metric is a rate or share, between 0 and 1 by construction.

    Such metrics (cooperation_rate, final_cooperation_rate, llm_invalid_rate,
    cooperation[...], final_share[...], mean_share[...]) get their 95 % interval
    clipped to [0, 1] in the charts.
    """
    return metric.endswith("_rate") or metric.startswith(
        ("cooperation[", "final_share[", "mean_share[")
    )


def _line_chart(data: pd.DataFrame, metric: str, key: str, others: list[str]) -> alt.Chart:
    """Mean and 95 % CI of ``metric`` against ``key``, one colour per value of the other keys.

    Over a numeric key it draws a line; over a categorical one, points with error bars
    side by side (its values have no order a line could join). The t-interval of a
    rate or share is clipped to [0, 1] here (aggregate.csv keeps it as computed).
    """
    share = is_share(metric)
    low, high = data["ci95_low"], data["ci95_high"]
    if share:  # a t-interval of few replicates can reach past what a share can be
        low, high = low.clip(0.0, 1.0), high.clip(0.0, 1.0)
    numeric = _is_number(data[key])
    frame = pd.DataFrame(
        {
            "x": data[key].to_numpy() if numeric else data[key].astype(str).to_numpy(),
            "mean": data["mean"].to_numpy(),
            "low": low.to_numpy(),
            "high": high.to_numpy(),
            "n": data["n"].to_numpy(),
            "series": (
                data[others]
                .astype(str)
                .apply(
                    lambda r: ", ".join(f"{k}={v}" for k, v in zip(others, r, strict=True)), axis=1
                )
                .to_numpy()
                if others
                else "all"
            ),
        }
    )
    order = list(dict.fromkeys(frame["x"])) if not numeric else None
    x = alt.X(
        "x:Q" if numeric else "x:N",
        title=key,
        sort=order,
        scale=alt.Scale(zero=False) if numeric else alt.Undefined,
        axis=(
            alt.Undefined
            if numeric
            else alt.Axis(labelAngle=0 if max(map(len, order)) <= 12 else -40, labelLimit=0)
        ),
    )
    series_order = list(dict.fromkeys(frame["series"]))[:_MAX_SERIES]
    frame = frame[frame["series"].isin(series_order)]
    # labelLimit/titleLimit 0: no limit, so "population.players[2].framing=police" is
    # shown whole instead of cut at Vega's default 160 pixels
    color = (
        alt.Color(
            "series:N",
            title=", ".join(others),
            sort=series_order,
            legend=alt.Legend(labelLimit=0, titleLimit=0),
        )
        if others
        else alt.value("#4c78a8")
    )
    ci = "95% CI clipped to [0, 1]" if share else "95% CI"
    base = alt.Chart(
        frame, title=alt.TitleParams(f"{metric} vs {key} (mean and {ci} over replicates)", limit=0)
    )
    y = alt.Y("mean:Q", title=metric, scale=alt.Scale(zero=False))
    tooltip = [
        alt.Tooltip("x", title=key),
        "series",
        alt.Tooltip("mean:Q", format=".4f"),
        alt.Tooltip("low:Q", format=".4f"),
        alt.Tooltip("high:Q", format=".4f"),
        "n",
    ]
    if numeric:
        marks = base.mark_line(point=True).encode(x=x, y=y, color=color, tooltip=tooltip)
        bars = base.mark_rule().encode(x=x, y="low:Q", y2="high:Q", color=color)
    else:
        dodge = {"xOffset": alt.XOffset("series:N", sort=series_order)} if others else {}
        marks = base.mark_point(filled=True, size=60, opacity=1).encode(
            x=x, y=y, color=color, tooltip=tooltip, **dodge
        )
        bars = base.mark_rule(strokeWidth=2).encode(
            x=x, y="low:Q", y2="high:Q", color=color, **dodge
        )
    return (bars + marks).properties(width=420, height=260)


def _heatmap(data: pd.DataFrame, metric: str, xkey: str, ykey: str) -> alt.Chart:
    frame = pd.DataFrame(
        {
            "x": data[xkey].astype(str).to_numpy(),
            "y": data[ykey].astype(str).to_numpy(),
            "mean": data["mean"].to_numpy(),
        }
    )
    xs, ys = list(dict.fromkeys(frame["x"])), list(dict.fromkeys(frame["y"]))
    lo, hi = float(frame["mean"].min()), float(frame["mean"].max())
    base = alt.Chart(frame, title=f"{metric}: mean over replicates").encode(
        x=alt.X("x:N", sort=xs, title=xkey, axis=alt.Axis(labelAngle=-40)),
        y=alt.Y("y:N", sort=ys, title=ykey),
    )
    cells = base.mark_rect().encode(
        color=alt.Color(
            "mean:Q",
            title=metric,
            scale=alt.Scale(scheme="viridis", domain=[lo, hi] if hi > lo else [lo - 1, hi + 1]),
        ),
        tooltip=[
            alt.Tooltip("x", title=xkey),
            alt.Tooltip("y", title=ykey),
            alt.Tooltip("mean:Q", format=".4f"),
        ],
    )
    chart = cells
    if len(xs) * len(ys) <= 400:
        middle = (lo + hi) / 2
        chart = cells + base.mark_text(fontSize=11).encode(
            text=alt.Text("mean:Q", format=".3~f"),
            color=alt.condition(alt.datum["mean"] > middle, alt.value("black"), alt.value("white")),
        )
    size = max(24, min(60, 600 // max(len(xs), len(ys), 1)))
    return chart.properties(width=size * len(xs), height=size * len(ys))


def _save(chart: alt.Chart, folder: Path, stem: str) -> list[Path]:
    from abm import charts

    return [folder / name for name in charts.save(chart, folder, stem)]


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "_", name).strip("_") or "metric"
