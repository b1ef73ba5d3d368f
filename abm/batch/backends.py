"""Where runs execute: in this process, in a local process pool, or on Ray.

Every backend calls the same ``execute(task)``, which runs one scenario into its own
folder with ``abm.run.run_scenario`` and returns a row of results, so serial, local
parallel and Ray runs of a sweep give the same rows.
"""

from __future__ import annotations

import contextlib
import multiprocessing
import os
import shutil
import socket
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from abm.batch.storage import read_metrics
from abm.run import run_scenario

OnResult = Callable[["Task", dict[str, Any]], None]


@dataclass(frozen=True)
class Task:
    """What a worker needs to run one run: picklable and small."""

    run_id: str
    base: str  # the base scenario, absolute
    overrides: tuple[str, ...]
    seed: int
    out: str  # the run folder, absolute
    force: bool = False
    llm: tuple[dict[str, Any], ...] = field(default=(), compare=False)


class WorkerLost(RuntimeError):
    """A worker process died (killed, or out of memory) and took the pool with it."""


def execute(task: Task) -> dict[str, Any]:
    """Run one task; never raises for a failed run, which comes back as a row with
    ``status = "failed"`` and the error."""
    started = time.perf_counter()
    final = Path(task.out)
    try:
        if task.force and final.exists():
            shutil.rmtree(final)
        if not (final / "summary.json").is_file():  # another attempt may have finished it
            _fresh_llm_counters()
            with _conversion_guard(task):
                run_scenario(task.base, out=final, seed=task.seed,
                             overrides=list(task.overrides), quiet=True)
        result: dict[str, Any] = {"status": "ok", "error": None, **read_metrics(final)}
    except Exception as exc:  # a failed run is a result; KeyboardInterrupt is not
        result = {"status": "failed", "error": _one_line(exc),
                  "traceback": traceback.format_exc()}
    result["run_id"] = task.run_id
    result["run_seconds"] = time.perf_counter() - started
    result["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return result


@contextlib.contextmanager
def _conversion_guard(task: Task) -> Iterator[None]:
    """A GGUF model is converted once and kept in the model cache; when it is not yet,
    the first run to get here converts it while holding a file lock, and runs in other
    processes (pool workers, Ray actors) wait for it instead of converting it again."""
    if not task.llm or not _needs_conversion(task):
        yield
        return
    try:
        import fcntl
    except ImportError:  # no advisory locks: convert as the policy would
        yield
        return
    from abm.llm.models import cache_root

    cache_root().mkdir(parents=True, exist_ok=True)
    with open(cache_root() / ".convert.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        if _needs_conversion(task):
            yield  # this run converts, holding the lock
            return
        fcntl.flock(handle, fcntl.LOCK_UN)
    yield


def _needs_conversion(task: Task) -> bool:
    from abm.llm.models import DEFAULT_MODEL, resolve

    for params in task.llm:
        source = resolve(str(params.get("model", DEFAULT_MODEL)))
        if source.converted is not None and not (source.converted / "config.json").is_file():
            return True
    return False


def _fresh_llm_counters() -> None:
    """Loaded models are kept for the next run of this process (that is what makes a
    worker cheap); their work counters start again so summary.json counts one run."""
    llm = sys.modules.get("abm.policies.llm")
    for backend in getattr(llm, "_BACKENDS", {}).values():
        backend.stats = type(backend.stats)()


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------ serial


def run_serial(tasks: list[Task], on_result: OnResult) -> None:
    for task in tasks:
        on_result(task, execute(task))


# ------------------------------------------------------------------ local processes


def start_method() -> str:
    """Fresh interpreters for workers: forking a process that may hold torch threads is
    unsafe, so spawn (forkserver would do too, where it exists)."""
    return "spawn"


def run_local(tasks: list[Task], on_result: OnResult, workers: int) -> None:
    """A process pool of ``workers`` processes; results arrive as runs finish."""
    context = multiprocessing.get_context(start_method())
    threads = max(1, default_workers() // workers)
    pool = ProcessPoolExecutor(max_workers=workers, mp_context=context,
                               initializer=_limit_threads, initargs=(threads,))
    pending: dict[Any, Task] = {}
    queue = list(reversed(tasks))
    try:
        # a bounded number in flight, so a huge sweep is not pickled into the pool at once
        while queue or pending:
            while queue and len(pending) < 4 * workers:
                task = queue.pop()
                pending[pool.submit(execute, task)] = task
            done, _ = wait(list(pending), return_when=FIRST_COMPLETED)
            for future in done:
                task = pending.pop(future)
                on_result(task, future.result())
    except BrokenProcessPool:
        raise WorkerLost("a worker process died (killed, or out of memory)") from None
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _limit_threads(threads: int) -> None:
    """Share the cores between the workers (as Ray does for its tasks): torch, if a run
    loads it, reads these before it starts its thread pools."""
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def default_workers() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
