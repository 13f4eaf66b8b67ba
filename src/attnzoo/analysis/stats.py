"""Head statistics streamed from q, k and the log-sum-exp: no n x n matrix at any length.

Per head and query row: the entropy of the attention row, the mass on the first tokens (the sink), the mass on
named token sets (a needle, a marked span, the visual tokens), the argmax key, the top-k keys, and the mean distance
to the attended keys. Row i of softmax(Q K^T * scale) is ``exp(q_i . k_j * scale - lse_i)``
(:func:`attnzoo.reduce.importance.attention_row`, which honours causal, key-padding and any ``attnzoo.masks``
predicate -- e.g. a mechanism's declared mask -- and takes the LSE a fused forward returns,
:func:`attnzoo.kernels.sdpa.sdpa_with_lse`); :func:`head_statistics` forms it for a chunk of rows at a time and
reduces it at once, so memory is O(chunk * Nk) per head, set by ``budget`` bytes, never O(Nq * Nk).

:func:`weight_statistics` computes the same statistics from a given (B, H, R, Nk) weight matrix: the dense
check, and the route for mechanisms that are not a masked softmax (their effective operator,
:mod:`attnzoo.analysis.operator`, at short lengths). Both share one reduction (:func:`_reduce`), so they differ
only in how the weights are formed (float64: 1e-10, ``tests/analysis/test_stats.py``).

Entropy is in nats and ignores zero weights (0 log 0 = 0); ties in argmax/top-k go to the lower key index
(``torch.argmax``'s first maximum; top-k by a stable sort). Rows that see no key have entropy 0, masses 0 and
argmax 0.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import torch

from ..errors import check_int, check_tensor
from ..masks import Predicate
from ..reduce.importance import attention_row

__all__ = ["HeadStats", "head_statistics", "weight_statistics", "token_set"]

DEFAULT_BUDGET = 256 << 20  # bytes of working memory per chunk of rows (the weights and their temporaries)
_WORK_COPIES = 8  # the weights, scores, masks and top-k/histogram temporaries of one chunk, in weight-sized units


@dataclass
class HeadStats:
    """Statistics of R query rows per head (B, H, R) unless noted; ``rows`` (R,) are the query positions."""

    rows: torch.Tensor
    entropy: torch.Tensor
    sink_mass: torch.Tensor
    argmax: torch.Tensor
    topk_values: torch.Tensor  # (B, H, R, k)
    topk_indices: torch.Tensor  # (B, H, R, k)
    set_mass: dict[str, torch.Tensor] = field(default_factory=dict)
    mean_distance: torch.Tensor | None = None
    distance_histogram: torch.Tensor | None = None  # (B, H, bins): attention mass summed over rows, per bin

    def as_dict(self) -> dict[str, torch.Tensor]:
        out = {"rows": self.rows, "entropy": self.entropy, "sink_mass": self.sink_mass, "argmax": self.argmax,
               "topk_values": self.topk_values, "topk_indices": self.topk_indices}
        out.update({f"set_mass[{k}]": v for k, v in self.set_mass.items()})
        if self.mean_distance is not None:
            out["mean_distance"] = self.mean_distance
        if self.distance_histogram is not None:
            out["distance_histogram"] = self.distance_histogram
        return out


def token_set(tokens: Sequence[int] | torch.Tensor, nk: int, batch: int = 1) -> torch.Tensor:
    """A (B, Nk) bool set of key positions from positions (a list or (K,) tensor), a (Nk,) or a (B, Nk) bool mask."""
    t = torch.as_tensor(tokens)
    if t.dtype == torch.bool:
        if t.dim() == 1:
            t = t.view(1, -1).expand(batch, -1)
        if tuple(t.shape) != (batch, nk):
            raise ValueError(f"token set: expected a bool mask (Nk,) or (B, Nk) = ({batch}, {nk}), "
                             f"got {tuple(t.shape)}")
        return t
    t = t.reshape(-1).long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= nk):
        raise ValueError(f"token set: expected positions in [0, {nk}), got {t.tolist()}")
    m = torch.zeros(nk, dtype=torch.bool)
    m[t] = True
    return m.view(1, nk).expand(batch, nk)


def _positions(pos: torch.Tensor | None, n: int, name: str) -> torch.Tensor | None:
    if pos is None:
        return None
    pos = torch.as_tensor(pos)
    if pos.dim() == 1:
        pos = pos.view(-1, 1)
    if pos.dim() != 2 or pos.shape[0] != n:
        raise ValueError(f"{name}: expected coordinates (N,) or (N, P) with N={n}, got {tuple(pos.shape)}")
    return pos.to(torch.float64)


def _topk(p: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k along the last axis, best first, ties to the lower index (whatever torch.topk's tie order)."""
    n = p.shape[-1]
    if k == 0:
        shape = (*p.shape[:-1], 0)
        return p.new_zeros(shape), torch.zeros(shape, dtype=torch.long, device=p.device)
    thr = torch.topk(p, k, dim=-1).values[..., -1:]  # the k-th largest value of each row
    above = p > thr
    tied = p == thr
    room = k - above.sum(-1, keepdim=True)  # how many of the tied entries make it: the first ones by index
    keep = above | (tied & (torch.cumsum(tied, dim=-1) <= room))  # exactly k per row
    pos = torch.arange(n, 0, -1, device=p.device)  # larger for lower indices
    idx = torch.topk(torch.where(keep, pos, torch.zeros_like(pos)), k, dim=-1).indices  # the kept, lowest first
    idx = idx.sort(dim=-1).values
    order = torch.sort(p.gather(-1, idx), dim=-1, descending=True, stable=True).indices
    idx = idx.gather(-1, order)
    return p.gather(-1, idx), idx


