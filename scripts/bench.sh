#!/usr/bin/env bash
# The README's main command: set up the clone's .venv (scripts/setup_venv.sh bench: attnzoo with the bench
# extra, torch's CPU build and every other version pinned by requirements/constraints.txt), then run
# `attnzoo bench` with the arguments given, e.g. `bash scripts/bench.sh --quick` (the report goes to
# bench-results/ unless --out says otherwise).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup_venv.sh bench
exec "${ATTNZOO_VENV:-.venv}/bin/attnzoo" bench "$@"
