"""Where runs execute: in this process, in a local process pool, or on Ray.

Every backend calls the same ``execute(task)``, which runs one scenario into its own
folder with ``abm.run.run_scenario`` and returns a row of results, so serial, local
parallel and Ray runs of a sweep give the same rows.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import sys
import threading
import time
import traceback
from collections.abc import Callable
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
    """Run one task in this process and return its row of results.

    A run folder that is already complete is not run again (unless ``task.force``).

    Args:
        task: The run to do.

    Returns:
        The row: ``status`` ("ok" or "failed"), ``error`` (one line, or None), the run's
        metrics when it succeeded, the traceback when it failed, ``run_id``,
        ``run_seconds`` and ``worker`` ("host:pid"). A failed run is a row, not an
        exception; only interrupts such as KeyboardInterrupt propagate.
    """
    started = time.perf_counter()
    final = Path(task.out)
    try:
        if task.force and final.exists():
            shutil.rmtree(final)
        if not (final / "summary.json").is_file():  # another attempt may have finished it
            run_scenario(
                task.base, out=final, seed=task.seed, overrides=list(task.overrides), quiet=True
            )
        result: dict[str, Any] = {"status": "ok", "error": None, **read_metrics(final)}
    except Exception as exc:  # a failed run is a result; KeyboardInterrupt is not
        result = {"status": "failed", "error": _one_line(exc), "traceback": traceback.format_exc()}
    result["run_id"] = task.run_id
    result["run_seconds"] = time.perf_counter() - started
    result["worker"] = f"{socket.gethostname()}:{os.getpid()}"
    return result


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


# ------------------------------------------------------------------ serial


# what makes two LLM players one loaded model (as abm.policies.llm_backends keys them)
_MODEL_KEYS = (
    "model",
    "server",
    "device",
    "dtype",
    "trust_remote_code",
    "prefix_cache",
    "device_map",
    "quantization",
    "decode",
    "adapter",
)


def model_key(task: Task) -> tuple:
    """Runs that can share a process's loaded models: the same models, loaded the same way.

    Players that load the same model count once, and a device_map table is the same
    whatever the order of its entries.
    """

    def shown(value: Any) -> str:
        return repr(sorted(value.items())) if isinstance(value, dict) else repr(value)

    return tuple(sorted({tuple(shown(p.get(k)) for k in _MODEL_KEYS) for p in task.llm}))


def run_by_model(tasks: list[Task], on_result: OnResult) -> None:
    """Run the tasks in this process, grouped by the models they load, one group at a time.

    The models of a group are let go before the next group's load, so a GPU holds
    one group's models at a time.
    """
    from abm.policies.llm_backends import release_backends

    last = None
    for task in sorted(tasks, key=model_key):
        if last is not None and model_key(task) != last:
            release_backends()
        last = model_key(task)
        on_result(task, execute(task))


def on_gpu(task: Task) -> bool:
    """Whether a run loads a model that goes to a GPU of this machine.

    A local LLM player whose ``device`` is not "cpu" does, where torch sees a CUDA GPU
    (torch is imported only for a sweep with such players); players on an inference
    server load nothing here.
    """
    local = [p for p in task.llm if not p.get("server") and p.get("device", "auto") != "cpu"]
    return bool(local) and _cuda_present()


def _cuda_present() -> bool:
    try:
        import torch
    except ImportError:  # a core install runs every model on an inference server
        return False
    return torch.cuda.is_available()


# ------------------------------------------------------------------ local processes


def start_method() -> str:
    """The multiprocessing start method of local workers: "spawn", fresh interpreters.

    Forking a process that may hold torch threads is unsafe, hence no "fork"; and not
    "forkserver" either, since workers watch their parent, and a forkserver worker's
    parent is the server, not the sweep.
    """
    return "spawn"


def run_local(tasks: list[Task], on_result: OnResult, workers: int) -> None:
    """Run the tasks on a pool of ``workers`` local processes.

    Each row goes to ``on_result`` (in this process) as its run finishes; each worker
    gets an equal share of the cores for its thread pools (``worker_threads``).

    Raises:
        WorkerLost: A worker process died (killed, or out of memory).
    """
    context = multiprocessing.get_context(start_method())
    threads = worker_threads(workers)
    pool = ProcessPoolExecutor(
        max_workers=workers,
        mp_context=context,
        initializer=_init_worker,
        initargs=(threads, os.getpid()),
    )
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


def _init_worker(threads: int, parent: int) -> None:
    """Set up a pool worker: its share of the cores, and an end when the sweep ends."""
    _limit_threads(threads)
    exit_with_parent(parent)


PARENT_POLL_SECONDS = 0.5


def exit_with_parent(parent: int, interval: float = PARENT_POLL_SECONDS) -> None:
    """End this process as soon as ``parent`` (the sweep's process) is gone.

    A pool worker waits on pipes that it shares with its parent, so it never sees them
    close: after a SIGKILL of the sweep (or an out-of-memory kill) it would run on as an
    orphan. On Linux the kernel sends it SIGKILL when the parent dies (PR_SET_PDEATHSIG);
    everywhere, a daemon thread also checks every ``interval`` seconds whether the
    parent is still its parent (an orphan is adopted by another process) and ends the
    process with ``os._exit`` when it is not.
    """
    _kill_on_parent_death()
    if os.getppid() != parent:  # the parent died before this worker got here
        os._exit(1)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(interval)
        os._exit(1)

    threading.Thread(target=watch, name="abm-parent-watch", daemon=True).start()


def _kill_on_parent_death() -> None:
    """Ask Linux to SIGKILL this process when its parent dies; nothing elsewhere or on failure.

    This is prctl(PR_SET_PDEATHSIG, SIGKILL). It fires when the parent's thread that
    started this process ends; the pool starts its workers from the thread that runs
    the sweep, which outlives the pool.
    """
    if not sys.platform.startswith("linux"):
        return
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL, 0, 0, 0)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def worker_threads(workers: int) -> int:
    """CPU threads each of ``workers`` parallel workers gets: its share of the cores.

    One per worker with the default of one worker per core, so that torch in several
    workers does not start more threads than there are cores; all of them for one.

    Args:
        workers: Workers running at once.

    Returns:
        At least 1.
    """
    return max(1, default_workers() // max(1, workers))


def _limit_threads(threads: int) -> None:
    """Share the cores between the workers, as Ray does for its tasks.

    Sets the OpenMP, MKL and OpenBLAS thread counts unless already set; torch, if a
    run loads it, reads them before it starts its thread pools.
    """
    for name in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        os.environ.setdefault(name, str(threads))


def default_workers() -> int:
    """The number of cores this process may run on (all cores where that is unknown)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1
