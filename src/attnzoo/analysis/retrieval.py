"""Retrieval heads (CATALOG P045): which attention heads copy a needle from a long context, and whether masking
them breaks retrieval.

Paper: "Retrieval Head Mechanistically Explains Long-Context Factuality", Wu, Wang, Xiao, Peng, Fu, arXiv
2404.15574. Official code: https://github.com/nightdessert/Retrieval_Head (``retrieval_head_detection.py``).

Copy-paste score, as the official ``retrieval_calculate``: a needle sentence is hidden in a haystack and the model
answers a question about it greedily. At every decoding step that emits token w, head h of layer l "retrieves" when
the argmax of its attention row (the query that produces w) lands on a needle position j whose token is w; each
such step adds 1 / |needle tokens| to the head's score for that sample, and a head's retrieval score is the mean over
samples. Heads above 0.1 are retrieval heads (the paper's threshold).

Choices: the answer is generated greedily first (the model's own tokens, as the official loop), then scored in one
teacher-forced forward over prompt + answer -- the same causal attention rows as step-by-step decoding -- with the
argmax streamed from q, k and the log-sum-exp (:mod:`attnzoo.analysis.stats`), or taken from the effective operator
when the model runs a non-softmax attnzoo mechanism. The needle span is located by token ids. Generation stops at a
newline or after ``max_new_tokens``. Needles, questions and the haystack are this library's (the official ones are
essays and diverse facts): the haystack is the real-text corpus of ``attnzoo bench real``.

Ablation: passkey retrieval (``attnzoo.bench.real``'s prompt and teacher-forced check) with the top-k retrieval heads'
outputs zeroed vs as many heads drawn at random (several seeds), as the paper's masking experiment.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..errors import check_int
from .capture import Analyzer, AttentionCall, head_mask_hook

__all__ = ["NEEDLES", "NeedleCase", "copy_paste_score", "needle_case", "retrieval_scores", "passkey_accuracy",
           "masking_ablation"]

NEEDLES: tuple[tuple[str, str], ...] = (
    ("The secret ingredient in Grandma Rosa's soup is smoked paprika from Valencia.",
     "What is the secret ingredient in Grandma Rosa's soup?"),
    ("The password for the blue laboratory door is crimson falcon seven.",
     "What is the password for the blue laboratory door?"),
    ("Captain Moreno's favourite book is a worn copy of Treasure Island with a green cover.",
     "What is Captain Moreno's favourite book?"),
    ("The hidden treasure of the old lighthouse is buried under the third olive tree.",
     "Where is the hidden treasure of the old lighthouse buried?"),
)
"""(needle, question) pairs used to detect retrieval heads (the passkey prompts of the ablation are different)."""

THRESHOLD = 0.1  # the paper's retrieval-head threshold


@dataclass
class NeedleCase:
    """A needle-in-a-haystack prompt: ``ids`` (1, P) and the needle's token span [start, end)."""

    ids: torch.Tensor
    start: int
    end: int
    length: int
    depth: float
    needle: str


def copy_paste_score(argmax: torch.Tensor, generated: Sequence[int] | torch.Tensor, prompt: torch.Tensor,
                     start: int, end: int) -> torch.Tensor:
    """Retrieval score of one sample: argmax (L, H, T) key index of each head's row at each of the T decoding steps
    (the row that produced ``generated[t]``), prompt (P,) token ids, needle span [start, end). Returns (L, H):
    the number of steps at which a head's argmax is a needle position holding the generated token, over the
    needle's length."""
    if argmax.dim() != 3:
        raise ValueError(f"argmax: expected (L, H, T), got shape {tuple(argmax.shape)}")
    gen = torch.as_tensor(generated, dtype=torch.long).reshape(-1)
    if gen.numel() != argmax.shape[2]:
        raise ValueError(f"generated: expected {argmax.shape[2]} tokens (one per step), got {gen.numel()}")
    if not 0 <= start < end <= prompt.numel():
        raise ValueError(f"start, end: expected a needle span inside the prompt of {prompt.numel()} tokens, "
                         f"got [{start}, {end})")
    inside = (argmax >= start) & (argmax < end)  # (L, H, T)
    copied = prompt[argmax.clamp(0, prompt.numel() - 1)] == gen.view(1, 1, -1)
    return (inside & copied).sum(-1).double() / (end - start)


