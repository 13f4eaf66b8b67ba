"""Video-CCAM: a cross-attention projector whose learned queries see the video's frames in causal order.

Paper: "Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and Long
Videos", Fei, Li, Deng, Wang, Liu, Wang, arXiv 2408.14023. Official code: https://github.com/QQ-MM/Video-CCAM.
CATALOG P076.
N learned queries cross-attend to the visual tokens of T frames; the queries are divided into T ordered groups and
group t may attend only to tokens of frames <= t (a block lower-triangular causal cross-attention mask, CCAM), so
the projected tokens the LLM reads follow the video's time order. The same queries serve any T (trained with 16
frames, run with 96).

(?) The projector's code is not in the repository (it loads from the model hub with remote code), so two choices
follow the paper's description: query i (0-indexed) sits at frame ``ceil((i + 1) T / N) - 1`` (the
groups are N/T consecutive queries when T divides N; uneven otherwise, the last query always sees every frame);
the block is the shared resampler (:class:`attnzoo.cross.LatentResampler`): pre-norms, cross-attention of the queries
to the frame tokens (queries do not attend to each other), a GEGLU feed-forward, ``depth`` blocks (options ``depth``,
``ff_mult``).
``causal=False`` is the unmasked projector the paper compares against. Causal cross by position runs on
:func:`attnzoo.cross_attention`'s block-prefix path (one SDPA call per group of queries over the frames it may see).
Decoding: frames arrive one at a time (``state=ContextCache()``, ``num_frames=T``); each call appends the new frames'
keys/values to every block's cache and returns the queries that just became complete (all queries of a frame
group once its frame is in), which equal the rows of the full run.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ...cross import LatentResampler
from ...errors import check_bool, check_int, check_key_padding_mask, check_module_input
from ...registry import CrossSpec, Mechanism, Option, register
from ...state.context import ContextCache, check_positions


def ccam_query_positions(num_queries: int, num_frames: int) -> torch.Tensor:
    """(num_queries,) the frame each query sits at: ``ceil((i + 1) T / N) - 1``; query i sees frames <= it."""
    check_int("num_queries", num_queries)
    check_int("num_frames", num_frames)
    i = torch.arange(num_queries)
    return ((i + 1) * num_frames + num_queries - 1) // num_queries - 1


class VideoCCAMProjector(nn.Module):
    """``x (B, M, context_dim)`` visual tokens with ``context_pos`` (M,) or (B, M) (their frame, 0..T-1), or
    ``x (B, T, n_f, context_dim)`` frames -> ``(B, num_queries, dim)`` projected tokens in time order.

    ``key_padding_mask`` (B, M) or (B, T, n_f) bool. ``num_frames`` (T; default: the last frame + 1) places the query
    groups. With ``state=ContextCache()`` and ``num_frames``, frames arrive over calls and each call returns the
    queries completed so far (``(out (B, n_new, dim), state)``).
    """

    def __init__(self, dim: int, heads: int, *, num_queries: int = 64, context_dim: int | None = None,
                 depth: int = 1, head_dim: int | None = None, ff_mult: int = 4, causal: bool = True) -> None:
        super().__init__()
        self.dim, self.heads = check_int("dim", dim), check_int("heads", heads)
        self.num_queries = check_int("num_queries", num_queries)
        self.causal = check_bool("causal", causal)
        self.context_dim = dim if context_dim is None else check_int("context_dim", context_dim)
        self.resampler = LatentResampler(dim, heads, num_latents=num_queries, context_dim=self.context_dim,
                                         depth=depth, head_dim=head_dim, ff_mult=ff_mult, causal=causal)

    def extra_repr(self) -> str:
        return f"num_queries={self.num_queries}, context_dim={self.context_dim}, causal={self.causal}"

    def query_positions(self, num_frames: int) -> torch.Tensor:
        """(num_queries,) frame of each query for a video of ``num_frames`` frames."""
        return ccam_query_positions(self.num_queries, num_frames).to(self.resampler.latents.device)

    def _tokens(self, x, context_pos, key_padding_mask, state):
        """(x (B, M, C), positions (M,) or (B, M) or None, mask (B, M) or None) from either input layout."""
        if isinstance(x, torch.Tensor) and x.dim() == 4:
            check_module_input(self, x, layout="(B, T, N, C)", channels=self.context_dim)
            B, T, nf, C = x.shape
            if context_pos is None:
                start = 0
                if state is not None and self.resampler.layers[0].source in state:
                    start = int(state.positions(self.resampler.layers[0].source).max()) + 1
                context_pos = torch.arange(start, start + T, device=x.device).repeat_interleave(nf)
            if isinstance(key_padding_mask, torch.Tensor) and key_padding_mask.dim() == 3:
                if tuple(key_padding_mask.shape) != (B, T, nf):
                    raise ValueError(f"key_padding_mask: frames x (B, T, n_f) = {(B, T, nf)} take a mask of that "
                                     f"shape or (B, T * n_f), got {tuple(key_padding_mask.shape)}")
                key_padding_mask = key_padding_mask.reshape(B, T * nf)
            check_key_padding_mask(key_padding_mask, B, T * nf, device=x.device)
            x = x.reshape(B, T * nf, C)
        else:
            check_module_input(self, x, channels=self.context_dim)
            check_key_padding_mask(key_padding_mask, x.shape[0], x.shape[1], device=x.device)
        check_positions("context_pos", context_pos, x.shape[0], x.shape[1], device=x.device)
        return x, context_pos, key_padding_mask

    def forward(self, x: torch.Tensor, *, context_pos: torch.Tensor | None = None, num_frames: int | None = None,
                key_padding_mask: torch.Tensor | None = None, state: ContextCache | None = None):
        """See the class docstring. Returns (B, num_queries, dim), or (out, state) when decoding."""
        x, pos, kpm = self._tokens(x, context_pos, key_padding_mask, state)
        if not self.causal:
            if state is not None:
                raise ValueError("state: frame-by-frame decoding is for the causal projector; the unmasked one needs "
                                 "every frame at once")
            return self.resampler(x, key_padding_mask=kpm)
        if pos is None:
            raise ValueError("context_pos: the causal projector needs each token's frame, (M,) or (B, M), or frames "
                             "as x (B, T, n_f, C)")
        if state is not None:
            return self._decode(x, pos, kpm, num_frames, state)
        T = int(pos.max()) + 1 if num_frames is None else check_int("num_frames", num_frames)
        if int(pos.max()) >= T:
            raise ValueError(f"context_pos: frames must be < num_frames={T}, got frame {int(pos.max())}")
        return self.resampler(x, key_padding_mask=kpm, context_pos=pos, q_pos=self.query_positions(T))

    def _decode(self, x, pos, kpm, num_frames, state: ContextCache):
        if not isinstance(state, ContextCache):
            raise TypeError(f"state: expected an attnzoo ContextCache, got {type(state).__name__}")
        if num_frames is None:
            raise ValueError("num_frames: frame-by-frame decoding needs the video's frame count up front (it places "
                             "the query groups)")
        T = check_int("num_frames", num_frames)
        if state.info.setdefault("video_ccam_frames", T) != T:
            raise ValueError(f"num_frames: this state decodes a video of {state.info['video_ccam_frames']} frames, "
                             f"got {T}")
        qpos = self.query_positions(T)
        done = state.seq_len
        if done and bool((pos <= qpos[done - 1]).any()):
            raise ValueError(f"context_pos: queries up to frame {int(qpos[done - 1])} were already returned; new "
                             f"tokens must come from later frames, got frame {int(pos.min())}")
        if int(pos.max()) >= T:
            raise ValueError(f"context_pos: frames must be < num_frames={T}, got frame {int(pos.max())}")
        for layer in self.resampler.layers:
            layer.attn.extend_context(state, {layer.source: layer.norm_c(x)},
                                      key_padding_mask=None if kpm is None else {layer.source: kpm},
                                      context_pos={layer.source: pos})
        seen = int(state.positions(self.resampler.layers[0].source).max())
        ready = int((qpos <= seen).sum())
        B = x.shape[0]
        if ready == done:
            return x.new_zeros(B, 0, self.dim), state
        latents = self.resampler.latents[done:ready].unsqueeze(0).expand(B, -1, -1)  # (B, n_new, dim)
        out = self.resampler(None, latents=latents, q_pos=qpos[done:ready], state=state)
        state.seq_len = ready
        return out, state


def _module(dim: int, heads: int, *, causal: bool = True, **options: Any):
    opts = VIDEO_CCAM.resolve_options(options)
    return VideoCCAMProjector(dim, heads, causal=causal, **opts)


VIDEO_CCAM = register(Mechanism(
    name="video_ccam",
    aliases=("ccam", "causal_cross_attention_mask"),
    family="cross",
    kind="pooling",
    catalog="P076",
    title="Video-CCAM: Enhancing Video-Language Understanding with Causal Cross-Attention Masks for Short and Long "
          "Videos",
    arxiv="2408.14023",
    code="https://github.com/QQ-MM/Video-CCAM",
    summary="Learned queries in T ordered groups cross-attend to T frames' tokens; group t sees only frames <= t "
            "(block lower-triangular mask); frames can be appended while decoding.",
    patterns=("noncausal_cross", "causal_cross"),
    exact=True,
    state="context",
    complexity="time O(N T n_f d / 2) causal (each group its frame prefix), memory O(N + T n_f) fused",
    module=_module,
    options=(
        Option("num_queries", 64, int, low=1, doc="learned queries N (the paper's projector: a few hundred)"),
        Option("context_dim", None, int, low=1, allow_none=True, doc="width of the visual tokens (None: dim)"),
        Option("depth", 1, int, low=1, doc="resampler blocks (?)"),
        Option("head_dim", None, int, low=1, allow_none=True, doc="per-head width (None: dim / heads)"),
        Option("ff_mult", 4, int, low=0, doc="feed-forward width multiple (0: none) (?)"),
    ),
    test_options={"num_queries": 8, "context_dim": 12, "depth": 2},
    cross=CrossSpec(positions=True, context_permutation_invariant=True, cache=True),
    notes="(?) query grouping ceil((i+1)T/N)-1 and the resampler block follow the paper's description (the projector "
          "code is not public). T = 1 is plain cross-attention pooling; group t is invariant to frames > t; decoding "
          "appends frames and returns each group as its frame arrives.",
))
