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
    """Mean and spread (sample std over seeds) per (mechanism, task, config)."""
    groups: dict[tuple, list[dict[str, Any]]] = {}
    for r in records:
        if r["type"] == "quality" and r["status"] == "ok" and r["value"] is not None:
            groups.setdefault((r["mechanism"], r["task"], r["config_id"]), []).append(r)
    out = []
    for (mech, task, cid), rs in sorted(groups.items()):
        vals = [r["value"] for r in rs]
        states = [r["state_bytes"] for r in rs if r.get("state_bytes") is not None]
        out.append({
            "mechanism": mech, "task": task, "config_id": cid, "metric": rs[0]["metric"],
            "higher_is_better": rs[0]["higher_is_better"], "mean": statistics.fmean(vals),
            "std": statistics.stdev(vals) if len(vals) > 1 else None, "seeds": len(vals),
            "steps": statistics.fmean(r["steps"] for r in rs), "budget_hit": any(r["budget_hit"] for r in rs),
            "state_bytes": states[0] if states else None, "baselines": rs[0]["baselines"],
            "family": rs[0].get("family"),
        })
    return out


def counts(records: list[dict[str, Any]]) -> dict[str, int]:
    c: Counter[str] = Counter()
    for r in records:
        c[f"{r['type']}_{r['status']}"] += 1
        if r["type"] == "efficiency" and r.get("contaminated"):
            c["efficiency_contaminated"] += 1
    return dict(sorted(c.items()))
