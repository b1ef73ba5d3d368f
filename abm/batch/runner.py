"""Running a sweep: what is left to do, on which backend, recorded as it finishes."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from abm.batch.backends import (
    Task,
    default_workers,
    on_gpu,
    run_by_model,
    run_local,
)
from abm.batch.storage import Store
from abm.batch.sweep import Sweep
from abm.errors import ScenarioError

BACKENDS = ("local", "serial", "ray")


@dataclass
class SweepResult:
    """What one call of ``run_sweep`` did."""

    out: Path
    total: int
    skipped: int  # complete before this call
    ran: list[str] = field(default_factory=list)  # run ids run by this call, in finishing order
    failed: list[str] = field(default_factory=list)  # run ids that failed (this call)
    errors: dict[str, str] = field(default_factory=dict)  # run id -> error of a failed run
    workers: dict[str, str] = field(default_factory=dict)  # run id -> "host:pid" that ran it
    recovered: int = 0  # rows rebuilt from run folders
    orphans: list[str] = field(default_factory=list)
    report: list[Path] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether no run failed in this call."""
        return not self.failed


def run_sweep(
    sweep: Sweep,
    out: str | Path,
    *,
    backend: str = "local",
    workers: int | None = None,
    force: bool = False,
    address: str | None = None,
    quiet: bool = True,
    report: bool = True,
    charts: bool = True,
) -> SweepResult:
    """Run every run of ``sweep`` that is not complete in ``out``, recording results as they come.

    Each finished run is added to results.parquet at once, so an interrupted sweep
    resumes where it stopped; rows lost from the table are rebuilt from complete run
    folders. Everything finished is kept whatever goes wrong.

    Args:
        sweep: The loaded sweep.
        out: The sweep folder (created if needed).
        backend: "local" (a process pool of ``workers`` processes; with one worker,
            or one run to do, the runs go in this process), "serial" (this process)
            or "ray".
        workers: Worker processes (local) or parallel runs (Ray); default one per
            core available.
        force: Run every run again, complete or not.
        address: The Ray cluster to join (default: $RAY_ADDRESS, else a new local one).
        quiet: Print no plan and no progress bar.
        report: Write the report (``abm.batch.report.write_report``) at the end.
        charts: Include the report's charts.

    Returns:
        What this call did.

    Raises:
        ScenarioError: An unknown backend, fewer than one worker, Ray missing or
            unreachable, or a folder that cannot be used.
        WorkerLost: A local worker process died.
        KeyboardInterrupt: Ctrl-C.
    """
    if backend not in BACKENDS:
        raise ScenarioError(f"--backend {backend!r}: allowed: {', '.join(BACKENDS)}")
    if workers is not None and workers < 1:
        raise ScenarioError(f"--workers {workers}: must be at least 1")
    if backend == "ray":
        from abm.batch.ray_backend import import_ray

        import_ray()  # say how to install it before anything is written
    out = Path(out).resolve()
    store = Store(out, sweep)
    store.load()  # reads only: a folder that cannot be used is refused before any write
    result = SweepResult(out=out, total=len(sweep.runs), skipped=0)
    todo = [run for run in sweep.runs if force or not store.complete(run)]
    ray_connected = False
    if backend == "ray" and todo:
        from abm.batch.ray_backend import connect

        # up before the folder is made: a cluster that cannot be reached leaves nothing
        ray_connected = connect(address, workers)
    try:
        store.create()
    except BaseException:
        _shutdown_ray(ray_connected)
        raise
    try:
        result.skipped = len(sweep.runs) - len(todo)
        if force:
            for run in todo:
                store.rows.pop(run.run_id, None)
        result.recovered = store.recover(skip={run.run_id for run in todo})
        result.orphans = store.orphans()
        tasks = [
            Task(
                run_id=run.run_id,
                base=str(sweep.base),
                overrides=run.overrides,
                seed=run.seed,
                out=str(store.folder(run)),
                force=force,
                llm=run.llm,
            )
            for run in todo
        ]
        runs = {run.run_id: run for run in todo}
        n_workers = min(workers or default_workers(), max(1, len(tasks)))
        # every local worker would load its own copy of a GPU model onto the same GPUs:
        # those runs go one after another in this process, which loads the model once
        here = [t for t in tasks if on_gpu(t)] if backend == "local" and n_workers > 1 else []
        kept = {t.run_id for t in here}
        pooled = [t for t in tasks if t.run_id not in kept]
        if not quiet:
            where = {
                "serial": "in this process",
                "local": (
                    f"on {min(n_workers, len(pooled))} local worker processes"
                    if min(n_workers, len(pooled)) > 1
                    else "in this process"
                ),
                "ray": "on Ray",
            }[backend]
            print(
                f"{sweep.name}: {len(sweep.runs)} runs ({len(sweep.points)} points x "
                f"{sweep.replicates} replicates); {result.skipped} complete, "
                f"{len(tasks)} to run {where}",
                flush=True,
            )
            if here:
                print(
                    f"{len(here)} runs load a model onto this machine's GPU: they run in "
                    "this process, one after another (one copy of the model)",
                    flush=True,
                )
            if result.orphans:
                print(
                    f"note: {len(result.orphans)} folders in {out / 'runs'} belong to no run "
                    "of this sweep (the sweep or its base scenario changed); left alone"
                )
        bar = tqdm(
            total=len(tasks), desc=sweep.name, unit="run", disable=quiet or not tasks, smoothing=0.1
        )

        def on_result(task: Task, row: dict[str, Any]) -> None:
            store.add(runs[task.run_id], row)
            result.ran.append(task.run_id)
            result.workers[task.run_id] = str(row.get("worker", ""))
            if row.get("status") != "ok":
                result.failed.append(task.run_id)
                result.errors[task.run_id] = str(row.get("error"))
                bar.set_postfix(failed=len(result.failed))
            bar.update()
            store.flush()

        try:
            if not tasks:
                pass
            elif backend == "ray":
                from abm.batch.ray_backend import run_ray

                run_ray(tasks, on_result, workers=workers, address=address, connected=ray_connected)
            elif backend == "serial" or n_workers == 1:
                run_by_model(tasks, on_result)
            else:
                if len(pooled) > 1:
                    run_local(pooled, on_result, min(n_workers, len(pooled)))
                else:  # as the plan line says: no pool for one run
                    run_by_model(pooled, on_result)
                run_by_model(here, on_result)
        finally:
            bar.close()
    finally:
        try:
            store.close()
        finally:
            _shutdown_ray(ray_connected)
    if report:
        from abm.batch.report import write_report

        result.report = write_report(out, charts=charts)
    return result


def _shutdown_ray(connected: bool) -> None:
    """Shut down the Ray session this sweep started or joined (one it found is left)."""
    if connected:
        import ray

        ray.shutdown()
