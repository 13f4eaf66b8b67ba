"""IP-Adapter decoupled cross-attention: a separate softmax over image-prompt tokens beside the text one.

Paper: "IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models", Ye, Zhang, Liu, Han,
Yang, arXiv 2308.06721. Official code: https://github.com/tencent-ailab/IP-Adapter (maintained in diffusers as
``IPAdapterAttnProcessor2_0``). CATALOG P069.
A UNet cross-attention layer keeps its text path, ``softmax(Q K_t^T / sqrt(d)) V_t`` with the frozen W_k, W_v, and
adds ``lambda * softmax(Q K_i^T / sqrt(d)) V_i`` over the image-prompt tokens with new trainable W'_k, W'_v
(initialised from W_k, W_v): two softmaxes, outputs summed, one shared query and output projection.

Confirmed against diffusers 0.42.1 ``IPAdapterAttnProcessor2_0``: q/k/v projections without bias and the output
projection with bias; several adapters (``to_k_ip[i]``, ``to_v_ip[i]``, ``scale[i]``), each taking several images
(B, P, tokens, C) that share its projections, with a scale and a mask per image; a mask is downsampled bicubically to
the latent grid and multiplies that image's output per query (a float weight, not a hard mask); an adapter whose
scales are all 0 is skipped, so scale 0 is exactly the text-only layer.
Here: each adapter is a named context source (every source but ``text_source``), so ``context={"text": c_t,
"image": c_i, "face": c_f}``; a 4-D source (B, P, M, C) is P images of one adapter. ``region_masks`` take bool
(hard regions) or floating weights (diffusers' downsampled masks). The layer runs on :func:`attnzoo.cross_attention`
(``mode="separate"``): one fused SDPA call per text/image source. A :class:`~attnzoo.state.context.ContextCache` as
``state`` keeps the text and image keys/values across denoising steps (they do not change between steps).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import nn

from ...cross import CrossAttention, cross_attention
from ...errors import check_bool, check_key_padding_mask, check_module_input, check_tensor
from ...registry import CrossSpec, Mechanism, Option, register
from ...state.context import ContextCache


def _image_key(name: str, p: int | None) -> str:
    return name if p is None else f"{name}[{p}]"


class IPAdapterAttention(nn.Module):
    """IP-Adapter cross-attention: ``x (B, N, dim)`` latent queries, ``context={"text": (B, M_t, C_t), <adapter>:
    (B, M_i, C_i) or (B, P, M_i, C_i), ...}`` -> ``(B, N, dim)``.

    ``context_dims`` (default ``{"text": dim, "image": dim}``) names the text source (``text_source``) and the
    image-prompt adapters; ``scale`` is every adapter's lambda (a float, or {adapter: float}); per call, ``scales``
    overrides it ({adapter: float, or a list of P floats for P images}). ``region_masks`` {adapter: (B, N) or
    (B, P, N)}: bool regions or floating weights multiplying that image's output. ``key_padding_mask`` {source:
    (B, M) or (B, P, M)}. Parameters: ``attn.q_proj``, ``attn.k_proj[source]``, ``attn.v_proj[source]``,
    ``attn.o_proj`` (diffusers' ``to_q``, ``to_k``/``to_k_ip[i]``, ``to_v``/``to_v_ip[i]``, ``to_out[0]``).
    """

    def __init__(self, dim: int, heads: int, *, context_dims: Mapping[str, int] | None = None,
                 text_source: str = "text", scale: float | Mapping[str, float] = 1.0, kv_heads: int | None = None,
                 head_dim: int | None = None, bias: bool = False, out_bias: bool = True, causal: bool = False) -> None:
        super().__init__()
        opts = IP_ADAPTER.resolve_options(dict(context_dims=context_dims, text_source=text_source,
                                               scale=scale if not isinstance(scale, Mapping) else dict(scale),
                                               head_dim=head_dim, bias=bias, out_bias=out_bias))
        check_bool("causal", causal)
        if causal:
            raise ValueError("causal: IP-Adapter's cross-attention is non-causal (every latent sees the whole text and "
                             "image prompt); build it with causal=False")
        dims = opts["context_dims"] or {text_source: dim, "image": dim}
        if text_source not in dims:
            raise ValueError(f"text_source: {text_source!r} is not among context_dims {list(dims)}")
        self.text_source = text_source
        self.adapters = [n for n in dims if n != text_source]
        if not self.adapters:
            raise ValueError(f"context_dims: expected at least one image-prompt source beside {text_source!r}, got "
                             f"{list(dims)}")
        lam = opts["scale"]
        lam = {n: lam for n in self.adapters} if not isinstance(lam, Mapping) else dict(lam)
        unknown = [n for n in lam if n not in self.adapters]
        if unknown:
            raise ValueError(f"scale: unknown adapter {unknown[0]!r}; the adapters are {self.adapters}")
        self.attn = CrossAttention(dim, heads, context_dims=dims, kv_heads=kv_heads, head_dim=head_dim, bias=bias,
                                   out_bias=out_bias, scales={text_source: 1.0, **lam}, mode="separate")
        self.dim, self.heads = dim, heads

    def extra_repr(self) -> str:
        return f"text_source={self.text_source!r}, adapters={self.adapters}, scales={self.attn.scales}"

    def set_scale(self, scale: float | Mapping[str, float]) -> None:
        """Set lambda of every adapter (a float) or of the named ones (a mapping)."""
        new = {n: scale for n in self.adapters} if not isinstance(scale, Mapping) else dict(scale)
        for n, v in new.items():
            if n not in self.adapters:
                raise ValueError(f"scale: unknown adapter {n!r}; the adapters are {self.adapters}")
            self.attn.scales[n] = float(IP_ADAPTER.resolve_options({"scale": v})["scale"])

    @torch.no_grad()
    def init_image_from_text(self) -> None:
        """Initialise every adapter's W'_k, W'_v with the text path's W_k, W_v (the paper's initialisation)."""
        t = self.text_source
        for n in self.adapters:
            for proj in (self.attn.k_proj, self.attn.v_proj):
                if proj[n].weight.shape != proj[t].weight.shape:
                    raise ValueError(f"{n}: its width {self.attn.context_dims[n]} differs from the text's "
                                     f"{self.attn.context_dims[t]}; W'_k, W'_v cannot start from W_k, W_v")
                proj[n].weight.copy_(proj[t].weight)
                if proj[n].bias is not None:
                    proj[n].bias.copy_(proj[t].bias)

    # -- the sources of one call -----------------------------------------------------------------------
    def _expand(self, context, key_padding_mask, region_masks, scales, batch: int):
        """{source key: (k, v)} with adapters of P images split into P sources sharing their projections, and
        their masks, regions and scales."""
        ctx = dict(context)
        unknown = [n for n in ctx if n not in self.attn.context_dims]
        if unknown:
            raise ValueError(f"context: unknown source {unknown[0]!r}; this layer's sources are "
                             f"{list(self.attn.context_dims)}")
        for arg, d in (("key_padding_mask", key_padding_mask), ("region_masks", region_masks), ("scales", scales)):
            extra = [n for n in d if n not in ctx]
            if extra:
                raise ValueError(f"{arg}: given for source {extra[0]!r}, which is not in this call's context")
        if self.text_source in region_masks:
            raise ValueError(f"region_masks: the text source {self.text_source!r} reaches every query; region masks "
                             "belong to image prompts")
        if self.text_source in scales:
            raise ValueError("scales: the text path has no lambda; scales are per image-prompt adapter")
        out: dict[str, Any] = {"sources": {}, "masks": {}, "regions": {}, "scales": {}}
        for name, c in ctx.items():
            check_tensor(f"context[{name!r}]", c)
            images = c.shape[1] if c.dim() == 4 and name != self.text_source else None
            if c.dim() == 4 and images is None:
                raise ValueError(f"context[{name!r}]: the text source is (B, M, C), got shape {tuple(c.shape)}")
            lam = scales.get(name, self.attn.scales.get(name, 1.0) if name != self.text_source else 1.0)
            if isinstance(lam, Sequence) and not isinstance(lam, str):
                if images is None or len(lam) != images:
                    raise ValueError(f"scales[{name!r}]: a list of scales needs one per image of a (B, P, M, C) "
                                     f"prompt, got {len(lam)} for shape {tuple(c.shape)}")
                lams = list(lam)
            else:
                lams = [lam] * (images or 1)
            for p in ([None] if images is None else range(images)):
                key = _image_key(name, p)
                k, v = self.attn.project(name, c if p is None else c[:, p])  # (B, Hk, M, hd) each
                if k.shape[0] != batch:
                    raise ValueError(f"context[{name!r}]: batch {k.shape[0]} does not match x's batch {batch}")
                out["sources"][key] = (k, v)
                if name != self.text_source:
                    out["scales"][key] = lams[0 if p is None else p]
                for arg, src, dst in (("key_padding_mask", key_padding_mask, "masks"),
                                      ("region_masks", region_masks, "regions")):
                    t = src.get(name)
                    if t is None:
                        continue
                    if p is not None:
                        if not isinstance(t, torch.Tensor) or t.dim() != 3 or t.shape[1] != images:
                            got = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
                            raise ValueError(f"{arg}[{name!r}]: a prompt of {images} images takes (B, {images}, ...), "
                                             f"got {got}")
                        t = t[:, p]
                    if dst == "masks":
                        check_key_padding_mask(t, batch, k.shape[2], name=f"key_padding_mask[{key!r}]",
                                               device=k.device)
                    out[dst][key] = t
        return out

    def forward(self, x: torch.Tensor, context: Mapping[str, torch.Tensor] | None = None, *,
                key_padding_mask: Mapping[str, torch.Tensor] | None = None,
                region_masks: Mapping[str, torch.Tensor] | None = None,
                scales: Mapping[str, float | Sequence[float]] | None = None, state: ContextCache | None = None,
                return_source_mass: bool = False):
        """x (B, N, dim); context {source: (B, M, C) or (B, P, M, C)} -> (B, N, dim) (and {source: mass} with
        ``return_source_mass``; the state last when given)."""
        check_module_input(self, x, channels=self.dim)
        B, N, _ = x.shape
        for arg, d in (("context", context), ("key_padding_mask", key_padding_mask), ("region_masks", region_masks),
                       ("scales", scales)):
            if d is not None and not isinstance(d, Mapping):
                raise TypeError(f"{arg}: expected a mapping {{source name: value}}, got {type(d).__name__}")
        kpm, regions, lam = dict(key_padding_mask or {}), dict(region_masks or {}), dict(scales or {})
        if state is not None and not isinstance(state, ContextCache):
            raise TypeError(f"state: expected an attnzoo ContextCache, got {type(state).__name__}")
        if context is not None:
            if self.text_source not in context:
                raise ValueError(f"context: IP-Adapter adds image prompts to the text cross-attention; the text source "
                                 f"{self.text_source!r} is missing (got {list(context)})")
            parts = self._expand(context, kpm, regions, lam, B)
            if state is not None:
                for key, (k, v) in parts["sources"].items():
                    if key in state:
                        raise ValueError(f"context: source {key!r} is already in this ContextCache; decode with "
                                         "context=None")
                    state.set(key, k, v, key_padding_mask=parts["masks"].get(key))
        else:
            if state is None:
                raise ValueError("context: IP-Adapter needs the text and image-prompt context (or a filled state)")
            if kpm:
                raise ValueError("key_padding_mask: decoding from a ContextCache uses the cached masks")
            parts = {"sources": {}, "masks": {}, "regions": {}, "scales": {}}
            for key in state.names:
                base = key.split("[")[0]
                if base not in self.attn.context_dims:
                    continue
                parts["sources"][key] = (state.keys(key), state.values(key))
                if state.mask(key) is not None:
                    parts["masks"][key] = state.mask(key)
                if base != self.text_source:
                    idx = int(key[len(base) + 1:-1]) if key != base else None
                    given = lam.get(base, self.attn.scales[base])
                    parts["scales"][key] = given[idx] if isinstance(given, Sequence) else given
                r = regions.get(base)
                if r is not None:
                    idx = int(key[len(base) + 1:-1]) if key != base else None
                    parts["regions"][key] = r if idx is None else r[:, idx]
            for n in (*regions, *lam):
                if not any(k.split("[")[0] == n for k in parts["sources"]):
                    raise ValueError(f"region_masks, scales: source {n!r} is not in the ContextCache")
        q = self.attn._heads(self.attn.q_proj(x), self.attn.heads)  # (B, H, N, hd)
        res = cross_attention(q, parts["sources"], mode="separate", masks=parts["masks"] or None,
                              region_masks=parts["regions"] or None, scales=parts["scales"] or None,
                              scale=self.attn.scale, return_source_mass=return_source_mass,
                              backend=self.attn.backend)
        out, mass = res if return_source_mass else (res, None)
        y = self.attn.o_proj(out.transpose(1, 2).reshape(B, N, -1))  # (B, N, dim)
        result = (y,) + ((mass,) if return_source_mass else ()) + ((state,) if state is not None else ())
        return result[0] if len(result) == 1 else result


def _module(dim: int, heads: int, *, kv_heads: int | None = None, causal: bool = False, **options: Any):
    return IPAdapterAttention(dim, heads, kv_heads=kv_heads, causal=causal, **options)


IP_ADAPTER = register(Mechanism(
    name="ip_adapter",
    aliases=("decoupled_cross_attention",),
    family="cross",
    catalog="P069",
    title="IP-Adapter: Text Compatible Image Prompt Adapter for Text-to-Image Diffusion Models",
    arxiv="2308.06721",
    code="https://github.com/tencent-ailab/IP-Adapter",
    summary="Decoupled cross-attention: the text softmax plus lambda times a separate softmax over image-prompt "
            "tokens with their own k/v projections; several adapters, images, scales and region masks.",
    patterns=("noncausal_cross",),
    exact=True,
    state="context",
    complexity="time O(N (M_text + sum M_image) d), memory O(N + M) fused",
    module=_module,
    options=(
        Option("context_dims", None, dict, allow_none=True,
               doc="{source: width}: the text source and the image-prompt adapters (None: text, image of width dim)"),
        Option("text_source", "text", str, doc="the name of the text source (every other source is an adapter)"),
        Option("scale", 1.0, (float, dict), doc="lambda of every adapter, or {adapter: lambda}"),
        Option("head_dim", None, int, low=1, allow_none=True, doc="per-head width (None: dim / heads)"),
        Option("bias", False, bool, doc="biases in the q/k/v projections (diffusers: none)"),
        Option("out_bias", True, bool, doc="bias in the output projection (diffusers: yes)"),
    ),
    permutation_equivariant=True,
    test_options={"context_dims": {"text": 12, "image": 10}, "scale": 0.6},
    cross=CrossSpec(sources=("text", "image"), context_permutation_invariant=True, cache=True, source_mass=True,
                    mode="separate"),
    notes="scale 0 is bit-identical to the text-only layer (the adapter is skipped); equals two separate softmaxes, "
          "not one over the concatenated keys; parity with diffusers' IPAdapterAttnProcessor2_0 (copied weights).",
))
