"""A run's output folder: written under a temporary name, renamed when complete."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import tomli_w

from abm import __version__, charts
from abm.errors import ScenarioError
from abm.model import DilemmaModel


def default_folder(name: str, root: Path = Path("outputs")) -> Path:
    """``outputs/<name>-<timestamp>``, with a suffix if that exists already."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = root / f"{name}-{stamp}"
    n = 2
    while folder.exists():
        folder = root / f"{name}-{stamp}-{n}"
        n += 1
    return folder


class RunFolder:
    """The folder appears under its final name only once everything is in it, so a
    crash or an error never leaves a folder that looks complete."""

    def __init__(self, final: Path) -> None:
        self.final = final
        if final.exists() and (not final.is_dir() or any(final.iterdir())):
            raise ScenarioError(f"--out {final}: already exists and is not empty; remove it or "
                                "choose another folder")
        final.parent.mkdir(parents=True, exist_ok=True)
        self.path = final.parent / f".{final.name}.partial-{os.getpid()}"
        if self.path.exists():
            shutil.rmtree(self.path)
        self.path.mkdir()

    def commit(self) -> Path:
        if self.final.is_dir():
            self.final.rmdir()  # empty, checked in __init__
        os.replace(self.path, self.final)
        return self.final

    def discard(self) -> None:
        shutil.rmtree(self.path, ignore_errors=True)


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
    return {
        "rule": model.scenario.evolution.rule,
        "average_last": last,
        "final_shares": dict(zip(model.labels, map(float, model.shares()))),
        "mean_shares": {label: float(window[f"share:{label}"].mean()) for label in model.labels},
    }


def _write_snapshots(model: DilemmaModel, folder: Path) -> None:
    """Who held which label on the lattice at each snapshot: steps (S,), grid (S, rows, cols)."""
    steps = np.array([s for s, _ in model.snapshots], np.int64)
    grid = np.stack([g.reshape(model.grid_shape) for _, g in model.snapshots]).astype(np.int32)
    np.savez_compressed(folder / "snapshots.npz", steps=steps, grid=grid,
                        labels=np.array(model.labels))


def _llm_summary(model: DilemmaModel, policy: Any, counts: pd.DataFrame) -> dict[str, Any]:
    """A policy's own statistics plus its invalid rate against each opponent."""
    index = model.policies.index(policy)
    labels = [label for label, p in zip(model.labels, model.policy_of_label) if p == index]
    rows = counts[counts["player"].isin(labels)]
    by_opponent = {
        opponent: {"decisions": int(g["decisions"].sum()), "invalid": int(g["invalid"].sum()),
                   "fallbacks": int(g["fallbacks"].sum()),
                   "invalid_rate": float(g["invalid"].sum() / g["decisions"].sum()),
                   "void_matches": int(g["void_matches"].sum())}
        for opponent, g in rows.groupby("opponent", sort=False)}
    return {"players": labels, **policy.stats(), "by_opponent": by_opponent}


def write_results(model: DilemmaModel, folder: Path, wall_seconds: float,
                  with_charts: bool = True) -> dict[str, Any]:
    """Everything but the streamed tables: config, matrices, summary, agents, charts."""
    scenario = model.scenario
    (folder / "config.toml").write_text(tomli_w.dumps(scenario.to_toml_dict()), encoding="utf-8")
    tally = model.tally
    payoff, defections = tally.payoff_matrix(), tally.defection_matrix()
    payoff.to_csv(folder / "payoff_matrix.csv")
    defections.to_csv(folder / "defections.csv")
    steps = pd.DataFrame(tally.steps)
    steps["step"] += 1
    steps.to_csv(folder / "steps.csv", index=False)
    degree = np.bincount(model.edges.ravel(), minlength=model.n_nodes)
    agents = pd.DataFrame({
        "agent": np.arange(model.n_nodes),
        "player": [model.labels[i] for i in model.label_of_node],
        "policy": model.policy_names,
        "degree": degree,
        "score": model.scores,
        "decisions": model.decisions,
        "cooperation_rate": np.divide(model.cooperations, model.decisions,
                                      out=np.full(model.n_nodes, np.nan),
                                      where=model.decisions > 0),
    })
    agents.to_csv(folder / "agents.csv", index=False)
    shares = pd.Series(model.policy_names).value_counts(normalize=True, sort=False)
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
        "final_shares": {k: float(v) for k, v in shares.items()},
        "ranking": tally.ranking(),
        "wall_seconds": round(wall_seconds, 3),
    }
    if model.evolution is not None:
        summary["evolution"] = _evolution_summary(model, steps)
        if model.snapshots:
            _write_snapshots(model, folder)
    unread = None
    if model.llm_policies:
        unread = tally.unread_matrix()
        counts = tally.unread_counts()
        counts.to_csv(folder / "invalid_answers.csv", index=False)
        summary["llm"] = [_llm_summary(model, policy, counts) for policy in model.llm_policies]
        summary["warnings"] = [w for entry in summary["llm"] for w in entry["warnings"]]
    (folder / "summary.json").write_text(json.dumps(_clean(summary), indent=2) + "\n",
                                         encoding="utf-8")
    if with_charts:
        charts.save(charts.heatmap(payoff, "Total payoff of the player in a match", "payoff",
                                   unread=unread), folder, "payoff_heatmap")
        charts.save(charts.heatmap(defections, "Times the player chose D in a match",
                                   "defections", unread=unread), folder, "defections_heatmap")
        charts.save(charts.cooperation_chart(steps), folder, "cooperation")
        if model.evolution is not None:
            charts.save(charts.shares_chart(steps, model.labels), folder, "shares")
            if model.snapshots:
                step, grid = model.snapshots[-1]
                charts.save(charts.lattice_chart(grid.reshape(model.grid_shape), model.labels,
                                                 step), folder, "lattice")
    return summary
