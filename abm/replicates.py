"""``python -m abm.run SCENARIO --replicates N``: one scenario N times, with intervals.

Replicate i (1 to N) runs with seed ``seed + i - 1`` (the scenario's or ``--seed``'s
seed, else one drawn and recorded) into ``OUT/replicate-<i>/``, a complete run
folder each. The
request (scenario file, ``--set`` values, ``--seed``) is recorded in
``OUT/replicates.json`` first; the same request into the same ``--out`` keeps
the replicates already there, so an interrupted command resumes, and another
request is refused rather than mixed in. Then the
replicates are summarised: heatmap cells, cooperation rates and the LLM
players' cooperation against each opponent as mean with a Student-t 95 %
interval over replicates, and fingerprints pooled over all their decisions
with Wilson intervals.
"""

from __future__ import annotations

import contextlib
import json
from pathlib import Path
from typing import Any

import pandas as pd

from abm.atomic import atomic_file
from abm.batch.stats import mean_ci
from abm.errors import ScenarioError

# what summarise() writes beside the replicate folders
OWN = {
    "replicates.json",
    "payoff_matrix_replicates.csv",
    "defections_replicates.csv",
    "llm_cooperation_replicates.csv",
    "llm_fingerprints_replicates.csv",
    *(
        f"{stem}.{ext}"
        for stem in ("payoff_heatmap", "defections_heatmap", "llm_cooperation", "llm_fingerprint")
        for ext in ("html", "png")
    ),
}


def run_replicates(
    path: str | Path,
    n: int,
    *,
    out: str | Path | None = None,
    seed: int | None = None,
    overrides: list[str] | None = None,
    quiet: bool = False,
) -> Path:
    """Run the scenario ``n`` times with consecutive seeds and write the summary.

    Replicates already in ``out`` from the same request are kept, so an interrupted
    command resumes.

    Args:
        path: The scenario file.
        n: How many replicates.
        out: The folder of the replicates; default a new folder under outputs/.
        seed: The first replicate's seed; default the scenario's, else a fresh one.
        overrides: ``--set`` values (``key=value``) applied to the scenario.
        quiet: Print nothing while running.

    Returns:
        The folder of the replicates.

    Raises:
        ScenarioError: The scenario is invalid, or ``out`` holds something else
            (other files, another request's replicates, an unreadable record).
    """
    from abm.run_folder import default_folder
    from abm.scenario import load_scenario
    from abm.seeding import fresh_seed

    scenario = load_scenario(path, overrides, seed)
    folder = Path(out) if out else default_folder(f"{scenario.name}-x{n}")
    request = {
        "scenario": str(Path(path).resolve()),
        "overrides": list(overrides or []),
        "seed": seed,
    }
    meta = folder / "replicates.json"
    try:
        old = json.loads(meta.read_text(encoding="utf-8")) if meta.is_file() else None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ScenarioError(
            f"--out {folder}: its replicates.json cannot be read ({exc}); give another folder"
        ) from None
    if old is not None and not isinstance(old, dict):
        raise ScenarioError(
            f"--out {folder}: its replicates.json is not a replicates record; give another folder"
        )
    if old is not None and old.get("request") != request:
        raise ScenarioError(
            f"--out {folder}: holds replicates of another request "
            f"({old.get('request')}); give another folder"
        )
    base = (
        old["base_seed"]
        if old is not None
        else scenario.seed
        if scenario.seed is not None
        else fresh_seed()
    )
    if folder.exists() and not folder.is_dir():
        raise ScenarioError(f"--out {folder}: exists and is not a folder")
    if folder.is_dir():
        strangers = [
            p.name
            for p in folder.iterdir()
            if not p.name.lstrip(".").startswith("replicate") and p.name not in OWN
        ]
        if strangers:
            raise ScenarioError(
                f"--out {folder}: holds other files ({strangers[0]}, ...); "
                "give an empty folder or the folder of these replicates"
            )
    created = not folder.exists()
    folder.mkdir(parents=True, exist_ok=True)
    with atomic_file(meta) as partial:  # what a resumed command must match
        partial.write_text(
            json.dumps({"request": request, "base_seed": base}, indent=2), encoding="utf-8"
        )
    try:
        folders = _run_all(path, n, folder, base, scenario.name, overrides, quiet)
    except BaseException:
        if created and not any(folder.glob("replicate-*")):  # nothing done: leave nothing
            meta.unlink(missing_ok=True)
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    summarise(
        folders, folder, {"request": request, "base_seed": base}, with_charts=scenario.output.charts
    )
    return folder


def _run_all(
    path: str | Path,
    n: int,
    folder: Path,
    base: int,
    name: str,
    overrides: list[str] | None,
    quiet: bool,
) -> list[Path]:
    """The replicate folders, running those not there yet."""
    from abm.run import run_scenario

    folders = []
    for i in range(n):
        target = folder / f"replicate-{i + 1}"
        done = target / "summary.json"
        if done.is_file():
            summary = json.loads(done.read_text(encoding="utf-8"))
            if summary.get("seed") != base + i or summary.get("scenario") != name:
                raise ScenarioError(
                    f"--out {folder}: {target.name} holds another run "
                    f"(seed {summary.get('seed')}); give another folder"
                )
        else:
            if not quiet:
                print(f"replicate {i + 1} of {n} (seed {base + i})")
            run_scenario(path, out=target, seed=base + i, overrides=overrides, quiet=quiet)
        folders.append(target)
    return folders


