"""Run a function on several local gloo ranks (tests and small benchmarks on CPU)."""

from __future__ import annotations

import os
import pickle
import queue
import socket
import time
import traceback
from collections.abc import Callable
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from longnet_dist.distributed.mesh import leave_distributed

_POLL_SECONDS = 0.05
_PORT_ATTEMPTS = 3
# After the first failure, how long to collect other ranks' failures before choosing the root cause.
_FAILURE_GRACE_SECONDS = 1.0


class MultiprocessError(RuntimeError):
    """A worker of `run_multiprocess` raised; carries its `rank` and formatted `worker_traceback`."""

    def __init__(self, rank: int, worker_traceback: str, later_failed_ranks: tuple[int, ...] = ()):
        note = f"\n(ranks {list(later_failed_ranks)} failed after it)" if later_failed_ranks else ""
        super().__init__(f"rank {rank} raised:\n{worker_traceback}{note}")
        self.rank = rank
        self.worker_traceback = worker_traceback
        self.later_failed_ranks = later_failed_ranks


class _PortInUse(RuntimeError):
    """Rank 0 could not bind the chosen port (another process took it); the run is retried."""


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _worker(rank: int, world_size: int, port: int, timeout: float, fn: Callable, args: tuple, results,
            caller_environment: dict[str, str]) -> None:
    # A forkserver child starts with the server's environment: use the caller's, as spawn would.
    os.environ.clear()
    os.environ.update(caller_environment)
    os.environ.update(
        MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), LOCAL_RANK=str(rank),
        WORLD_SIZE=str(world_size), LOCAL_WORLD_SIZE=str(world_size),
    )
    torch.set_num_threads(1)
    try:
        dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world_size,
                                timeout=timedelta(seconds=timeout))
    except Exception as error:  # noqa: BLE001 - reported to the parent
        in_use = "address already in use" in str(error).lower() or "eaddrinuse" in str(error).lower()
        results.put((rank, "port_in_use" if in_use else "error", traceback.format_exc(), time.time()))
        return
    try:
        value = fn(rank, world_size, *args)
        # Plain pickle: tensors travel by value, not through shared memory that dies with the worker.
        results.put((rank, "ok", pickle.dumps(value), time.time()))
    except BaseException:  # noqa: BLE001 - reported to the parent, which stops the other ranks
        results.put((rank, "error", traceback.format_exc(), time.time()))
        return
    leave_distributed()


def _stop(processes: list) -> None:
    for process in processes:
        if process.is_alive():
            process.kill()
    for process in processes:
        process.join()


def _start_context(start_method: str | None):
    """A fresh-interpreter start method: forkserver (torch imported once, then forked) or spawn."""
    if start_method is None:
        start_method = "forkserver" if "forkserver" in mp.get_all_start_methods() else "spawn"
    if start_method not in ("forkserver", "spawn"):
        raise ValueError(f"start_method={start_method!r}; use 'forkserver' or 'spawn' (fork is unsafe with torch)")
    context = mp.get_context(start_method)
    if start_method == "forkserver":
        # Takes effect when the server first starts; later runs reuse the server.
        context.set_forkserver_preload(["torch", "torch.distributed", __name__])
    return context


def _root_failure(failures: dict[int, tuple[float, str]]) -> MultiprocessError:
    """The failure that came first: a silent death (time -inf) or the earliest exception."""
    first = min(failures, key=lambda rank: (failures[rank][0], rank))
    later = tuple(sorted(set(failures) - {first}))
    return MultiprocessError(first, failures[first][1], later)


def _run_once(fn: Callable, world_size: int, args: tuple, timeout: float, start_method: str | None) -> list[Any]:
    context = _start_context(start_method)
    results = context.Queue()
    port = free_port()
    processes = [
        context.Process(target=_worker, args=(rank, world_size, port, timeout, fn, args, results, dict(os.environ)),
                        daemon=True)
        for rank in range(world_size)
    ]
    for process in processes:
        process.start()
    deadline = time.monotonic() + timeout
    values: dict[int, Any] = {}
    failures: dict[int, tuple[float, str]] = {}  # rank -> (worker wall time, traceback)
    first_failure_seen = None
    try:
        while len(values) < world_size:
            try:
                rank, status, payload, worker_time = results.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                for rank, process in enumerate(processes):
                    silent = rank not in values and rank not in failures
                    if silent and process.exitcode is not None and results.empty():
                        failures[rank] = (float("-inf"), f"process exited with code {process.exitcode} without a result")
            else:
                if status == "port_in_use":
                    raise _PortInUse(payload)
                if status == "error":
                    failures[rank] = (worker_time, payload)
                else:
                    values[rank] = pickle.loads(payload)
            now = time.monotonic()
            if failures:
                first_failure_seen = first_failure_seen or now
                everyone_reported = len(failures) + len(values) == world_size
                if everyone_reported or now - first_failure_seen > _FAILURE_GRACE_SECONDS:
                    raise _root_failure(failures)
            elif now > deadline:
                pending = sorted(set(range(world_size)) - set(values))
                raise TimeoutError(f"run_multiprocess: ranks {pending} not done after {timeout} s; workers killed")
        # Results are in; give the workers' final barrier the remaining time, then stop them anyway.
        for process in processes:
            process.join(max(deadline - time.monotonic(), 0.0))
    finally:
        _stop(processes)
        results.close()
    return [values[rank] for rank in range(world_size)]


def run_multiprocess(
    fn: Callable, world_size: int, *args: Any, timeout: float = 120.0, start_method: str | None = None
) -> list[Any]:
    """Run fn(rank, world_size, *args) on `world_size` fresh gloo processes; return their results.

    `fn` and `args` must be picklable (a module-level function); so must its return value. The
    default process group is initialised (gloo, 127.0.0.1, a free port; RANK/WORLD_SIZE/MASTER_*
    set) with torch.set_num_threads(1). A worker exception is re-raised here as MultiprocessError
    naming the rank, with its traceback. After `timeout` seconds in all, every worker is killed and
    TimeoutError is raised. `start_method`: "forkserver" (default where available: one server
    imports torch once and forks the workers, several times faster than spawn on a small machine)
    or "spawn".
    """
    if isinstance(world_size, bool) or not isinstance(world_size, int) or world_size < 1:
        raise ValueError(f"world_size={world_size!r} must be a positive int")
    for attempt in range(_PORT_ATTEMPTS):
        try:
            return _run_once(fn, world_size, args, timeout, start_method)
        except _PortInUse:
            if attempt == _PORT_ATTEMPTS - 1:
                raise
    raise AssertionError("unreachable")


def value_error_message(call) -> str | None:
    """The message of the ValueError `call()` raises, or None: lets a worker report an expected error
    to the parent (exceptions themselves may not pickle)."""
    try:
        call()
    except ValueError as error:
        return str(error)
    return None
