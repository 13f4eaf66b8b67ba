"""plot_mask: the PNG is written at the requested pixel size, and the matrix drawn equals the mask the
mechanism's reference materializes (patterns, mechanisms, per-head masks, predicates, arrays)."""

import builtins

import pytest
import torch

import attnzoo
from attnzoo import masks
from attnzoo.mechanisms.local.moa import moa_windows
from attnzoo.mechanisms.local.neighborhood_1d import neighborhood_1d_mask
from attnzoo.mechanisms.local.s2_attention import s2_mask
from attnzoo.mechanisms.local.sliding_window import sliding_window_mask
from attnzoo.mechanisms.memory.streaming_sinks import sink_window_mask

pytest.importorskip("matplotlib")
from attnzoo.analysis.mask_plot import plot_mask  # noqa: E402


def png_shape(path):
    import matplotlib.image as mpimg

    return mpimg.imread(path).shape[:2]


def full(pred, n, heads=1):
    return masks.materialize(pred, 1, heads, n, n)[0].numpy()


CASES = [
    ("causal", {}, lambda n: full(masks.causal(), n)[0]),
    ("sliding_window", {"window": 5}, lambda n: sliding_window_mask(n, n, 5, True)[0, 0].numpy()),
    ("sink_window", {"window": 4, "sinks": 2}, lambda n: sink_window_mask(n, n, 4, 2, True)[0, 0].numpy()),
    ("neighborhood_1d", {"kernel_size": 5, "dilation": 2, "causal": False},
     lambda n: neighborhood_1d_mask(n, n, 5, 2, False)[0, 0].numpy()),
    ("natten_1d", {"kernel_size": 3}, lambda n: neighborhood_1d_mask(n, n, 3, 1, True)[0, 0].numpy()),
    ("dilated", {"window": 4, "dilation": 3}, lambda n: full(masks.dilated_window(4, 3), n)[0]),
    ("block_local", {"block_size": 6}, lambda n: full(masks.and_masks(masks.block_local(6), masks.causal()), n)[0]),
    ("prefix_lm", {"prefix_length": 7}, lambda n: full(masks.prefix_lm(7), n)[0]),
]


@pytest.mark.parametrize("name,opts,want", CASES, ids=[c[0] for c in CASES])
def test_png_written_and_drawn_matrix_is_the_mask(tmp_path, name, opts, want):
    n = 30
    path = tmp_path / f"{name}.png"
    drawn = plot_mask(name, n=n, path=path, size=320, **opts)
    assert path.exists() and path.stat().st_size > 0
    assert png_shape(path) == (320, 320)
    assert drawn.shape == (n, n) and drawn.dtype == bool
    assert (drawn == want(n)).all()


def test_per_head_masks_moa_and_s2(tmp_path):
    n = 48
    s2 = s2_mask(4, 4, n, n, block_size=4, local_blocks=2, vert_stride=4, num_dense_heads=0, head_sliding_step=None,
                 head_sliding_offset=0, homo_head=False)[0].numpy()
    heads_seen = []
    for h in range(4):
        drawn = plot_mask("s2_attention", n=n, path=tmp_path / f"s2_{h}.png", heads=4, head=h, block_size=4,
                          local_blocks=2, vert_stride=4)
        assert (drawn == s2[h]).all()
        heads_seen.append(drawn)
    assert not (heads_seen[0] == heads_seen[1]).all()  # heads shard the context differently
    alphas, sinks = (6, 12, 20), 2
    windows = moa_windows(3, n, alphas=alphas, betas=0.0, sinks=sinks)
    for h, w in enumerate(windows):
        drawn = plot_mask("moa", n=n, path=tmp_path / f"moa_{h}.png", head=h, alphas=alphas, sinks=sinks)
        assert (drawn == sink_window_mask(n, n, w, sinks, True)[0, 0].numpy()).all()
        assert drawn.sum(1).max() == min(n, w + sinks)


def test_predicate_and_array_inputs(tmp_path):
    pred = masks.or_masks(masks.sliding_window(3), masks.prefix_lm(4))
    drawn = plot_mask(pred, n=20, path=tmp_path / "p.png", title="custom")
    assert (drawn == full(pred, 20)[0]).all()
    arr = torch.rand(12, 17, generator=torch.Generator().manual_seed(0)) > 0.5
    drawn = plot_mask(arr, n=12, path=tmp_path / "a.png", size=200)
    assert (drawn == arr.numpy()).all() and png_shape(tmp_path / "a.png") == (200, 200)


def test_errors(tmp_path):
    with pytest.raises(ValueError, match="window"):
        plot_mask("sliding_window", n=10, path=tmp_path / "x.png", window=0)
    with pytest.raises(attnzoo.UnknownMechanismError, match="Did you mean"):
        plot_mask("slidng_window", n=10, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="head"):
        plot_mask("s2_attention", n=16, path=tmp_path / "x.png", heads=2, head=5, block_size=2)
    with pytest.raises(ValueError, match="n"):
        plot_mask("causal", n=0, path=tmp_path / "x.png")
    with pytest.raises(TypeError, match="mechanism_or_mask"):
        plot_mask(3, n=8, path=tmp_path / "x.png")
    with pytest.raises(ValueError, match="window"):
        plot_mask("causal", n=8, path=tmp_path / "x.png", window=3)  # not an option of the causal pattern
    assert not (tmp_path / "x.png").exists()

def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch):
    real = builtins.__import__

    def fake(name, *a, **k):
        if name == "matplotlib" or name.startswith("matplotlib."):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", fake)
    with pytest.raises(ImportError, match=r"pip install attnzoo\[bench\]"):
        plot_mask("causal", n=8, path=tmp_path / "x.png")
