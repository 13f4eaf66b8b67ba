"""Every case in a fresh process with a hard timeout, milliseconds apart: a fork server.

Starting a new Python interpreter and importing torch for each of hundreds of cases costs seconds each.
Instead one server process is started once (a fresh interpreter with glibc's allocator pinned, see
:data:`attnzoo.bench.measure.MALLOC_ENV`), imports torch, attnzoo and the registry **without running any
parallel torch operation** (forking after OpenMP has spun up its thread pool deadlocks the child), and
forks one child per probe (:mod:`attnzoo.bench.probes`: a timing, a peak-memory measurement, a quality
run). The child sets its thread count, runs the probe, writes the JSON result to a pipe and exits. Each
child is a process that has run nothing but that case: no allocator state, caches or compiled graphs carry
over from other cases, and a case that hangs or exceeds its time is killed (the run's time budget holds).

Protocol (JSON lines): the parent writes ``{"imports": [...], "threads": T}`` once, then
``{"op": "timing" | "memory" | "quality", "args": {...}, "timeout": s}`` per probe; the server answers
``{"ready": true}`` and then one result dict (or ``{"error": "...", "timeout": bool}``) per probe.
"""

from __future__ import annotations

import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from typing import Any

from .measure import child_env


def import_extra(name: str) -> None:
    """Import a module by dotted name or a ``.py`` file path (a user's own mechanisms)."""
    import importlib
    import importlib.util

    if name.endswith(".py") or os.sep in name:
        mod_name = "attnzoo_user_" + os.path.splitext(os.path.basename(name))[0]
        if mod_name in sys.modules:
            return
        spec = importlib.util.spec_from_file_location(mod_name, name)
        if spec is None or spec.loader is None:
            raise ImportError(f"--import: cannot load {name!r}")
        mod = importlib.util.module_from_spec(spec)
        sys.modules[mod_name] = mod
        spec.loader.exec_module(mod)
    else:
        importlib.import_module(name)


