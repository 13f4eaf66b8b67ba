"""Window attention on 2-D token grids of any size: Swin's (shifted) windows and strided ("spanning") windows.

q, k, v are (B, heads, H, W, D). Tokens are grouped into windows of M1 x M2 tokens and attend only inside their
group:
- contiguous windows (Swin, HAT, MANIQA's SSTB, EMOv2's "close" attention): window (i, j) holds rows
  ``i*M1 .. i*M1 + M1 - 1`` and the matching columns; with a cyclic shift ``s`` the grid is rolled by ``-s`` first
  and, as Swin's attention mask does, tokens that wrapped around the border only see tokens of the same region
  (Swin's slices ``(0, -M)``, ``(-M, -s)``, ``(-s, None)`` of each rolled axis);
- strided windows (EMOv2's "spanning"/"remote" attention): with n1 = Hp / M1 windows along the rows, window j holds
  rows ``j, j + n1, j + 2 n1, ...`` (M1 rows spread over the whole grid), the same along the columns.
A grid whose sides are not multiples of the window is zero-padded at the bottom and right to the next multiple
(Swin's, HAT's and EMOv2's ``F.pad`` before partitioning; the shift and the Swin regions are taken on the padded
grid, as the official code does), the padded keys are masked out of every softmax (the official code lets them
in as zero tokens) and the padded queries are cropped from the output. A grid that already divides is untouched.
The optional relative position bias ``table ((2 M1 - 1) (2 M2 - 1), heads)`` is Swin's, read at the offset of
query minus key inside the window (:func:`relative_index`).

Forms: :func:`window_attention_reference` materialises the (HpWp) x (HpWp) masked softmax (the oracle);
:func:`window_attention` (``backend="fast"``/``"auto"``) runs the windows as independent tiles through
:func:`attnzoo.kernels.grid.tile_attention` (hand-written backward), O(HW M1 M2) time and memory.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from ..errors import check_backend, check_pair, check_tensor
from ..reference import softmax_attention
from .grid import tile_attention

__all__ = ["padded_length", "relative_index", "window_attention", "window_attention_reference", "window_layout"]


def padded_length(length: int, window: int) -> int:
    """The smallest multiple of ``window`` that holds ``length`` tokens."""
    return -(-length // window) * window


def relative_index(window, device=None, table_window=None) -> torch.Tensor:
    """(M1 M2, M1 M2) Swin index into a ((2 T1 - 1) (2 T2 - 1), heads) table: (dy + T1 - 1) (2 T2 - 1) + dx + T2 - 1
    with (dy, dx) = query minus key (window-local, row-major tokens) and T = ``table_window`` (default: the window;
    a table built for a larger window T >= M holds every offset of the smaller one)."""
    m1, m2 = check_pair("window", window)
    t1, t2 = (m1, m2) if table_window is None else check_pair("table_window", table_window)
    if t1 < m1 or t2 < m2:
        raise ValueError(f"table_window: expected >= window {(m1, m2)} per axis, got {(t1, t2)}")
    y, x = torch.meshgrid(torch.arange(m1, device=device), torch.arange(m2, device=device), indexing="ij")
    y, x = y.reshape(-1), x.reshape(-1)
    dy = y.view(-1, 1) - y.view(1, -1) + t1 - 1
    return dy * (2 * t2 - 1) + (x.view(-1, 1) - x.view(1, -1) + t2 - 1)


def _check_geometry(height: int, width: int, window, shift, strided: bool) -> tuple[int, int, int, int]:
    m1, m2 = check_pair("window", window)
    s1, s2 = check_pair("shift", shift, low=0)
    if strided and (s1 or s2):
        raise ValueError(f"shift: strided (spanning) windows take no shift, got shift={shift!r}")
    if s1 >= m1 or s2 >= m2:
        raise ValueError(f"shift: expected 0 <= shift < window per axis, got shift={shift!r}, window={window!r}")
    return m1, m2, s1, s2


@functools.lru_cache(maxsize=64)
def window_layout(height: int, width: int, window, shift=0, strided: bool = False, device: str = "cpu"):
    """Geometry of the windows of an ``height`` x ``width`` grid (tokens row-major on the padded grid).

    Returns (Hp, Wp, group (Hp Wp,) attention group of each token, valid (Hp Wp,) True for real tokens,
    local (Hp Wp, 2) window-local (row, col) of each token). Two tokens attend to each other iff their groups are
    equal (and the key is valid).
    """
    m1, m2, s1, s2 = _check_geometry(height, width, window, shift, strided)
    hp, wp = padded_length(height, m1), padded_length(width, m2)
    n1, n2 = hp // m1, wp // m2
    r = torch.arange(hp, device=device).view(hp, 1).expand(hp, wp)
    c = torch.arange(wp, device=device).view(1, wp).expand(hp, wp)
    valid = (r < height) & (c < width)
    if strided:
        win = (r % n1) * n2 + (c % n2)  # row j, j + n1, ... and column i, i + n2, ... share a window
        local = torch.stack([r // n1, c // n2], dim=-1)
        return hp, wp, win.reshape(-1), valid.reshape(-1), local.reshape(-1, 2)
    rs, cs = (r - s1) % hp, (c - s2) % wp  # coordinates on the grid rolled by -shift
    win = (rs // m1) * n2 + cs // m2
    if s1 or s2:
        def region(x, n, m, s):  # Swin's slices (0, -M), (-M, -s), (-s, None) of a rolled axis
            return ((x >= n - m).long() + (x >= n - s).long()) if s else torch.zeros_like(x)

        win = win * 9 + region(rs, hp, m1, s1) * 3 + region(cs, wp, m2, s2)
    local = torch.stack([rs % m1, cs % m2], dim=-1)
    return hp, wp, win.reshape(-1), valid.reshape(-1), local.reshape(-1, 2)


def _pad(x: torch.Tensor, hp: int, wp: int) -> torch.Tensor:
    H, W = x.shape[2], x.shape[3]
    return x if (H, W) == (hp, wp) else F.pad(x, (0, 0, 0, wp - W, 0, hp - H))  # (B, h, Hp, Wp, D)


def _check(q, k, v, table, window, table_window):
    for name, t in (("q", q), ("k", k), ("v", v)):
        check_tensor(name, t, ndim=5)
    if k.shape[:4] != q.shape[:4] or v.shape[:4] != q.shape[:4] or k.shape[4] != q.shape[4]:
        raise ValueError(f"q, k, v: expected (B, heads, H, W, D) with equal (B, heads, H, W) and q/k D, got "
                         f"{tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    if table is not None:
        m1, m2 = check_pair("window", window)
        t1, t2 = (m1, m2) if table_window is None else check_pair("table_window", table_window)
        if t1 < m1 or t2 < m2:
            raise ValueError(f"table_window: expected >= window {(m1, m2)} per axis, got {(t1, t2)}")
        want = ((2 * t1 - 1) * (2 * t2 - 1), q.shape[1])
        if tuple(table.shape) != want:
            raise ValueError(f"table: expected shape {want} ((2 T1 - 1)(2 T2 - 1), heads) for the table window "
                             f"{(t1, t2)}, got {tuple(table.shape)}")


def window_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window, shift=0,
                               strided: bool = False, table: torch.Tensor | None = None,
                               table_window=None, scale: float | None = None) -> torch.Tensor:
    """Dense masked softmax over all (padded) tokens: q, k (B, h, H, W, D), v (B, h, H, W, Dv) -> (B, h, H, W, Dv).
    O((HW)^2) memory: the oracle of :func:`window_attention`."""
    window, shift = check_pair("window", window), check_pair("shift", shift, low=0)
    _check(q, k, v, table, window, table_window)
    B, h, H, W, _ = q.shape
    hp, wp, group, valid, local = window_layout(H, W, window, shift, strided, str(q.device))
    n = hp * wp
    flat = lambda t: _pad(t, hp, wp).reshape(B, h, n, t.shape[-1])  # (B, h, N, D)
    mask = (group.view(n, 1) == group.view(1, n)) & valid.view(1, n)  # (N, N) same window, real key
    bias = None
    if table is not None:
        t1, t2 = window if table_window is None else check_pair("table_window", table_window)
        dy = local[:, 0].view(n, 1) - local[:, 0].view(1, n) + t1 - 1  # query minus key, window-local
        dx = local[:, 1].view(n, 1) - local[:, 1].view(1, n) + t2 - 1
        bias = table[dy * (2 * t2 - 1) + dx].permute(2, 0, 1).unsqueeze(0).to(q.dtype)  # (1, h, N, N)
    out = softmax_attention(flat(q), flat(k), flat(v), attn_mask=mask.view(1, 1, n, n), bias=bias, scale=scale)
    return out.view(B, h, hp, wp, -1)[:, :, :H, :W]  # (B, h, H, W, Dv)


def _partition(x: torch.Tensor, m1: int, m2: int, strided: bool) -> torch.Tensor:
    """(B, h, Hp, Wp, D) -> (B, h, T, M1 M2, D) windows (row-major inside each window)."""
    B, h, hp, wp, D = x.shape
    n1, n2 = hp // m1, wp // m2
    if strided:  # row = i * n1 + j: window j, local row i
        x = x.view(B, h, m1, n1, m2, n2, D).permute(0, 1, 3, 5, 2, 4, 6)  # (B, h, n1, n2, M1, M2, D)
    else:  # row = j * M1 + i: window j, local row i
        x = x.view(B, h, n1, m1, n2, m2, D).permute(0, 1, 2, 4, 3, 5, 6)  # (B, h, n1, n2, M1, M2, D)
    return x.reshape(B, h, n1 * n2, m1 * m2, D)


def _merge(xt: torch.Tensor, m1: int, m2: int, hp: int, wp: int, strided: bool) -> torch.Tensor:
    """Inverse of :func:`_partition`: (B, h, T, M1 M2, D) -> (B, h, Hp, Wp, D)."""
    B, h, _, _, D = xt.shape
    n1, n2 = hp // m1, wp // m2
    x = xt.view(B, h, n1, n2, m1, m2, D)
    x = x.permute(0, 1, 4, 2, 5, 3, 6) if strided else x.permute(0, 1, 2, 4, 3, 5, 6)
    return x.reshape(B, h, hp, wp, D)


def window_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, window, shift=0, strided: bool = False,
                     table: torch.Tensor | None = None, table_window=None, scale: float | None = None,
                     backend: str = "auto") -> torch.Tensor:
    """(Shifted or strided) window attention on a grid of any size.

    Args:
        q, k: (B, heads, H, W, D); v: (B, heads, H, W, Dv).
        window: M or (M1, M2). shift: s or (s1, s2), 0 <= s < M (contiguous windows only).
        strided: spanning windows (rows j, j + n1, ...) instead of contiguous ones.
        table: optional Swin relative position bias ((2 T1 - 1)(2 T2 - 1), heads); may require grad.
        table_window: the window T >= M the table was built for (default: ``window``).
        scale: multiplies q . k (default D ** -0.5).
        backend: "auto"/"fast" (windows as tiles) or "reference" (dense masked softmax).

    Returns:
        (B, heads, H, W, Dv).
    """
    check_backend(backend)
    window, shift = check_pair("window", window), check_pair("shift", shift, low=0)
    if backend == "reference":
        return window_attention_reference(q, k, v, window=window, shift=shift, strided=strided, table=table,
                                          table_window=table_window, scale=scale)
    _check(q, k, v, table, window, table_window)
    B, h, H, W, D = q.shape
    m1, m2, s1, s2 = _check_geometry(H, W, window, shift, strided)
    hp, wp, group, valid, _ = window_layout(H, W, window, shift, strided, str(q.device))
    scale = D ** -0.5 if scale is None else scale
    q, k, v = (_pad(t, hp, wp) for t in (q, k, v))  # (B, h, Hp, Wp, D)
    if s1 or s2:
        q, k, v = (torch.roll(t, shifts=(-s1, -s2), dims=(2, 3)) for t in (q, k, v))
    grid_ids = torch.stack([group.view(hp, wp), valid.view(hp, wp).long()], dim=-1)  # (Hp, Wp, 2)
    if s1 or s2:
        grid_ids = torch.roll(grid_ids, shifts=(-s1, -s2), dims=(0, 1))
    tiles = _partition(grid_ids.view(1, 1, hp, wp, 2), m1, m2, strided)[0, 0]  # (T, Q, 2)
    T, Q = tiles.shape[0], tiles.shape[1]
    mask = None
    if s1 or s2 or (hp, wp) != (H, W):
        mask = (tiles[:, :, None, 0] == tiles[:, None, :, 0]) & tiles[:, None, :, 1].bool()  # (T, Q, Q)
        mask = mask.view(1, 1, T, Q, Q)
    bias = None
    if table is not None:
        index = relative_index((m1, m2), q.device, table_window)  # (Q, Q)
        bias = table[index].permute(2, 0, 1).reshape(1, h, 1, Q, Q).to(q.dtype)
    out = tile_attention(_partition(q, m1, m2, strided), _partition(k, m1, m2, strided),
                         _partition(v, m1, m2, strided), scale=scale, bias=bias, mask=mask)  # (B, h, T, Q, Dv)
    out = _merge(out, m1, m2, hp, wp, strided)  # (B, h, Hp, Wp, Dv)
    if s1 or s2:
        out = torch.roll(out, shifts=(s1, s2), dims=(2, 3))
    return out[:, :, :H, :W]
