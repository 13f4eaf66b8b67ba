"""``results.json``: its versioned schema (``results.schema.json`` beside this file), validation, summaries."""

from __future__ import annotations

import json
import math
import os
import statistics
from collections import Counter
from typing import Any

SCHEMA = "attnzoo-bench"
SCHEMA_VERSION = 2
READABLE_VERSIONS = (1, 2)
"""Version 2 added the optional ``real_model`` section; version-1 files (no such section) still load."""
SCHEMA_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results.schema.json")


def load_schema() -> dict[str, Any]:
    with open(SCHEMA_PATH) as f:
        return json.load(f)


def validate(results: dict[str, Any]) -> None:
    """Raise ``ValueError`` naming the first violation of the schema (jsonschema if installed; else the
    top-level keys and versions only)."""
    if not isinstance(results, dict):
        raise ValueError(f"results: expected a JSON object, got {type(results).__name__}")
    if results.get("schema") != SCHEMA:
        raise ValueError(f"results: 'schema' is {results.get('schema')!r}, expected {SCHEMA!r}: not attnzoo bench "
                         "results")
    if results.get("schema_version") not in READABLE_VERSIONS:
        raise ValueError(f"results: schema_version {results.get('schema_version')!r}; this attnzoo reads versions "
                         f"{list(READABLE_VERSIONS)}")
    if results.get("schema_version") == 1 and "real_model" in results:
        raise ValueError("results: a real_model section needs schema_version 2, got 1")
    try:
        import jsonschema
    except ImportError:
        missing = [k for k in load_schema()["required"] if k not in results]
        if missing:
            raise ValueError(f"results: missing keys {missing}") from None
        return
    try:
        jsonschema.validate(results, load_schema())
    except jsonschema.ValidationError as e:
        path = "/".join(str(p) for p in e.absolute_path)
        raise ValueError(f"results: schema violation at /{path}: {e.message}") from None


def _clean(obj: Any) -> Any:
    """JSON-safe copy: NaN/inf become null, tuples lists."""
    if isinstance(obj, float):
        return obj if math.isfinite(obj) else None
    if isinstance(obj, dict):
        return {str(k): _clean(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_clean(v) for v in obj]
    return obj


def save(results: dict[str, Any], path: str) -> None:
    results = _clean(results)
    validate(results)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(results, f, indent=1, sort_keys=False)
        f.write("\n")
    os.replace(tmp, path)


def load(path: str) -> dict[str, Any]:
    if os.path.isdir(path):
        path = os.path.join(path, "results.json")
    if not os.path.exists(path):
        raise FileNotFoundError(f"results: no such file {path!r} (expected a results.json of `attnzoo bench`)")
    with open(path) as f:
        try:
            data = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"results: {path} is not valid JSON: {e}") from None
    validate(data)
    return data


def quality_summary(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One entry per (study, mechanism, option variant): the learning rate the sweep chose (best value on
    the first seed, :func:`~attnzoo.bench.quality.protocol.best_lr`), and the mean, sample std, min and max
    over the seeds trained at it; ``rank`` and ``ties`` within the study (a difference inside the seed
    spread is a tie, :func:`~attnzoo.bench.quality.protocol.rank`). Records of runs before the protocol
    (no study/variant/lr) are one study per task and config."""
    from .quality.protocol import best_lr, rank, summarize

    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["type"] == "quality" and r["status"] == "ok" and r["value"] is not None:
            study = r.get("study") or f"{r['task']}|{r['config_id']}"
            groups.setdefault((study, r["mechanism"], r.get("variant", "default")), []).append(r)
    out = []
    for (study, mech, variant), rs in sorted(groups.items()):
        higher = rs[0]["higher_is_better"]
        first = min(r["seed"] for r in rs)
        sweep = {r.get("lr"): r["value"] for r in rs if r["seed"] == first}
        lr = best_lr(sweep, higher) if None not in sweep else None
        chosen = [r for r in rs if r.get("lr") == lr]
        vals = [r["value"] for r in chosen]
        states = [r["state_bytes"] for r in chosen if r.get("state_bytes") is not None]
        out.append({
            "study": study, "mechanism": mech, "variant": variant, "options": chosen[0].get("options") or {},
            "task": rs[0]["task"], "config_id": rs[0]["config_id"], "metric": rs[0]["metric"],
            "higher_is_better": higher, **summarize(vals), "lr": lr,
            "lr_sweep": {f"{k:g}": v for k, v in sorted(sweep.items())} if lr is not None else {},
            "steps": statistics.fmean(r["steps"] for r in chosen), "budget_hit": any(r["budget_hit"] for r in chosen),
            "train_time_s": statistics.fmean(r.get("train_time_s") or 0.0 for r in chosen),
            "state_bytes": states[0] if states else None, "baselines": rs[0]["baselines"],
            "family": rs[0].get("family"), "hyper": rs[0].get("hyper"),
        })
    ranked = []
    for study in dict.fromkeys(e["study"] for e in out):
        entries = [{**e, "key": f"{e['mechanism']} ({e['variant']})" if e["variant"] != "default" else e["mechanism"]}
                   for e in out if e["study"] == study]
        ranked += rank(entries, entries[0]["higher_is_better"])
    return ranked


def merge(parts: list[dict[str, Any]], command: str) -> dict[str, Any]:
    """One results document from several runs (e.g. shards of a quality run, each on its own machine or
    process): records concatenated (a record id measured twice keeps the later run's), mechanisms united,
    summaries recomputed from the records. ``config.merged`` keeps each part's command and configuration."""
    from .efficiency import efficiency_lengths

    if len(parts) < 2:
        raise ValueError(f"merge: expected two or more results, got {len(parts)}")
    records: dict[str, dict[str, Any]] = {}
    mechanisms: dict[str, dict[str, Any]] = {}
    for p in parts:
        for r in p["records"]:
            records[r["id"]] = r
        for m in p["mechanisms"]:
            mechanisms[m["name"]] = m
    recs = list(records.values())
    first = parts[0]
    notes = [n for p in parts for n in p["summary"].get("notes", [])]
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": max(p["created"] for p in parts),
        "command": command, "profile": first["profile"],
        "config": {"merged": [{"command": p["command"], "config": p["config"]} for p in parts]},
        "environment": first["environment"], "duration_s": sum(p["duration_s"] for p in parts),
        "interrupted": any(p["interrupted"] for p in parts), "mechanisms": list(mechanisms.values()),
        "peers": first["peers"], "records": recs,
        "summary": {"efficiency_length": efficiency_lengths(recs), "quality": quality_summary(recs),
                    "counts": counts(recs), "notes": notes},
    }


def counts(records: list[dict[str, Any]]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for r in records:
        c[f"{r['type']}_{r['status']}"] += 1
        if r["type"] == "efficiency" and r.get("contaminated"):
            c["efficiency_contaminated"] += 1
    return dict(sorted(c.items()))
