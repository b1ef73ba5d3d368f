"""A sweep's output folder: one run folder per run, results.parquet, the lock.

``DIR/runs/<run_id>/`` is written by ``abm.run`` under a temporary name and renamed
when complete, so a run is complete exactly when its folder exists. results.parquet
holds one row per run (parameters, seed, status, metrics) and is replaced atomically;
rows missing from it are rebuilt from the run folders, so a crash loses nothing
that was complete.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from abm.atomic import atomic_file
from abm.batch.keys import label
from abm.batch.sweep import Run, Sweep
from abm.errors import ScenarioError

RESULTS = "results.parquet"
RUNS = "runs"
SWEEP_JSON = "sweep.json"
ERRORS = "errors.log"
# columns that describe a run rather than measure it
BOOKKEEPING = ("run_id", "point", "replicate", "seed", "status", "error", "out", "run_seconds")


# ------------------------------------------------------------------ metrics of one run


def read_metrics(folder: Path) -> dict[str, Any]:
    """The numbers of a finished run folder, one value each.

    From summary.json: agents, edges, steps, matches, decisions, cooperation_rate;
    from steps.csv: mean_payoff (per decision) and final_cooperation_rate (last step);
    per player: ``payoff[<player>]`` (mean match payoff against others, as in the
    ranking) and ``cooperation[<player>]`` (share of its actions that were C); with
    ``[evolution]``: ``final_share[<player>]`` and ``mean_share[<player>]`` (over the
    last ``average_last`` steps); with LLM players: llm_decisions, llm_invalid_rate,
    llm_fallbacks.
    """
    summary = json.loads((folder / "summary.json").read_text(encoding="utf-8"))
    out: dict[str, Any] = {
        key: summary.get(key)
        for key in ("agents", "edges", "steps", "matches", "decisions", "cooperation_rate")
    }
    steps = pd.read_csv(folder / "steps.csv")
    decisions = steps["decisions"].to_numpy(float)
    total = decisions.sum()
    out["mean_payoff"] = (
        float((steps["mean_payoff"].fillna(0) * decisions).sum() / total) if total else float("nan")
    )
    out["final_cooperation_rate"] = (
        float(steps["cooperation_rate"].iloc[-1]) if len(steps) else float("nan")
    )
    for row in summary.get("ranking", []):
        out[f"payoff[{row['player']}]"] = row["mean_payoff"]
    agents = pd.read_csv(folder / "agents.csv")
    coop = (
        (agents["cooperation_rate"].fillna(0) * agents["decisions"])
        .groupby(agents["player"], sort=False)
        .sum()
    )
    made = agents.groupby("player", sort=False)["decisions"].sum()
    for player in made.index:
        out[f"cooperation[{player}]"] = (
            float(coop[player] / made[player]) if made[player] else float("nan")
        )
    evolution = summary.get("evolution") or {}
    for player, share in evolution.get("final_shares", {}).items():
        out[f"final_share[{player}]"] = share
    for player, share in evolution.get("mean_shares", {}).items():
        out[f"mean_share[{player}]"] = share
    llm = summary.get("llm") or []
    if llm:
        decided = sum(s.get("decisions", 0) for s in llm)
        out["llm_decisions"] = decided
        out["llm_invalid_rate"] = (
            sum(s.get("invalid", 0) for s in llm) / decided if decided else 0.0
        )
        out["llm_fallbacks"] = sum(s.get("fallbacks", 0) for s in llm)
    return {k: (float("nan") if v is None else v) for k, v in out.items()}


# ------------------------------------------------------------------ the folder


class Store:
    """The sweep's output folder: the run folders, results.parquet and the lock.

    Attributes:
        out: The sweep folder.
        rows: The results rows by run id, as results.parquet will hold them.
    """

    def __init__(self, out: Path, sweep: Sweep) -> None:
        """Describe the folder ``out`` of ``sweep``; nothing is read or written yet."""
        self.out = out
        self.sweep = sweep
        self.runs_dir = out / RUNS
        self.by_id = {run.run_id: run for run in sweep.runs}
        self.rows: dict[str, dict[str, Any]] = {}
        self._lock_file = None
        self._last_flush = 0.0
        self._dirty = False

    # -- setup

    def open(self) -> None:
        """Check the folder, read old rows, take the lock, clear what killed runs left."""
        self.load()
        self.create()

    def load(self) -> None:
        """Check the folder and read the rows an earlier call recorded, writing nothing.

        Only rows of this sweep's runs that succeeded and whose folder is complete are
        kept; the others are run again.

        Raises:
            ScenarioError: The folder is not this sweep's, or its sweep.json or
                results.parquet cannot be read; it is then left exactly as it is.
        """
        out = self.out
        where = f"--out {out}"
        marker = out / SWEEP_JSON
        old: dict[str, Any] = {}
        if out.exists() and not out.is_dir():
            raise ScenarioError(f"{where}: exists and is not a folder; choose another folder")
        try:
            holds_something = out.is_dir() and any(out.iterdir())
        except OSError as exc:
            raise ScenarioError(
                f"{where}: cannot read the folder ({_reason(exc)}); choose a "
                "folder you can read and write"
            ) from None
        if holds_something:
            if not marker.is_file():
                raise ScenarioError(
                    f"{where}: exists, is not empty and holds no sweep "
                    f"({SWEEP_JSON} is missing); choose another folder"
                )
            old = read_sweep_json(marker, where)
            if old["name"] != self.sweep.name:
                raise ScenarioError(
                    f"{where}: holds the sweep {old['name']!r}, not "
                    f"{self.sweep.name!r}; choose another folder"
                )
        results = out / RESULTS
        if results.exists() and not results.is_file():
            raise ScenarioError(
                f"{where}: {results} is not a file; move it away and run the "
                "same command again (the results are rebuilt from the run "
                "folders)"
            )
        if results.is_file():
            skip = set(BOOKKEEPING) | set(old.get("keys", [])) | set(self.sweep.keys)
            for row in read_results(results, where).to_dict("records"):
                run = self.by_id.get(row.get("run_id"))
                if run is None or row.get("status") != "ok" or not self.complete(run):
                    continue  # not in this sweep, failed (run again), or its folder is gone
                metrics = {k: _py(v) for k, v in row.items() if k not in skip and not _missing(v)}
                self.add(
                    run,
                    {
                        "status": "ok",
                        "error": None,
                        "run_seconds": _py(row.get("run_seconds")),
                        **metrics,
                    },
                )

    def create(self) -> None:
        """Make the folder, take the lock, clear what killed runs left, write sweep.json.

        sweep.toml, the sweep file's text, is written beside it.

        Raises:
            ScenarioError: The folder cannot be written (read-only, under a file, a full
                disk; what this call made before it failed is removed again), or another
                sweep holds its lock.
        """
        out = self.out
        made = _first_missing(self.runs_dir)  # the topmost folder this call makes, if any
        fresh = made is not None and (made == out or made in out.parents)
        try:
            self.runs_dir.mkdir(parents=True, exist_ok=True)
            self._lock()
            for partial in self.runs_dir.glob(".*.partial-*"):
                shutil.rmtree(partial, ignore_errors=True)  # a run killed half way
            _write_atomic(
                out / SWEEP_JSON,
                json.dumps({**self.sweep.to_json(), "abm_batch": 1}, indent=2).encode() + b"\n",
            )
            _write_atomic(out / "sweep.toml", self.sweep.text.encode())
        except OSError as exc:
            self._unlock()
            if fresh:  # the folder is this call's: take back what it wrote
                for name in (".lock", SWEEP_JSON, "sweep.toml"):
                    with contextlib.suppress(OSError):
                        (out / name).unlink(missing_ok=True)
            if made is not None:
                for folder in (self.runs_dir, *self.runs_dir.parents):
                    try:
                        folder.rmdir()  # empty folders only: never anything else
                    except OSError:
                        break
                    if folder == made:
                        break
            raise ScenarioError(
                f"--out {out}: cannot write there ({_reason(exc)}); choose a "
                "folder you can write to, e.g. --out outputs/NAME"
            ) from None

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # no advisory locks here: trust the user
            return
        # held open for the sweep's lifetime: closing it releases the lock
        handle = open(self.out / ".lock", "w")  # noqa: SIM115
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            handle.close()
            raise ScenarioError(
                f"--out {self.out}: another sweep is writing to this folder "
                "right now; wait for it or choose another folder"
            ) from None
        self._lock_file = handle

    def close(self) -> None:
        """Write results.parquet if anything changed, and release the lock."""
        self.flush(force=True)
        self._unlock()

    def _unlock(self) -> None:
        if self._lock_file is not None:
            self._lock_file.close()
            self._lock_file = None

    # -- runs

    def folder(self, run: Run) -> Path:
        """The run's folder, ``runs/<run_id>``."""
        return self.runs_dir / run.run_id

    def complete(self, run: Run) -> bool:
        """Whether the run's folder is complete (``abm.run`` renames it into place)."""
        return (self.folder(run) / "summary.json").is_file()

    def orphans(self) -> list[str]:
        """Run folders that belong to no run of this sweep (an edited sweep or base)."""
        return sorted(
            p.name
            for p in self.runs_dir.iterdir()
            if p.is_dir() and not p.name.startswith(".") and p.name not in self.by_id
        )

    def recover(self, skip: set[str] = frozenset()) -> int:
        """Add rows, read from their folders, for complete runs that have none yet.

        Args:
            skip: Run ids to leave out (those about to run again).

        Returns:
            How many rows were added.
        """
        n = 0
        for run in self.sweep.runs:
            if run.run_id not in self.rows and run.run_id not in skip and self.complete(run):
                self.add(run, {"status": "ok", "error": None, **read_metrics(self.folder(run))})
                n += 1
        return n

    def add(self, run: Run, result: dict[str, Any]) -> dict[str, Any]:
        """Record a run's result as its row; a failed run's traceback goes to errors.log.

        Args:
            run: The run.
            result: A row from ``abm.batch.backends.execute`` (status, error, metrics
                ...).

        Returns:
            The row: the run's id, point, replicate, seed and parameters, then status,
            error, ``out`` (its folder, when it succeeded), run_seconds and metrics.
        """
        row: dict[str, Any] = {
            "run_id": run.run_id,
            "point": run.point,
            "replicate": run.replicate,
            "seed": run.seed,
        }
        row.update(run.params)
        row["status"] = result.get("status", "ok")
        row["error"] = result.get("error")
        row["out"] = f"{RUNS}/{run.run_id}" if row["status"] == "ok" else None
        row["run_seconds"] = result.get("run_seconds", float("nan"))
        row.update(
            {
                k: v
                for k, v in result.items()
                if k not in ("status", "error", "run_seconds", "traceback", "run_id", "worker")
            }
        )
        self.rows[run.run_id] = row
        if row["status"] != "ok" and result.get("traceback"):
            with open(self.out / ERRORS, "a", encoding="utf-8") as log:
                log.write(
                    f"=== {run.run_id} (seed {run.seed}, "
                    f"{time.strftime('%Y-%m-%d %H:%M:%S')})\n{result['traceback']}\n"
                )
        self._dirty = True
        return row

    # -- results.parquet

    def frame(self) -> pd.DataFrame:
        """The rows recorded so far as the results table (``results_frame``)."""
        return results_frame(self.sweep, list(self.rows.values()))

    def flush(self, force: bool = False, every: float = 1.0) -> None:
        """Write results.parquet (temp file + rename) if rows changed, at most every ``every`` s.

        Args:
            force: Write now, however recent the last write.
            every: The least number of seconds between two writes.
        """
        if not self._dirty or (not force and time.monotonic() - self._last_flush < every):
            return
        frame = self.frame()
        with atomic_file(self.out / RESULTS) as tmp:
            frame.to_parquet(tmp, index=False)
        self._last_flush = time.monotonic()
        self._dirty = False


