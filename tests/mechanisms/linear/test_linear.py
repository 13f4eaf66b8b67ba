"""Oracles of `linear` (Katharopoulos et al.), of the shared chunked kernel and of RecurrentState."""

import math

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.kernels.chunked import chunked_linear_attention
from attnzoo.mechanisms.linear.linear_attention import (
    feature_map,
    quadratic_linear_attention,
    recurrent_linear_attention,
)
from attnzoo.state import RecurrentState
from attnzoo.testing import assert_close

F64 = torch.float64


def rand(*shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=F64).to(dtype)


def qkv(n, hq=4, hk=2, d=5, dv=3, b=2, nk=None, seed=0, dtype=F64):
    nk = n if nk is None else nk
    return rand(b, hq, n, d, seed=seed, dtype=dtype), rand(b, hk, nk, d, seed=seed + 1, dtype=dtype), \
        rand(b, hk, nk, dv, seed=seed + 2, dtype=dtype)


@pytest.mark.parametrize("fmap,normalize", [("elu+1", True), ("identity", False)])
@pytest.mark.parametrize("n", [1, 7, 65])
def test_chunked_equals_recurrent_equals_quadratic(fmap, normalize, n):
    q, k, v = qkv(n)
    scale = 0.4
    qf, kf = feature_map(q, fmap) * scale, feature_map(k, fmap)
    quad = quadratic_linear_attention(qf, kf, v, causal=True, normalize=normalize, eps=1e-6)
    rec, _, _ = recurrent_linear_attention(qf, kf, v, normalize=normalize, eps=1e-6)
    assert_close(rec, quad, F64, "recurrent vs quadratic")
    for chunk in (1, 3, 4, 64):  # 3 and 4 do not divide 65
        fast = attnzoo.attention(q, k, v, mechanism="linear", causal=True, scale=scale, backend="fast",
                                 feature_map=fmap, normalize=normalize, chunk=chunk)
        assert_close(fast, quad, F64, f"chunked (chunk {chunk}) vs quadratic")


def test_hand_computed():
    # one head, D = 1: phi(x) = elu(x) + 1; q = [1, 2], k = [1, -1], v = [10, 20], scale 1, eps 0.
    q = torch.tensor([1.0, 2.0], dtype=F64).view(1, 1, 2, 1)
    k = torch.tensor([1.0, -1.0], dtype=F64).view(1, 1, 2, 1)
    v = torch.tensor([10.0, 20.0], dtype=F64).view(1, 1, 2, 1)
    pk = [2.0, math.exp(-1.0)]  # phi(1) = 2, phi(-1) = e^-1
    pq = [2.0, 3.0]
    want0 = 10.0  # the first query sees only key 0
    want1 = (pq[1] * pk[0] * 10 + pq[1] * pk[1] * 20) / (pq[1] * pk[0] + pq[1] * pk[1])
    for backend in ("reference", "fast"):
        out = attnzoo.attention(q, k, v, mechanism="linear", causal=True, scale=1.0, eps=0.0, backend=backend)
        assert torch.allclose(out.flatten(), torch.tensor([want0, want1], dtype=F64), rtol=1e-12, atol=0)
    nc = attnzoo.attention(q, k, v, mechanism="linear", causal=False, scale=1.0, eps=0.0)
    want = (pk[0] * 10 + pk[1] * 20) / (pk[0] + pk[1])  # phi(q) cancels without a causal mask
    assert torch.allclose(nc.flatten(), torch.full((2,), want, dtype=F64), rtol=1e-12, atol=0)


def test_noncausal_is_the_global_summary():
    q, k, v = qkv(6, nk=9)
    out = attnzoo.attention(q, k, v, mechanism="linear", causal=False, backend="fast")
    qf = (F.elu(q) + 1) / math.sqrt(q.shape[-1])
    kf = (F.elu(k) + 1).repeat_interleave(2, dim=1)
    vv = v.repeat_interleave(2, dim=1)
    num = qf @ (kf.transpose(-1, -2) @ vv)  # phi(Q) (phi(K)^T V)
    den = qf @ kf.sum(dim=2, keepdim=True).transpose(-1, -2)  # phi(Q) . sum_j phi(k_j)
    assert_close(out, num / (den + 1e-6), F64, "global summary")


