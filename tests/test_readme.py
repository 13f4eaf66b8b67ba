"""README.md says what is true now: its mechanism table is the registry's, its commands exist."""

import pathlib
import re

import pytest

from attnzoo import cli

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def _block(start: str, end: str) -> str:
    i, j = README.index(start), README.index(end)
    return README[i + len(start) : j].strip("\n") + "\n"


def test_mechanism_table_matches_registry():
    assert _block(cli.MECH_START, cli.MECH_END) == cli.mechanism_table(), (
        "README's mechanism table drifted from the registry: run `attnzoo list --markdown --update README.md`")


def test_two_setup_commands_and_ci_runs_the_test_command():
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    commands = [line for b in blocks for line in b.splitlines() if line and not line.startswith("#")]
    assert commands == ["bash scripts/bench.sh --quick", "bash scripts/test.sh"], commands
    bench = (ROOT / "scripts" / "bench.sh").read_text()
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    assert "setup_venv.sh bench" in bench and '/bin/attnzoo" bench "$@"' in bench  # `attnzoo bench --quick`
    assert '-c requirements/constraints.txt -e ".[bench]"' in setup  # pinned CPU torch, bench extra, into .venv
    ci = (ROOT / ".ci" / "run").read_text()
    assert commands[1] in ci, f".ci/run must run the README's test command {commands[1]!r}"
    assert "torch==2.13.0" in (ROOT / "requirements" / "constraints.txt").read_text()


def _python_block_after(heading: str) -> str:
    section = README[README.index(heading):]
    return re.search(r"```python\n(.*?)```", section, flags=re.S).group(1)


@pytest.mark.realmodel
def test_hugging_face_example_runs(smollm2_copy, monkeypatch):
    """The README's Hugging Face example, executed as written on SmolLM2: register + set_attn_implementation +
    generate, then swap_attention; the decode state gives the same greedy tokens as the function over
    transformers' full cache. (load_smollm2 hands out the session's copy instead of converting the GGUF again.)"""
    import torch

    from attnzoo import models

    monkeypatch.setattr(models, "load_smollm2", lambda *a, **k: smollm2_copy)
    ns: dict = {}
    exec(compile(_python_block_after("## In a Hugging Face model"), "README.md", "exec"), ns)
    assert ns["name"] == "attnzoo:sink_window(sinks=4,window=256)"
    prompt_len = ns["prompt"]["input_ids"].shape[1]
    assert ns["out"].shape == (1, prompt_len + 12) and torch.equal(ns["swapped"], ns["out"])
    assert ns["model"].config._attn_implementation == ns["name"]
    swapped = [m for m in ns["model"].modules() if type(m).__name__ == "SwappedAttention"]
    assert len(swapped) == ns["model"].config.num_hidden_layers


def test_window_convention_is_stated():
    """Beside the window option: non-causal |p - j| < w (2w - 1 keys), not Longformer's w/2 per side."""
    first_example = README[: README.index("## In a Hugging Face model")]
    assert "|p - j| < w" in first_example and "2w - 1 keys" in first_example and "w/2" in first_example


def test_every_mechanism_file_has_a_paper_header():
    """Each mechanism file opens with the paper title, arXiv id and official code link."""
    for m in cli.registry.mechanisms():
        doc = cli.mechanism_docstring(m)
        assert doc, f"{m.name}: its file has no docstring"
        if m.arxiv and m.arxiv[0].isdigit():
            assert m.arxiv in doc, f"{m.name}: arXiv id {m.arxiv} missing from its file's docstring"
        assert m.title.split(":")[0][:25].lower() in doc.lower().replace("\n", " "), (
            f"{m.name}: paper title missing from its file's docstring")


def test_measured_block_is_generated_from_the_committed_results():
    """The README's numbers are `attnzoo bench readme` of the committed results (never hand-typed): the
    block names the runs it comes from, and regenerating it from those results.json gives the same text."""
    from attnzoo.bench import report
    from attnzoo.bench.results import load

    block = _block("<!-- bench:start -->", "<!-- bench:end -->")
    outs = re.findall(r"--out (benchmarks/results/[\w.-]+)", block)
    assert outs, "the README's measured block names no committed run"
    regenerated = report.readme_block([load(str(ROOT / o)) for o in outs])
    assert regenerated.strip() == block.strip()