def _pad_topk(values: torch.Tensor, indices: torch.Tensor, k: int, kn: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k over kn < k visible keys completed as the full row ranks them: the zero weights that follow the
    visible keys' come at the lowest indices with weight 0 -- visible zeros first (they are already in the list
    when kn >= k), then keys kn, kn + 1, ..."""
    missing = k - values.shape[-1]
    if missing <= 0:
        return values, indices
    extra = torch.arange(kn, kn + missing, device=indices.device).expand(*indices.shape[:-1], missing)
    return torch.cat([values, values.new_zeros(*values.shape[:-1], missing)], -1), torch.cat([indices, extra], -1)


def _reduce(p: torch.Tensor, rows: torch.Tensor, *, nq: int, sink: int, sets: dict[str, torch.Tensor], topk: int,
            qpos: torch.Tensor | None, kpos: torch.Tensor | None, bins: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """Statistics of weights p (B, H, R, Nk) for query rows ``rows`` (R,) of ``nq`` queries."""
    B, H, R, Nk = p.shape
    out = {"entropy": -torch.xlogy(p, p).sum(-1), "sink_mass": p[..., :sink].sum(-1),
           "argmax": p.argmax(-1)}
    out["topk_values"], out["topk_indices"] = _topk(p, min(topk, Nk))
    for name, m in sets.items():
        mm = m.to(p.dtype).view(m.shape[0], 1, Nk, 1)  # (B|1, 1, Nk, 1)
        out[f"set:{name}"] = torch.matmul(p, mm).squeeze(-1)  # (B, H, R)
    if qpos is not None or bins is not None:
        if qpos is None:  # 1-D positions, bottom-right aligned (query i at key position i + Nk - nq)
            d = ((rows.view(R, 1) + (Nk - nq)) - torch.arange(Nk, device=p.device).view(1, Nk)).abs().to(p.dtype)
        else:
            d = torch.cdist(qpos[rows].to(p.device), kpos.to(p.device)).to(p.dtype)  # (R, Nk)
        out["mean_distance"] = (p * d).sum(-1)  # (B, H, R)
        if bins is not None:
            which = torch.bucketize(d, bins.to(p.device, p.dtype), right=True) - 1  # (R, Nk); -1 below the first
            nb = bins.numel() - 1
            which = torch.where((which >= 0) & (which < nb), which, torch.full_like(which, nb))  # nb = out of range
            hist = torch.zeros(B, H, nb + 1, dtype=p.dtype, device=p.device)
            hist.scatter_add_(2, which.reshape(1, 1, -1).expand(B, H, -1), p.reshape(B, H, -1))
            out["distance_histogram"] = hist[..., :nb]
    return out


def _collect(parts: list[dict[str, torch.Tensor]], rows: torch.Tensor, names: list[str]) -> HeadStats:
    cat = lambda key: torch.cat([x[key] for x in parts], dim=2)  # noqa: E731
    hist = None
    if "distance_histogram" in parts[0]:
        hist = sum(x["distance_histogram"] for x in parts)
    return HeadStats(
        rows=rows, entropy=cat("entropy"), sink_mass=cat("sink_mass"), argmax=cat("argmax"),
        topk_values=cat("topk_values"), topk_indices=cat("topk_indices"),
        set_mass={n: cat(f"set:{n}") for n in names},
        mean_distance=cat("mean_distance") if "mean_distance" in parts[0] else None, distance_histogram=hist)


def _prepare(B, Nk, nq, rows, sink, sets, topk, positions, key_positions, bins, device):
    rows = torch.arange(nq, device=device) if rows is None else torch.as_tensor(rows, device=device).reshape(-1)
    if rows.numel() and (int(rows.min()) < 0 or int(rows.max()) >= nq):
        raise ValueError(f"rows: expected query positions in [0, {nq}), got {rows.tolist()}")
    check_int("sink", sink, low=0)
    check_int("topk", topk, low=0)
    sets = {str(n): token_set(t, Nk, B).to(device) for n, t in (sets or {}).items()}
    qpos = _positions(positions, nq, "positions")
    kpos = _positions(key_positions if key_positions is not None else positions, Nk, "key_positions") \
        if qpos is not None else None
    if bins is not None:
        bins = torch.as_tensor(bins, dtype=torch.float64).reshape(-1)
        if bins.numel() < 2 or bool((bins[1:] <= bins[:-1]).any()):
            raise ValueError(f"distance_bins: expected >= 2 increasing edges, got {bins.tolist()}")
    return rows.long(), sets, qpos, kpos, bins


def head_statistics(
    q: torch.Tensor, k: torch.Tensor, *, rows: Sequence[int] | torch.Tensor | None = None, nq: int | None = None,
    scale: float | None = None, causal: bool = False, key_padding_mask: torch.Tensor | None = None,
    predicate: Predicate | None = None, lse: torch.Tensor | None = None, sink: int = 1,
    sets: Mapping[str, Sequence[int] | torch.Tensor] | None = None, topk: int = 5,
    positions: torch.Tensor | None = None, key_positions: torch.Tensor | None = None,
    distance_bins: Sequence[float] | torch.Tensor | None = None, budget: int = DEFAULT_BUDGET,
) -> HeadStats:
    """Statistics of softmax attention rows, streamed in chunks of rows from q, k and the log-sum-exp.

    Args:
        q: (B, Hq, Nq, D) queries (RoPE applied), or only the selected rows (B, Hq, R, D) when ``rows`` is given
            with ``nq`` (then q[:, :, r] is the query at position rows[r]).
        k: (B, Hk, Nk, D) keys, Hq % Hk == 0.
        rows: query positions to report (default all Nq).
        nq: number of queries of the attention (default q.shape[2]); causal is bottom-right aligned.
        key_padding_mask / predicate: as :func:`attnzoo.reduce.importance.attention_row`.
        lse: (B, Hq, R) log-sum-exp of the reported rows (``sdpa_with_lse``); computed per chunk when None.
        sink: the first ``sink`` keys form the sink.
        sets: named token sets {name: positions, (Nk,) or (B, Nk) bool} whose mass is reported.
        topk: keys reported per row.
        positions / key_positions: coordinates (N,) or (N, P) for the mean distance (e.g. patch rows and columns);
            default, when ``distance_bins`` is given, 1-D positions.
        distance_bins: increasing bin edges; the attention mass per distance bin is summed over the rows.
        budget: bytes of working memory per chunk of rows (the weights and their temporaries, about 8 weight-sized
            tensors): sets how many rows are formed at once.
    """
    check_tensor("q", q, ndim=4)
    check_tensor("k", k, ndim=4)
    B, Hq, Rq, _ = q.shape
    Nk = k.shape[2]
    nq = Rq if nq is None else check_int("nq", nq, low=1)
    rows, sets, qpos, kpos, bins = _prepare(B, Nk, nq, rows, sink, sets, topk, positions, key_positions,
                                            distance_bins, q.device)
    if rows.numel() != Rq and Rq != nq:
        raise ValueError(f"q: expected all {nq} queries or the {rows.numel()} selected rows, got {Rq} rows")
    if lse is not None:
        check_tensor("lse", lse, ndim=3)
        if tuple(lse.shape) != (B, Hq, rows.numel()):
            raise ValueError(f"lse: expected (B, Hq, R) = ({B}, {Hq}, {rows.numel()}), got {tuple(lse.shape)}")
    check_int("budget", budget, low=1)
    item = torch.promote_types(q.dtype, torch.float32).itemsize
    chunk = max(1, budget // max(1, _WORK_COPIES * B * Hq * Nk * item))
    parts = []
    offset = Nk - nq  # bottom-right alignment: query i sees key j <= i + offset
    for s in range(0, rows.numel(), chunk):
        e = min(rows.numel(), s + chunk)
        idx = rows[s:e]
        qr = q[:, :, idx] if Rq == nq else q[:, :, s:e]  # (B, Hq, c, D)
        # causal: keys after the chunk's last visible one get zero weight -- leave them out (same alignment)
        kn = min(Nk, max(1, int(idx.max()) + offset + 1)) if causal else Nk
        cut = lambda t, kn=kn: t if t is None or kn == Nk else t[..., :kn]  # noqa: E731
        p = attention_row(qr, k[:, :, :kn], rows=idx, nq=kn - offset, scale=scale, causal=causal,
                          key_padding_mask=cut(key_padding_mask), lse=None if lse is None else lse[:, :, s:e],
                          predicate=predicate)  # (B, Hq, c, kn)
        part = _reduce(p, idx, nq=kn - offset, sink=sink, sets={n: cut(m) for n, m in sets.items()}, topk=topk,
                       qpos=qpos, kpos=None if kpos is None else kpos[:kn], bins=bins)
        del p
        if kn < Nk:  # top-k slots past the visible keys: weight 0 at the lowest unseen indices (as dense)
            part["topk_values"], part["topk_indices"] = _pad_topk(part["topk_values"], part["topk_indices"],
                                                                  min(topk, Nk), kn)
        parts.append(part)
    if not parts:
        raise ValueError("rows: expected at least one query row")
    return _collect(parts, rows, list(sets))


def weight_statistics(
    weights: torch.Tensor, *, rows: Sequence[int] | torch.Tensor | None = None, nq: int | None = None,
    sink: int = 1, sets: Mapping[str, Sequence[int] | torch.Tensor] | None = None, topk: int = 5,
    positions: torch.Tensor | None = None, key_positions: torch.Tensor | None = None,
    distance_bins: Sequence[float] | torch.Tensor | None = None,
) -> HeadStats:
    """The statistics of :func:`head_statistics` from a weight matrix (B, H, Nq, Nk) (all rows, or the rows
    ``rows`` of ``nq`` when weights holds only those, (B, H, R, Nk)): any mechanism's effective operator."""
    check_tensor("weights", weights, ndim=4)
    B, H, Rw, Nk = weights.shape
    nq = Rw if nq is None else check_int("nq", nq, low=1)
    rows, sets, qpos, kpos, bins = _prepare(B, Nk, nq, rows, sink, sets, topk, positions, key_positions,
                                            distance_bins, weights.device)
    p = weights[:, :, rows] if Rw == nq else weights
    if p.shape[2] != rows.numel():
        raise ValueError(f"weights: expected all {nq} rows or the {rows.numel()} selected rows, got {Rw}")
    part = _reduce(p, rows, nq=nq, sink=sink, sets=sets, topk=topk, qpos=qpos, kpos=kpos, bins=bins)
    return _collect([part], rows, list(sets))


def dense_bytes(batch: int, heads: int, n: int, itemsize: int = 4) -> int:
    """Bytes of the dense (B, H, n, n) attention matrix (the comparison of the memory benchmark)."""
    return batch * heads * n * n * itemsize


def entropy_bound(nk: int) -> float:
    """The largest possible row entropy, log(Nk) nats (uniform attention)."""
    return math.log(nk)
