"""attnzoo.cross_attention: the multi-source contract (separate / joint, masks, regions, scales, biases, causal
by position, source mass) against written-out softmaxes, and its validation."""

import pytest
import torch

from attnzoo import cross_attention
from attnzoo.cross import _prefix_blocks, _SourceLSE, position_visibility
from attnzoo.reference import softmax_attention
from attnzoo.testing import assert_close

F64 = torch.float64


def _g(seed):
    return torch.Generator().manual_seed(seed)


def _inputs(B=2, Hq=4, Nq=70, D=8, Dv=6, m=(9, 5), hk=(2, 4), seed=0, dtype=F64, grad=False):
    g = _g(seed)
    q = torch.randn(B, Hq, Nq, D, generator=g, dtype=F64).to(dtype).requires_grad_(grad)
    src = {}
    for name, M, H in zip(("text", "image"), m, hk):
        k = torch.randn(B, H, M, D, generator=g, dtype=F64).to(dtype).requires_grad_(grad)
        v = torch.randn(B, H, M, Dv, generator=g, dtype=F64).to(dtype).requires_grad_(grad)
        src[name] = (k, v)
    return q, src


def _softmax_rows(scores):
    return torch.softmax(scores, dim=-1)


def _scores(q, k):
    kr = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    return q @ kr.transpose(-2, -1) / q.shape[-1] ** 0.5


def _vals(q, v):
    return v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)


# ---------------------------------------------------------------------------------------------------------
# The two modes against written-out softmaxes
# ---------------------------------------------------------------------------------------------------------
def test_separate_is_a_sum_of_per_source_softmaxes_and_differs_from_joint():
    q, src = _inputs()
    (kt, vt), (ki, vi) = src["text"], src["image"]
    want = (_softmax_rows(_scores(q, kt)) @ _vals(q, vt)
            + 0.6 * _softmax_rows(_scores(q, ki)) @ _vals(q, vi))
    for backend in ("reference", "fast"):
        got = cross_attention(q, src, mode="separate", scales={"image": 0.6}, backend=backend)
        assert_close(got, want, F64, f"separate ({backend})")
    joint = cross_attention(q, src, mode="joint", scales={"image": 0.6})
    assert (joint - want).abs().max() > 1e-2


def test_joint_is_one_softmax_over_concatenated_keys():
    q, src = _inputs()
    (kt, vt), (ki, vi) = src["text"], src["image"]
    p = _softmax_rows(torch.cat([_scores(q, kt), _scores(q, ki)], -1))
    want = p[..., :9] @ _vals(q, vt) + 0.3 * (p[..., 9:] @ _vals(q, vi))
    for backend in ("reference", "fast"):
        got = cross_attention(q, src, mode="joint", scales={"image": 0.3}, backend=backend)
        assert_close(got, want, F64, f"joint ({backend})")


def test_single_source_equals_softmax_attention_in_both_modes():
    q, src = _inputs()
    kt, vt = src["text"]
    mask = torch.rand(2, 9, generator=_g(3)) > 0.4
    mask[:, 0] = True
    want = softmax_attention(q, kt, vt, key_padding_mask=mask)
    for mode in ("separate", "joint"):
        got = cross_attention(q, {"text": (kt, vt)}, masks={"text": mask}, mode=mode)
        assert_close(got, want, F64, mode)


@pytest.mark.parametrize("mode", ["separate", "joint"])
def test_scale_zero_in_separate_mode_is_bit_identical_to_the_source_absent(mode):
    q, src = _inputs(dtype=torch.float32)
    alone = cross_attention(q, {"text": src["text"]}, mode=mode)
    zero = cross_attention(q, src, mode=mode, scales={"image": 0.0})
    if mode == "separate":
        assert torch.equal(alone, zero)
    else:  # joint: the zero-scaled keys still take softmax mass
        assert (alone - zero).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# fast == reference in every combination, outputs, mass and gradients
# ---------------------------------------------------------------------------------------------------------
def _extras(B=2, Nq=70, Hq=4):
    g = _g(5)
    kpm = torch.rand(B, 9, generator=g) > 0.3
    kpm[:, 0] = True
    return {
        "masks": dict(masks={"text": kpm}),
        "regions": dict(region_masks={"image": torch.rand(B, Nq, generator=g) > 0.5}),
        "biases": dict(biases={"image": torch.randn(1, Hq, 5, generator=g, dtype=F64)}),
        "positions": dict(q_pos=torch.randint(0, 5, (Nq,), generator=g),
                          kv_pos={"text": torch.randint(0, 5, (9,), generator=g)}),
        "batch_positions": dict(q_pos=torch.randint(0, 5, (B, Nq), generator=g),
                                kv_pos={"text": torch.randint(0, 5, (B, 9), generator=g),
                                        "image": torch.arange(5).double()}),
        "scales": dict(scales={"image": torch.tensor(0.7, dtype=F64), "text": 1.3}),
    }