def results_frame(sweep: Sweep, rows: list[dict[str, Any]]) -> pd.DataFrame:
    """The results table: rows in sweep order (point, then replicate).

    The bookkeeping and parameter columns come first; each parameter column is typed
    one way (numbers, booleans, or labels for tables, lists and mixtures), and metric
    columns are numeric.

    Args:
        sweep: The sweep, for its parameter keys.
        rows: Rows as ``Store.add`` makes them.

    Returns:
        The table results.parquet holds.
    """
    keys = sweep.keys
    first = ["run_id", "point", "replicate", "seed", *keys, "status", "error", "out", "run_seconds"]
    # columns in the order rows of the sweep name them, whatever order runs finished in
    frame = pd.DataFrame(sorted(rows, key=lambda r: (r["point"], r["replicate"])))
    for column in first:
        if column not in frame:
            frame[column] = pd.Series(dtype=object)
    rest = [c for c in frame.columns if c not in first]
    frame = frame[first + rest]
    for key in keys:
        frame[key] = _param_column(frame[key])
    frame["error"] = frame["error"].astype(object).where(frame["error"].notna(), None)
    frame["out"] = frame["out"].astype(object).where(frame["out"].notna(), None)
    for column in ("point", "replicate", "seed"):
        frame[column] = frame[column].astype("int64")
    for column in rest:
        if frame[column].dtype == object:
            frame[column] = pd.to_numeric(frame[column], errors="coerce")
    return frame.sort_values(["point", "replicate"], kind="stable").reset_index(drop=True)


