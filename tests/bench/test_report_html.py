"""The HTML report renders in headless Chromium: every image loads, no console errors, a screenshot."""

import base64
import json
import os
import re
import shutil
import subprocess
import time
import urllib.request

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
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
    websocket = pytest.importorskip("websocket", reason="pip package websocket-client drives Chromium's DevTools")
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


def test_report_renders_with_every_image_and_no_console_error(tiny_run, browser, tmp_path):
    _, out, paths = tiny_run
    report = os.path.join(out, "report.html")
    html = open(report).read()
    assert "src=\"data:image/png;base64," in html and "<script" not in html  # self-contained, no scripts
    n_png = len([p for p in paths["plots"].split(",") if p])
    dt = browser
    for domain in ("Page", "Runtime", "Log"):
        dt.send(f"{domain}.enable")
    dt.send("Page.navigate", url=f"file://{report}")
    dt.wait_for("Page.loadEventFired")
    images = dt.send("Runtime.evaluate", returnByValue=True, expression=(
        "Array.from(document.images).map(i => [i.complete, i.naturalWidth, i.naturalHeight, i.alt])"))["result"]
    imgs = images["value"]
    assert len(imgs) == n_png
    broken = [alt for complete, w, h, alt in imgs if not (complete and w > 100 and h > 100)]
    assert not broken, f"images that did not load: {broken}"
    title = dt.send("Runtime.evaluate", expression="document.title", returnByValue=True)["result"]["value"]
    assert title.startswith("attnzoo bench")
    errors = [e for e in dt.events if e.get("method") == "Runtime.exceptionThrown"
              or (e.get("method") == "Runtime.consoleAPICalled" and e["params"]["type"] in ("error", "assert"))
              or (e.get("method") == "Log.entryAdded" and e["params"]["entry"]["level"] == "error")]
    assert not errors, errors
    shot = dt.send("Page.captureScreenshot", format="png")["data"]
    png = base64.b64decode(shot)
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 10_000
    (tmp_path / "report.png").write_bytes(png)
