"""Communication for context parallelism: a thin wrapper around torch.distributed that counts bytes, bounds
every wait by a timeout and turns a failed collective into one clear error.

CATALOG P025 (A Unified View of Long-Sequence Models towards Modeling Million-Scale Dependencies: sharded
attention merged by log-sum-exp) -- this module is the plumbing every layout of :mod:`attnzoo.distributed`
shares: ring and halo exchanges (P025), Ulysses all-to-all (P025, P075), LASP-2's all-gather (P117) and
split-KV decoding (P089).

Every operation is asynchronous and then waited with ``timeout`` seconds (gloo honours the per-call timeout
on CPU, NCCL on GPU: the same code). A wait that fails -- a peer process died (its sockets close), hung (the
timeout expires) or called a different collective -- raises :class:`DistributedError` naming this rank, the
operation, the peer and the time waited, on every rank that was waiting; the group is then marked broken and
every later call raises at once instead of waiting again.

Bytes: ``comm_stats()`` holds per-process counters of what this rank *sent*, split into ``data`` (the tensors
of the algorithm: key/value blocks, states, gradients) and ``control`` (pre-flight metadata, plans). An
all-gather counts ``(W - 1) x`` its input (the input must reach the W - 1 other ranks), an all-to-all the
parts addressed to other ranks, an all-reduce ``2 (W - 1) / W x`` its input (a ring all-reduce).

Pre-flight (:func:`preflight`): before the first message of an attention call, every rank contributes a
fixed-size int64 digest of its arguments (layout, mechanism, options, shapes, dtypes, masks, grad mode) to
one all-gather; if any field differs, the ranks exchange readable descriptions and every rank raises
:class:`RankMismatchError` listing the differing fields per rank -- never a silent hang or a wrong result.
"""

from __future__ import annotations

import datetime
import hashlib
import pickle
import time
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.distributed as dist

from ..errors import AttnzooError, check_float

__all__ = [
    "DistributedError", "RankMismatchError", "Comm", "CommStats", "comm_stats", "reset_comm_stats",
    "preflight", "DEFAULT_TIMEOUT",
]

DEFAULT_TIMEOUT = 120.0
"""Seconds any single wait may take before the call fails (pass ``timeout=`` to change it per call)."""


class DistributedError(AttnzooError, RuntimeError):
    """A collective or point-to-point operation failed: a rank died, hung, or called something else."""


class RankMismatchError(AttnzooError, ValueError):
    """The ranks of a group called the same distributed operation with different arguments."""


# --------------------------------------------------------------------------------------------------------
# Byte counters
# --------------------------------------------------------------------------------------------------------
@dataclass
class CommStats:
    """Bytes this process sent since the last reset (``data``: the algorithm's tensors; ``control``:
    metadata), with the data bytes also split by operation kind (``"ring kv"``, ``"lasp2 states"`` ...)."""

    data_bytes: int = 0
    control_bytes: int = 0
    messages: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)

    def add(self, nbytes: int, kind: str, control: bool) -> None:
        if nbytes <= 0:
            return
        self.messages += 1
        if control:
            self.control_bytes += nbytes
        else:
            self.data_bytes += nbytes
            self.by_kind[kind] = self.by_kind.get(kind, 0) + nbytes

    def reset(self) -> None:
        self.data_bytes = self.control_bytes = self.messages = 0
        self.by_kind = {}

    def snapshot(self) -> dict[str, Any]:
        return {"data_bytes": self.data_bytes, "control_bytes": self.control_bytes, "messages": self.messages,
                "by_kind": dict(self.by_kind)}


_STATS = CommStats()


def comm_stats() -> CommStats:
    """The process-wide byte counters (what this rank sent)."""
    return _STATS


def reset_comm_stats() -> None:
    _STATS.reset()


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


# torch >= 2.10 names it all_gather_single (all_gather_into_tensor is deprecated there)
_all_gather_flat = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor

# Groups on which an operation already failed: every later call fails at once (the transport is closed).
_BROKEN: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_BROKEN_DEFAULT: list[str] = []


