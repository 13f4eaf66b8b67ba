"""Run a function on W local processes joined by a gloo process group: tests, the demo and the benchmarks.

CATALOG P025 (the simulated devices of sharded attention are real processes here). ``run(fn, W, *args)``
starts W processes (``forkserver`` by default: a fresh interpreter that imports torch and attnzoo once and
forks every rank from it, much faster than ``spawn`` on a small machine; ``start_method="spawn"`` works too),
each joins a gloo group on a free localhost port, calls ``fn(rank, world, *args)`` and reports its return
value or its exception. The parent collects one :class:`RankResult` per rank. A rank that dies without
reporting is recorded as ``"died"`` (with its exit code); once any rank failed, the others get ``linger``
seconds to report before they are killed (``"killed"``), and nothing waits beyond ``timeout`` in total.
"""

from __future__ import annotations

import datetime
import multiprocessing as mp
import os
import pkgutil
import queue
import socket
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

__all__ = ["RankResult", "run", "free_port", "init_local_group"]


@dataclass
class RankResult:
    rank: int
    status: str  # "ok", "error", "died", "killed"
    value: Any = None
    error_type: str | None = None
    error: str | None = None
    traceback: str | None = None
    exitcode: int | None = None

    @property
    def ok(self) -> bool:
        return self.status == "ok"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def init_local_group(rank: int, world: int, port: int, *, backend: str = "gloo", timeout: float = 60.0) -> None:
    """Join the process group of ``world`` local processes rendezvousing on ``127.0.0.1:port``."""
    import torch.distributed as dist

    dist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=timeout))


def _child(fn, rank, world, port, args, q, threads, backend, pg_timeout):
    try:
        import torch

        torch.set_num_threads(threads)
        init_local_group(rank, world, port, backend=backend, timeout=pg_timeout)
        value = fn(rank, world, *args)
        q.put(("ok", rank, value, None, None, None))
    except BaseException as err:  # report everything, including a RankMismatchError
        q.put(("error", rank, None, type(err).__name__, str(err), traceback.format_exc()))
    finally:
        q.close()
        q.join_thread()
        os._exit(0)  # skip interpreter teardown (gloo's destructors may wait for dead peers)


def _preload() -> list[str]:
    import attnzoo.mechanisms as pkg

    mods = ["torch", "torch.distributed", "attnzoo", "attnzoo.distributed"]
    mods += [m.name for m in pkgutil.walk_packages(pkg.__path__, prefix=pkg.__name__ + ".")]
    return mods


def run(fn: Callable[..., Any], world: int, *args: Any, timeout: float = 600.0, linger: float = 30.0,
        start_method: str = "forkserver", backend: str = "gloo", threads: int = 1, pg_timeout: float = 60.0,
        preload: list[str] | None = None) -> list[RankResult]:
    """``fn(rank, world, *args)`` on ``world`` local processes; one :class:`RankResult` per rank.

    ``fn`` and ``args`` must be picklable (a module-level function). ``pg_timeout`` is the process group's
    default timeout (attnzoo's own calls take their ``timeout=`` argument)."""
    from ..errors import check_choice, check_int

    check_int("world", world)
    check_choice("start_method", start_method, ("forkserver", "spawn", "fork"))
    ctx = mp.get_context(start_method)
    if start_method == "forkserver":
        ctx.set_forkserver_preload(_preload() + list(preload or []))
    port = free_port()
    q = ctx.Queue()
    procs = [ctx.Process(target=_child, args=(fn, r, world, port, args, q, threads, backend, pg_timeout), daemon=True)
             for r in range(world)]
    for p in procs:
        p.start()
    results: dict[int, RankResult] = {}
    deadline = time.monotonic() + timeout
    first_failure: float | None = None
    while len(results) < world:
        now = time.monotonic()
        limit = deadline if first_failure is None else min(deadline, first_failure + linger)
        if now >= limit:
            break
        try:
            status, rank, value, etype, err, tb = q.get(timeout=min(0.5, max(0.01, limit - now)))
            results[rank] = RankResult(rank, status, value, etype, err, tb)
            if status != "ok" and first_failure is None:
                first_failure = time.monotonic()
            continue
        except queue.Empty:
            pass
        for r, p in enumerate(procs):
            if r not in results and not p.is_alive():
                # give its last message a moment to arrive through the queue
                try:
                    while True:
                        status, rank, value, etype, err, tb = q.get(timeout=0.2)
                        results[rank] = RankResult(rank, status, value, etype, err, tb)
                except queue.Empty:
                    pass
                if r not in results:
                    results[r] = RankResult(r, "died", exitcode=p.exitcode)
                    if first_failure is None:
                        first_failure = time.monotonic()
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
        p.join(timeout=5)
        if r not in results:
            results[r] = RankResult(r, "killed", exitcode=p.exitcode)
    return [results[r] for r in range(world)]
