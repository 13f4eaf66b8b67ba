"""Train one tiny model on one task with one mechanism and one seed, within a step count and a time budget."""

from __future__ import annotations

import math
import time
import traceback
from typing import Any

import torch
from torch import nn

from ... import registry
from ..cases import state_nbytes
from .models import ChannelModel, GridModel, SequenceModel, aux_loss
from .tasks import IGNORE, Task

NO_ATTENTION = "none"
"""Pseudo-mechanism of the image tasks (digits, skimage_patches): the same CNN without any attention (channel-model
baseline)."""


def applicability(task: Task, mechanism: str) -> tuple[str, bool] | str:
    """``(model, causal)`` to train ``mechanism`` on ``task``, or the reason it does not apply."""
    if mechanism == NO_ATTENTION:
        return ("channel", False) if task.input == "image" else "the no-attention baseline is for image tasks only"
    mech = registry.get(mechanism)
    if task.input == "image":
        if mech.kind == "grid":
            return "grid", False
        if mech.kind == "channel":
            return "channel", False
        if mech.kind == "sequence" and "noncausal_self" in mech.patterns:
            return "sequence", False
        return f"{task.name} needs a grid, channel or non-causal sequence mechanism; {mech.name} is {mech.kind}"
    if mech.kind != "sequence":
        return f"{task.name} is a sequence task; {mech.name} is a {mech.kind} mechanism"
    if "causal_self" in mech.patterns:
        return "sequence", True
    if task.needs_causal:
        return f"{task.name} needs causal self attention; {mech.name} supports {list(mech.patterns)}"
    if "noncausal_self" in mech.patterns:
        return "sequence", False
    return f"{mech.name} supports neither causal_self nor noncausal_self"


def make_model(task: Task, mechanism: str, model: str, causal: bool, *, dim: int, layers: int, heads: int,
               options: dict[str, Any]) -> nn.Module:
    if model == "grid":
        return GridModel(mechanism, classes=task.classes, side=task.side, dim=dim, layers=layers, heads=heads,
                         options=options)
    if model == "channel":
        return ChannelModel(None if mechanism == NO_ATTENTION else mechanism, classes=task.classes, side=task.side,
                            dim=dim, layers=layers, heads=heads, options=options)
    out = 1 if task.output == "scalar" else task.classes
    if task.input == "image":  # pixels as side * side tokens of one feature
        return SequenceModel(mechanism, features=1, out=out, seq_len=task.seq_len, dim=dim, layers=layers,
                             heads=heads, causal=causal, readout=task.readout, options=options)
    return SequenceModel(mechanism, vocab=task.vocab if task.input == "tokens" else 0,
                         features=task.features if task.input == "vectors" else 0, out=out, seq_len=task.seq_len,
                         dim=dim, layers=layers, heads=heads, causal=causal,
                         readout=task.readout if task.output == "class" else None, options=options)


def _prep(task: Task, model: str, x: torch.Tensor) -> torch.Tensor:
    if task.input == "image" and model == "sequence":
        return x.reshape(x.shape[0], -1, 1)  # (B, side * side, 1)
    return x


def loss_fn(task: Task, out: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    if task.output == "scalar":
        keep = ~torch.isnan(y)
        return ((out.squeeze(-1)[keep] - y[keep]) ** 2).mean()
    if task.output == "class":
        return nn.functional.cross_entropy(out, y)
    return nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), y.reshape(-1), ignore_index=IGNORE)


def evaluate(task: Task, net: nn.Module, model: str, batch: int = 128) -> float:
    x, y = task.eval_set()
    net.eval()
    outs = []
    with torch.no_grad():
        for i in range(0, len(x), batch):
            o = net(_prep(task, model, x[i: i + batch]))
            outs.append(o.squeeze(-1) if task.output == "scalar" else o)
    net.train()
    return task.score(torch.cat(outs), y)


