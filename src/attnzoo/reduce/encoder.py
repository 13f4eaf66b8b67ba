"""Token pruning inside a running BERT encoder (all-MiniLM-L6-v2 from ``attnzoo.models.load_minilm()``).

The first ``layer + 1`` layers run on every token; after layer ``layer`` a fraction of tokens is dropped (or merged,
for the pooling baseline) and the remaining layers run on the short sequence; the sentence embedding is the
size-weighted mean of the remaining tokens (MiniLM's mean pooling; a pooled token counts as the tokens it holds),
L2-normalised. The [CLS] token is always kept. Scores, computed from the attention of layer ``layer`` without an
n x n matrix (``attnzoo.reduce.importance``):

- ``cls``: the [CLS] row (head mean) -- the FasterVLM/VTC-CLS criterion in a text encoder;
- ``mean``: the mean attention each token receives over all queries (mean-pool attention);
- ``random`` and ``pool`` (contiguous segments averaged): the baselines at the same budget.

One sentence at a time (sentences differ in length, so budgets differ); padding never enters.
"""

from __future__ import annotations

import torch

from ..errors import check_choice, check_int
from .importance import attention_received, attention_row
from .select import keep_count, merge_tokens, pool_assignment, random_indices, select_tokens, topk_indices

METHODS = ("cls", "mean", "random", "pool")


def _heads(layer, x):
    att = layer.attention.self
    B, N, _ = x.shape
    H, D = att.num_attention_heads, att.attention_head_size
    q = att.query(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    k = att.key(x).view(B, N, H, D).transpose(1, 2)  # (B, H, N, D)
    return q, k, att.scaling


@torch.no_grad()
def pruned_sentence_embedding(model, input_ids: torch.Tensor, *, layer: int, keep: float | int | None,
                              method: str = "cls", seed: int = 0) -> tuple[torch.Tensor, int]:
    """(embedding (d,), tokens after pruning) of one sentence (1, N) (no padding); ``keep=None``: no pruning."""
    check_choice("method", method, METHODS)
    layers = model.encoder.layer
    check_int("layer", layer, low=0, high=len(layers) - 1)
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise ValueError(f"input_ids: expected one sentence of shape (1, N), got {tuple(input_ids.shape)}")
    h = model.embeddings(input_ids=input_ids, token_type_ids=torch.zeros_like(input_ids))  # (1, N, C)
    N = h.shape[1]
    sizes = torch.ones(1, N, dtype=h.dtype)
    h_in = h
    for i, lay in enumerate(layers):
        if keep is not None and i == layer + 1 and N > 1:
            h, sizes = _reduce(layers[layer], h_in, h, keep, method, seed)
        h_in = h
        h = lay(h, attention_mask=None)
        h = h[0] if isinstance(h, tuple) else h
    if keep is not None and layer == len(layers) - 1 and N > 1:
        h, sizes = _reduce(layers[layer], h_in, h, keep, method, seed)
    emb = (h[0] * sizes[0, :, None]).sum(0) / sizes.sum()
    return torch.nn.functional.normalize(emb, dim=-1), h.shape[1]


def _reduce(score_layer, h_in, h, keep, method, seed):
    """Keep [CLS] (token 0) and ``keep`` of the other tokens of h (1, N, C), scored by ``score_layer``'s attention
    on its input h_in."""
    N = h.shape[1]
    rest = N - 1
    k = keep_count(rest, keep)
    if method == "pool":
        a, m = pool_assignment(rest, k)
        assignment = torch.cat([torch.zeros(1, dtype=torch.long), a + 1]).view(1, N)
        red = merge_tokens(h, assignment, m + 1)
        return red.tokens, red.sizes
    if method == "random":
        top = random_indices(1, rest, k, generator=torch.Generator().manual_seed(seed))
    else:
        q, kk, scale = _heads(score_layer, h_in)
        if method == "cls":
            s = attention_row(q[:, :, :1], kk, rows=[0], scale=scale)[:, :, 0].mean(1)  # (1, N)
        else:
            s = attention_received(q, kk, scale=scale).mean(1)  # (1, N)
        top = topk_indices(s[:, 1:], k)
    index = torch.cat([torch.zeros(1, 1, dtype=torch.long), top + 1], dim=1)
    red = select_tokens(h, index)
    return red.tokens, red.sizes