def _find(ids: torch.Tensor, sub: list[int]) -> int:
    n = len(sub)
    for i in range(ids.numel() - n + 1):
        if ids[i : i + n].tolist() == sub:
            return i
    return -1


def needle_case(tok, needle: str, question: str, haystack: str, length: int, depth: float) -> NeedleCase:
    """A prompt of about ``length`` tokens: haystack text with ``needle`` inserted at relative ``depth`` (at a
    sentence boundary), then the question -- in the tokenizer's chat template when it has one (an instruct model),
    else followed by ``Answer:`` (the official plain format)."""
    check_int("length", length, low=64)
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth: expected a float in [0, 1], got {depth!r}")
    tail = f"\nBased on the content of the text, Question: {question}\nAnswer:"
    chat = getattr(tok, "chat_template", None) is not None
    budget = length - len(tok(needle + tail)["input_ids"]) - (24 if chat else 2)
    hay = tok(haystack, add_special_tokens=False)["input_ids"][: max(budget, 0)]
    text = tok.decode(hay)
    cut = int(len(text) * depth)
    dot = text.rfind(". ", 0, cut)
    cut = dot + 2 if dot >= 0 else cut
    body = text[:cut] + " " + needle + " " + text[cut:]
    if chat:  # an instruct model answers in its chat format (a bare "Answer:" makes SmolLM2 ramble)
        prompt = tok.apply_chat_template([{"role": "user", "content": f"{body}\n\n{question}"}], tokenize=False,
                                         add_generation_prompt=True)
    else:
        prompt = body + tail
    ids = tok(prompt, return_tensors="pt")["input_ids"]
    span = tok(" " + needle, add_special_tokens=False)["input_ids"]
    start = _find(ids[0], span)
    if start < 0:  # the needle's first token may merge with the text before it: match without it
        start = _find(ids[0], span[1:]) - 1
    if start < 0:
        raise ValueError("needle: its tokens were not found in the tokenized prompt")
    return NeedleCase(ids, start, start + len(span), length, depth, needle)


def _greedy(model, ids: torch.Tensor, max_new_tokens: int, stop: set[int], pad: int) -> list[int]:
    with torch.no_grad():
        out = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=pad,
                             attention_mask=torch.ones_like(ids))
    gen = out[0, ids.shape[1]:].tolist()
    content = False  # a newline ends the answer once it has begun (leading newlines are kept, not stopped at)
    for i, t in enumerate(gen):
        if t == pad or (t in stop and content):
            return gen[:i]
        content = content or t not in stop
    return gen


def _argmax_hook(rows: torch.Tensor, store: dict[int, torch.Tensor]):
    def hook(call: AttentionCall) -> None:
        store[call.layer] = call.stats(rows=rows, topk=1).argmax[0]  # (H, T)

    return hook


def retrieval_scores(model, tok, cases: Sequence[NeedleCase], *, mechanism: str = "softmax",
                     options: dict[str, Any] | None = None, max_new_tokens: int = 24, progress=None
                     ) -> dict[str, Any]:
    """Mean copy-paste score (L, H) over ``cases``, with the answers generated and each case's score.

    ``mechanism``/``options``: the attention the model runs (its effective operator gives the argmax)."""
    options = dict(options or {})
    stop = {t for t in (tok.eos_token_id, *tok("\n", add_special_tokens=False)["input_ids"]) if t is not None}
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    per_case, answers = [], []
    for case in cases:
        with Analyzer(model, mechanism, **options):
            gen = _greedy(model, case.ids, max_new_tokens, stop, pad)
        answers.append(tok.decode(gen))
        if not gen:
            per_case.append(None)
            if progress is not None:
                progress.tick()
            continue
        P = case.ids.shape[1]
        full = torch.cat([case.ids, torch.tensor([gen])], dim=1)[:, :-1]  # the last generated token is never a query
        rows = torch.arange(P - 1, P - 1 + len(gen))
        store: dict[int, torch.Tensor] = {}
        with torch.no_grad(), Analyzer(model, mechanism, hooks=[_argmax_hook(rows, store)], **options) as az:
            model(full, use_cache=False, logits_to_keep=1)
        argmax = torch.stack([store[i] for i in range(az.num_layers)])  # (L, H, T)
        per_case.append(copy_paste_score(argmax, gen, case.ids[0], case.start, case.end))
        if progress is not None:
            progress.tick()
    scored = [s for s in per_case if s is not None]
    if not scored:
        raise RuntimeError("retrieval_scores: the model generated nothing for every case")
    mean = torch.stack(scored).mean(0)
    return {"scores": mean, "per_case": per_case, "answers": answers}