def _child(op: str, args: dict[str, Any], threads: int, wfd: int) -> None:  # pragma: no cover - after fork
    code = 0
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, 1)  # stray prints must not reach the protocol stream
        from .probes import dispatch

        result: dict[str, Any] = dispatch(op, args, threads)
    except BaseException as e:  # noqa: BLE001 - report everything to the parent
        result = {"error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        code = 1
    data = json.dumps(result).encode()
    view = memoryview(data)
    while view:
        n = os.write(wfd, view)
        view = view[n:]
    os.close(wfd)
    os._exit(code)


def _run_one(op: str, args: dict[str, Any], threads: int, timeout: float) -> dict[str, Any]:
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - child
        os.close(rfd)
        _child(op, args, threads, wfd)
    os.close(wfd)
    chunks, deadline = [], time.monotonic() + timeout
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(rfd)
            return {"error": f"timeout: killed after {timeout:.1f} s", "timeout": True}
        ready, _, _ = select.select([rfd], [], [], left)
        if ready:
            chunk = os.read(rfd, 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(rfd)
    _, status = os.waitpid(pid, 0)
    raw = b"".join(chunks)
    if not raw:
        if os.WIFSIGNALED(status):
            sig = os.WTERMSIG(status)
            hint = " (killed: out of memory?)" if sig == signal.SIGKILL else ""
            return {"error": f"the case died with signal {signal.Signals(sig).name}{hint}"}
        return {"error": f"the case exited with status {os.WEXITSTATUS(status)} and no result"}
    return json.loads(raw)


def serve() -> None:  # pragma: no cover - runs in the server process
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(os.open(os.devnull, os.O_WRONLY), 1)
    first = json.loads(sys.stdin.readline())
    threads = int(first.get("threads", 1))
    try:
        import torch

        torch.set_num_threads(1)  # never start an OpenMP pool before forking
        from attnzoo import registry

        for name in first.get("imports", []):
            import_extra(name)
        registry.mechanisms()  # not attnzoo.mechanisms: loading the registry rebinds that name to the subpackage
        # What every child needs, imported once here (importing in each child costs seconds per case).
        import torch._dynamo  # noqa: F401  (torch.optim imports it lazily: seconds per child)
        import torch.fx.experimental.symbolic_shapes  # noqa: F401  (backward(grad) imports it, with sympy)
        import torch.optim  # noqa: F401
        import torch.utils.benchmark  # noqa: F401

        from . import cases, measure, probes  # noqa: F401
        from .quality import models, tasks, train  # noqa: F401
        proto.write(json.dumps({"ready": True}) + "\n")
    except BaseException as e:  # noqa: BLE001
        proto.write(json.dumps({"ready": False, "error": f"{type(e).__name__}: {e}"}) + "\n")
        return
    for line in sys.stdin:
        if not line.strip():
            continue
        req = json.loads(line)
        if req.get("quit"):
            break
        try:
            res = _run_one(req["op"], req["args"], int(req.get("threads", threads)), float(req.get("timeout", 600)))
        except BaseException as e:  # noqa: BLE001
            res = {"error": f"{type(e).__name__}: {e}"}
        proto.write(json.dumps(res) + "\n")


class ForkServer:
    """Client of the fork server: ``run(op, args, timeout=...)`` returns the probe's result dict or
    ``{"error": ..., "timeout": bool}``; ``measure(spec)`` is the peak-memory probe. A context manager."""

    isolated = True

    def __init__(self, *, threads: int = 1, imports: list[str] | tuple[str, ...] = (), start_timeout: float = 180):
        self.threads, self.imports, self.start_timeout = threads, list(imports), start_timeout
        self.proc: subprocess.Popen | None = None
        self._ready = False
        self._stderr = tempfile.TemporaryFile()

    def __enter__(self) -> MemoryServer:
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def start(self) -> None:
        """Start the server; it imports in the background until the first :meth:`measure`."""
        code = "from attnzoo.bench.forkserver import serve; serve()"
        # its own process group: the cases it forks are killed with it (close), and a terminal's Ctrl-C reaches
        # only the client, which then stops the server
        self.proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=self._stderr, env=child_env(self.threads), text=True, bufsize=1,
                                     start_new_session=True)
        self._ready = False
        self._send({"imports": self.imports, "threads": self.threads})

    def ready(self) -> None:
        """Block until the server has imported everything (it starts in the background)."""
        if self.proc is None:
            self.start()
        self._wait_ready()

    def _wait_ready(self) -> None:
        if self._ready:
            return
        reply = self._recv(self.start_timeout)
        if not reply.get("ready"):
            raise RuntimeError(f"memory fork server failed to start: {reply.get('error')}\n{self._err_tail()}")
        self._ready = True

    def _err_tail(self) -> str:
        self._stderr.seek(0)
        return self._stderr.read().decode(errors="replace")[-2000:]

    def _send(self, obj: dict[str, Any]) -> None:
        assert self.proc is not None and self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def _recv(self, timeout: float) -> dict[str, Any]:
        assert self.proc is not None and self.proc.stdout is not None
        ready, _, _ = select.select([self.proc.stdout], [], [], timeout)
        if not ready:
            raise TimeoutError(f"memory fork server did not answer in {timeout:.0f} s")
        line = self.proc.stdout.readline()
        if not line:
            raise RuntimeError(f"memory fork server exited\n{self._err_tail()}")
        return json.loads(line)

    def run(self, op: str, args: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self._wait_ready()
        self._send({"op": op, "args": args, "timeout": timeout})
        return self._recv(timeout + 60)

    def measure(self, spec: dict[str, Any], *, timeout: float = 600) -> dict[str, Any]:
        return self.run("memory", {"spec": spec}, timeout=timeout)

    def close(self, now: bool = False) -> None:
        """Stop the server: ask it to quit (it finishes the case it runs, up to 10 s), or with ``now`` (an
        interrupted run) kill it and the case it runs at once."""
        if self.proc is not None and self.proc.poll() is None:
            try:
                if now:
                    raise OSError("stop now")
                self._send({"quit": True})
                self.proc.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired, ValueError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)  # the server and the case it forked
                except ProcessLookupError:
                    pass
                self.proc.wait()
        self.proc = None


MemoryServer = ForkServer  # the name of its first use


def executor(*, threads: int, imports: list[str] | tuple[str, ...] = (), isolate: bool = True):
    """A :class:`ForkServer` where ``fork`` exists (Linux, macOS) and ``isolate``; else in-process probes."""
    from .probes import InProcess

    if isolate and hasattr(os, "fork") and sys.platform != "win32":
        return ForkServer(threads=threads, imports=imports)
    return InProcess(threads=threads, imports=imports)
