"""The ``attnzoo`` command: list, info, unknown names, the generated README table."""

import json
import os
import subprocess
import sys

import pytest

import attnzoo
from attnzoo import cli
from attnzoo.bench import cli as bench_cli

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run(capsys, *argv):
    code = cli.main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_list_names_every_mechanism(capsys):
    code, out, _ = run(capsys, "list")
    assert code == 0
    for name in attnzoo.names():
        assert name in out
    assert f"{len(attnzoo.names())} mechanisms" in out


def test_list_json_is_the_registry(capsys):
    code, out, _ = run(capsys, "list", "--json")
    data = json.loads(out)
    assert code == 0 and [d["name"] for d in data] == attnzoo.names()
    sw = next(d for d in data if d["name"] == "sliding_window")
    assert sw["patterns"] == list(attnzoo.get("sliding_window").patterns)
    assert sw["options"][0]["name"] == "window" and "forms" in sw


def test_list_markdown_is_mechanism_table(capsys):
    code, out, _ = run(capsys, "list", "--markdown")
    assert code == 0 and out == cli.mechanism_table()
    lines = out.strip().splitlines()
    assert lines[0] == ("| name | family | kind | paper | patterns | exact | decode state | forms | complexity |")
    assert len(lines) == 2 + len(attnzoo.names())
    row = next(line for line in lines if line.startswith("| `sliding_window`"))
    assert "[arXiv 2004.05150](https://arxiv.org/abs/2004.05150)" in row
    assert "| yes | window | reference, fast, step |" in row


def test_list_filters(capsys):
    code, out, _ = run(capsys, "list", "--family", "local")
    assert code == 0 and "sliding_window" in out and "softmax " not in out


def test_info_softmax(capsys):
    code, out, _ = run(capsys, "info", "softmax")
    assert code == 0
    assert "Attention Is All You Need" in out and "https://arxiv.org/abs/1706.03762" in out
    assert "noncausal_self, causal_self, noncausal_cross, causal_cross" in out
    code, out, _ = run(capsys, "info", "sdpa", "--json")  # an alias
    assert json.loads(out)["name"] == "softmax"


def test_info_shows_options_with_ranges(capsys):
    code, out, _ = run(capsys, "info", "sliding_window")
    assert "window = 256  (int >= 1)" in out


def test_unknown_name_errors_with_a_suggestion(capsys):
    code, out, err = run(capsys, "info", "sliding_windw")
    assert code == 1 and out == ""
    assert "unknown name 'sliding_windw'" in err and "Did you mean 'sliding_window'" in err
    code, _, err = run(capsys, "bench", "-m", "softmaks", "--no-progress", "--out", "/nonexistent/never")
    assert code == 1 and "Did you mean" in err and "'softmax'" in err


def test_bad_bench_option_is_named(capsys):
    code, _, err = run(capsys, "bench", "--option", "sliding_window.window=-3", "-m", "sliding_window",
                       "--no-progress")
    assert code == 1 and "window" in err and ">= 1" in err
    code, _, err = run(capsys, "bench", "--option", "window=3")
    assert code == 1 and "MECHANISM.OPTION=VALUE" in err
    code, _, err = run(capsys, "bench", "--tasks", "mqra", "--no-progress")
    assert code == 1 and "unknown 'mqra'" in err


def test_option_values_are_parsed():
    assert bench_cli.parse_options(["sliding_window.window=256", "x.flag=true", "x.name=abc", "x.f=0.5"]) == {
        "sliding_window": {"window": 256}, "x": {"flag": True, "name": "abc", "f": 0.5}}


def test_update_replaces_only_the_marked_block(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# title\n\nintro\n<!-- mechanisms:start -->\nstale table\n<!-- mechanisms:end -->\n\nafter\n")
    code, out, _ = run(capsys, "list", "--markdown", "--update", str(readme))
    assert code == 0 and "updated" in out
    text = readme.read_text()
    assert text.startswith("# title\n\nintro\n<!-- mechanisms:start -->\n| name |")
    assert cli.mechanism_table() in text and "stale" not in text and text.endswith("<!-- mechanisms:end -->\n\nafter\n")
    code, out, _ = run(capsys, "list", "--markdown", "--update", str(readme))
    assert "already up to date" in out and readme.read_text() == text


def test_update_without_markers_fails_clearly(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    code, _, err = run(capsys, "list", "--markdown", "--update", str(readme))
    assert code == 1 and "<!-- mechanisms:start -->" in err
    code, _, err = run(capsys, "list", "--update", str(readme))
    assert code == 1 and "only with --markdown" in err


def test_python_dash_m_attnzoo():
    env = dict(os.environ, PYTHONPATH=os.path.join(ROOT, "src"))
    proc = subprocess.run([sys.executable, "-m", "attnzoo", "list", "--json"], capture_output=True, text=True,
                          env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "sliding_window" in [d["name"] for d in json.loads(proc.stdout)]


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"]])
def test_help(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cli.main(argv)
    assert e.value.code == 0
    assert "attnzoo" in capsys.readouterr().out
