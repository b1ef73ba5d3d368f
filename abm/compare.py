"""``python -m abm.compare RUN_OR_SWEEP ...``: several runs side by side, with tests.

Each argument is a run folder (from ``abm.run``) or a sweep folder (from
``abm.batch``: each point of the sweep is one condition, its replicates
pooled). For the LLM players of every condition the report shows cooperation
against each opponent with 95 % Wilson intervals, cooperation round by round,
memory-one fingerprints, for every pair of conditions a two-proportion z-test
of the difference in cooperation (overall and per opponent), and, when the
conditions are the points of a sweep of one number, cooperation against that
number. Writes ``report.html`` (self-contained) and the CSVs behind it.
"""

from __future__ import annotations

import argparse
import html
import itertools
import json
import math
import numbers
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import altair as alt
import pandas as pd

from abm.atomic import atomic_file
from abm.behaviour import fingerprint, round_by_round, run_decisions, wilson
from abm.behaviour_charts import cooperation_chart, fingerprint_chart, round_chart
from abm.errors import ScenarioError


@dataclass
class Condition:
    """One column of the comparison: a run, or one point of a sweep (its replicates)."""

    name: str
    folders: list[Path]
    llm: list[str] = field(default_factory=list)
    settings: dict = field(default_factory=dict)
    value: float | None = None  # a sweep's one numeric key at this point


def _run_condition(folder: Path) -> Condition:
    summary = _json(folder / "summary.json")
    players = [p for entry in summary.get("llm", []) for p in entry.get("players", [])]
    settings = {
        "scenario": summary.get("scenario"),
        "seeds": [summary.get("seed")],
        "models": sorted({e.get("model") for e in summary.get("llm", [])}),
    }
    return Condition(folder.name, [folder], players, settings)


def _sweep_conditions(folder: Path) -> list[Condition]:
    sweep = _json(folder / "sweep.json")
    results_path = folder / "results.parquet"
    try:
        results = pd.read_parquet(results_path)
    except Exception as exc:  # a missing or damaged file: say which
        raise ScenarioError(
            f"{results_path}: cannot be read as a sweep's results ({exc})"
        ) from None
    done = results[results["status"] == "ok"] if "status" in results else results
    keys = [k for k in sweep.get("keys", []) if k in done]
    out = []
    for point, rows in done.groupby("point", sort=True):
        values = ", ".join(f"{k}={rows[k].iloc[0]}" for k in keys) or f"point {point}"
        number = rows[keys[0]].iloc[0] if len(keys) == 1 else None
        number = (
            float(number)
            if isinstance(number, numbers.Real) and not isinstance(number, bool)
            else None
        )
        folders = [folder / "runs" / str(r) for r in rows["run_id"]]
        conditions = [_run_condition(f) for f in folders if (f / "summary.json").is_file()]
        if conditions:
            first = conditions[0]
            out.append(
                Condition(
                    values,
                    [c.folders[0] for c in conditions],
                    first.llm,
                    {**first.settings, "seeds": [c.settings["seeds"][0] for c in conditions]},
                    number,
                )
            )
    if not out:
        raise ScenarioError(f"{folder}: the sweep has no finished runs to compare")
    return out


def _json(path: Path) -> dict:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ScenarioError(
            f"{path.parent}: not a run folder (no summary.json) nor a sweep folder (no sweep.json)"
        ) from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScenarioError(f"{path}: cannot be read ({exc})") from None
    if not isinstance(data, dict):
        raise ScenarioError(f"{path}: expected a JSON object")
    return data


def conditions_of(paths: list[Path]) -> list[Condition]:
    """The conditions the command-line arguments stand for, in order.

    A run folder is one condition; a sweep folder gives one per point with finished
    runs. Conditions of the same name get their parent folder's name in front.

    Args:
        paths: Run folders and sweep folders.

    Returns:
        The conditions.

    Raises:
        ScenarioError: A path is not a folder, is neither a run nor a sweep folder, or
            has files that cannot be read, or a sweep has no finished runs.
    """
    out: list[Condition] = []
    for path in paths:
        if not path.is_dir():
            raise ScenarioError(f"{path}: no such folder")
        out += (
            _sweep_conditions(path) if (path / "sweep.json").is_file() else [_run_condition(path)]
        )
    names = [c.name for c in out]
    for c in out:  # two runs of the same name get their parent folder in front
        if names.count(c.name) > 1:
            c.name = f"{c.folders[0].parent.name}/{c.name}"
    return out


