"""A tiny benchmark run shared by the bench tests (one run per session, well under a minute)."""

import base64
import copy
import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.request

import pytest

from attnzoo import registry

HERE = os.path.dirname(os.path.abspath(__file__))
FAKES = os.path.join(HERE, "fake_mechanisms.py")


def tiny_config(out, **kw):
    from attnzoo.bench import quick

    base = dict(
        mechanisms=["softmax", "sliding_window", "bench_fake_module", "bench_fake_grid", "bench_fake_channel"],
        lengths=(16, 32), min_run_time=0.002, warmup=1, retries=0, options={"sliding_window": {"window": 8}},
        tasks=("mqar", "digits"), quality_steps=3, quality_budget=60.0, deadline=None, mechanism_budget=60.0,
        progress=False, out=str(out), imports=[FAKES], command="pytest tiny bench run", decode_tokens=2,
    )
    # The step count (3) ends every quality case; the budgets are only ceilings, generous so that a loaded 2-core
    # machine (a quality child is killed at 1.5 x its budget + 6 s) still trains every planned case.
    base.update(kw)
    return quick(**base)


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory):
    """(results, out_dir, written paths) of a tiny end-to-end run with memory, quality, plots and report."""
    from attnzoo.bench.runner import run, write_outputs

    out = tmp_path_factory.mktemp("bench")
    try:
        results = run(tiny_config(out))
        paths = write_outputs(results, str(out))
    finally:
        for name in ("bench_fake_module", "bench_fake_grid", "bench_fake_channel"):
            if name in registry._REGISTRY:
                registry.unregister(name)
        sys.modules.pop("attnzoo_user_fake_mechanisms", None)
    return results, out, paths


# Headless Chromium for the HTML report tests
ROOT = os.path.dirname(os.path.dirname(HERE))
CHROMIUM = "/usr/bin/chromium"


def _chromium() -> str:
    if not os.path.exists(CHROMIUM):
        script = os.path.join(ROOT, "scripts", "install_chromium.sh")
        try:
            proc = subprocess.run(["bash", script], capture_output=True, text=True, timeout=900)
        except (OSError, subprocess.TimeoutExpired) as e:
            pytest.skip(f"chromium missing and scripts/install_chromium.sh could not run: {e}")
        if proc.returncode != 0 or not os.path.exists(CHROMIUM):
            pytest.skip(f"chromium missing and installing it failed (apt-get install chromium): {proc.stderr[-500:]}")
    return CHROMIUM


class DevTools:
    """The smallest Chrome DevTools Protocol client: one page, commands in order, events collected."""

    def __init__(self, ws_url: str):
        import websocket

        self.ws = websocket.create_connection(ws_url, timeout=60)
        self.next_id, self.events = 0, []

    def send(self, method: str, **params):
        self.next_id += 1
        self.ws.send(json.dumps({"id": self.next_id, "method": method, "params": params}))
        while True:
            msg = json.loads(self.ws.recv())
            if msg.get("id") == self.next_id:
                if "error" in msg:
                    raise RuntimeError(f"{method}: {msg['error']}")
                return msg.get("result", {})
            self.events.append(msg)

    def wait_for(self, method: str, timeout: float = 60):
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if any(e.get("method") == method for e in self.events):
                return
            self.events.append(json.loads(self.ws.recv()))
        raise TimeoutError(method)


