"""Reliability probes of decoding (``init_state.*``, ``step.*``, ``state.*``): a uniform view of functional steps and
module states, bad arguments, other batch/head/dtype/device states, and crop / reorder semantics."""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable
from dataclasses import replace

import torch

from ..registry import Mechanism
from ..testing import TOL, Sizes
from .core import (
    CLEAR_ERRORS,
    ProbeFailure,
    bad_masks,
    close_enough,
    expect_error,
    first_output,
    guarded,
    names_argument,
)
from .entry import probe_module


# --------------------------------------------------------------------------------------------------------
# Decoding: a uniform view of functional steps and module states
# --------------------------------------------------------------------------------------------------------
def decode_chunks(start: int, stop: int, pos: int, prefill: int) -> list[tuple[int, int]]:
    """Token ranges [a, b) that decode tokens ``start .. stop - 1`` into a state holding ``pos`` positions: one token
    each, except a first step reaching position ``prefill`` (:meth:`Mechanism.min_prefill`: a bidirectional region
    that decoding must take in one step) while the state holds fewer."""
    out, t = [], start
    while t < stop:
        size = max(1, min(stop - t, prefill - pos)) if t == start else 1
        out.append((t, t + size))
        t += size
    return out


def _seq_len(state, prefill: int) -> int:
    return 0 if prefill <= 1 else state.seq_len


class Decoder:
    """Decode through ``mech.step`` (functional) or ``module(x, state=...)`` on token slices."""

    def __init__(self, mech: Mechanism, functional: bool, batch: int | None = None) -> None:
        self.mech, self.functional = mech, functional
        self.s = replace(Sizes.of(mech), **({} if batch is None else {"batch": batch}))
        self.opts = mech.resolve_options(dict(mech.test_options))
        self.scale = 1.0 / math.sqrt(self.s.head_dim)
        self.prefill = mech.min_prefill(self.opts)
        if not functional:
            self.mod = probe_module(mech, "causal_self")
            self.mod.eval()

    def tokens(self, n: int, seed: int = 0, batch: int | None = None):
        s = self.s
        B = s.batch if batch is None else batch
        g = torch.Generator().manual_seed(seed)
        if self.functional:
            return tuple(torch.randn(B, h, n, d, generator=g, dtype=torch.float64) for h, d in (
                (s.heads, s.head_dim), (s.kv_heads, s.head_dim), (s.kv_heads, s.value_dim)))
        return torch.randn(B, n, s.dim, generator=g, dtype=torch.float64)

    @staticmethod
    def take(tok, a: int, b: int, index: torch.Tensor | None = None):
        if isinstance(tok, tuple):
            return tuple(Decoder.take(t, a, b, index) for t in tok)
        t = tok[:, :, a:b] if tok.dim() == 4 else tok[:, a:b]
        return t if index is None else t.index_select(0, index)

    def init(self, batch: int | None = None, **overrides):
        s = self.s
        if self.functional:
            kw = dict(batch=s.batch if batch is None else batch, kv_heads=s.kv_heads, head_dim=s.head_dim,
                      value_dim=s.value_dim, dtype=torch.float64, device=torch.device("cpu"))
            kw.update(overrides)
            return self.mech.init_state(**kw, **self.opts)
        return self.mod.init_state(s.batch if batch is None else batch, **overrides)

    def step(self, tok, state, **kw):
        if self.functional:
            q, k, v = tok
            return self.mech.step(q, k, v, state, **{"scale": self.scale, **kw}, **self.opts)
        return first_output(self.mod(tok, state=state, **kw))

    def run(self, tok, state, start: int, stop: int, index=None) -> torch.Tensor | None:
        """Decode tokens ``start .. stop - 1`` one at a time, after a first step reaching the record's
        ``min_prefill`` when the state holds fewer positions (None when there are none)."""
        outs = [self.step(self.take(tok, a, b, index), state)
                for a, b in decode_chunks(start, stop, _seq_len(state, self.prefill), self.prefill)]
        return torch.cat(outs, dim=2 if self.functional else 1) if outs else None


def _kpm_probe_state(dec: Decoder):
    """A fresh state and one token of input for the step probes."""
    return dec.init(), dec.take(dec.tokens(1), 0, 1)