def _param_column(values: pd.Series) -> pd.Series:
    """Numbers stay numbers, booleans booleans; tables, lists and mixtures become labels."""
    items = list(values)
    if all(isinstance(v, bool) for v in items):
        return pd.Series(items, index=values.index, dtype=bool)
    if all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in items):
        if all(isinstance(v, int) for v in items):
            return pd.Series(items, index=values.index, dtype="int64")
        return pd.Series(items, index=values.index, dtype="float64")
    return pd.Series(
        [str(label(v)) if not isinstance(v, str) else v for v in items],
        index=values.index,
        dtype=object,
    )


def _py(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def _missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and np.isnan(value))


def _write_atomic(path: Path, data: bytes) -> None:
    with atomic_file(path) as tmp:
        tmp.write_bytes(data)


def _reason(exc: BaseException) -> str:
    """An OSError as its message alone ("Permission denied"), anything else in one line."""
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _first_missing(path: Path) -> Path | None:
    """The topmost folder of ``path`` (``path`` included) that does not exist yet."""
    missing = None
    for folder in (path, *path.parents):
        if folder.exists():
            break
        missing = folder
    return missing


# ------------------------------------------------------------------ reading a sweep folder

_SHAPE = (
    "a JSON object with 'name' (a string) and 'keys', 'metrics' and 'axes' (lists of "
    "names), as python -m abm.batch writes it"
)


