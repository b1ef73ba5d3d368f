"""Runs as Ray tasks, on a local Ray instance or an existing cluster.

Rule-only runs are plain Ray tasks (one CPU each). Runs with LLM players go to Ray
actors that stay alive for the whole sweep: the model is loaded once per actor (the
LLM policy keeps loaded models per process) and serves every run sent to it. An
actor asks for a GPU when the scenario's LLM player asks for CUDA, or leaves the
device to ``"auto"`` and the cluster has GPUs, and for every GPU of a node when
the model is spread over GPUs (``device_map``). Runs of different models go to
different actors, one model after the other, so a GPU holds one model at a time.

A local instance started here listens on 127.0.0.1 only; a cluster's address is checked
with a TCP connection before Ray is asked to join it, so a wrong one fails in seconds.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
from collections import deque
from collections.abc import Iterator
from typing import Any

from abm.batch.backends import (
    OnResult,
    Task,
    _limit_threads,
    _one_line,
    default_workers,
    execute,
    model_key,
)
from abm.errors import ScenarioError


def import_ray() -> Any:
    """The ``ray`` module.

    Raises:
        ScenarioError: Ray is not installed (the message gives the install command).
    """
    try:
        import ray
    except ImportError:
        raise ScenarioError(
            "--backend ray needs Ray, which is not installed; install it from "
            'the clone of abm with: pip install -e ".[ray]" (or: pip install '
            '"ray>=2.40")'
        ) from None
    return ray


class LLMWorker:
    """A Ray actor: one process that keeps its loaded models and runs task after task."""

    def __init__(self) -> None:
        """Use the one CPU the actor reserves: torch in it starts one thread."""
        _limit_threads(1)

    def pid(self) -> int:
        """The actor's process id."""
        return os.getpid()

    def run(self, task: Task) -> dict[str, Any]:
        """Run one task in the actor's process, as ``abm.batch.backends.execute`` does."""
        return execute(task)


def gpus_for(task: Task, cluster_gpus: float, node_gpus: int | None = None) -> int:
    """The GPUs a run's actor asks for.

    Ray numbers an actor's GPUs from 0, so a player on ``"cuda:N"`` gets N + 1 of them
    and a ``device_map`` table as many as its highest GPU number + 1; a ``device_map``
    such as "auto" gets every GPU of the largest node (an actor's GPUs are on one
    node); a player on ``"cuda"``, or on "auto" on a cluster with GPUs, gets 1.
    Players on an inference server count for nothing.

    Args:
        task: The run.
        cluster_gpus: GPUs in the whole cluster.
        node_gpus: GPUs of its largest node (default: ``cluster_gpus``).
    """
    node = int(cluster_gpus if node_gpus is None else node_gpus)
    need = 0
    # a player on an inference server loads nothing here: it needs no GPU of its own
    for player in (p for p in task.llm if not p.get("server")):
        device, placement = str(player.get("device", "auto")), player.get("device_map")
        if isinstance(placement, dict):
            numbers = [_gpu_number(v) for v in placement.values()]
            need = max(need, *(n + 1 for n in numbers if n is not None), 0)
        elif placement is not None:
            need = max(need, node)
        elif device.startswith("cuda"):
            need = max(need, (_gpu_number(device) or 0) + 1)
        elif device == "auto" and cluster_gpus > 0:
            need = max(need, 1)
    return need


def _gpu_number(where: int | str) -> int | None:
    """The GPU number a device names (``0`` for a bare "cuda"), None for the CPU."""
    if isinstance(where, int):
        return where
    index = str(where).removeprefix("cuda").removeprefix(":")
    if not str(where).startswith("cuda"):
        return None
    return int(index) if index.isdigit() else 0