def top_heads(scores: torch.Tensor, k: int) -> list[tuple[int, int]]:
    """The k (layer, head) pairs of highest score (ties: lower layer, then lower head)."""
    flat = scores.flatten()
    order = torch.sort(flat, descending=True, stable=True).indices[:k]
    H = scores.shape[1]
    return [(int(i) // H, int(i) % H) for i in order]


def random_heads(layers: int, heads: int, k: int, seed: int, exclude: Sequence[tuple[int, int]] = ()
                 ) -> list[tuple[int, int]]:
    """k distinct (layer, head) pairs drawn uniformly (seeded), none of ``exclude``."""
    ex = {(int(a), int(b)) for a, b in exclude}
    pool = [(l, h) for l in range(layers) for h in range(heads) if (l, h) not in ex]
    g = torch.Generator().manual_seed(seed)
    return [pool[int(i)] for i in torch.randperm(len(pool), generator=g)[:k]]


def passkey_accuracy(model, tok, *, lengths: Sequence[int], depths: Sequence[float], seeds: Sequence[int] = (0,),
                     masked: Sequence[tuple[int, int]] = (), mechanism: str = "softmax",
                     options: dict[str, Any] | None = None, progress=None) -> float:
    """Teacher-forced passkey accuracy (every key token the greedy choice) with ``masked`` heads zeroed."""
    from ..bench.real import passkey_correct, passkey_key, passkey_prompt

    hits = total = 0
    with Analyzer(model, mechanism, hooks=[head_mask_hook(masked)] if masked else [], **(options or {})):
        for n in lengths:
            for d in depths:
                for s in seeds:
                    ids, n_answer = passkey_prompt(tok, n, d, passkey_key(n, d, s))
                    hits += passkey_correct(model, ids, n_answer)
                    total += 1
                    if progress is not None:
                        progress.tick()
    return hits / total


def masking_ablation(model, tok, scores: torch.Tensor, *, ks: Sequence[int], seeds: Sequence[int] = (0, 1, 2),
                     lengths: Sequence[int] = (1024,), depths: Sequence[float] = (0.1, 0.3, 0.5, 0.7, 0.9),
                     mechanism: str = "softmax", options: dict[str, Any] | None = None, progress=None
                     ) -> dict[str, Any]:
    """Passkey accuracy unmasked, with the top-k retrieval heads masked, and with k random heads masked (one run
    per seed, random heads drawn outside the top-k), for each k."""
    L, H = scores.shape
    kw = dict(lengths=lengths, depths=depths, mechanism=mechanism, options=options, progress=progress)
    out: dict[str, Any] = {"baseline": passkey_accuracy(model, tok, **kw), "rows": []}
    for k in ks:
        top = top_heads(scores, k)
        row = {"k": k, "top_heads": top, "top": passkey_accuracy(model, tok, masked=top, **kw), "random": []}
        for s in seeds:
            rnd = random_heads(L, H, k, seed=s, exclude=top)
            row["random"].append({"seed": s, "heads": rnd, "accuracy": passkey_accuracy(model, tok, masked=rnd, **kw)})
        row["random_mean"] = sum(r["accuracy"] for r in row["random"]) / len(row["random"])
        out["rows"].append(row)
    return out