def decode_probes(mech: Mechanism, functional: bool) -> list[tuple[str, Callable[[], None]]]:
    pre = "" if functional else "module_"
    prefix = pre + "step"
    dec = Decoder(mech, functional)
    s = dec.s
    out: list[tuple[str, Callable[[], None]]] = []

    def add(name, call, *names, contains=None):
        out.append((name, lambda: expect_error(call, *names, contains=contains)))

    # init_state: bad integers and dtypes
    if functional:
        for arg in ("batch", "kv_heads", "head_dim", "value_dim"):
            for label, value in (("zero", 0), ("negative", -1), ("bool", True), ("float", 2.0)):
                add(f"init_state.{arg}_{label}", lambda arg=arg, value=value: dec.init(**{arg: value}), arg)
        add("init_state.dtype_int", lambda: dec.init(dtype=torch.int64), "dtype")
        add("init_state.dtype_str", lambda: dec.init(dtype="float32"), "dtype")
    else:
        for label, value in (("zero", 0), ("negative", -1), ("bool", True), ("float", 2.0)):
            add(f"module_init_state.batch_{label}", lambda value=value: dec.init(batch=value), "batch_size", "batch")

    # masks and scale at step time
    for label, mask, contains in bad_masks(s.batch, 1):
        def call(mask=mask):
            state, tok = _kpm_probe_state(dec)
            return dec.step(tok, state, key_padding_mask=mask)
        add(f"{prefix}.mask_{label}", call, "key_padding_mask", contains=contains)
    if functional:
        for label, value in (("inf", math.inf), ("zero", 0.0), ("nan", math.nan)):
            def call(value=value):
                state, tok = _kpm_probe_state(dec)
                return dec.step(tok, state, scale=value)
            add(f"step.scale_{label}", call, "scale")
        add("step.q_rank", lambda: dec.step((dec.tokens(1)[0][0],) + dec.tokens(1)[1:], dec.init()), "q")
        add("step.length_mismatch", lambda: dec.step(
            (dec.tokens(2)[0],) + dec.take(dec.tokens(1), 0, 1)[1:], dec.init()), "q", "k", "v")
        add("step.no_tokens", lambda: dec.step(dec.take(dec.tokens(1), 0, 0), dec.init()), "q", "k", "v")
        add("step.k_meta", lambda: dec.step(tuple(t.to("meta") if i == 1 else t for i, t in enumerate(
            dec.tokens(1))), dec.init()), "k", "q")

    # a state built for another call
    tok = dec.take(dec.tokens(1), 0, 1)
    add(f"{prefix}.state_wrong_type", lambda: dec.step(tok, object()), "state")
    add(f"{prefix}.state_batch", lambda: dec.step(tok, dec.init(batch=s.batch + 1)), "state")
    if functional:
        add("step.state_kv_heads", lambda: dec.step(tok, dec.init(kv_heads=s.kv_heads * 2)), "state")
        add("step.state_head_dim", lambda: dec.step(tok, dec.init(head_dim=s.head_dim + 1)), "state")
        add("step.state_value_dim", lambda: dec.step(tok, dec.init(value_dim=s.value_dim + 1)), "state")
        add("step.state_dtype", lambda: dec.step(tok, dec.init(dtype=torch.float32)), "state")
        add("step.state_meta", lambda: dec.step(tok, dec.init(device=torch.device("meta"))), "state")
    else:
        params = inspect.signature(dec.mod.init_state).parameters
        takes = {n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        for label, kw, bad in (("dtype", {"dtype": torch.float32}, lambda t: t.is_floating_point()
                                and t.dtype != torch.float64),
                               ("meta", {"device": torch.device("meta")}, lambda t: t.device.type == "meta")):
            if label == "dtype" and "dtype" not in takes or label == "meta" and "device" not in takes:
                continue

            def run(kw=kw, bad=bad):
                try:
                    state = dec.init(**kw)
                except CLEAR_ERRORS as e:  # refused when built: fine, if it says so
                    if not any(names_argument(str(e), n) for n in ("dtype", "device", "state")):
                        raise ProbeFailure(f"init_state({kw}) raised {type(e).__name__} not naming dtype/device: "
                                           f"{e}") from None
                    return
                try:
                    dec.step(tok, state)
                except CLEAR_ERRORS as e:
                    if not names_argument(str(e), "state"):
                        raise ProbeFailure(f"{type(e).__name__} does not name state: {e}") from None
                    return
                except Exception as e:  # noqa: BLE001
                    raise ProbeFailure(f"crashed inside with {type(e).__name__}: {e}") from None
                used = [t for t in state.tensors() if bad(t)]
                if used:
                    raise ProbeFailure(f"accepted a state built with {kw} and computed with it "
                                       f"({len(used)} of its tensors are {used[0].dtype} on {used[0].device})")
            out.append((f"module_step.state_{label}", run))

    # crop / reorder arguments
    decoded_len = max(2, dec.prefill)  # a state holding this many positions (at least the record's prefill)

    def decoded():
        state = dec.init()
        dec.run(dec.tokens(decoded_len), state, 0, decoded_len)
        return state

    for label, value in (("negative", -1), ("beyond", decoded_len + 1), ("float", 1.5), ("bool", True)):
        add(f"{pre}state.crop_{label}", lambda value=value: decoded().crop(value), "length")
    for label, value in (("out_of_range", torch.tensor([0, s.batch])), ("negative", torch.tensor([-1])),
                         ("float", torch.tensor([0.0])), ("rank", torch.zeros(1, 1, dtype=torch.long)),
                         ("list", [0])):
        add(f"{pre}state.reorder_{label}", lambda value=value: decoded().reorder(value), "index")

    # a state's own append (KV-style caches): bad masks
    try:
        append = getattr(dec.init(), "append", None)
    except Exception:  # noqa: BLE001 - init_state's own probes report it
        append = None
    if functional and append is not None and list(inspect.signature(append).parameters)[:3] == [
            "k", "v", "key_padding_mask"]:
        for label, mask, contains in bad_masks(s.batch, 1):
            def call(mask=mask):
                _, k, v = dec.take(dec.tokens(1), 0, 1)
                return dec.init().append(k, v, mask)
            add(f"state.append_mask_{label}", call, "key_padding_mask", contains=contains)

    # semantics
    out.append((f"{pre}state.crop_continue", lambda: _crop_continue(dec, partial=True)))
    out.append((f"{pre}state.crop_zero", lambda: _crop_continue(dec, partial=False)))
    out.append((f"{pre}state.reorder_continue", lambda: _reorder_continue(dec)))
    return out


def _crop_continue(dec: Decoder, *, partial: bool) -> None:
    """Decode n tokens, crop to m, decode new tokens == decode the first m then the new tokens afresh (a crop may be
    refused with an error naming ``length``)."""
    n = max(dec.s.n, 4, 2 * dec.prefill + 2)  # the cut (crop point, reorder point) lies past the prefill
    m = n - 2 if partial else 0
    tok, new = dec.tokens(n, seed=0), dec.tokens(n - m, seed=7)
    state = dec.init()
    guarded(lambda: dec.run(tok, state, 0, n), "decoding")
    try:
        state.crop(m)
    except CLEAR_ERRORS as e:
        if names_argument(str(e), "length"):
            return  # refused: this state cannot roll back that far, and says so
        raise ProbeFailure(f"crop({m}) raised {type(e).__name__} not naming length: {e}") from None
    except Exception as e:  # noqa: BLE001
        raise ProbeFailure(f"crop({m}) crashed inside with {type(e).__name__}: {e}") from None
    if state.seq_len != m:
        raise ProbeFailure(f"after crop({m}) seq_len is {state.seq_len}")
    got = guarded(lambda: dec.run(new, state, 0, n - m), f"decoding after crop({m})")
    fresh = dec.init()
    guarded(lambda: dec.run(tok, fresh, 0, m), "decoding the prefix afresh")
    want = guarded(lambda: dec.run(new, fresh, 0, n - m), "decoding the prefix afresh")
    close_enough(got, want, TOL[torch.float64], f"crop({m}) then new tokens vs the prefix decoded afresh")


def _reorder_continue(dec: Decoder) -> None:
    """Decode B rows, reorder with [last, 0, 0], decode new tokens == decoding the reordered rows afresh."""
    n = max(dec.s.n, 4, 2 * dec.prefill + 2)  # the cut (crop point, reorder point) lies past the prefill
    t = n // 2
    B = dec.s.batch
    index = torch.tensor([B - 1, 0, 0])
    tok, new = dec.tokens(t, seed=0), dec.tokens(n - t, seed=7, batch=3)
    state = dec.init()
    guarded(lambda: dec.run(tok, state, 0, t), "decoding")
    try:
        state.reorder(index)
    except Exception as e:  # noqa: BLE001
        raise ProbeFailure(f"reorder({index.tolist()}) raised {type(e).__name__}: {e}") from None
    got = guarded(lambda: dec.run(new, state, 0, n - t), "decoding after reorder")
    fresh = dec.init(batch=3)
    guarded(lambda: dec.run(tok, fresh, 0, t, index=index), "decoding the reordered rows afresh")
    want = guarded(lambda: dec.run(new, fresh, 0, n - t), "decoding the reordered rows afresh")
    close_enough(got, want, TOL[torch.float64],
                 f"reorder({index.tolist()}) then new tokens vs the reordered rows afresh")
