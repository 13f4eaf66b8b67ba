"""Oracles for Titans (P022): the neural memory's update order, its chunked (mini-batch) form, the
delta-rule special case, analytic vs autograd gradients, and the MAC / MAG / MAL layers' decoding."""

import pytest
import torch
import torch.nn.functional as F

import attnzoo
from attnzoo.mechanisms.memory.titans import Titans, TitansState
from attnzoo.mechanisms.memory.titans_memory import (
    NeuralMemoryState,
    memory_fast,
    memory_forward,
    memory_loss_grad,
    memory_reference,
)
from attnzoo.testing import assert_close

F64 = torch.float64
B, H, D, HID = 2, 3, 4, 6


def _weights(depth, seed=1):
    g = torch.Generator().manual_seed(seed)
    sizes = [D] + [HID] * (depth - 1) + [D]
    ws = [0.5 * torch.randn(1, H, sizes[i + 1], sizes[i], generator=g, dtype=F64) for i in range(depth)]
    return [w.expand(B, -1, -1, -1) for w in ws]


def _inputs(T=11, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)
    q, k, v, qa = r(B, H, T, D), F.normalize(r(B, H, T, D), dim=-1), r(B, H, T, D), r(B, H, T, D)
    u = lambda lo, hi: lo + (hi - lo) * torch.rand(B, H, T, generator=g, dtype=F64)
    alpha, eta, theta = u(0.0, 0.3), u(0.0, 1.0), u(0.0, 0.2)
    active = torch.rand(B, T, generator=g) > 0.3
    return q, k, v, qa, alpha, eta, theta, active


def _state(depth, chunk):
    return NeuralMemoryState(_weights(depth), chunk_size=chunk)


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_analytic_gradient_equals_autograd(depth):
    ws = [w[:1, :1].clone().requires_grad_(True) for w in _weights(depth)]
    k, v = torch.randn(1, 1, D, dtype=F64), torch.randn(1, 1, D, dtype=F64)
    loss = (memory_forward(ws, k.unsqueeze(-2))[0].squeeze(-2) - v).pow(2).sum()
    auto = torch.autograd.grad(loss, ws)
    for a, b in zip(memory_loss_grad(ws, k, v), auto):
        assert_close(a, b, F64, "analytic vs autograd gradient of ||M(k) - v||^2")


def test_delta_rule_special_case():
    """Linear memory, eta = 0, alpha = 0, chunk 1: M_t = M_{t-1} - 2 theta_t (M_{t-1} k_t - v_t) k_t^T and
    the read at t is M_{t-1} q_t (before the update)."""
    q, k, v, _, _, _, theta, _ = _inputs()
    zero = torch.zeros_like(theta)
    W = _weights(1)[0].clone()
    want = []
    for t in range(q.shape[2]):
        want.append((W @ q[:, :, t, :, None]).squeeze(-1))
        err = (W @ k[:, :, t, :, None]).squeeze(-1) - v[:, :, t]
        W = W - 2 * theta[:, :, t, None, None] * err.unsqueeze(-1) * k[:, :, t].unsqueeze(-2)
    want = torch.stack(want, 2)
    for form in (memory_reference, memory_fast):
        mem = _state(1, 1)
        reads, _ = form(mem, q, k, v, zero, zero, theta)
        assert_close(reads, want, F64, f"{form.__name__}: reads vs delta rule")
        assert_close(mem.weights[0], W, F64, f"{form.__name__}: final memory vs delta rule")