@pytest.mark.parametrize("mode", ["separate", "joint"])
@pytest.mark.parametrize("case", ["none", "masks", "regions", "biases", "positions", "batch_positions", "scales",
                                  "all"])
def test_fast_equals_reference_with_mass_and_gradients(mode, case):
    q, src = _inputs(grad=True)
    ex = _extras()
    kw = {} if case == "none" else ex.get(case, {})
    if case == "all":
        kw = {**ex["masks"], **ex["regions"], **ex["biases"], **ex["positions"], **ex["scales"]}
    ref, mref = cross_attention(q, src, mode=mode, backend="reference", return_source_mass=True, **kw)
    fast, mfast = cross_attention(q, src, mode=mode, return_source_mass=True, **kw)
    assert_close(fast, ref, F64, f"{mode} {case}: output")
    for n in mref:
        assert_close(mfast[n], mref[n], F64, f"{mode} {case}: mass of {n}")
    leaves = [q, *src["text"], *src["image"]]
    g = torch.randn_like(ref, generator=_g(9))

    def loss(out, mass):
        return (out * g).sum() + sum(m.square().sum() for m in mass.values())

    gr = torch.autograd.grad(loss(ref, mref), leaves)
    gf = torch.autograd.grad(loss(fast, mfast), leaves)
    for i, (a, b) in enumerate(zip(gf, gr)):
        assert_close(a, b, F64, f"{mode} {case}: gradient #{i}")


def test_source_mass_equals_the_dense_attention_matrix_mass_float64():
    """Acceptance: the mass from log-sum-exps equals the mass summed from the dense joint attention matrix."""
    q, src = _inputs(Nq=300)  # several LSE query blocks
    kt, ki = src["text"][0], src["image"][0]
    kpm = torch.ones(2, 9, dtype=torch.bool)
    kpm[1, 4:] = False
    s_t = _scores(q, kt).masked_fill(~kpm[:, None, None, :], float("-inf"))
    p = _softmax_rows(torch.cat([s_t, _scores(q, ki)], -1))  # (B, H, Nq, 14), the dense matrix
    for mode in ("joint", "separate"):
        _, mass = cross_attention(q, src, mode=mode, masks={"text": kpm}, return_source_mass=True)
        assert_close(mass["text"], p[..., :9].sum(-1), F64, f"{mode}: text mass", tol=1e-10)
        assert_close(mass["image"], p[..., 9:].sum(-1), F64, f"{mode}: image mass", tol=1e-10)
        total = mass["text"] + mass["image"]
        assert (total - 1).abs().max() < 1e-12


def test_source_mass_is_zero_where_a_region_or_position_hides_a_source():
    q, src = _inputs()
    region = torch.zeros(2, 70, dtype=torch.bool)
    region[:, ::2] = True
    _, mass = cross_attention(q, src, mode="joint", region_masks={"image": region}, return_source_mass=True)
    assert (mass["image"][..., 1::2] == 0).all() and (mass["text"][..., 1::2] == 1).all()
    qp = torch.arange(70) % 3
    _, mass = cross_attention(q, src, mode="joint", q_pos=qp, kv_pos={"image": torch.full((5,), 2)},
                              return_source_mass=True)
    assert (mass["image"][..., qp < 2] == 0).all() and (mass["image"][..., qp == 2] > 0).all()


def test_source_lse_gradcheck():
    g = _g(11)
    q = torch.randn(1, 2, 7, 4, generator=g, dtype=F64, requires_grad=True)
    k = torch.randn(1, 1, 5, 4, generator=g, dtype=F64, requires_grad=True)
    bias = torch.randn(1, 2, 5, generator=g, dtype=F64, requires_grad=True)
    vis = torch.rand(1, 1, 7, 5, generator=g) > 0.3
    vis[..., 0] = True

    def fn(q, k, bias):
        return _SourceLSE.apply(q, k, bias, 0.4, lambda a, b: vis[:, :, a:b], 3)

    assert torch.autograd.gradcheck(fn, (q, k, bias))


# ---------------------------------------------------------------------------------------------------------
# Causal by position
# ---------------------------------------------------------------------------------------------------------
def test_position_visibility_is_block_lower_triangular_for_frame_groups():
    q_pos = torch.arange(3).repeat_interleave(2)  # 2 queries per frame group
    kv_pos = torch.arange(3).repeat_interleave(4)  # 4 tokens per frame
    vis = position_visibility(q_pos, kv_pos)[0, 0]
    want = torch.kron(torch.tril(torch.ones(3, 3, dtype=torch.bool)), torch.ones(2, 4, dtype=torch.bool))
    assert torch.equal(vis, want)


def test_prefix_blocks_cover_rows_and_merge_short_runs():
    counts = [0, 0, 1, 1, 1, 3, 3, 5, 8, 8]
    blocks = _prefix_blocks(counts, 3)
    assert blocks[0] == (0, 2, 0, 0)
    rows = [r for a, b, _, _ in blocks for r in range(a, b)]
    assert rows == list(range(10))
    for a, b, lo, hi in blocks:
        assert lo == counts[a] and hi == counts[b - 1]
        assert b - a >= 3 or b == 10 or a == 0