LOOPBACK = "127.0.0.1"
CONNECT_TIMEOUT = 3.0  # seconds to wait for a TCP answer from a cluster's address
# Ray reads this once, at import, into ray._private.ray_constants.ENABLE_RAY_CLUSTER; when
# it is false (Ray's single-machine mode, the default on macOS and Windows) a node started
# with _node_ip_address="127.0.0.1" keeps that address; otherwise Ray replaces it with the
# machine's routable address and its servers listen on every interface
_SINGLE_MACHINE_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def connect(address: str | None, workers: int | None) -> bool:
    """Start or join Ray unless already connected; True when this call connected.

    With an address (``--address`` or $RAY_ADDRESS) it first checks, with a TCP connection
    of at most ``CONNECT_TIMEOUT`` seconds, that something answers there, so a wrong
    address fails in seconds (``ray.init`` itself retries for minutes). Without one it
    starts a local instance that listens on 127.0.0.1 only.
    """
    ray = import_ray()
    if ray.is_initialized():
        return False
    flag = f"--address {address}" if address else None
    address = address or os.environ.get("RAY_ADDRESS") or None
    if address and flag is None:
        flag = f"RAY_ADDRESS={address}"
    options: dict[str, Any] = {
        "include_dashboard": False,
        "logging_level": logging.WARNING,
        "log_to_driver": False,
    }
    if address:
        check_reachable(address, str(flag))
    try:
        if address:
            ray.init(address=address, **options)
        else:
            with _loopback_only():
                ray.init(
                    num_cpus=workers or default_workers(), _node_ip_address=LOOPBACK, **options
                )
    except (ConnectionError, ValueError, RuntimeError, TimeoutError, SystemExit) as exc:
        # SystemExit: what ray.init raises when a reachable address never answers as Ray
        where = f"the Ray cluster at {flag}" if address else "a local Ray instance"
        raise ScenarioError(
            f"--backend ray: cannot start or join {where}: {_one_line(exc)}"
        ) from None
    return True


def check_reachable(address: str, flag: str, timeout: float = CONNECT_TIMEOUT) -> None:
    """Check that something accepts a TCP connection at a Ray cluster's address.

    Args:
        address: HOST:PORT or ray://HOST:PORT; "auto" and "local" are Ray's own and
            are left to it.
        flag: How the user gave the address (``--address ...`` or ``RAY_ADDRESS=...``),
            for the message.
        timeout: Seconds to wait for the connection.

    Raises:
        ScenarioError: The address is malformed, or nothing answers there in time.
    """
    if address in ("auto", "local"):
        return
    target = address.removeprefix("ray://")
    host, colon, port = target.rpartition(":")
    host = host.strip("[]")  # [::1]:6379
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ScenarioError(
            f"{flag}: not the address of a Ray cluster; allowed: HOST:PORT "
            "(the head node's port, 6379 unless `ray start --head --port` "
            "chose another, e.g. 10.0.0.5:6379), ray://HOST:PORT (Ray Client) "
            "or auto (the cluster started on this machine)"
        )
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = "timed out" if isinstance(exc, TimeoutError) else (exc.strerror or str(exc))
        raise ScenarioError(
            f"{flag}: no Ray cluster answers there ({reason}, within "
            f"{timeout:g} s); start one with `ray start --head` on that "
            "machine, correct the address, or leave --address out (and unset "
            "RAY_ADDRESS) to start a local Ray instance"
        ) from None


@contextlib.contextmanager
def _loopback_only() -> Iterator[None]:
    """Switch on Ray's single-machine mode while a local instance starts.

    In that mode the 127.0.0.1 given as the node address is kept: the GCS, the raylet
    and the workers then listen on 127.0.0.1 only, not on every interface. It is set
    in the environment for the processes Ray starts and in Ray's constant for this
    one; both are restored afterwards.
    """
    try:
        from ray._private import ray_constants
    except ImportError:  # another layout: the address alone is the best there is
        ray_constants = None
    saved_env = os.environ.get(_SINGLE_MACHINE_ENV)
    saved = getattr(ray_constants, "ENABLE_RAY_CLUSTER", None)
    os.environ[_SINGLE_MACHINE_ENV] = "0"
    if saved is not None:
        ray_constants.ENABLE_RAY_CLUSTER = False
    try:
        yield
    finally:
        if saved_env is None:
            os.environ.pop(_SINGLE_MACHINE_ENV, None)
        else:
            os.environ[_SINGLE_MACHINE_ENV] = saved_env
        if saved is not None:
            ray_constants.ENABLE_RAY_CLUSTER = saved


def run_ray(
    tasks: list[Task],
    on_result: OnResult,
    workers: int | None = None,
    address: str | None = None,
    connected: bool | None = None,
) -> None:
    """Run every task on Ray, handing each row to ``on_result`` as its run finishes.

    Args:
        tasks: The runs to do.
        on_result: Called in this process with each task and its row.
        workers: The CPUs of a local instance started here; on a running cluster, the
            most runs at once (default: as many as it has CPUs). It also bounds the
            LLM actors alive at once.
        address: The cluster to join, as for ``connect``.
        connected: None to connect here (and shut Ray down after); True or False when
            the caller has called ``connect`` itself (what it returned) and shuts Ray
            down itself.

    Raises:
        ScenarioError: Ray is missing, or cannot be started or joined.
    """
    ray = import_ray()
    owner = connected is None
    connected_here = connect(address, workers) if owner else bool(connected)
    try:
        # a local instance started here has exactly ``workers`` CPUs, so Ray itself keeps
        # that many running and a second batch can wait in its queue; on a cluster that was
        # already running, ``workers`` is the number of runs in flight
        in_flight = 2 * (workers or 0) if connected_here or workers is None else workers
        _schedule(ray, tasks, on_result, workers, in_flight)
    finally:
        if owner and connected_here:
            ray.shutdown()