@pytest.mark.parametrize("nq,nk", [(3, 8), (8, 3)])
def test_causal_cross_is_bottom_right(nq, nk):
    """Causal with Nq != Nk: the queries are the last Nq positions of a causal self attention over Nk keys
    (Nq > Nk: the first Nq - Nk queries see nothing and return 0)."""
    n = max(nq, nk)
    q, k, v = qkv(n)
    full = attnzoo.attention(q, k, v, mechanism="linear", causal=True, backend="reference", chunk=2)
    qc, kc, vc = q[:, :, n - nq:], k[:, :, n - nk:], v[:, :, n - nk:]
    for backend in ("reference", "fast"):
        out = attnzoo.attention(qc, kc, vc, mechanism="linear", causal=True, backend=backend, chunk=2)
        if nq <= nk:
            assert_close(out, full[:, :, n - nq:], F64, f"{backend} causal cross")
        else:
            assert out[:, :, : nq - nk].abs().max() == 0
            sub = attnzoo.attention(qc[:, :, nq - nk:], kc, vc, mechanism="linear", causal=True, backend="reference")
            assert_close(out[:, :, nq - nk:], sub, F64, f"{backend} causal cross, seen rows")


# ---------------------------------------------------------------------------------------------------------
# The chunked kernel: outputs, final states and their gradients against the explicit sums
# ---------------------------------------------------------------------------------------------------------
def explicit(q, k, v, decay, s0):
    """o_i = sum_{j<=i} lambda^(i-j) q_i.k_j v_j + lambda^(i+1) q_i S0;
    S_N = sum_j lambda^(N-1-j) k_j v_j^T + lambda^N S0."""
    B, Hq, N, Fd = q.shape
    G = Hq // k.shape[1]
    lam = decay.to(F64)
    outs = []
    for i in range(N):
        acc = (lam ** (i + 1)).view(1, -1, 1, 1) * s0
        for j in range(i + 1):
            acc = acc + (lam ** (i - j)).view(1, -1, 1, 1) * k[:, :, j].unsqueeze(-1) * v[:, :, j].unsqueeze(-2)
        outs.append(torch.einsum("bhgf,bhfe->bhge", q[:, :, i].view(B, -1, G, Fd), acc).reshape(B, Hq, -1))
    fin = (lam ** N).view(1, -1, 1, 1) * s0
    for j in range(N):
        fin = fin + (lam ** (N - 1 - j)).view(1, -1, 1, 1) * k[:, :, j].unsqueeze(-1) * v[:, :, j].unsqueeze(-2)
    return torch.stack(outs, dim=2), fin


@pytest.mark.parametrize("chunk", [1, 3, 8])
@pytest.mark.parametrize("decay", [None, (0.9, 0.35)])
def test_kernel_states_and_gradients(chunk, decay):
    q, k, v = (t.requires_grad_(True) for t in qkv(7))
    s0 = rand(2, 2, 5, 3, seed=9).requires_grad_(True)
    dec = None if decay is None else torch.tensor(decay, dtype=F64)
    out, fin = chunked_linear_attention(q, k, v, decay=dec, chunk=chunk, initial_state=s0)
    want_out, want_fin = explicit(q, k, v, torch.ones(2, dtype=F64) if dec is None else dec, s0)
    assert_close(out, want_out, F64, "kernel output")
    assert_close(fin, want_fin, F64, "kernel final state")
    go, gf = rand(*out.shape, seed=3), rand(*fin.shape, seed=4)
    got = torch.autograd.grad((out * go).sum() + (fin * gf).sum(), (q, k, v, s0))
    want = torch.autograd.grad((want_out * go).sum() + (want_fin * gf).sum(), (q, k, v, s0))
    for name, a, b in zip(("q", "k", "v", "initial_state"), got, want):
        assert_close(a, b, F64, f"kernel gradient of {name}")


def test_kernel_gradcheck():
    q, k, v = (t[:1].requires_grad_(True) for t in qkv(5, d=3, dv=2))
    s0 = rand(1, 2, 3, 2, seed=5).requires_grad_(True)
    dec = torch.tensor([0.8, 0.5], dtype=F64)
    fn = lambda q, k, v, s0: chunked_linear_attention(q, k, v, decay=dec, chunk=2, initial_state=s0)
    assert torch.autograd.gradcheck(fn, (q, k, v, s0), fast_mode=True)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