@pytest.mark.parametrize("order", ["sorted", "shuffled"])
def test_causal_by_position_matches_dense_mask_and_ignores_later_tokens(order):
    g = _g(2)
    B, H, Nq, M, D = 2, 2, 150, 40, 8
    q = torch.randn(B, H, Nq, D, generator=g, dtype=F64)
    k = torch.randn(B, H, M, D, generator=g, dtype=F64)
    v = torch.randn(B, H, M, D, generator=g, dtype=F64)
    qp = torch.randint(0, 8, (Nq,), generator=g).sort().values
    kp = torch.arange(M) // 5
    if order == "shuffled":
        qp, kp = qp[torch.randperm(Nq, generator=g)], kp[torch.randperm(M, generator=g)]
    want = softmax_attention(q, k, v, attn_mask=position_visibility(qp, kp))
    got = cross_attention(q, {"frames": (k, v)}, q_pos=qp, kv_pos={"frames": kp})
    assert_close(got, want, F64, "by position")
    assert (got[:, :, qp < kp.min()] == 0).all()
    t = 3
    k2, v2 = k.clone(), v.clone()
    k2[:, :, kp > t] += 5
    v2[:, :, kp > t] -= 5
    pert = cross_attention(q, {"frames": (k2, v2)}, q_pos=qp, kv_pos={"frames": kp})
    assert (pert[:, :, qp <= t] - got[:, :, qp <= t]).abs().max() < 1e-12
    assert (pert[:, :, qp > t] - got[:, :, qp > t]).abs().max() > 1e-3


# ---------------------------------------------------------------------------------------------------------
# Validation: every per-source argument is checked and never silently dropped
# ---------------------------------------------------------------------------------------------------------
def test_unknown_source_names_raise():
    q, src = _inputs()
    for arg in ("masks", "region_masks", "scales", "biases", "kv_pos"):
        with pytest.raises(ValueError, match=f"{arg}: unknown source 'imgae'"):
            cross_attention(q, src, q_pos=torch.zeros(70), **{arg: {"imgae": torch.ones(2, 5, dtype=torch.bool)}})


@pytest.mark.parametrize("kwargs,err,match", [
    (dict(mode="concat"), ValueError, "mode: expected one of"),
    (dict(masks={"text": torch.ones(2, 9)}), TypeError, r"masks\['text'\]: expected dtype torch.bool"),
    (dict(masks={"text": torch.ones(2, 8, dtype=torch.bool)}), ValueError, r"masks\['text'\]: expected shape"),
    (dict(region_masks={"image": torch.ones(2, 69, dtype=torch.bool)}), ValueError, r"region_masks\['image'\]"),
    (dict(region_masks={"image": torch.ones(2, 70, dtype=F64)}, mode="joint"), TypeError, "only for mode='separate'"),
    (dict(region_masks={"image": torch.ones(2, 70)}), TypeError, "q's dtype"),
    (dict(scales={"image": True}), TypeError, r"scales\['image'\]"),
    (dict(scales={"image": float("nan")}), TypeError, r"scales\['image'\]"),
    (dict(biases={"image": torch.zeros(2, 4, 6, dtype=F64)}), ValueError, r"biases\['image'\]"),
    (dict(kv_pos={"text": torch.zeros(9)}), ValueError, "q_pos: kv_pos is given"),
    (dict(q_pos=torch.zeros(70, dtype=torch.bool)), TypeError, "q_pos: expected integer or floating"),
    (dict(q_pos=torch.zeros(71)), ValueError, "q_pos: expected shape"),
    (dict(scale=-1.0), ValueError, "scale"),
    (dict(backend="flash"), ValueError, "backend"),
])
def test_bad_arguments_raise_clear_errors(kwargs, err, match):
    q, src = _inputs()
    with pytest.raises(err, match=match):
        cross_attention(q, src, **kwargs)


def test_bad_sources_raise():
    q, src = _inputs()
    with pytest.raises(TypeError, match="sources: expected a non-empty mapping"):
        cross_attention(q, {})
    with pytest.raises(TypeError, match=r"sources\['text'\]: expected a pair"):
        cross_attention(q, {"text": src["text"][0]})
    k, v = src["text"]
    with pytest.raises(ValueError, match=r"sources\['text'\]: .*head dim"):
        cross_attention(q, {"text": (k[..., :4], v)})
    with pytest.raises(ValueError, match=r"sources\['image'\]: value dim"):
        cross_attention(q, {"text": (k, v), "image": (k, v[..., :3])})
    with pytest.raises(ValueError, match=r"sources\['text'\]: .*multiple of key/value heads"):
        cross_attention(q, {"text": (k[:, :1].expand(2, 3, 9, 8), v[:, :1].expand(2, 3, 9, 6))})