def decode_state_bytes(net: nn.Module, length: int, dim: int) -> int | None:
    """Bytes of the decode states of all the model's attention layers after a prefill of ``length`` tokens
    (batch 1): what one sequence holds to decode its next token (``state.nbytes()``), None if the
    mechanism does not decode."""
    blocks = getattr(net, "blocks", None)
    if not blocks:
        return None
    length = net.stream_length(length) if hasattr(net, "stream_length") else length  # with landmark tokens
    total = 0
    for blk in blocks:
        attn = blk.attn
        if not hasattr(attn, "init_state") or not getattr(attn, "causal", True):
            return None
        try:
            state = attn.init_state(1)
            with torch.no_grad():
                _, state = attn(torch.randn(1, length, dim), state=state)
        except Exception:  # noqa: BLE001 - no decode form: no state size
            return None
        total += state_nbytes(state)
    return total


def train_case(task: Task, mechanism: str, *, seed: int, steps: int, budget: float, options: dict[str, Any],
               dim: int = 64, layers: int = 2, heads: int = 4, batch: int = 32, lr: float = 3e-3,
               threads: int = 1, study: str | None = None, variant: str = "default") -> dict[str, Any]:
    """Train and evaluate; returns a ``quality`` record (``status`` "ok", "error" or "not_applicable").

    ``study`` and ``variant`` name the protocol's study and the mechanism's option setting (the record's
    id includes them and the learning rate, so every case of a sweep has its own id)."""
    study = study or task.name
    rec: dict[str, Any] = {
        "type": "quality", "id": f"{mechanism}|{study}|{variant}|{task.config_id()}|lr={lr:g}|seed={seed}",
        "mechanism": mechanism, "study": study, "variant": variant, "lr": lr,
        "family": registry.get(mechanism).family if mechanism != NO_ATTENTION else "baseline",
        "kind": registry.get(mechanism).kind if mechanism != NO_ATTENTION else "channel",
        "task": task.name, "config": task.config, "config_id": task.config_id(), "seed": seed,
        "metric": task.metric, "higher_is_better": task.higher_is_better, "value": None, "baselines": {},
        "status": "ok", "message": "", "steps": 0, "steps_planned": steps, "budget_s": budget, "budget_hit": False,
        "train_time_s": 0.0, "final_train_loss": None, "parameters": None, "state_bytes": None, "causal": None,
        "model": None, "options": options, "threads": threads,
        "hyper": {"dim": dim, "layers": layers, "heads": heads, "batch": batch, "lr": lr},
    }
    how = applicability(task, mechanism)
    if isinstance(how, str):
        rec.update(status="not_applicable", message=how)
        return rec
    model, causal = how
    rec.update(model=model, causal=causal)
    old = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        rec["baselines"] = task.baselines()
        torch.manual_seed(seed)
        net = make_model(task, mechanism, model, causal, dim=dim, layers=layers, heads=heads, options=options)
        rec["parameters"] = sum(p.numel() for p in net.parameters())
        opt = torch.optim.AdamW(net.parameters(), lr=lr, betas=(0.9, 0.98), weight_decay=0.01)
        warm = max(1, steps // 10)
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / warm) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
        g = torch.Generator().manual_seed(10_000 + seed)
        t0 = time.monotonic()
        losses: list[float] = []
        for step in range(steps):
            if time.monotonic() - t0 > budget:
                rec["budget_hit"] = True
                break
            x, y = task.sample(batch, g)
            out = net(_prep(task, model, x))
            loss = loss_fn(task, out, y)
            aux = aux_loss(net)
            total = loss if aux is None else loss + aux
            opt.zero_grad(set_to_none=True)
            total.backward()
            nn.utils.clip_grad_norm_(net.parameters(), 1.0)
            opt.step()
            sched.step()
            losses.append(float(loss.detach()))
            rec["steps"] = step + 1
            if not math.isfinite(losses[-1]):
                raise FloatingPointError(f"training loss became {losses[-1]} at step {step}")
        rec["train_time_s"] = time.monotonic() - t0
        rec["final_train_loss"] = sum(losses[-10:]) / max(1, len(losses[-10:]))
        rec["value"] = evaluate(task, net, model)
        if causal and model == "sequence":
            rec["state_bytes"] = decode_state_bytes(net, task.seq_len, dim)
    except Exception as e:  # noqa: BLE001 - a failing mechanism is a result
        rec.update(status="error", message=f"{type(e).__name__}: {e}"[:500], traceback=traceback.format_exc()[-1500:])
    finally:
        torch.set_num_threads(old)
    return rec