def _cells(folders: list[Path], name: str) -> pd.DataFrame:
    """Mean and 95 % interval of each heatmap cell over the replicates, long format."""
    tables = [pd.read_csv(f / name, index_col="player") for f in folders]
    rows = []
    for player in tables[0].index:
        for opponent in tables[0].columns:
            values = [t.loc[player, opponent] for t in tables]
            stats = mean_ci(values)
            rows.append({"player": player, "opponent": opponent, **stats})
    return pd.DataFrame(rows)


def _llm_cooperation(frames: list[pd.DataFrame]) -> pd.DataFrame:
    """Per LLM player and opponent: each replicate's share of C, then mean and interval."""
    rows: dict[tuple[str, str], list[float]] = {}
    for frame in frames:
        valid = frame[frame["choice"].isin(["C", "D"])]
        for (player, opponent), part in valid.groupby(["player", "opponent_player"]):
            rows.setdefault((player, str(opponent)), []).append(
                float((part["choice"] == "C").mean())
            )
    return pd.DataFrame([{"player": p, "opponent": o, **mean_ci(v)} for (p, o), v in rows.items()])


def summarise(
    folders: list[Path], out: Path, about: dict[str, Any] | None = None, with_charts: bool = True
) -> dict[str, Any]:
    """Summarise finished replicate folders into ``out``.

    Writes replicates.json, the heatmap cell tables (mean and Student-t 95 % interval
    per cell) and, for LLM players whose decisions were kept, their cooperation per
    opponent and pooled fingerprints; with charts, also the two heatmaps and the LLM
    charts.

    Args:
        folders: The replicate run folders.
        out: The folder to write into.
        about: Entries put first in replicates.json (the request and base seed).
        with_charts: Also write the charts (HTML and PNG).

    Returns:
        What replicates.json holds.
    """
    from abm import behaviour, charts

    summaries = [json.loads((f / "summary.json").read_text(encoding="utf-8")) for f in folders]
    payoff, defections = _cells(folders, "payoff_matrix.csv"), _cells(folders, "defections.csv")
    llm_players = sorted({p for s in summaries for e in s.get("llm", []) for p in e["players"]})
    frames, prints = [], []
    if llm_players and not all((f / "rounds.parquet").is_file() for f in folders):
        llm_players = []  # output.rounds = false: the decisions were not kept
    if llm_players:
        for f in folders:
            frame = behaviour.run_decisions(f)
            frames.append(frame[frame["player"].isin(llm_players)])
        pooled = pd.concat(frames, ignore_index=True)
        for player in llm_players:
            fp = behaviour.fingerprint(pooled[pooled["player"] == player])
            prints.append(fp.table.reset_index().assign(player=player))
    cooperation = _llm_cooperation(frames) if frames else pd.DataFrame()
    result = {
        **(about or {}),
        "replicates": len(folders),
        "seeds": [s["seed"] for s in summaries],
        "scenario": summaries[0]["scenario"],
        "cooperation_rate": mean_ci([s["cooperation_rate"] for s in summaries]),
        "interval": "Student-t 95 % over replicates; fingerprints: Wilson 95 % over pooled "
        "decisions",
    }
    tables = {"payoff_matrix_replicates.csv": payoff, "defections_replicates.csv": defections}
    if llm_players:
        tables["llm_cooperation_replicates.csv"] = cooperation
        tables["llm_fingerprints_replicates.csv"] = pd.concat(prints, ignore_index=True)
    for name, table in tables.items():
        with atomic_file(out / name) as partial:
            table.to_csv(partial, index=False)
    with atomic_file(out / "replicates.json") as partial:
        partial.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    if not with_charts:
        return result
    if llm_players:
        from abm.behaviour_charts import cooperation_chart, fingerprint_chart

        charts.save(
            cooperation_chart(
                cooperation,
                group="player",
                share="mean",
                low="ci_low",
                high="ci_high",
                interval=f"mean, 95 % t over {len(folders)} replicates",
            ),
            out,
            "llm_cooperation",
        )
        charts.save(
            fingerprint_chart(tables["llm_fingerprints_replicates.csv"].set_index("situation")),
            out,
            "llm_fingerprint",
        )
    for stem, table, title in (
        ("payoff_heatmap", payoff, "Mean total payoff per match"),
        ("defections_heatmap", defections, "Intended defections per match (mean)"),
    ):
        mean = table.pivot(index="player", columns="opponent", values="mean")
        half = (
            (table["ci_high"] - table["mean"])
            .to_frame("half")
            .assign(player=table["player"], opponent=table["opponent"])
            .pivot(index="player", columns="opponent", values="half")
        )
        order = list(dict.fromkeys(table["player"]))
        mean, half = mean.loc[order, order], half.loc[order, order]
        mean.index.name = half.index.name = "player"
        chart = charts.heatmap(
            mean,
            title,
            stem.split("_")[0],
            fmt=".1~f",
            half=half,
            subtitle=[
                f"mean \u00b1 half-width of the 95 % t-interval over {len(folders)} replicates"
            ],
        )
        charts.save(chart, out, stem)
    return result
