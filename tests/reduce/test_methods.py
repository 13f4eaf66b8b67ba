"""The CATALOG oracles of the nine reduction papers, each against an explicit reference."""

import torch

from attnzoo import masks
from attnzoo.reduce import cls_attention as C
from attnzoo.reduce import exit as E
from attnzoo.reduce import learned_queries as LQ
from attnzoo.reduce import maelre as M
from attnzoo.reduce import reductions
from attnzoo.reduce import text_query as T
from attnzoo.reduce.importance import attention_row
from attnzoo.reference import softmax_attention

G = lambda s: torch.Generator().manual_seed(s)  # noqa: E731


def test_nine_papers_registered_with_catalog_ids():
    recs = {r.catalog: r for r in reductions()}
    assert set(recs) == {"P048", "P053", "P057", "P065", "P081", "P083", "P085", "P100", "P109"}
    for r in recs.values():
        assert r.family == "reduce" and r.scores and r.keeps and r.as_dict()["entry"]


# ---------------------------------------------------------------- P057 FasterVLM / P085 VTC-CLS
def _vit(B=2, L=4, H=3, P=16, D=8, seed=0):
    """Random per-layer q/k of a (1 + P)-token ViT and the eager [CLS] rows (the explicit reference)."""
    g = G(seed)
    qs = [torch.randn(B, H, 1 + P, D, generator=g, dtype=torch.float64) for _ in range(L)]
    ks = [torch.randn(B, H, 1 + P, D, generator=g, dtype=torch.float64) for _ in range(L)]
    eager = [torch.softmax(q @ k.transpose(-1, -2) / D ** 0.5, -1)[:, :, 0] for q, k in zip(qs, ks)]
    lse_rows = [attention_row(q[:, :, :1], k, rows=[0]).squeeze(2) for q, k in zip(qs, ks)]
    return eager, lse_rows


def test_fastervlm_keeps_topk_of_cls_attention_in_order():
    eager, rows = _vit()
    patches = torch.randn(2, 16, 5, dtype=torch.float64)
    for keep in (1.0, 0.5, 0.25, 0.05):
        red = C.fastervlm(patches, rows, keep)
        k = red.kept
        ref = eager[-2].mean(1)[:, 1:]  # penultimate layer, head mean, patches only
        for b in range(2):
            want = sorted(sorted(range(16), key=lambda i: (-ref[b, i].item(), i))[:k])
            assert red.index[b].tolist() == want
        assert torch.equal(red.tokens, torch.gather(patches, 1, red.index.unsqueeze(-1).expand(-1, -1, 5)))
    assert torch.equal(C.fastervlm(patches, rows, 1.0).tokens, patches)  # keep 1: identity


def test_vtc_cls_single_layer_equals_fastervlm_and_sums_layers():
    _, rows = _vit(L=5)
    patches = torch.randn(2, 16, 5, dtype=torch.float64)
    a = C.vtc_cls(patches, rows, 0.25, layers=[3])
    b = C.fastervlm(patches, rows, 0.25)
    assert torch.equal(a.index, b.index)
    s = C.vtc_cls_scores(rows)
    torch.testing.assert_close(s, sum(r.mean(1)[:, 1:] for r in rows[:-1]))
    assert torch.equal(C.vtc_cls(patches, rows, 1.0).tokens, patches)


# ---------------------------------------------------------------- P083 LSceneLLM, P065 YOPO-style
def test_lscenellm_selects_fine_tokens_of_topk_regions():
    fine = torch.randn(2, 12, 4, dtype=torch.float64)
    region = torch.tensor([0, 0, 1, 1, 1, 2, 2, 3, 3, 3, 3, 1])  # 4 regions of unequal sizes
    rows = [torch.rand(2, 3, 5, 4, generator=G(i), dtype=torch.float64) for i in range(3)]  # (B, H, T, N) x layers
    scores = T.text_query_scores(rows, slice(0, 4))
    torch.testing.assert_close(scores, torch.stack(rows).mean(dim=(0, 2, 3)))
    full = T.lscenellm_select(fine[:1], region, scores[:1], 4)
    assert torch.equal(full.tokens, fine[:1])  # k = all regions: every fine token
    red = T.lscenellm_select(fine[:1], region, scores[:1], 2)
    top = sorted(sorted(range(4), key=lambda r: (-scores[0, r].item(), r))[:2])
    assert red.index[0].tolist() == [i for i in range(12) if region[i].item() in top]


def _dense(pred, nq, nk, heads=1):
    return masks.materialize(pred, 1, heads, nq, nk)[0]