def test_fast_precision_long(dtype, tol):
    """A longer sequence (several chunks of 64 and a tail) in low precision, against the float64 reference."""
    q, k, v = qkv(200, hq=2, hk=1, d=16, dv=8, b=1)
    ref = attnzoo.attention(q, k, v, mechanism="linear", causal=True, backend="reference")
    out = attnzoo.attention(q.to(dtype), k.to(dtype), v.to(dtype), mechanism="linear", causal=True, backend="fast")
    assert out.dtype == dtype
    # bf16 inputs are rounded first: compare with the reference on the rounded inputs
    ref_r = attnzoo.attention(q.to(dtype).double(), k.to(dtype).double(), v.to(dtype).double(), mechanism="linear",
                              causal=True, backend="reference")
    assert_close(out, ref_r, dtype, f"fast {dtype} vs float64 reference", tol=tol)
    assert (ref_r - ref).abs().max() < 0.1


def test_errors():
    q, k, v = qkv(4)
    with pytest.raises(ValueError, match="feature_map"):
        attnzoo.attention(q, k, v, mechanism="linear", feature_map="relu")
    with pytest.raises(ValueError, match="chunk"):
        attnzoo.attention(q, k, v, mechanism="linear", chunk=0)
    with pytest.raises(ValueError, match="decay"):
        chunked_linear_attention(q, k, v, decay=torch.tensor([1.5, 0.5]))


# ---------------------------------------------------------------------------------------------------------
# Decoding and the RecurrentState
# ---------------------------------------------------------------------------------------------------------
def decode(mech_name, q, k, v, prefill, state=None, **opts):
    mech = attnzoo.get(mech_name)
    opts = mech.resolve_options(opts)
    if state is None:
        state = mech.init_state(batch=q.shape[0], kv_heads=k.shape[1], head_dim=q.shape[-1], value_dim=v.shape[-1],
                                dtype=q.dtype, device=q.device, **opts)
    scale = 1 / math.sqrt(q.shape[-1])
    outs = [mech.step(q[:, :, :prefill], k[:, :, :prefill], v[:, :, :prefill], state, scale=scale, **opts)]
    for t in range(prefill, q.shape[2]):
        sl = slice(t, t + 1)
        outs.append(mech.step(q[:, :, sl], k[:, :, sl], v[:, :, sl], state, scale=scale, **opts))
    return torch.cat(outs, dim=2), state


def test_decode_state_is_constant_and_matches_forward():
    q, k, v = qkv(70)
    full = attnzoo.attention(q, k, v, mechanism="linear", causal=True)
    out, state = decode("linear", q, k, v, prefill=67)
    assert_close(out, full, F64, "prefill 67 + 3 steps vs forward")
    size = state.nbytes()
    out2, state2 = decode("linear", q[:, :, :10], k[:, :, :10], v[:, :, :10], prefill=5)
    assert state2.nbytes() == size == 2 * 2 * (5 * 3 + 5) * 8  # (B, Hk, F, Dv) + (B, Hk, F) float64
    assert state.seq_len == 70 and state2.seq_len == 10