def test_hand_computed_scalar_memory():
    """A 1x1 matrix memory with momentum and forgetting, three steps worked by hand."""
    w0 = torch.full((1, 1, 1, 1), 0.5, dtype=F64)
    mem = NeuralMemoryState([w0], chunk_size=1)
    q = torch.tensor([1.0, 2.0, -1.0], dtype=F64).view(1, 1, 3, 1)
    k = torch.ones(1, 1, 3, 1, dtype=F64)
    v = torch.tensor([2.0, 1.0, 0.0], dtype=F64).view(1, 1, 3, 1)
    a, e, t = (torch.tensor(x, dtype=F64).view(1, 1, 3) for x in ([0.1, 0.0, 0.5], [0.5, 0.9, 0.0], [0.25, 0.5, 0.1]))
    # t=0: read 0.5*1 = 0.5; u = 2(0.5-2) = -3; S = -0.25*-3 = 0.75; M = 0.9*0.5 + 0.75 = 1.2
    # t=1: read 1.2*2 = 2.4; u = 2(1.2-1) = 0.4; S = 0.9*0.75 - 0.5*0.4 = 0.475; M = 1.2 + 0.475 = 1.675
    # t=2: read 1.675*-1 = -1.675; u = 2*1.675 = 3.35; S = 0 - 0.335 = -0.335; M = 0.5*1.675 - 0.335 = 0.5025
    for form in (memory_reference, memory_fast):
        mem = NeuralMemoryState([w0], chunk_size=1)
        reads, _ = form(mem, q, k, v, a, e, t)
        assert_close(reads.flatten(), torch.tensor([0.5, 2.4, -1.675], dtype=F64), F64, form.__name__)
        assert abs(mem.weights[0].item() - 0.5025) < 1e-12 and abs(mem.momentum[0].item() + 0.335) < 1e-12


def test_mini_batch_gradients_are_taken_at_the_chunk_start():
    """chunk 2, linear memory: the second token's gradient uses M_0 (not M_1), the third's M_2."""
    q, k, v, _, alpha, eta, theta, _ = _inputs(T=3)
    W0 = _weights(1)[0]
    W, S, A = W0.clone(), torch.zeros_like(W0), W0.clone()
    for t in range(3):
        u = 2 * ((A @ k[:, :, t, :, None]).squeeze(-1) - v[:, :, t]).unsqueeze(-1) * k[:, :, t].unsqueeze(-2)
        S = eta[:, :, t, None, None] * S - theta[:, :, t, None, None] * u
        W = (1 - alpha[:, :, t, None, None]) * W + S
        if t == 1:
            A = W.clone()
    for form in (memory_reference, memory_fast):
        mem = _state(1, 2)
        form(mem, q, k, v, alpha, eta, theta)
        assert_close(mem.weights[0], W, F64, form.__name__)


@pytest.mark.parametrize("chunk", [1, 3, 4, 16])
@pytest.mark.parametrize("depth", [1, 2])
def test_chunked_form_equals_token_loop(chunk, depth):
    """Reads (before and after each update), final weights and momentum; the fast form is also fed in two
    pieces split inside a chunk, with padded tokens."""
    q, k, v, qa, alpha, eta, theta, active = _inputs()
    ref = _state(depth, chunk)
    r1, a1 = memory_reference(ref, q, k, v, alpha, eta, theta, active=active, q_after=qa)
    fast = _state(depth, chunk)
    parts = [memory_fast(fast, *(x[..., sl, :] if x.dim() == 4 else x[..., sl] for x in (q, k, v)),
                         *(x[..., sl] for x in (alpha, eta, theta)), active=active[:, sl], q_after=qa[:, :, sl])
             for sl in (slice(0, 5), slice(5, 11))]
    assert_close(torch.cat([p[0] for p in parts], 2), r1, F64, "reads before")
    assert_close(torch.cat([p[1] for p in parts], 2), a1, F64, "reads after")
    for a, b in zip(fast.weights + fast.momentum + fast.anchor, ref.weights + ref.momentum + ref.anchor):
        assert_close(a, b, F64, "memory state")
    assert fast.pos == ref.pos == 11