def test_yopo_mask_limits_and_band():
    prefix, gh, gw, suffix = 3, 4, 5, 2
    n = prefix + gh * gw + suffix
    causal = _dense(masks.causal(), n, n)[0]
    big = _dense(T.yopo_predicate(prefix, (gh, gw), 2 * max(gh, gw) + 1), n, n)[0]
    assert torch.equal(big, causal)  # k >= grid: standard causal attention
    m = _dense(T.yopo_predicate(prefix, (gh, gw), 3), n, n)[0]
    for i in range(n):
        for j in range(n):
            vi, vj = prefix <= i < prefix + gh * gw, prefix <= j < prefix + gh * gw
            want = j <= i
            if vi and vj:
                (ri, ci), (rj, cj) = divmod(i - prefix, gw), divmod(j - prefix, gw)
                want = want and abs(ri - rj) <= 1 and abs(ci - cj) <= 1
            assert bool(m[i, j]) == want, (i, j)
    # inactive heads: visual queries see nothing (skipped), text queries are unchanged
    mh = _dense(T.yopo_predicate(prefix, (gh, gw), 3, inactive_heads=[1]), n, n, heads=2)
    assert not mh[1, prefix:prefix + gh * gw].any() and torch.equal(mh[1, :prefix], m[:prefix])
    assert torch.equal(mh[0], m)
    mass = torch.tensor([0.5, 0.1, 0.3])
    assert T.inactive_heads(mass, 2) == [1]


def test_yopo_skipped_layer_leaves_visual_states_unchanged():
    x = torch.randn(2, 10, 4)
    out = T.skip_visual(lambda h: h * 2 + 1, x, slice(3, 7))
    assert torch.equal(out[:, 3:7], x[:, 3:7]) and torch.equal(out[:, :3], x[:, :3] * 2 + 1)


# ---------------------------------------------------------------- P109 LLaVA-Mini, P100 TextMonkey, P053 MULTI-LANE
def test_llava_mini_equals_reference_cross_attention_and_is_permutation_invariant():
    torch.manual_seed(0)
    comp = LQ.LLaVAMiniCompressor(8, side=2).double()
    x = torch.randn(2, 12, 8, dtype=torch.float64)
    out = comp(x, (3, 4))
    assert out.shape == (2, 4, 8)  # exactly C^2 tokens
    pos = LQ.sinusoidal_2d(3, 4, 8, dtype=torch.float64)
    q = (comp.queries + LQ.sinusoidal_2d(2, 2, 8, dtype=torch.float64)).expand(2, -1, -1)
    ref = LQ.cross_attention_reference(q, x + pos, x)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    perm = torch.randperm(12)
    torch.testing.assert_close(comp(x[:, perm], (3, 4), positions=pos[perm]), out, rtol=1e-10, atol=1e-12)
    assert LQ.LLaVAMiniCompressor(8, side=1).double()(x, (3, 4)).shape == (2, 1, 8)


def test_textmonkey_selection_is_topk_uniqueness_and_resampler_is_cross_attention():
    torch.manual_seed(1)
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    xn = torch.nn.functional.normalize(x, dim=-1)
    ref_u = 1 - (xn @ xn.transpose(1, 2)).mean(-1)  # explicit (N, N) cosine matrix
    torch.testing.assert_close(LQ.uniqueness_scores(x), ref_u)
    rs = LQ.TextMonkeyResampler(8, heads=2).double()
    out, idx = rs(x, 4)
    for b in range(2):
        assert idx[b].tolist() == sorted(sorted(range(10), key=lambda i: (-ref_u[b, i].item(), i))[:4])
    sel = torch.gather(x, 1, idx.unsqueeze(-1).expand(-1, -1, 8))
    q = rs.q(sel).view(2, 4, 2, 4).transpose(1, 2)
    k = rs.k(x).view(2, 10, 2, 4).transpose(1, 2)
    v = rs.v(x).view(2, 10, 2, 4).transpose(1, 2)
    ref = sel + rs.o(softmax_attention(q, k, v).transpose(1, 2).reshape(2, 4, 8))
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)


def test_multi_lane_equals_reference_and_pathways_are_independent():
    torch.manual_seed(2)
    ml = LQ.MultiLaneSummary(8, tasks=3, summaries=4).double()
    x = torch.randn(2, 9, 8, dtype=torch.float64)
    out = ml(x)
    assert out.shape == (3, 2, 4, 8)
    for t in range(3):
        ref = LQ.cross_attention_reference(ml.selectors[t].expand(2, -1, -1), x, x, scale=8 ** -0.5)
        torch.testing.assert_close(out[t], ref, rtol=1e-10, atol=1e-12)
    with torch.no_grad():
        ml.selectors[1] += 1.0
    out2 = ml(x)
    assert torch.equal(out2[0], out[0]) and torch.equal(out2[2], out[2]) and not torch.equal(out2[1], out[1])


