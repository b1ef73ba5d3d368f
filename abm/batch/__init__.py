"""Batch parameter runs: a sweep file expanded into runs, run in parallel, resumable.

``python -m abm.batch SWEEP_FILE`` runs a sweep; ``python -m abm.batch report DIR``
aggregates it. From Python::

    from abm.batch import load_sweep, run_sweep

    sweep = load_sweep("scenarios/sweep_noise.toml")
    result = run_sweep(sweep, "outputs/sweep_noise", backend="local", workers=2)

Nothing here starts a process pool or Ray at import time.
"""

from abm.batch.report import aggregate, write_report
from abm.batch.runner import SweepResult, run_sweep
from abm.batch.sweep import Run, Sweep, derive_seed, load_sweep

__all__ = [
    "Run",
    "Sweep",
    "SweepResult",
    "aggregate",
    "derive_seed",
    "load_sweep",
    "run_sweep",
    "write_report",
]