def test_chunked_gradients_equal_token_loop():
    q, k, v, qa, alpha, eta, theta, active = (t.clone().requires_grad_(t.is_floating_point()) for t in _inputs(T=7))
    grads = {}
    for form in (memory_reference, memory_fast):
        mem = NeuralMemoryState([w.clone().requires_grad_(True) for w in _weights(2)], chunk_size=3)
        w0 = list(mem.weights)
        r, ra = form(mem, q, k, v, alpha, eta, theta, active=active, q_after=qa)
        loss = r.square().sum() + ra.sin().sum() + sum(w.square().sum() for w in mem.weights)
        grads[form] = torch.autograd.grad(loss, (q, k, v, qa, alpha, eta, theta, *w0))
    for a, b in zip(grads[memory_fast], grads[memory_reference]):
        assert_close(a, b, F64, "gradient")


@pytest.mark.parametrize("form", [memory_reference, memory_fast])
def test_read_happens_before_the_update(form):
    """The read at t must not see (k_t, v_t); the read after t's update (MAC's gate) must."""
    q, k, v, qa, alpha, eta, theta, _ = _inputs(T=6)
    base, after = form(_state(2, 3), q, k, v, alpha, eta, theta, q_after=qa)
    v2 = v.clone()
    v2[:, :, 4] += 1.0
    r2, a2 = form(_state(2, 3), q, k, v2, alpha, eta, theta, q_after=qa)
    assert (r2[:, :, :5] - base[:, :, :5]).abs().max() < 1e-13  # reads up to and including t = 4 unchanged
    assert (r2[:, :, 5] - base[:, :, 5]).abs().max() > 1e-6  # the next read learned v_4
    assert (a2[:, :, 4] - after[:, :, 4]).abs().max() > 1e-6  # the post-update read sees it at once


# ------------------------------------------------------------------------------------------------------
# The layer
# ------------------------------------------------------------------------------------------------------
SMALL = dict(chunk_size=2, segment=4, window=3, persistent=2, memory_depth=2, memory_expansion=2)


def _layer(variant, seed=0, **kw):
    torch.manual_seed(seed)
    layer = Titans(12, 3, variant=variant, **{**SMALL, **kw}).double()
    with torch.no_grad():
        layer.gates.bias.normal_(0.0, 1.0)  # exercise forgetting and momentum, not their initial values
    return layer


@pytest.mark.parametrize("variant", ["mac", "mag", "mal", "lmm"])
def test_layer_decoding_chaining_and_backends(variant):
    layer = _layer(variant)
    x = torch.randn(2, 13, 12, dtype=F64)
    full = layer(x)
    st = layer.init_state(2)
    outs = [layer(x[:, :6], state=st)[0]] + [layer(x[:, t:t + 1], state=st)[0] for t in range(6, 13)]
    assert_close(torch.cat(outs, 1), full, F64, f"{variant}: prefill + token-by-token vs parallel")
    st2 = layer.init_state(2)
    halves = [layer(x[:, :7], state=st2)[0], layer(x[:, 7:], state=st2)[0]]
    assert_close(torch.cat(halves, 1), full, F64, f"{variant}: two halves with the state carried over")
    layer.backend = "reference"
    assert_close(layer(x), full, F64, f"{variant}: reference (token loop, dense attention) vs fast")


@pytest.mark.parametrize("variant", ["mac", "mag", "mal"])
def test_state_is_bounded_in_sequence_length(variant):
    layer = _layer(variant)
    sizes = []
    for n in (12, 28, 60, 124, 252):  # same position inside a segment
        st = layer.init_state(1)
        with torch.no_grad():
            layer(torch.randn(1, n, 12, dtype=F64), state=st)
        sizes.append(st.nbytes())
    # constant once the window slides; a short prefill may hold a larger window buffer (the sliding cache's slack),
    # which shrinks back: never above the first size
    assert len(set(sizes[1:])) == 1 and 0 < sizes[1] <= sizes[0] == max(sizes), sizes


