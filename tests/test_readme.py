"""README.md says what is true now: its mechanism table is the registry's, its commands exist."""

import pathlib
import re

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
    assert len(commands) == 2, commands
    main_cmd, test_cmd = commands
    assert "attnzoo bench --quick" in main_cmd and "requirements/constraints.txt" in main_cmd
    ci = (ROOT / ".ci" / "run").read_text()
    assert test_cmd in ci, f".ci/run must run the README's test command {test_cmd!r}"
    assert "torch==2.13.0" in (ROOT / "requirements" / "constraints.txt").read_text()


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