# ---------------------------------------------------------------- P048 MAELRE
def test_maelre_threshold_inf_is_softmax_and_duplicates_merge_losslessly():
    g = G(4)
    q = torch.randn(1, 2, 6, 4, generator=g, dtype=torch.float64)
    k0 = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64)
    v0 = torch.randn(1, 2, 5, 4, generator=g, dtype=torch.float64)
    ones = torch.ones(1, 5, dtype=torch.float64)
    torch.testing.assert_close(M.maelre_attention(q, k0, v0, ones, threshold=float("inf")),
                               softmax_attention(q, k0, v0), rtol=1e-10, atol=1e-12)
    reps = torch.tensor([2, 1, 3, 1, 2])
    k, v = k0.repeat_interleave(reps, 2), v0.repeat_interleave(reps, 2)
    sizes = reps.double().view(1, 5)
    torch.testing.assert_close(M.maelre_attention(q, k0, v0, sizes, threshold=float("inf")),
                               softmax_attention(q, k, v), rtol=1e-10, atol=1e-12)
    # the approximate branch: size-weighted linear attention equals linear attention over the duplicates
    phi = lambda t: torch.nn.functional.elu(t) + 1  # noqa: E731
    a = phi(q) @ phi(k).transpose(-1, -2)
    ref = (a @ v) / a.sum(-1, keepdim=True)
    torch.testing.assert_close(M.maelre_attention(q, k0, v0, sizes, threshold=0), ref, rtol=1e-10, atol=1e-12)


def test_maelre_stage_merges_and_switches():
    torch.manual_seed(3)
    st = M.MAELREStage(8, 2, merge=3, threshold=float("inf")).double()
    x = torch.randn(2, 10, 8, dtype=torch.float64)
    y, sizes = st(x)
    assert y.shape == (2, 7, 8)
    torch.testing.assert_close(sizes.sum(1), torch.full((2,), 10.0, dtype=torch.float64))
    st0 = M.MAELREStage(8, 2, merge=0, threshold=float("inf")).double()
    st0.load_state_dict(st.state_dict())
    qkv = st0.qkv(x).view(2, 10, 3, 2, 4).permute(2, 0, 3, 1, 4)
    ref = x + st0.proj(softmax_attention(*qkv).transpose(1, 2).reshape(2, 10, 8))
    torch.testing.assert_close(st0(x)[0], ref, rtol=1e-10, atol=1e-12)  # threshold inf, no merge: a softmax layer


# ---------------------------------------------------------------- P081 DyVTE
class _Layer:
    """A tiny attention + MLP layer whose keys can be masked: layer(h, key_mask)."""

    def __init__(self, dim, seed):
        g = G(seed)
        self.w = [torch.randn(dim, dim, generator=g, dtype=torch.float64) / dim ** 0.5 for _ in range(4)]

    def __call__(self, h, key_mask):
        q, k, v = (h @ w for w in self.w[:3])
        a = softmax_attention(q.unsqueeze(1), k.unsqueeze(1), v.unsqueeze(1), key_padding_mask=key_mask).squeeze(1)
        h = h + a
        return h + torch.tanh(h @ self.w[3])


def test_dyvte_exit_equals_masking_visual_keys_and_limits():
    layers = [_Layer(6, s) for s in range(4)]
    x = torch.randn(2, 11, 6, dtype=torch.float64)
    vis = slice(2, 8)  # [2 system tokens; 6 visual; 3 text]
    never, ex = E.exit_forward(layers, x, vis)
    assert ex is None
    h = x
    for layer in layers:
        h = layer(h, torch.ones(2, 11, dtype=torch.bool))
    assert torch.equal(never, h)  # never exit: the unchanged model
    for l in range(4):
        got, ex = E.exit_forward(layers, x, vis, exit_layer=l)
        assert ex == l
        torch.testing.assert_close(got, E.masked_reference_forward(layers, x, vis, l), rtol=1e-12, atol=1e-12)
    text_only, _ = E.exit_forward(layers, x, vis, exit_layer=-1)
    h = E.drop_visual(x, vis)
    for layer in layers:
        h = layer(h, torch.ones(2, 5, dtype=torch.bool))
    assert torch.equal(text_only, h)  # exit at layer 0's input: the text-only forward


def test_dyvte_gate_decides_the_exit_layer():
    torch.manual_seed(5)
    layers = [_Layer(6, s) for s in range(3)]
    gates = [E.VisualExitGate(6, hidden=8).double() for _ in range(3)]
    x = torch.randn(1, 11, 6, dtype=torch.float64)
    with torch.no_grad():
        for gate in gates:
            gate.w1.weight.zero_()  # equal logits: stay
        u = torch.randn(4, 12, dtype=torch.float64)
        gates[1].w1.weight.copy_(torch.cat([u, -u]))  # gelu(a) + gelu(-a) > 0 for a != 0
        gates[1].w2.weight.copy_(torch.tensor([[0.0] * 8, [1.0] * 8]))  # logit 1 > logit 0: exit
        got, ex = E.exit_forward(layers, x, slice(2, 8), gates=gates, text=slice(8, 11))
    assert ex == 1
    torch.testing.assert_close(got, E.masked_reference_forward(layers, x, slice(2, 8), 1))
