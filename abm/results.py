"""What a finished run writes into its folder (``write_results``).

The resolved config, the payoff and defection matrices, steps.csv, agents.csv,
summary.json, the charts and, with LLM players, invalid_answers.csv and the LLM
behaviour files.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from abm import __version__, charts
from abm.game import EMPTY
from abm.model import DilemmaModel


def _clean(value: Any) -> Any:
    """JSON has no NaN: write null instead."""
    if isinstance(value, float) and not np.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


def _evolution_summary(model: DilemmaModel, steps: pd.DataFrame) -> dict[str, Any]:
    """Final shares (after the last update) and shares averaged over the last N steps."""
    last = model.scenario.evolution.average_last
    window = steps.tail(last)
    population = model.population
    return {
        "rule": model.scenario.evolution.rule,
        "average_last": last,
        "final_shares": dict(zip(population.labels, map(float, population.shares()), strict=True)),
        "mean_shares": {
            label: float(window[f"share:{label}"].mean()) for label in population.labels
        },
    }


def _write_snapshots(model: DilemmaModel, folder: Path) -> None:
    """Who held which label on the lattice at each snapshot: steps (S,), grid (S, rows, cols)."""
    steps = np.array([s for s, _ in model.snapshots], np.int64)
    grid = np.stack([g.reshape(model.grid_shape) for _, g in model.snapshots]).astype(np.int32)
    np.savez_compressed(
        folder / "snapshots.npz", steps=steps, grid=grid, labels=np.array(model.population.labels)
    )


def _llm_summary(model: DilemmaModel, policy: Any, counts: pd.DataFrame) -> dict[str, Any]:
    """A policy's own statistics plus its invalid rate against each opponent."""
    population = model.population
    index = population.policies.index(policy)
    labels = [
        label
        for label, p in zip(population.labels, population.policy_of_label, strict=True)
        if p == index
    ]
    rows = counts[counts["player"].isin(labels)]
    by_opponent = {
        opponent: {
            "decisions": int(g["decisions"].sum()),
            "invalid": int(g["invalid"].sum()),
            "fallbacks": int(g["fallbacks"].sum()),
            "invalid_rate": float(g["invalid"].sum() / g["decisions"].sum()),
            "void_matches": int(g["void_matches"].sum()),
        }
        for opponent, g in rows.groupby("opponent", sort=False)
    }
    return {"players": labels, **policy.stats(), "by_opponent": by_opponent}