@pytest.fixture
def browser(tmp_path):
    exe = _chromium()
    websocket = pytest.importorskip("websocket", reason="websocket-client not installed (pip install "
                                    "websocket-client): it drives Chromium's DevTools")
    del websocket
    profile = tmp_path / "chromium-profile"
    proc = subprocess.Popen(
        [exe, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={profile}",
         "--remote-debugging-port=0", "--window-size=1280,900", "about:blank"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        port, end = None, time.monotonic() + 90
        while port is None and time.monotonic() < end:
            line = proc.stderr.readline()
            if not line and proc.poll() is not None:
                break
            m = re.search(r"DevTools listening on ws://[^:]+:(\d+)/", line)
            if m:
                port = int(m.group(1))
        if port is None:
            pytest.fail("chromium did not start its DevTools endpoint")
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/json/list", timeout=30) as r:
            pages = [t for t in json.load(r) if t["type"] == "page"]
        yield DevTools(pages[0]["webSocketDebuggerUrl"])
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        shutil.rmtree(profile, ignore_errors=True)




def page_report(dt, report: str) -> dict:
    """Load ``report`` in the browser; returns its images [complete, width, height, alt], title, section
    headings, the console errors and a PNG screenshot."""
    for domain in ("Page", "Runtime", "Log"):
        dt.send(f"{domain}.enable")
    dt.send("Page.navigate", url=f"file://{report}")
    dt.wait_for("Page.loadEventFired")

    def ev(expr):
        return dt.send("Runtime.evaluate", returnByValue=True, expression=expr)["result"]["value"]

    out = {
        "images": ev("Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])"),
        "title": ev("document.title"),
        "headings": ev("Array.from(document.querySelectorAll('h2,h3')).map(h => h.textContent)"),
        "screenshot": base64.b64decode(dt.send("Page.captureScreenshot", format="png")["data"]),
    }
    out["errors"] = [e for e in dt.events if e.get("method") == "Runtime.exceptionThrown"
                     or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
                     or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    return out


# A synthetic real_model section and results.json (no model is loaded)

LENGTHS = (1024, 2048, 4096)


def _row(mechanism, options, label, ppl, acc, tps, cache, **extra):
    cases = [{"length": n, "tokens": n - 3, "depth": d, "seed": 0, "key": 12345, "correct": i < round(acc[k] * 3)}
             for k, n in enumerate(LENGTHS) for i, d in enumerate((0.1, 0.5, 0.9))]
    row = {"mechanism": mechanism, "options": options, "label": label, "note": f"{mechanism} note",
           "errors": {}, "seconds": {"perplexity": 1.0, "passkey": 2.0, "decode": 0.5},
           "perplexity": {str(n): v for n, v in zip(LENGTHS, ppl)},
           "perplexity_forwards": "one forward at the longest length; shorter lengths are its prefixes",
           "passkey_accuracy": {str(n): v for n, v in zip(LENGTHS, acc)}, "passkey_cases": cases,
           "decode_mode": "transformers DynamicCache", "decode_tokens_per_s": tps, "prefill_s": 1.5,
           "cache_bytes": cache}
    row.update(extra)
    return row


def real_section():
    rows = [
        _row("sdpa", {}, "sdpa", (20.0, 18.0, 16.0), (1.0, 1.0, 2 / 3), 10.0, 24 * 2 ** 20),
        _row("softmax", {}, "softmax", (20.0, 18.0, 16.0), (1.0, 1.0, 2 / 3), 8.0, 25 * 2 ** 20,
             max_abs_logit_diff_vs_sdpa=3.5e-5, logit_diff_tokens=4096, decode_mode="attnzoo kv decode state",
             decode_matches_sdpa=True),
        _row("sliding_window", {"window": 256}, "sliding_window(window=256)", (21.0, 21.6, 24.0), (1 / 3, 0.0, 0.0),
             12.0, 6 * 2 ** 20, decode_mode="attnzoo window decode state", decode_matches_sdpa=False),
        {"mechanism": "moa", "options": {"alphas": 128}, "label": "moa(alphas=128)", "note": "moa note",
         "skipped": "not registered"},
        _row("hyperattention", {"block_size": 256}, "hyperattention(block_size=256)", (22.0, 19.0, 17.0),
             (0.0, 0.0, 0.0), 1.0, 0, decode_skipped="no decode form (patterns [...]): a prefill-only method",
             errors={"passkey": "RuntimeError: synthetic failure in the passkey stage"}),
    ]
    for r in rows[-1:]:
        del r["passkey_accuracy"], r["passkey_cases"], r["decode_tokens_per_s"], r["cache_bytes"], r["decode_mode"]
    minilm = [
        {"mechanism": "softmax", "options": {}, "label": "softmax", "sentences": 64, "tokens_mean": 31.5,
         "tokens_max": 70, "cosine_mean": 1.0, "cosine_min": 0.9999998},
        {"mechanism": "sliding_window", "options": {"window": 16}, "label": "sliding_window(window=16)",
         "sentences": 64, "tokens_mean": 31.5, "tokens_max": 70, "cosine_mean": 0.91, "cosine_min": 0.77},
        {"mechanism": "moa", "options": {}, "label": "moa", "sentences": 64, "tokens_mean": 31.5, "tokens_max": 70,
         "skipped": "not registered"},
        {"mechanism": "longheads", "options": {}, "label": "longheads", "sentences": 64, "tokens_mean": 31.5,
         "tokens_max": 70, "skipped": "no non-causal form (patterns ['causal_self'])"},
    ]
    return {
        "model": "SmolLM2-135M-Instruct (synthetic)", "encoder": "all-MiniLM-L6-v2", "corpus": "synthetic corpus",
        "corpus_tokens": 75000, "config": {"lengths": list(LENGTHS)}, "lengths": list(LENGTHS),
        "passkey_depths": [0.1, 0.5, 0.9], "prefill": 1024, "new_tokens": 32, "decode_warmup": 2,
        "dtype": "float32", "threads": 2, "exact_max_abs_logit_diff": 3.5e-5, "rows": rows, "minilm": minilm,
        "not_evaluated": [{"mechanism": "illama_soft_mask", "reason": "no row"}], "duration_s": 3600.0,
        "interrupted": False, "stopped": None,
    }


def real_results(section=None):
    from attnzoo.bench import real

    env = {"date": "2026-01-02T03:04:05+00:00", "hostname": "testhost", "platform": "Linux", "python": "3.11",
           "torch": "2.13.0", "attnzoo": "0.1.0", "attnzoo_commit": "abc1234", "threads": 2,
           "cpu": {"model": "Test CPU", "flags": ["avx2"], "logical_cores": 2}, "transformers": "5.0"}
    return real.results_document(copy.deepcopy(section or real_section()), env,
                                 command="attnzoo bench real --synthetic", profile="real", duration_s=3601.0)


@pytest.fixture
def make_real_results():
    """The synthetic results builder: make_real_results(section=None) -> results dict (schema version 2)."""
    return real_results


@pytest.fixture
def open_report(browser):
    """open_report(path) -> what headless Chromium saw (see page_report)."""
    return lambda path: page_report(browser, str(path))
