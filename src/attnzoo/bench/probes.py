"""What a worker process runs for one case: a timing, a peak-memory measurement or a quality training run.

Each probe takes and returns JSON-able dicts, so it runs the same in a forked child of the fork server
(:mod:`attnzoo.bench.forkserver`, with a hard timeout) and in this process (:class:`InProcess`).
"""

from __future__ import annotations

from typing import Any

import torch


def timing(spec: dict[str, Any], *, min_run_time: float, warmup: int, retries: int, threads: int) -> dict[str, Any]:
    from .cases import build
    from .measure import time_call, time_prepared

    built = build(spec)
    if built.run is not None:
        t = time_call(built.run, min_run_time=min_run_time, warmup=warmup, threads=threads, retries=retries)
    else:
        t = time_prepared(built.prepare, built.step, min_run_time=min_run_time, warmup=warmup, threads=threads,
                          retries=retries)
    return {"timing": t.as_dict(), "info": built.info, "tokens": built.tokens}


def memory(spec: dict[str, Any]) -> dict[str, Any]:
    from .cases import memory_probe

    return memory_probe(spec)


def quality(task: str, config: dict[str, Any], mechanism: str, **kw: Any) -> dict[str, Any]:
    from .quality import make_task, train_case

    return train_case(make_task(task, config), mechanism, **kw)


PROBES = {"timing": timing, "memory": memory, "quality": quality}


def dispatch(op: str, args: dict[str, Any], threads: int | None = None) -> dict[str, Any]:
    if op not in PROBES:
        raise ValueError(f"op: expected one of {list(PROBES)}, got {op!r}")
    if threads is not None:
        torch.set_num_threads(threads)
    return PROBES[op](**args)


class InProcess:
    """Runs probes in this process (no isolation, no hard timeout): for platforms without ``fork``."""

    isolated = False

    def __init__(self, *, threads: int = 1, imports: list[str] | tuple[str, ...] = ()):
        self.threads = threads

    def start(self) -> None:
        pass

    def ready(self) -> None:
        pass

    def close(self, now: bool = False) -> None:
        pass

    def __enter__(self) -> InProcess:
        return self

    def __exit__(self, *exc) -> None:
        pass

    def run(self, op: str, args: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
        old = torch.get_num_threads()
        try:
            return dispatch(op, args, self.threads)
        except Exception as e:  # noqa: BLE001
            return {"error": f"{type(e).__name__}: {e}"}
        finally:
            torch.set_num_threads(old)

    def measure(self, spec: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
        return self.run("memory", {"spec": spec}, timeout=timeout)