def _degrees(edges: np.ndarray, n_nodes: int) -> tuple[np.ndarray, np.ndarray]:
    """Per node: the number of distinct other neighbours, and whether it has a self-loop.

    A self-loop (self-play) is not counted in the degree.
    """
    loop = edges[:, 0] == edges[:, 1]
    pairs = np.sort(edges[~loop], axis=1)
    # one integer per node pair: a 1-D unique is much faster than unique rows
    key = np.unique(pairs[:, 0] * n_nodes + pairs[:, 1])
    degree = np.bincount(np.concatenate([key // n_nodes, key % n_nodes]), minlength=n_nodes)
    self_loop = np.zeros(n_nodes, bool)
    self_loop[edges[loop, 0]] = True
    return degree, self_loop


def _heatmap_subtitle(model: DilemmaModel) -> str:
    """Under what the heatmaps were measured: match length, noise, n per cell, models."""
    scenario = model.scenario
    match = scenario.match
    length = (
        f"{match.rounds} rounds per match"
        if match.rounds is not None
        else f"geometric match length, continuation p = {match.continuation_probability:g}"
    )
    k = len(model.population.labels)
    # complete matches behind each cell; on the diagonal both sides of a match fall
    # in the same cell, so they are counted once
    n = model.tally.pair_matches.reshape(k, k).astype(float)
    n[np.diag_indices(k)] /= 2
    n = [int(x) for x in np.ceil(n[n > 0])]
    lo, hi = (min(n), max(n)) if n else (0, 0)
    cells = (
        "no complete match"
        if not n
        else f"{lo} match{'es' * (lo != 1)} per cell"
        if lo == hi
        else f"{lo}-{hi} matches per cell"
    )
    parts = [length, f"noise {scenario.game.noise:g}", cells]
    models = list(
        dict.fromkeys(
            str(getattr(getattr(p, "params", None), "model", "?"))
            for p in model.population.llm_policies
        )
    )
    if models:
        parts.append("LLM: " + ", ".join(models))
    return "; ".join(parts)


def _cooperation_by_round(result: Any) -> pd.DataFrame | None:
    """Share of C among the actual actions of each round of one step."""
    if result is None or result.actual.size == 0:
        return None
    actual = result.actual
    played = (actual != EMPTY).sum(axis=1)
    coop = (actual == 0).sum(axis=1)
    keep = played > 0
    return pd.DataFrame(
        {
            "round": np.arange(1, len(actual) + 1)[keep],
            "cooperation_rate": coop[keep] / played[keep],
        }
    )


def _llm_behaviour(
    model: DilemmaModel, folder: Path, summary: dict[str, Any]
) -> tuple[pd.DataFrame, pd.DataFrame] | None:
    """Round-by-round tables and memory-one fingerprints of the LLM players.

    They are read from the run's own rounds.parquet and transcripts, and written as
    llm_rounds.csv, llm_fingerprints.csv and a ``behaviour`` block per LLM entry of
    the summary. Returns the two tables; None without rounds.parquet or LLM decisions.
    """
    from abm import behaviour as bh
    from abm.policies.rules import default_generosity

    path = folder / "rounds.parquet"
    if not path.is_file():
        for entry in summary["llm"]:
            entry["behaviour"] = "not computed: output.rounds = false"
        return None
    frame = bh.run_decisions(folder)
    g = default_generosity(model.scenario.game.payoffs)
    # not a dilemma: Nowak & Sigmund's usual 1/3
    strategies = bh.classic_strategies(1 / 3 if g is None else g)
    tables, prints = [], []
    for entry in summary["llm"]:
        entry["behaviour"] = {}
        for player in entry["players"]:
            mine = frame[frame["player"] == player]
            if mine.empty:  # a mutant that never appeared, say: nothing to describe
                entry["behaviour"][player] = "no decisions"
                continue
            tables.append(bh.round_by_round(frame, player))
            pooled = bh.fingerprint(mine)
            prints.append(pooled.table.reset_index().assign(player=player, opponent="all"))
            by_opponent = {}
            for opponent, part in mine.groupby("opponent_player", sort=False):
                fp = bh.fingerprint(part)
                by_opponent[str(opponent)] = fp.to_dict(strategies)
                prints.append(fp.table.reset_index().assign(player=player, opponent=opponent))
            entry["behaviour"][player] = {
                "fingerprint": pooled.to_dict(strategies),
                "fingerprint_by_opponent": by_opponent,
                "sequences": bh.sequences(frame, player),
            }
    if not tables:
        return None
    rounds_table = pd.concat(tables, ignore_index=True)
    prints_table = pd.concat(prints, ignore_index=True)
    rounds_table.to_csv(folder / "llm_rounds.csv", index=False)
    prints_table.to_csv(folder / "llm_fingerprints.csv", index=False)
    return rounds_table, prints_table


def write_results(
    model: DilemmaModel, folder: Path, wall_seconds: float, with_charts: bool = True
) -> dict[str, Any]:
    """Write everything but the streamed tables: config, matrices, summary, agents, charts.

    Args:
        model: The model, after its last step.
        folder: The run's folder.
        wall_seconds: The run's wall time so far, for the summary.
        with_charts: Draw the charts (``output.charts``).

    Returns:
        The summary, as written to summary.json (NaN there becomes null).
    """
    scenario = model.scenario
    (folder / "config.toml").write_text(tomli_w.dumps(scenario.to_toml_dict()), encoding="utf-8")
    tally = model.tally
    payoff, defections = tally.payoff_matrix(), tally.defection_matrix()
    payoff.to_csv(folder / "payoff_matrix.csv")
    defections.to_csv(folder / "defections.csv")
    steps = pd.DataFrame(tally.steps)
    steps["step"] += 1
    steps.to_csv(folder / "steps.csv", index=False)
    degree, self_loop = _degrees(model.edges, model.n_nodes)
    population = model.population
    agents = pd.DataFrame(
        {
            "agent": np.arange(model.n_nodes),
            "player": np.array(population.labels, object)[population.label_of_node],
            "policy": population.policy_name_of_node(),
            "degree": degree,
            "self_loop": self_loop,
            "score": model.scores,
            "decisions": model.decisions,
            "cooperation_rate": np.divide(
                model.cooperations,
                model.decisions,
                out=np.full(model.n_nodes, np.nan),
                where=model.decisions > 0,
            ),
        }
    )
    agents.to_csv(folder / "agents.csv", index=False)
    summary = {
        "scenario": scenario.name,
        "description": scenario.description,
        "seed": model.master_seed,
        "abm_version": __version__,
        "agents": model.n_nodes,
        "edges": int(len(model.edges)),
        "steps": len(tally.steps),
        "matches": int(steps["matches"].sum()),
        "decisions": int(steps["decisions"].sum()),
        "cooperation_rate": tally.cooperation_rate(),
        "cooperation_by_step": steps["cooperation_rate"].tolist(),
        # by label (player name), like the ranking and the evolution block
        "final_shares": {
            label: float(v) for label, v in zip(population.labels, population.shares(), strict=True)
        },
        "ranking": tally.ranking(),
        "wall_seconds": round(wall_seconds, 3),
    }
    if model.evolution is not None:
        summary["evolution"] = _evolution_summary(model, steps)
        if model.snapshots:
            _write_snapshots(model, folder)
    unread = None
    llm_policies = population.llm_policies
    if llm_policies:
        unread = tally.unread_matrix()
        counts = tally.unread_counts()
        counts.to_csv(folder / "invalid_answers.csv", index=False)
        summary["llm"] = [_llm_summary(model, policy, counts) for policy in llm_policies]
        summary["warnings"] = [w for entry in summary["llm"] for w in entry["warnings"]]
        behaviour = _llm_behaviour(model, folder, summary)
    (folder / "summary.json").write_text(
        json.dumps(_clean(summary), indent=2) + "\n", encoding="utf-8"
    )
    if with_charts:
        about = [_heatmap_subtitle(model)]
        charts.save(
            charts.heatmap(
                payoff,
                "Mean total payoff of the row player per match",
                "payoff",
                unread=unread,
                subtitle=about,
            ),
            folder,
            "payoff_heatmap",
        )
        charts.save(
            charts.heatmap(
                defections,
                "Intended defections of the row player per match (mean)",
                "defections",
                unread=unread,
                subtitle=[
                    "rounds in which the row player chose D, counted before noise flips an action",
                    *about,
                ],
            ),
            folder,
            "defections_heatmap",
        )
        if llm_policies and behaviour is not None:
            from abm.behaviour_charts import fingerprint_chart, round_chart

            rounds_table, prints = behaviour
            charts.save(round_chart(rounds_table), folder, "llm_rounds")
            charts.save(
                fingerprint_chart(prints[prints["opponent"] == "all"].set_index("situation")),
                folder,
                "llm_fingerprint",
            )
        by_round = _cooperation_by_round(model.last_result) if len(steps) == 1 else None
        charts.save(charts.cooperation_chart(steps, by_round), folder, "cooperation")
        if model.evolution is not None:
            charts.save(charts.shares_chart(steps, population.labels), folder, "shares")
            if model.snapshots:
                step, grid = model.snapshots[-1]
                charts.save(
                    charts.lattice_chart(grid.reshape(model.grid_shape), population.labels, step),
                    folder,
                    "lattice",
                )
    return summary
