"""PEM (P062) against the official PEM_CA written out (local representation, normalised features, per-head argmax
prototypes, modulation normalised over the query axis), the tau -> 0 limit of softmax aggregation, and the mask:
masked or padded pixels are never prototypes."""

import torch
import torch.nn.functional as F

import attnzoo
from attnzoo import cross_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _setup(**kw):
    torch.manual_seed(0)
    pem = attnzoo.build("pem", 16, 4, **kw).double().eval()  # eval: BatchNorm with its running statistics
    g = torch.Generator().manual_seed(1)
    return pem, torch.randn(2, 5, 16, generator=g, dtype=F64), torch.randn(2, 16, 4, 6, generator=g, dtype=F64)


def _official(pem, q, x_map, memory_mask=None):
    """PEM_CA.forward (batch-first queries) with pos / query_pos = None."""
    query = F.normalize(pem.to_query(x_map), dim=-1)  # pixels, (B, HW, C)
    key = F.normalize(pem.to_key(q), dim=-1)
    B, N, C = query.shape
    Q, D = key.shape[1], C // 4
    xh = query.view(B, N, 4, D).permute(0, 2, 1, 3)
    qh = key.view(B, Q, 4, D).permute(0, 2, 1, 3)
    sim = torch.einsum("bhnc, bhqc -> bhnq", xh, qh)
    if memory_mask is not None:  # (B, Q, HW) mask logits: < 0 masked, all-masked rows unmasked
        mask = (memory_mask.flatten(2).permute(0, 2, 1) < 0.0).unsqueeze(1).expand(-1, 4, -1, -1).clone()
        mask[torch.all(mask.sum(2) == mask.shape[2], dim=2)] = False
        sim = sim.masked_fill(mask, float("-inf"))
    idx = torch.argmax(sim, dim=2)
    proto = torch.gather(xh, 2, idx.unsqueeze(-1).expand(-1, -1, -1, D)).permute(0, 2, 1, 3).reshape(B, Q, C)
    out = F.normalize(pem.proj(proto * key), dim=1) * pem.alpha + proto
    return pem.final(out) + q


def test_equals_the_official_module_with_and_without_a_memory_mask():
    pem, q, x_map = _setup()
    assert_close(pem(q, x_map), _official(pem, q, x_map), F64, "PEM_CA")
    logits = torch.randn(2, 5, 24, generator=torch.Generator().manual_seed(2), dtype=F64)
    logits[..., 0] = 1.0  # every query keeps a pixel (the official fallback differs for lone fully masked rows)
    assert_close(pem(q, x_map, attn_mask=logits >= 0), _official(pem, q, x_map, logits), F64, "masked")
    logits[0, 1] = -1.0  # query 1 of row 0 masked everywhere: here it sees every pixel, as if unmasked
    got = pem(q, x_map, attn_mask=logits >= 0)
    free = logits.clone()
    free[0, 1] = 1.0
    assert_close(got, _official(pem, q, x_map, free), F64, "fully masked query falls back to every pixel")


def test_prototype_is_the_zero_temperature_limit_of_softmax_aggregation():
    pem, q, x_map = _setup(local_conv=False)
    pix = F.normalize(pem.to_query(x_map), dim=-1)
    keys = F.normalize(pem.to_key(q), dim=-1)
    proto = pem.prototypes(pix, keys, None)
    qh = keys.view(2, 5, 4, 4).transpose(1, 2)
    ph = pix.view(2, 24, 4, 4).transpose(1, 2)
    limit = cross_attention(qh, {"pixels": (ph, ph)}, scale=1e5).transpose(1, 2).reshape(2, 5, 16)
    assert_close(proto, limit, F64, "argmax vs softmax(S / 1e-5)", tol=1e-6)
    soft = cross_attention(qh, {"pixels": (ph, ph)}, scale=1.0).transpose(1, 2).reshape(2, 5, 16)
    assert (proto - soft).abs().max() > 1e-2  # at temperature 1 the aggregation is another thing


def test_masked_and_padded_pixels_are_never_prototypes():
    pem, q, x_map = _setup(local_conv=False)
    tokens = x_map.flatten(2).transpose(1, 2)  # (B, 24, 16)
    allowed = torch.rand(2, 5, 24, generator=torch.Generator().manual_seed(3)) > 0.5
    allowed[..., 0] = True
    kpm = torch.ones(2, 24, dtype=torch.bool)
    kpm[:, 20:] = False
    base = pem(q, tokens, attn_mask=allowed, key_padding_mask=kpm)
    moved = tokens.clone()
    moved[:, 20:] = 50 * torch.randn(2, 4, 16, dtype=F64)
    assert_close(pem(q, moved, attn_mask=allowed, key_padding_mask=kpm), base, F64, "padded pixels")
