"""Oracles for FIT (P128)."""

import pytest
import torch

import attnzoo
from attnzoo.mechanisms.memory.fit import FIT
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _layer(causal, seed=0, **kw):
    torch.manual_seed(seed)
    layer = FIT(12, 3, causal=causal, **{"group_size": 4, "latents": 2, **kw}).double()
    with torch.no_grad():  # LayerNorm affine parameters away from their trivial initial values
        for name, p in layer.named_parameters():
            if name.startswith("ln_"):
                p.add_(0.1 * torch.randn_like(p))
    return layer


def test_one_group_without_write_is_a_standard_attention_layer():
    layer = _layer(False, group_size=16)
    with torch.no_grad():
        layer.write.o.weight.zero_()
    x = torch.randn(2, 11, 12, dtype=F64)
    u = layer.ln_local(x)
    q, k, v = layer.local.qkv(u, u)
    want = layer.local.out(softmax_attention(q, k, v))
    for backend in ("reference", "fast"):
        layer.backend = backend
        assert_close(layer(x), want, F64, backend)


def test_group_permutation_equivariance():
    layer = _layer(False)
    x = torch.randn(2, 16, 12, dtype=F64)
    perm = torch.tensor([2, 0, 3, 1])
    xp = x.view(2, 4, 4, 12)[:, perm].reshape(2, 16, 12)
    for backend in ("reference", "fast"):
        layer.backend = backend
        out = layer(x).view(2, 4, 4, 12)[:, perm].reshape(2, 16, 12)
        assert_close(layer(xp), out, F64, backend)


def test_information_crosses_groups_only_through_the_latents():
    layer = _layer(False)
    x = torch.randn(1, 12, 12, dtype=F64)
    x2 = x.clone()
    x2[:, 8:] += torch.randn(1, 4, 12, dtype=F64)  # change group 2 only
    assert (layer(x2)[:, :4] - layer(x)[:, :4]).abs().max() > 1e-6  # group 0 hears it via the latents
    with torch.no_grad():
        layer.glob.o.weight.zero_()  # no global latent attention: groups become independent
    assert (layer(x2)[:, :4] - layer(x)[:, :4]).abs().max() < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_grouped_equals_dense_with_padding_and_partial_group(causal):
    layer = _layer(causal)
    x = torch.randn(2, 14, 12, dtype=F64, requires_grad=True)
    mask = torch.ones(2, 14, dtype=torch.bool)
    mask[0, 5] = mask[1, 0] = mask[1, 12] = False
    res = {}
    for backend in ("reference", "fast"):
        layer.backend = backend
        layer.zero_grad()
        out = layer(x, key_padding_mask=mask)
        gx, = torch.autograd.grad(out.sin().sum(), x, retain_graph=True)
        out.sin().sum().backward()
        res[backend] = (out.detach(), gx, [p.grad.clone() for p in layer.parameters()])
    assert_close(res["fast"][0], res["reference"][0], F64, "output")
    assert_close(res["fast"][1], res["reference"][1], F64, "input gradient")
    for a, b in zip(res["fast"][2], res["reference"][2]):
        assert_close(a, b, F64, "parameter gradient")


def test_causal_write_uses_the_previous_groups_latents():
    """Group 0 writes from zero latents: its outputs equal a layer whose latents are never read."""
    layer = _layer(True)
    x = torch.randn(1, 12, 12, dtype=F64)
    base = layer(x)
    with torch.no_grad():
        layer.read.o.weight.mul_(3.0)  # changes every latent
    changed = layer(x)
    assert (changed[:, :4] - base[:, :4]).abs().max() < 1e-12  # group 0 does not read any latent
    assert (changed[:, 4:] - base[:, 4:]).abs().max() > 1e-6


def test_causal_decode_chaining_crop_reorder():
    layer = _layer(True)
    x = torch.randn(2, 15, 12, dtype=F64)
    full = layer(x)
    st = layer.init_state(2)
    outs = [layer(x[:, :6], state=st)[0]] + [layer(x[:, t:t + 1], state=st)[0] for t in range(6, 15)]
    assert_close(torch.cat(outs, 1), full, F64, "prefill + token-by-token")
    st = layer.init_state(2)
    assert_close(torch.cat([layer(x[:, :9], state=st)[0], layer(x[:, 9:], state=st)[0]], 1), full, F64, "halves")
    st = layer.init_state(2)
    layer(x[:, :11], state=st)
    st.crop(9)  # inside the current group (positions 8..11)
    assert_close(layer(x[:, 9:], state=st)[0], full[:, 9:], F64, "after crop")
    with pytest.raises(ValueError, match="group"):
        st.crop(3)
    st = layer.init_state(2)
    layer(x[:, :10], state=st)
    st.reorder(torch.tensor([1, 1]))
    assert_close(layer(x[[1, 1], 10:], state=st)[0], full[[1, 1], 10:], F64, "after reorder")
    sizes = []
    for n in (8, 24):  # latents grow as N m / g, the group buffer is bounded
        st = layer.init_state(1)
        with torch.no_grad():
            layer(torch.randn(1, n, 12, dtype=F64), state=st)
        sizes.append(st.latent_kv.length)
    assert sizes == [4, 12]


def test_errors():
    with pytest.raises(ValueError, match="causal"):
        _layer(False).init_state(1)
    with pytest.raises(ValueError, match="context"):
        _layer(False)(torch.randn(1, 4, 12, dtype=F64), torch.randn(1, 4, 12, dtype=F64))
    assert attnzoo.get("fit").catalog == "P128"
    assert isinstance(attnzoo.build("fit", 12, 3, causal=True, group_size=4, latents=2), FIT)