def test_crop_with_history_and_reorder():
    layer = _layer("mag")
    x = torch.randn(2, 10, 12, dtype=F64)
    full = layer(x)
    st = layer.init_state(2, history=3)
    layer(x[:, :8], state=st)
    st.crop(6)  # roll back two tokens, then decode them again
    out = torch.cat([layer(x[:, t:t + 1], state=st)[0] for t in range(6, 10)], 1)
    assert_close(out, full[:, 6:], F64, "after crop")
    with pytest.raises(ValueError, match="history"):
        st.crop(2)
    st = layer.init_state(2)
    layer(x[:, :5], state=st)
    st.reorder(torch.tensor([1, 0]))
    out = layer(x[[1, 0], 5:], state=st)[0]
    assert_close(out, full[[1, 0], 5:], F64, "after reorder")
    with pytest.raises(ValueError, match="history"):
        st.crop(4)


def test_mag_attention_branch_is_sink_window_attention():
    """The SW-Attn* branch of MAG is attnzoo's sink_window over [persistent || x]."""
    layer = _layer("mag")
    x = torch.randn(2, 9, 12, dtype=F64)
    xt = torch.cat([layer.persistent_tokens.expand(2, -1, -1), x], 1)
    q = layer._heads(layer.attn_q(xt), 3)
    k, v = layer._heads(layer.attn_k(xt), 3), layer._heads(layer.attn_v(xt), 3)
    want = attnzoo.attention(q, k, v, mechanism="sink_window", causal=True, window=3, sinks=2)[:, :, 2:]
    st = layer.init_state(2)
    got = layer._window_attention(q[:, :, 2:], k[:, :, 2:], v[:, :, 2:], None, st.attn, 2)
    assert_close(got, layer._merge(want), F64, "MAG attention branch")


def test_mac_retrieves_with_the_segment_start_memory():
    """MAC: h of every token of a segment comes from the memory before that segment; the memory learns
    from the segment's attention outputs only after it."""
    layer = _layer("mac", segment=4, persistent=0)
    x = torch.randn(1, 8, 12, dtype=F64)
    st = layer.init_state(1)
    w0 = [w.clone() for w in st.memory.weights]
    layer(x[:, :3], state=st)
    assert all(torch.equal(a, b) for a, b in zip(st.seg_weights, w0))  # segment 0 reads M_0
    layer(x[:, 3:5], state=st)  # completes segment 0, starts segment 1
    end_of_seg0 = st.seg_weights
    assert not all(torch.equal(a, b) for a, b in zip(end_of_seg0, w0))
    ref = layer.init_state(1)
    layer(x[:, :4], state=ref)
    for a, b in zip(end_of_seg0, ref.memory.weights):
        assert_close(a, b, F64, "segment 1 retrieves from the memory at the end of segment 0")


def test_registry_records_and_errors():
    for name in ("titans", "titans_mag", "titans_mal"):
        mech = attnzoo.get(name)
        assert mech.catalog == "P022" and mech.decodable and mech.patterns == ("causal_self",)
    assert isinstance(attnzoo.build("titans_mal", 12, 3, causal=True, **SMALL), Titans)
    with pytest.raises(ValueError, match="causal"):
        Titans(12, 3, causal=False)
    with pytest.raises(ValueError, match="variant"):
        Titans(12, 3, variant="mat")
    layer = _layer("lmm")
    with pytest.raises(ValueError, match="context"):
        layer(torch.randn(1, 3, 12, dtype=F64), torch.randn(1, 3, 12, dtype=F64))
    with pytest.raises(TypeError, match="TitansState"):
        layer(torch.randn(1, 3, 12, dtype=F64), state=object())
    assert isinstance(layer.init_state(1), TitansState)


@pytest.mark.parametrize("name", ["titans", "titans_mag", "titans_mal"])
def test_default_layers_stay_finite_on_long_inputs(name):
    """Regression: with max_lr 0.1 the default mini-batches of 64 tokens diverged at initialisation (NaN
    within 2048 tokens, found by attnzoo bench --full); the default 0.01 keeps every variant finite."""
    torch.manual_seed(0)
    layer = attnzoo.build(name, 64, 2, causal=True)
    with torch.no_grad():
        y = layer(torch.randn(1, 2048, 64))
    y = y[0] if isinstance(y, tuple) else y
    assert torch.isfinite(y).all()