def read_sweep_json(path: Path, where: str) -> dict[str, Any]:
    """The sweep.json of a sweep folder, checked.

    Args:
        path: The sweep.json file.
        where: How messages name the folder (``--out DIR``).

    Returns:
        Its contents.

    Raises:
        ScenarioError: It cannot be read, is not JSON or is not a sweep's description
            (the file is left as it is).
    """
    advice = (
        "it is left as it is: restore it (it is written when the sweep starts), or "
        "choose another folder"
    )
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ScenarioError(f"{where}: cannot read {path} ({_reason(exc)}); {advice}") from None
    except (UnicodeDecodeError, ValueError) as exc:
        raise ScenarioError(
            f"{where}: {path} is not valid JSON ({_reason(exc)}); {advice}"
        ) from None

    def names(value: Any) -> bool:
        return isinstance(value, list) and all(isinstance(v, str) for v in value)

    ok = (
        isinstance(data, dict)
        and isinstance(data.get("name"), str)
        and names(data.get("keys", []))
        and names(data.get("metrics", []))
        and isinstance(data.get("axes", []), list)
        and all(names(axis) for axis in data.get("axes", []))
    )
    if not ok:
        shown = json.dumps(data)
        shown = shown if len(shown) <= 60 else shown[:57] + "..."
        raise ScenarioError(
            f"{where}: {path} is not a sweep description (expected {_SHAPE}; got {shown}); {advice}"
        )
    return data


def read_results(path: Path, where: str) -> pd.DataFrame:
    """The results.parquet of a sweep folder; the file is never removed or replaced here.

    Args:
        path: The results.parquet file.
        where: How messages name the folder (``--out DIR``).

    Returns:
        The table.

    Raises:
        ScenarioError: It cannot be read, or lacks the columns every results table has
            (run_id, point, status).
    """
    advice = (
        f"it is left as it is; to rebuild it from the run folders, move it aside (e.g. "
        f"rename it to {RESULTS}.bad) and run the sweep command again with the same "
        "--out: complete runs are not run again"
    )
    try:
        frame = pd.read_parquet(path)
    except Exception as exc:  # pyarrow's errors, OSError, ValueError: any unreadable file
        raise ScenarioError(
            f"{where}: {path} cannot be read as a results table ({_reason(exc)}); {advice}"
        ) from None
    missing = [c for c in ("run_id", "point", "status") if c not in frame.columns]
    if missing:
        raise ScenarioError(
            f"{where}: {path} is not a sweep's results table (no column "
            f"{', '.join(repr(c) for c in missing)}); {advice}"
        )
    return frame
