"""Mechanisms whose defaults cannot fit every benchmark size declare ``case_options``; the bench and the
quality models apply them (found by ``attnzoo bench --quick``: BiFormer's 7x7 regions on a 16x16 grid,
Sparsifiner's projections for 197 tokens, single-head SHViT/SpectFormer, non-causal Lightning with decay)."""

import pytest
import torch

import attnzoo
from attnzoo.bench.config import quick
from attnzoo.bench.efficiency import _base
from attnzoo.bench.quality.models import GridModel, SequenceModel

FITTED = [m for m in attnzoo.list_mechanisms() if m.case_options is not None]


def test_the_known_cases_declare_case_options():
    names = {m.name for m in FITTED}
    assert {"biformer", "crossformer_lsda", "sparsifiner", "shvit", "spectformer", "lightning"} <= names


@pytest.mark.parametrize("mech", FITTED, ids=lambda m: m.name)
@pytest.mark.parametrize("side", [6, 10, 13])
def test_fitted_options_build_and_run(mech, side):
    torch.manual_seed(0)
    n = side * side
    for causal in [p.startswith("causal") for p in mech.patterns if p.endswith("self")][:2]:
        opts, heads = mech.fit_case({}, n=n, side=side if mech.kind in ("grid", "channel") else None, heads=2,
                                    causal=causal)
        dim = 16
        if mech.kind == "grid":
            y = attnzoo.build(mech.name, dim, heads, **opts)(torch.randn(1, side, side, dim))
            assert torch.isfinite(y[0] if isinstance(y, tuple) else y).all()
        elif mech.kind == "channel":
            y = attnzoo.build(mech.name, dim, heads, **opts)(torch.randn(1, dim, side, side))
            assert torch.isfinite(y[0] if isinstance(y, tuple) else y).all()
        elif mech.functional:
            q, k, v = (torch.randn(1, 2, n, 8) for _ in range(3))
            assert torch.isfinite(attnzoo.attention(q, k, v, mechanism=mech.name, causal=causal, **opts)).all()
        else:
            y = attnzoo.build(mech.name, dim, heads, causal=causal, **opts)(torch.randn(1, n, dim))
            assert torch.isfinite(y[0] if isinstance(y, tuple) else y).all()


def test_explicit_options_win_and_heads_keep_the_width():
    bif = attnzoo.get("biformer")
    assert bif.fit_case({}, n=256, side=16, heads=4, causal=False)[0]["n_win"] == 4
    assert bif.fit_case({"n_win": 2}, n=256, side=16, heads=4, causal=False)[0]["n_win"] == 2
    cfg = quick(lengths=(256,), heads=4, head_dim=16)
    spec = _base(cfg, attnzoo.get("shvit"), "noncausal_self", "forward", 256)
    assert (spec["heads"], spec["heads"] * spec["head_dim"]) == (1, 64)
    spec = _base(cfg, attnzoo.get("lightning"), "noncausal_self", "forward", 256)
    assert spec["options"]["decay"] == 1.0


def test_quality_models_apply_case_options():
    m = SequenceModel("sparsifiner", vocab=10, out=10, seq_len=12, dim=16, heads=2, causal=False)
    assert m(torch.randint(0, 10, (2, 12))).shape == (2, 12, 10)
    g = GridModel("biformer", classes=10, side=8, dim=16, heads=2)
    assert g(torch.randn(2, 8, 8)).shape == (2, 10)