def _decisions(condition: Condition) -> pd.DataFrame:
    frames = []
    for i, folder in enumerate(condition.folders):
        path = folder / "rounds.parquet"
        if not path.is_file():
            raise ScenarioError(
                f"{folder}: has no rounds.parquet (run it with output.rounds = true)"
            )
        frame = run_decisions(folder)
        frame["replicate"] = i
        frames.append(frame)
    frame = pd.concat(frames, ignore_index=True)
    return frame[frame["player"].isin(condition.llm)].assign(condition=condition.name)


def cooperation_table(frame: pd.DataFrame) -> pd.DataFrame:
    """Cooperation per condition, player and opponent (and "all" opponents together).

    Args:
        frame: Decisions (rows of ``abm.behaviour.decisions``) with a ``condition``
            column.

    Returns:
        One row per condition, player and opponent: readable ``decisions``,
        ``cooperate`` (how many were C), ``share`` with its Wilson 95 % interval
        ``low`` and ``high``, and ``invalid`` (invalid answers and fallback moves).
    """
    rows = []
    for (cond, player), part in frame.groupby(["condition", "player"], sort=False):
        groups = [("all", part), *part.groupby("opponent_player", sort=False)]
        for opponent, g in groups:
            valid = g[g["choice"].isin(["C", "D"])]
            n, k = len(valid), int((valid["choice"] == "C").sum())
            low, high = wilson(k, n)
            rows.append(
                {
                    "condition": cond,
                    "player": player,
                    "opponent": str(opponent),
                    "decisions": n,
                    "cooperate": k,
                    "share": k / n if n else math.nan,
                    "low": low,
                    "high": high,
                    "invalid": int(g["choice"].isin(["invalid", "fallback"]).sum()),
                }
            )
    return pd.DataFrame(rows)


def two_proportion_test(k1: int, n1: int, k2: int, n2: int) -> tuple[float, float]:
    """Two-proportion z-test of H0: equal proportions, with the pooled standard error.

    Args:
        k1: Successes in the first sample.
        n1: Size of the first sample.
        k2: Successes in the second sample.
        n2: Size of the second sample.

    Returns:
        z and the two-sided p-value; (nan, nan) when a sample is empty, (0, 1) when
        both samples are all successes or all failures.
    """
    if min(n1, n2) == 0:
        return math.nan, math.nan
    pooled = (k1 + k2) / (n1 + n2)
    se = math.sqrt(pooled * (1 - pooled) * (1 / n1 + 1 / n2))
    if se == 0:
        return 0.0, 1.0
    z = (k1 / n1 - k2 / n2) / se
    return z, math.erfc(abs(z) / math.sqrt(2))


def differences(table: pd.DataFrame) -> pd.DataFrame:
    """Compare every pair of conditions, per player and opponent present in both.

    Args:
        table: The ``cooperation_table``.

    Returns:
        One row per pair and (player, opponent): the two shares and sample sizes,
        their difference (a minus b), and the test's ``z`` and ``p_value``.
    """
    rows = []
    names = list(dict.fromkeys(table["condition"]))
    for a, b in itertools.combinations(names, 2):
        left, right = table[table["condition"] == a], table[table["condition"] == b]
        merged = left.merge(right, on=["player", "opponent"], suffixes=("_a", "_b"))
        for r in merged.itertuples():
            z, p = two_proportion_test(r.cooperate_a, r.decisions_a, r.cooperate_b, r.decisions_b)
            rows.append(
                {
                    "a": a,
                    "b": b,
                    "player": r.player,
                    "opponent": r.opponent,
                    "share_a": r.share_a,
                    "n_a": r.decisions_a,
                    "share_b": r.share_b,
                    "n_b": r.decisions_b,
                    "difference": r.share_a - r.share_b,
                    "z": z,
                    "p_value": p,
                }
            )
    return pd.DataFrame(rows)


def _curve_chart(table: pd.DataFrame, key: str) -> alt.Chart:
    """Cooperation against the swept value, with 95 % Wilson intervals."""
    base = alt.Chart(table).encode(x=alt.X("value:Q", title=key))
    line = base.mark_line(point=True).encode(
        y=alt.Y("share:Q", scale=alt.Scale(domain=[0, 1]), title="share of C (95 % Wilson)"),
        color=alt.Color("player:N"),
        tooltip=["condition", "decisions", alt.Tooltip("share:Q", format=".2f")],
    )
    return (
        base.mark_errorbar().encode(y="low:Q", y2="high:Q", color="player:N") + line
    ).properties(width=360, height=220, title=f"The LLM's cooperation against {key}")