# --------------------------------------------------------------------------------------------------------
# The wrapper
# --------------------------------------------------------------------------------------------------------
class Comm:
    """Operations on one process group (None = the default group) with byte counting and timeouts.

    Ranks passed to :meth:`isend` / :meth:`irecv` are ranks *within the group*."""

    def __init__(self, group=None, *, timeout: float = DEFAULT_TIMEOUT) -> None:
        if not dist.is_available() or not dist.is_initialized():
            raise DistributedError(
                "group: torch.distributed is not initialized; call torch.distributed.init_process_group('gloo' or "
                "'nccl', ...) first (torchrun sets the environment), or use attnzoo.distributed.launch.run")
        self.timeout = check_float("timeout", timeout, low=0.0, low_open=True)
        self.group = group
        self.rank = dist.get_rank(group)
        self.world = dist.get_world_size(group)
        if self.rank < 0:
            raise DistributedError("group: this process is not a member of the given process group")
        self._check_not_broken()

    # -- bookkeeping -----------------------------------------------------------------------------------
    def _broken_reason(self) -> str | None:
        if self.group is None:
            return _BROKEN_DEFAULT[0] if _BROKEN_DEFAULT else None
        try:
            return _BROKEN.get(self.group)
        except TypeError:  # pragma: no cover - an unhashable / non-weakrefable group object
            return None

    def _mark_broken(self, reason: str) -> None:
        if self.group is None:
            if not _BROKEN_DEFAULT:
                _BROKEN_DEFAULT.append(reason)
            return
        try:
            _BROKEN.setdefault(self.group, reason)
        except TypeError:  # pragma: no cover
            pass

    def _check_not_broken(self) -> None:
        reason = self._broken_reason()
        if reason is not None:
            raise DistributedError(
                f"attnzoo.distributed: rank {self.rank} of {self.world}: this process group is unusable, an earlier "
                f"operation on it failed ({reason}); destroy it and start a new one")

    def global_rank(self, r: int) -> int:
        return r if self.group is None else dist.get_global_rank(self.group, r)

    def _fail(self, what: str, peer: str, started: float, err: BaseException) -> DistributedError:
        waited = time.monotonic() - started
        msg = (f"attnzoo.distributed: rank {self.rank} of {self.world}: {what} ({peer}) failed after {waited:.1f} s "
               f"(timeout {self.timeout:g} s): a rank of the group died, hung, or called a different operation. "
               f"Original error: {type(err).__name__}: {str(err).strip()[:400]}")
        self._mark_broken(f"{what} failed on rank {self.rank}")
        return DistributedError(msg)

    def wait(self, works: Sequence[tuple[Any, str, str]]) -> None:
        """Wait for ``(work, what, peer)`` triples, each bounded by the timeout."""
        td = datetime.timedelta(seconds=self.timeout)
        for work, what, peer in works:
            started = time.monotonic()
            try:
                ok = work.wait(td)
            except Exception as err:  # gloo raises RuntimeError / DistBackendError on timeout or closed pairs
                raise self._fail(what, peer, started, err) from err
            if ok is False:
                raise self._fail(what, peer, started, TimeoutError("wait returned False"))

    # -- point to point --------------------------------------------------------------------------------
    def isend(self, t: torch.Tensor, dst: int, tag: int, *, kind: str, control: bool = False):
        self._check_not_broken()
        _STATS.add(_nbytes(t), kind, control)
        return dist.isend(t.contiguous(), self.global_rank(dst), group=self.group, tag=tag)

    def irecv(self, t: torch.Tensor, src: int, tag: int):
        self._check_not_broken()
        return dist.irecv(t, self.global_rank(src), group=self.group, tag=tag)

    # -- collectives -----------------------------------------------------------------------------------
    def all_gather(self, t: torch.Tensor, *, what: str, kind: str, control: bool = False) -> torch.Tensor:
        """(...) on every rank -> (W, ...) stacked in rank order."""
        self._check_not_broken()
        t = t.contiguous()
        out = t.new_empty(self.world * t.numel())
        _STATS.add((self.world - 1) * _nbytes(t), kind, control)
        started = time.monotonic()
        try:
            work = _all_gather_flat(out, t.reshape(-1), group=self.group, async_op=True)
        except Exception as err:
            raise self._fail(what, "all ranks", started, err) from err
        self.wait([(work, what, "all ranks")])
        return out.view(self.world, *t.shape)

    def all_reduce(self, t: torch.Tensor, *, what: str, kind: str, control: bool = False) -> torch.Tensor:
        """Sum over the group (in place on a contiguous copy, returned)."""
        self._check_not_broken()
        t = t.contiguous().clone()
        _STATS.add(2 * (self.world - 1) * _nbytes(t) // max(self.world, 1), kind, control)
        started = time.monotonic()
        try:
            work = dist.all_reduce(t, group=self.group, async_op=True)
        except Exception as err:
            raise self._fail(what, "all ranks", started, err) from err
        self.wait([(work, what, "all ranks")])
        return t

    def all_to_all(self, t: torch.Tensor, send_rows: Sequence[int], recv_rows: Sequence[int], *, what: str,
                   kind: str) -> torch.Tensor:
        """Rows (dim 0) of ``t``: the first ``send_rows[0]`` go to rank 0, the next ``send_rows[1]`` to rank 1 ...;
        returns the ``sum(recv_rows)`` rows received, in source-rank order."""
        self._check_not_broken()
        t = t.contiguous()
        row = _nbytes(t[:1]) if t.shape[0] else 0
        out = t.new_empty(sum(recv_rows), *t.shape[1:])
        _STATS.add(row * (sum(send_rows) - send_rows[self.rank]), kind, False)
        started = time.monotonic()
        try:
            work = dist.all_to_all_single(out, t, list(recv_rows), list(send_rows), group=self.group, async_op=True)
        except Exception as err:
            raise self._fail(what, "all ranks", started, err) from err
        self.wait([(work, what, "all ranks")])
        return out

    def gather_objects(self, obj: Any, *, what: str) -> list[Any]:
        """Every rank's picklable ``obj``, in rank order (control bytes; bounded by the timeout)."""
        payload = torch.frombuffer(bytearray(pickle.dumps(obj)), dtype=torch.uint8)
        sizes = self.all_gather(torch.tensor([payload.numel()], dtype=torch.int64), what=what + " (sizes)",
                                kind="control", control=True)
        top = int(sizes.max())
        buf = torch.zeros(top, dtype=torch.uint8)
        buf[: payload.numel()] = payload
        allbuf = self.all_gather(buf, what=what, kind="control", control=True)
        return [pickle.loads(allbuf[i, : int(sizes[i])].numpy().tobytes()) for i in range(self.world)]


# --------------------------------------------------------------------------------------------------------
# Pre-flight metadata check
# --------------------------------------------------------------------------------------------------------
_MAGIC = 0x61747A6F  # 'atzo': a rank calling a different collective fails the comparison of column 0


def _digest(value: Any) -> int:
    """A stable 63-bit digest (Python's hash() is salted per process, so it cannot be compared across ranks)."""
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int) and -(2 ** 62) < value < 2 ** 62:
        return value
    h = hashlib.blake2b(describe(value).encode(), digest_size=8).digest()
    return int.from_bytes(h, "little") & ((1 << 62) - 1)


