"""SinkLoRA's SF-Attn: shift-free grouped attention with global sink tokens.

Paper: "SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models",
Zhang, arXiv 2406.05678. Official code: https://github.com/Dexter-GT-86/SinkLoRA (it ships LongLoRA's
S2-Attn code only; SF-Attn follows the paper).
LongLoRA's S2-Attn (arXiv 2309.12307) splits the sequence into groups of ``group_size`` tokens, attends
within each group, and shifts half of the heads by half a group. SF-Attn's segmentation-and-reassembly
returns the shifted heads' groups to the unshifted position, so every head attends within the same
fixed groups, and adds global attention to the first ``sinks`` tokens (4 in the paper, as StreamingLLM):
query p sees key j iff j <= p and (group(j) == group(p) or j < sinks). O(N (G + s) d).

Choices: groups are counted from position 0 of the key sequence (bottom-right causal alignment), so
chunked prefill and decoding keep the training groups; ``shift=True`` gives LongLoRA's S2-Attn pattern
for comparison (the second half of the query heads uses groups offset by G/2), without S2-Attn's
wrap-around of the last half group, which would leak future tokens under a causal mask. The sinks'
own rows are causal too (the paper's global rows would see the future in a causal LM). The paper's
inference uses H2O KV eviction (not implemented here); decoding here is exact for the trained pattern
with StreamingLLM's :class:`~attnzoo.state.SinkWindowCache` (window = group_size): O(G + s) state.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ...errors import check_step
from ...kernels.sdpa import sdpa
from ...reference import softmax_attention
from ...registry import Mechanism, Option, register
from ...state import SinkWindowCache
from ._common import query_positions


def _head_offsets(hq: int, group_size: int, shift: bool, device=None) -> torch.Tensor:
    """Group offset per query head: 0, or G/2 for the second half of the heads when ``shift``."""
    off = torch.zeros(hq, dtype=torch.long, device=device)
    if shift:
        off[hq // 2 :] = group_size // 2
    return off


def sinklora_mask(hq, q_pos, k_pos, group_size, sinks, shift, key_padding_mask=None):
    """(B|1, Hq|1, Nq, Nk) bool of SF-Attn for queries/keys at absolute positions q_pos, k_pos."""
    off = _head_offsets(hq, group_size, shift, q_pos.device).view(-1, 1, 1)  # (Hq, 1, 1)
    qp, kp = q_pos.view(1, -1, 1), k_pos.view(1, 1, -1)
    same = torch.div(qp + off, group_size, rounding_mode="floor") == torch.div(kp + off, group_size,
                                                                              rounding_mode="floor")
    mask = (kp <= qp) & (same | (kp < sinks))  # (Hq|1, Nq, Nk)
    mask = mask.unsqueeze(0)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask.view(key_padding_mask.shape[0], 1, 1, -1)
    return mask


def sinklora_predicate(nq: int, nk: int, *, causal: bool, group_size: int, sinks: int, shift: bool, heads=None,
                       kv_heads=None):
    """The registry's predicate of SF-Attn (causal, bottom-right): query head h sees the keys of its group
    (the second half of the heads shifted by G/2 when ``shift``) and the sinks."""
    if not causal:
        raise ValueError("causal: sinklora is causal only, got causal=False")
    hq = 2 if heads is None else heads
    off = _head_offsets(hq, group_size, shift)  # (Hq,)

    def sinklora_mask_mod(b, h, q_idx, kv_idx):
        p = q_idx + (nk - nq)
        o = off.to(q_idx.device)[h]
        same = torch.div(p + o, group_size, rounding_mode="floor") == torch.div(kv_idx + o, group_size,
                                                                               rounding_mode="floor")
        return (kv_idx <= p) & (same | (kv_idx < sinks))

    sinklora_mask_mod.heads = hq
    return sinklora_mask_mod


def sinklora_reference(q, k, v, *, causal, key_padding_mask, scale, group_size, sinks, shift):
    """Softmax attention with the SF-Attn mask materialized densely."""
    Nq, Nk = q.shape[2], k.shape[2]
    mask = sinklora_mask(q.shape[1], query_positions(Nq, Nk, q.device), torch.arange(Nk, device=q.device),
                         group_size, sinks, shift, key_padding_mask)
    return softmax_attention(q, k, v, attn_mask=mask, scale=scale)


def _grouped(q, k, v, off, group_size, sinks, key_padding_mask, scale):
    """Heads sharing one group offset: queries and keys cut into aligned groups, the sink keys prepended
    to every group, one batched fused SDPA call over all groups."""
    B, Hq, Nq, D = q.shape
    Hk, Nk, Dv = k.shape[1], k.shape[2], v.shape[3]
    G = group_size
    first = (Nk - Nq + off) // G  # first group holding a query
    lo = first * G - off  # absolute position where that group starts (may be negative: front padding)
    n_groups = -(-(Nk + off) // G) - first
    span = n_groups * G
    front = max(0, -lo)
    kpad = F.pad(k[:, :, max(lo, 0):], (0, 0, front, span - front - (Nk - max(lo, 0))))  # (B, Hk, span, D)
    vpad = F.pad(v[:, :, max(lo, 0):], (0, 0, front, span - front - (Nk - max(lo, 0))))
    qstart = Nk - Nq - lo  # grid row of the first query
    qpad = F.pad(q, (0, 0, qstart, span - qstart - Nq))  # (B, Hq, span, D)
    S = min(sinks, Nk)
    grid = torch.arange(span, device=q.device) + lo  # absolute position of each grid slot
    kpos = grid.view(n_groups, G)
    kvalid = (kpos >= 0) & (kpos < Nk)  # (n, G)
    valid = kvalid.unsqueeze(0)
    if key_padding_mask is not None:
        kpm = F.pad(key_padding_mask[:, max(lo, 0):], (front, span - front - (Nk - max(lo, 0))))
        valid = valid & kpm.view(B, n_groups, G)
    qposg = kpos.view(n_groups, G, 1)
    group_part = (kpos.view(n_groups, 1, G) <= qposg) & valid.unsqueeze(2)  # (B|1, n, G, G)
    sink_pos = torch.arange(S, device=q.device)
    gstart = (torch.arange(n_groups, device=q.device) * G + lo).view(n_groups, 1, 1)
    sink_part = (sink_pos.view(1, 1, S) <= qposg) & (sink_pos.view(1, 1, S) < gstart)  # not already a member
    if key_padding_mask is not None:
        sink_part = sink_part.unsqueeze(0) & key_padding_mask[:, :S].view(B, 1, 1, S)
    else:
        sink_part = sink_part.unsqueeze(0)
    rows = max(group_part.shape[0], sink_part.shape[0])
    mask = torch.cat([sink_part.expand(rows, -1, -1, -1), group_part.expand(rows, -1, -1, -1)], -1)
    mask = mask.reshape(rows * n_groups, 1, G, S + G)  # (B|1 * n, 1, G, S + G)
    if rows == 1 and B > 1:
        mask = mask.repeat(B, 1, 1, 1)
    kg = torch.cat([k[:, :, :S].unsqueeze(2).expand(B, Hk, n_groups, S, D), kpad.view(B, Hk, n_groups, G, D)], 3)
    vg = torch.cat([v[:, :, :S].unsqueeze(2).expand(B, Hk, n_groups, S, Dv), vpad.view(B, Hk, n_groups, G, Dv)], 3)
    fold = lambda x, h: x.transpose(1, 2).reshape(B * n_groups, h, x.shape[-2], x.shape[-1])
    out = sdpa(fold(qpad.view(B, Hq, n_groups, G, D), Hq), fold(kg, Hk), fold(vg, Hk), attn_mask=mask, scale=scale)
    out = out.view(B, n_groups, Hq, G, Dv).transpose(1, 2).reshape(B, Hq, span, Dv)  # (B, Hq, span, Dv)
    return out[:, :, qstart : qstart + Nq]


def sinklora_fast(q, k, v, *, causal, key_padding_mask, scale, group_size, sinks, shift):
    """Group-blocked fused SDPA with the sinks prepended to each group: O(N (G + s)) work, O(N) memory."""
    Hq, Hk = q.shape[1], k.shape[1]
    if not shift:
        return _grouped(q, k, v, 0, group_size, sinks, key_padding_mask, scale)
    half = Hq // 2
    if half % (Hq // Hk):  # a key/value head would serve both offsets: split the query heads per kv head
        k, v = k.repeat_interleave(Hq // Hk, 1), v.repeat_interleave(Hq // Hk, 1)
        Hk = Hq
    kh = half // (Hq // Hk)
    a = _grouped(q[:, :half], k[:, :kh], v[:, :kh], 0, group_size, sinks, key_padding_mask, scale)
    b = _grouped(q[:, half:], k[:, kh:], v[:, kh:], group_size // 2, group_size, sinks, key_padding_mask, scale)
    return torch.cat([a, b], 1)


def init_sinklora_cache(*, batch, kv_heads, head_dim, value_dim, dtype, device, group_size, sinks, shift):
    return SinkWindowCache(batch, kv_heads, head_dim, value_dim, window=group_size, sinks=sinks, dtype=dtype,
                           device=device)


def sinklora_step(q, k, v, state: SinkWindowCache, *, scale, group_size, sinks, shift, key_padding_mask=None):
    """Append T tokens to the sink + window cache (window = group_size keeps every key of the current
    group), attend with the SF-Attn mask in absolute positions, evict what no later query sees."""
    B, Hq, Hk, T, D, Dv = check_step(q, k, v, state, key_padding_mask, scale=scale, state_type=SinkWindowCache)
    if (state.window, state.sinks) != (group_size, sinks):
        raise ValueError(f"group_size, sinks: this SinkWindowCache was built for ({state.window}, {state.sinks}), "
                         f"got ({group_size}, {sinks})")
    keys, values, kmask = state.append(k, v, key_padding_mask)  # [sinks | recent], (B, Hk, L, D)
    n_sink = min(sinks, state.seq_len)
    k_pos = torch.cat([torch.arange(n_sink), torch.arange(state.start, state.seq_len)]).to(q.device)
    q_pos = torch.arange(state.seq_len - T, state.seq_len, device=q.device)
    mask = sinklora_mask(Hq, q_pos, k_pos, group_size, sinks, shift, kmask)
    out = sdpa(q, keys, values, attn_mask=mask, scale=scale)  # (B, Hq, T, Dv)
    state.evict()
    return out


SINKLORA = register(Mechanism(
    name="sinklora",
    aliases=("sf_attn", "sink_fixed_attention"),
    family="memory",
    catalog="P088",
    title="SinkLoRA: Enhanced Efficiency and Chat Capabilities for Long-Context Large Language Models",
    arxiv="2406.05678",
    code="https://github.com/Dexter-GT-86/SinkLoRA",
    summary="SF-Attn: causal attention inside fixed groups of G tokens (S2-Attn's shifted heads returned to "
            "the unshifted groups) plus global attention to the first `sinks` tokens.",
    patterns=("causal_self", "causal_cross"),
    exact=False,
    state="sink_window",
    complexity="time O(N (G + s) d), memory O(N d); decode state O(G + s)",
    mask=sinklora_predicate,
    reference=sinklora_reference,
    fast=sinklora_fast,
    step=sinklora_step,
    init_state=init_sinklora_cache,
    options=(
        Option("group_size", 2048, int, low=1, doc="tokens per attention group (G)"),
        Option("sinks", 4, int, low=0, doc="leading tokens every query attends to"),
        Option("shift", False, bool, doc="LongLoRA S2-Attn: second half of the heads uses groups shifted by G/2"),
    ),
    test_options={"group_size": 3, "sinks": 2},
    test_sizes={"n": 10, "nq": 5, "nk": 11},
    notes="group_size >= N gives dense causal attention; shift=True is LongLoRA's S2-Attn (causal, no wrap).",
))
