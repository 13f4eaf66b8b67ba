"""Prompt pruning inside a causal LM (FastV-style), with a KV cache that stays consistent when generating.

FastV ("An Image is Worth 1/2 Tokens After Layer 2", arXiv 2403.06764; the method P057/P085 compare against) runs
the first ``layer + 1`` layers on the whole prompt, scores the context tokens by the attention the last token pays
them in layer ``layer`` (mean over heads), and runs the later layers on the kept tokens only. Its official code
forces that layer to eager attention and keeps the full KV of the early layers beside the pruned ones (the KV-cache
double-write bug). Here:

- the score is the last token's attention row recomputed from its q, the cached K and the log-sum-exp
  (``attnzoo.reduce.importance.attention_row``): the model keeps its SDPA attention;
- after pruning, the cache of *every* layer holds exactly the kept tokens (early layers: their K/V computed with the
  full context, cropped to the kept positions; later layers: computed on the kept tokens);
- kept tokens keep their original positions (RoPE), generated tokens continue at the prompt length.

Generation after pruning therefore equals the model run on the kept tokens with the dropped ones masked out (a test
checks it against transformers' own forward with per-layer masks; with ``layer = -1`` it is literally the model run
on the kept token ids at their positions). Works with Llama-style transformers models (SmolLM2).

A trap this avoids: transformers (5.x) reads gaps in ``position_ids`` as packed-sequence boundaries and, without an
explicit 4-D mask, builds a block-diagonal mask; a pruned prompt run through ``model(..., position_ids=kept)`` then
silently attends only within runs of consecutive kept positions. The layers here always get an explicit mask.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import check_int
from .importance import attention_row
from .select import keep_count, merge_tokens, pool_assignment, random_indices, topk_indices


@dataclass
class PrunedPrompt:
    """State after :func:`fastv_prefill`: the cache (exactly the kept tokens in every layer), the kept original
    positions (M,), the prompt length N (the next token's position) and the last prompt token's logits (1, V)."""

    cache: object
    kept: torch.Tensor
    length: int
    logits: torch.Tensor
    scores: torch.Tensor | None = None


def _additive_causal(n: int, dtype, device) -> torch.Tensor:
    m = torch.full((n, n), float("-inf"), dtype=dtype, device=device).triu(1)  # (n, n)
    return m.view(1, 1, n, n)


def _run(model, h, position_ids, mask, cache, layers):
    inner = model.model
    pe = inner.rotary_emb(h, position_ids=position_ids)
    for i in layers:
        h = inner.layers[i](h, attention_mask=mask, position_embeddings=pe, position_ids=position_ids, cache=cache,
                            use_cache=True)
    return h


def last_token_scores(model, h_in: torch.Tensor, cache, layer: int, position: int) -> torch.Tensor:
    """(1, N): head-mean attention row of the last token in ``layer`` (input states h_in (1, N, C)), recomputed
    from its q (RoPE applied), the cached keys and the log-sum-exp -- no attention matrix."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    inner = model.model
    attn = inner.layers[layer].self_attn
    x = inner.layers[layer].input_layernorm(h_in[:, -1:])  # (1, 1, C)
    D = attn.head_dim
    q = attn.q_proj(x).view(1, 1, -1, D).transpose(1, 2)  # (1, Hq, 1, D)
    cos, sin = inner.rotary_emb(x, position_ids=torch.tensor([[position]], device=x.device))
    q, _ = apply_rotary_pos_emb(q, q, cos, sin)
    k = cache.layers[layer].keys  # (1, Hk, N, D), RoPE applied
    n = k.shape[2]
    row = attention_row(q, k, rows=[n - 1], nq=n, causal=True, scale=attn.scaling)  # (1, Hq, 1, N)
    return row.mean(dim=1).squeeze(1)  # (1, N)


@torch.no_grad()
def fastv_prefill(model, input_ids: torch.Tensor, *, layer: int, keep: float | int | None = None,
                  index: torch.Tensor | None = None, protect_first: int = 1, protect_last: int = 1,
                  method: str = "attention", seed: int = 0) -> PrunedPrompt:
    """Run the prompt (1, N) and prune it after ``layer`` (-1: before the first layer, then ``index`` is needed).

    The prunable tokens are positions [protect_first, N - protect_last) (the first token, a sink, and the last, the
    query, stay); ``keep`` (ratio or count) of them are kept by ``method``: ``"attention"`` (the last token's
    attention in ``layer``, FastV), ``"random"`` or ``"pool"`` (contiguous segments merged: hidden states and the
    early layers' cached K/V averaged, the merged token at its segment's last position) -- the baselines at the
    same budget. ``index`` (ascending kept positions of the whole prompt) overrides the scoring."""
    from transformers import DynamicCache

    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one prompt of shape (1, N), got {tuple(input_ids.shape)}")
    L = model.config.num_hidden_layers
    check_int("layer", layer, low=-1, high=L - 1)
    N = input_ids.shape[1]
    check_int("protect_first", protect_first, low=0, high=N)
    check_int("protect_last", protect_last, low=0, high=N - protect_first)
    if method not in ("attention", "random", "pool"):
        raise ValueError(f"method: expected one of ['attention', 'random', 'pool'], got {method!r}")
    if (keep is None) == (index is None):
        raise ValueError("keep, index: give exactly one (a budget to score with, or the kept positions)")
    if layer == -1 and index is None:
        raise ValueError("layer: -1 (prune before the first layer) has no attention to score with; give index")
    dev = input_ids.device
    inner = model.model
    h = inner.embed_tokens(input_ids)  # (1, N, C)
    pos = torch.arange(N, device=dev).view(1, N)
    cache = DynamicCache(config=model.config)
    mask = _additive_causal(N, h.dtype, dev)
    h_in = h
    if layer >= 0:
        h_in = _run(model, h, pos, mask, cache, range(layer))  # input of the scoring layer
        h = _run(model, h_in, pos, mask, cache, [layer])
    scores = None
    lo, hi = protect_first, N - protect_last
    if index is None and method == "pool" and hi > lo:
        return _pool_rest(model, h, cache, layer, lo, hi, keep_count(hi - lo, keep), N)
    if index is None:
        if hi <= lo:
            top = torch.empty(1, 0, dtype=torch.long, device=dev)
        elif method == "random":
            top = random_indices(1, hi - lo, keep, generator=torch.Generator().manual_seed(seed)) + lo
        else:
            scores = last_token_scores(model, h_in, cache, layer, N - 1)  # (1, N)
            top = topk_indices(scores[:, lo:hi], keep_count(hi - lo, keep)) + lo  # (1, k)
        index = torch.cat([torch.arange(lo, device=dev), top[0], torch.arange(hi, N, device=dev)])
    index = torch.as_tensor(index, dtype=torch.long, device=dev).reshape(-1)
    if index.numel() == 0 or bool((index[1:] <= index[:-1]).any()) or int(index[0]) < 0 or int(index[-1]) >= N:
        raise ValueError(f"index: expected ascending unique positions in [0, {N}), got {index.tolist()}")
    for i in range(layer + 1):  # the early layers' cache: exactly the kept tokens
        lay = cache.layers[i]
        lay.keys, lay.values = lay.keys[:, :, index], lay.values[:, :, index]
    h = h[:, index]
    kpos = index.view(1, -1)
    h = _run(model, h, kpos, _additive_causal(index.numel(), h.dtype, dev), cache, range(layer + 1, L))
    logits = model.lm_head(inner.norm(h[:, -1:]))[:, 0]  # (1, V)
    return PrunedPrompt(cache, index, N, logits, scores)


def _merge_heads(t: torch.Tensor, assignment: torch.Tensor, m: int) -> torch.Tensor:
    """Segment means of cached (B, Hk, N, D) keys/values along the tokens -> (B, Hk, m, D)."""
    B, Hk, N, D = t.shape
    flat = t.transpose(1, 2).reshape(B, N, Hk * D)  # (B, N, Hk*D)
    merged = merge_tokens(flat, assignment.view(1, N).expand(B, N), m).tokens  # (B, m, Hk*D)
    return merged.view(B, m, Hk, D).transpose(1, 2).contiguous()  # (B, Hk, m, D)


def _pool_rest(model, h, cache, layer, lo, hi, m, N):
    """The pooling baseline: merge positions [lo, hi) into m contiguous segments, in the hidden states after
    ``layer`` and in the cached K/V of layers <= ``layer``; the later layers run on the merged sequence."""
    dev = h.device
    a, _ = pool_assignment(hi - lo, m, device=dev)
    assignment = torch.cat([torch.arange(lo, device=dev), a + lo, torch.arange(hi, N, device=dev) - hi + lo + m])
    M = lo + m + (N - hi)
    pos = torch.zeros(M, dtype=torch.long, device=dev).scatter_reduce_(
        0, assignment, torch.arange(N, device=dev), reduce="amax")  # (M,) each slot at its last position
    h = merge_tokens(h, assignment.view(1, N), M).tokens
    for i in range(layer + 1):
        lay = cache.layers[i]
        lay.keys = _merge_heads(lay.keys, assignment, M)
        lay.values = _merge_heads(lay.values, assignment, M)
    L = model.config.num_hidden_layers
    h = _run(model, h, pos.view(1, M), _additive_causal(M, h.dtype, dev), cache, range(layer + 1, L))
    logits = model.lm_head(model.model.norm(h[:, -1:]))[:, 0]
    return PrunedPrompt(cache, pos, N, logits, None)


@torch.no_grad()
def decode_step(model, state: PrunedPrompt, token: int | list[int], step: int) -> torch.Tensor:
    """Feed generated token(s) starting at position N + ``step`` (several at once: teacher forcing); returns the
    next-token logits (1, V) after each of them, (T, V) for T tokens (a single token: (1, V))."""
    inner = model.model
    dev = state.kept.device
    toks = [token] if isinstance(token, int) else list(token)
    T = len(toks)
    h = inner.embed_tokens(torch.tensor([toks], device=dev))  # (1, T, C)
    pos = torch.arange(T, device=dev).view(1, T) + state.length + step
    cached = state.cache.get_seq_length()
    mask = torch.cat([torch.zeros(T, cached, dtype=h.dtype, device=dev),
                      torch.full((T, T), float("-inf"), dtype=h.dtype, device=dev).triu(1)], dim=1)
    h = _run(model, h, pos, mask.view(1, 1, T, cached + T), state.cache, range(model.config.num_hidden_layers))
    return model.lm_head(inner.norm(h))[0]


@torch.no_grad()
def fastv_generate(model, state: PrunedPrompt, max_new_tokens: int) -> tuple[list[int], list[torch.Tensor]]:
    """Greedy generation from a pruned prompt: (tokens, the logits (1, V) that chose each token)."""
    check_int("max_new_tokens", max_new_tokens, low=1)
    logits, tokens, all_logits = state.logits, [], []
    for step in range(max_new_tokens):
        tok = int(logits.argmax(-1))
        tokens.append(tok)
        all_logits.append(logits)
        if step + 1 < max_new_tokens:
            logits = decode_step(model, state, tok, step)
    return tokens, all_logits