def describe(value: Any) -> str:
    """A readable, rank-independent description of an argument (tensors by shape, dtype and value sum)."""
    if isinstance(value, torch.Tensor):
        if value.is_floating_point() or value.is_complex():
            s = float(value.detach().double().sum()) if value.numel() else 0.0
        else:
            s = int(value.detach().long().sum()) if value.numel() else 0
        return f"tensor(shape={tuple(value.shape)}, dtype={value.dtype}, sum={s!r})"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k}: {describe(v)}" for k, v in sorted(value.items(), key=lambda kv: str(kv[0]))) + "}"
    if isinstance(value, (list, tuple)):
        inner = ", ".join(describe(v) for v in value)
        return f"[{inner}]" if isinstance(value, list) else f"({inner})"
    if callable(value):
        return f"<callable {getattr(value, '__module__', '?')}.{getattr(value, '__qualname__', type(value).__name__)}>"
    return repr(value)


def preflight(comm: Comm, meta: Mapping[str, Any], soft: Sequence[int] = ()) -> torch.Tensor:
    """Raise :class:`RankMismatchError` on every rank if any entry of ``meta`` differs between ranks.

    One all-gather of a fixed-size int64 row: the digests of ``meta`` and then the ``soft`` ints, which may differ
    between ranks and are returned, (W, len(soft)) (e.g. whether each rank has a plan cached). Readable
    descriptions are exchanged only on a mismatch."""
    keys = list(meta)
    hard = [_MAGIC, len(keys), len(soft)] + [_digest(meta[k]) for k in keys]
    width = 64
    if len(hard) + len(soft) > width:
        raise ValueError(f"meta, soft: at most {width - 3} fields in all, got {len(keys)} + {len(soft)}")
    # Ranks with a different number of fields would hang in the all-gather: pad to a fixed width.
    fixed = torch.zeros(width, dtype=torch.int64)
    fixed[: len(hard)] = torch.tensor(hard, dtype=torch.int64)
    fixed[width - len(soft):] = torch.tensor(list(soft), dtype=torch.int64)
    rows = comm.all_gather(fixed, what="pre-flight check of the arguments", kind="control", control=True)
    head = rows[:, : width - len(soft)] if soft else rows
    if bool((head == head[0]).all()):
        return rows[:, width - len(soft):]
    described = {k: describe(v) for k, v in meta.items()}
    everyone = comm.gather_objects(described, what="pre-flight description of the arguments")
    names = sorted({k for d in everyone for k in d}, key=lambda k: (k not in described, k))
    diff = [k for k in names if len({d.get(k, "<missing>") for d in everyone}) > 1]
    if not diff:  # a different number of soft fields: a different attnzoo version or operation
        diff = ["op"]
    lines = [f"  {k}: " + ", ".join(f"rank {r}: {d.get(k, '<missing>')}" for r, d in enumerate(everyone)) for k in diff]
    raise RankMismatchError(
        f"attnzoo.distributed: rank {comm.rank} of {comm.world}: the ranks called {meta.get('op', 'the operation')!r} "
        f"with different arguments (every rank must pass the same mechanism, options, layout and local shapes):\n"
        + "\n".join(lines))