def _schedule(
    ray: Any, tasks: list[Task], on_result: OnResult, workers: int | None, in_flight: int
) -> None:
    resources = ray.cluster_resources()
    cpus = max(1, int(resources.get("CPU", 1)))
    gpus = float(resources.get("GPU", 0))
    per_node = [int(n.get("Resources", {}).get("GPU", 0)) for n in ray.nodes() if n.get("Alive")]
    node_gpus = max(per_node, default=0)
    limit = workers or cpus  # LLM actors at once
    in_flight = in_flight or 2 * cpus  # rule-only runs submitted at once
    remote_execute = ray.remote(num_cpus=1)(execute)
    actor_class = ray.remote(LLMWorker)

    rules = deque(t for t in tasks if not t.llm)
    groups: dict[tuple, deque[Task]] = {}
    for task in tasks:
        if task.llm:
            need = gpus_for(task, gpus, node_gpus)
            groups.setdefault((model_key(task), need), deque()).append(task)
    waiting = deque(groups.items())
    inflight: dict[Any, tuple[Task, Any]] = {}
    actors: list[Any] = []
    idle: list[Any] = []
    current: deque[Task] = deque()
    need_gpus = 0

    def new_actor() -> Any:
        return actor_class.options(num_cpus=1, num_gpus=need_gpus).remote()

    try:
        while rules or current or waiting or inflight:
            if not current and not actors and waiting:
                (_, need_gpus), current = waiting.popleft()
                if need_gpus and gpus == 0:
                    for task in current:  # a CUDA model on a cluster without GPUs
                        on_result(
                            task,
                            _failed(
                                task, "the run's LLM asks for CUDA but the Ray cluster has no GPU"
                            ),
                        )
                    current = deque()
                    continue
                if need_gpus > node_gpus:  # Ray would wait for such a node for ever
                    for task in current:
                        on_result(
                            task,
                            _failed(
                                task,
                                f"the run's LLM needs {need_gpus} GPUs on one machine (its "
                                f"device or device_map), but no node of the Ray cluster has "
                                f"more than {node_gpus}",
                            ),
                        )
                    current = deque()
                    continue
                # an actor's GPUs are on one node: count the actors each node can hold
                fit = sum(g // need_gpus for g in per_node) if need_gpus else cpus
                n = min(len(current), limit, fit)
                actors = [new_actor() for _ in range(max(1, n))]
                idle = list(actors)
            while current and idle:
                actor = idle.pop()
                task = current.popleft()
                inflight[actor.run.remote(task)] = (task, actor)
            in_rules = sum(1 for _, a in inflight.values() if a is None)
            while rules and in_rules < in_flight:
                task = rules.popleft()
                inflight[remote_execute.remote(task)] = (task, None)
                in_rules += 1
            if not current and actors and len(idle) == len(actors):
                for actor in actors:  # this model is done: free its CPUs and GPU
                    ray.kill(actor)
                actors, idle = [], []
                continue
            if not inflight:
                continue
            ready, _ = ray.wait(list(inflight), num_returns=1)
            for ref in ready:
                task, actor = inflight.pop(ref)
                try:
                    result = ray.get(ref)
                except ray.exceptions.RayActorError as exc:
                    result = _failed(task, f"the Ray actor died: {_one_line(exc)}")
                    actors.remove(actor)
                    actor = new_actor()
                    actors.append(actor)
                except ray.exceptions.RayError as exc:
                    result = _failed(task, f"Ray: {_one_line(exc)}")
                if actor is not None:
                    idle.append(actor)
                on_result(task, result)
    except BaseException:
        for ref, (_, actor) in inflight.items():
            if actor is None:
                ray.cancel(ref, force=True)
        for actor in actors:
            ray.kill(actor)
        raise


def _failed(task: Task, error: str) -> dict[str, Any]:
    return {"run_id": task.run_id, "status": "failed", "error": error, "run_seconds": 0.0}
