"""The HTML report renders in headless Chromium: every image loads, no console errors, a screenshot.
(The ``browser`` fixture is in conftest.py.)"""

import base64
import os


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