def test_state_crop_reorder_snapshots():
    q, k, v = qkv(9)
    mech = attnzoo.get("linear")
    full = attnzoo.attention(q, k, v, mechanism="linear", causal=True)
    opts = mech.resolve_options({})
    state = mech.init_state(batch=2, kv_heads=2, head_dim=5, value_dim=3, dtype=F64, device="cpu", **opts)
    state.keep_snapshots(3)
    scale = 1 / math.sqrt(5)
    for t in range(6):
        mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, scale=scale, **opts)
    assert state.crop_points == [0, 4, 5, 6]  # the last 3 step boundaries, and the empty state
    with pytest.raises(ValueError, match="cannot crop this RecurrentState to 3 tokens"):
        state.crop(3)
    state.crop(4)  # roll back two tokens, then decode them again
    assert state.seq_len == 4 and state.crop_points == [0, 4]
    out = torch.cat([mech.step(q[:, :, t:t + 1], k[:, :, t:t + 1], v[:, :, t:t + 1], state, scale=scale, **opts)
                     for t in range(4, 8)], dim=2)
    assert_close(out, full[:, :, 4:8], F64, "decoding after crop")
    idx = torch.tensor([1, 1, 0])
    state.reorder(idx)  # beam search: three beams from two rows
    assert state["kv"].shape[0] == 3 and state.batch == 3
    nxt = mech.step(q[idx, :, 8:9], k[idx, :, 8:9], v[idx, :, 8:9], state, scale=scale, **opts)
    assert_close(nxt, full[idx, :, 8:9], F64, "decoding after reorder")
    state.crop(0)
    assert state.seq_len == 0 and state["kv"].abs().max() == 0 and state["kv"].shape[0] == 3
    with pytest.raises(ValueError, match="length"):
        state.crop(1)


def test_state_without_snapshots_can_only_reset():
    state = RecurrentState(kv=torch.zeros(1, 2, 2))
    state.update(kv=torch.ones(1, 2, 2))
    state.advance(5)
    with pytest.raises(ValueError, match=r"it can return to \[0, 5\] only"):
        state.crop(3)
    state.crop(5)
    state.crop(0)
    assert state["kv"].abs().max() == 0
    with pytest.raises(ValueError, match="kv: expected a tensor of shape"):
        state.update(kv=torch.ones(2, 2, 2))


@pytest.mark.parametrize("fused", [False, True])
def test_kernel_feature_maps_and_mask_in_pieces(monkeypatch, fused):
    """Feature maps applied inside the kernel piece by piece (pieces of 6 tokens here), with a key mask:
    outputs, final state and gradients equal the explicit sums on precomputed, masked features."""
    from attnzoo.kernels import chunked

    monkeypatch.setattr(chunked, "PIECE_TOKENS", 6)
    q, k, v = (t.requires_grad_(True) for t in qkv(17))
    s0 = rand(2, 2, 5, 3, seed=9).requires_grad_(True)
    mask = torch.rand(2, 17, generator=torch.Generator().manual_seed(2)) > 0.3
    dec = torch.tensor([0.9, 0.6], dtype=F64)
    phi = lambda x: F.elu(x) + 1
    if fused:
        out, fin = chunked_linear_attention(q, k, v, decay=dec, chunk=3, initial_state=s0, q_map=phi, k_map=phi,
                                            key_padding_mask=mask)
    else:
        out, fin = chunked_linear_attention(phi(q), phi(k), v, decay=dec, chunk=3, initial_state=s0,
                                            key_padding_mask=mask)
    want_out, want_fin = explicit(phi(q), phi(k) * mask.view(2, 1, 17, 1), v, dec, s0)
    assert_close(out, want_out, F64, "output")
    assert_close(fin, want_fin, F64, "final state")
    go, gf = rand(*out.shape, seed=3), rand(*fin.shape, seed=4)
    got = torch.autograd.grad((out * go).sum() + (fin * gf).sum(), (q, k, v, s0))
    want = torch.autograd.grad((want_out * go).sum() + (want_fin * gf).sum(), (q, k, v, s0))
    for name, a, b in zip(("q", "k", "v", "initial_state"), got, want):
        assert_close(a, b, F64, f"gradient of {name}")


@pytest.mark.parametrize("mech", ["linear", "lightning", "based"])
def test_fast_form_never_allocates_n_by_n(mech):
    """Forward and backward of the fast form at N = 2048: no single operation allocates as much as one
    N x N float32 matrix (16 MiB); the quadratic reference does (a control that the probe sees it)."""
    from torch.profiler import ProfilerActivity, profile

    n = 2048
    d = 16 if mech == "based" else 32
    q, k, v = (rand(1, 1, n, d, seed=s, dtype=torch.float32).requires_grad_(True) for s in range(3))

    def biggest(backend):
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            out = attnzoo.attention(q, k, v, mechanism=mech, causal=True, backend=backend)
            out.backward(torch.ones_like(out))
        return max(e.cpu_memory_usage for e in prof.events())

    assert biggest("fast") < n * n * 4
    assert biggest("reference") >= n * n * 4