def report(conditions: list[Condition], out: Path) -> dict[str, Path]:
    """Write the CSVs and report.html into ``out`` (created if needed).

    Args:
        conditions: The conditions to compare, as ``conditions_of`` gives them.
        out: The report folder.

    Returns:
        The paths written, by name ("conditions", "cooperation", "differences",
        "fingerprints", "round_by_round", "report").

    Raises:
        ScenarioError: No condition has an LLM player, or a run lacks rounds.parquet.
    """
    frame = pd.concat([_decisions(c) for c in conditions], ignore_index=True)
    if frame.empty:
        raise ScenarioError("none of these runs has an LLM player to compare")
    coop = cooperation_table(frame)
    diffs = differences(coop)
    prints, rbr = [], []
    for (cond, player), part in frame.groupby(["condition", "player"], sort=False):
        fp = fingerprint(part).table.reset_index().assign(condition=cond, player=player)
        prints.append(fp)
        rbr.append(round_by_round(part, player).assign(condition=cond))
    prints_table = pd.concat(prints, ignore_index=True)
    rbr_table = pd.concat(rbr, ignore_index=True)
    settings = pd.DataFrame(
        [
            {
                "condition": c.name,
                "runs": len(c.folders),
                "llm_players": ", ".join(c.llm),
                **{k: json.dumps(v) for k, v in c.settings.items()},
            }
            for c in conditions
        ]
    )
    out.mkdir(parents=True, exist_ok=True)
    written = {}
    for name, table in (
        ("conditions", settings),
        ("cooperation", coop),
        ("differences", diffs),
        ("fingerprints", prints_table),
        ("round_by_round", rbr_table),
    ):
        with atomic_file(out / f"{name}.csv") as partial:
            table.to_csv(partial, index=False)
        written[name] = out / f"{name}.csv"
    labelled = rbr_table.assign(player=rbr_table["condition"] + ": " + rbr_table["player"])
    fp_chart = prints_table.assign(
        player=prints_table["condition"] + ": " + prints_table["player"]
    ).set_index("situation")
    charts = [cooperation_chart(coop), round_chart(labelled), fingerprint_chart(fp_chart)]
    if all(c.value is not None for c in conditions):  # one numeric key swept
        key = conditions[0].name.rsplit("=", 1)[0]  # a sweep point is named "key=value"
        value_of = {c.name: c.value for c in conditions}
        overall = coop[coop["opponent"] == "all"].assign(
            value=lambda t: t["condition"].map(value_of)
        )
        charts.insert(0, _curve_chart(overall, key))
    chart = alt.vconcat(*charts).resolve_scale(color="independent")
    page = chart.to_html(inline=True)
    tables = (
        "<h2>Conditions</h2>"
        + settings.to_html(index=False, escape=True)
        + "<h2>Differences in cooperation (two-proportion z-test)</h2><p>"
        + html.escape(
            "Decisions are pooled over matches and replicates and treated "
            "as independent; rounds of one match are not, so read p-values "
            "as a screen, not a proof."
        )
        + "</p>"
        + diffs.to_html(index=False, float_format=lambda v: f"{v:.4g}")
    )
    page = page.replace("</body>", f"<div style='font-family:sans-serif'>{tables}</div></body>")
    with atomic_file(out / "report.html") as partial:
        partial.write_text(page, encoding="utf-8")
    written["report"] = out / "report.html"
    return written


def main(argv: list[str] | None = None) -> int:
    """Command-line entry point; returns the exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m abm.compare", description=__doc__.split("\n\n")[0].split(": ", 1)[-1]
    )
    parser.add_argument("runs", nargs="+", type=Path, help="run folders or sweep folders")
    parser.add_argument(
        "--out", type=Path, help="report folder (default: outputs/compare-<timestamp>)"
    )
    args = parser.parse_args(argv)
    out = args.out or Path("outputs") / f"compare-{time.strftime('%Y%m%d-%H%M%S')}"
    try:
        conditions = conditions_of(args.runs)
        if len(conditions) < 2:
            raise ScenarioError("give at least two runs, or a sweep with two points, to compare")
        written = report(conditions, out)
    except ScenarioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    print(f"{len(conditions)} conditions compared; report: {written['report']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
