#!/usr/bin/env bash
# Rewrite requirements/constraints.txt from a fresh resolution: a new virtual environment (.venv-lock, removed
# afterwards) gets requirements/test.txt with only the policy pins of constraints.txt (the lines above its
# "--- frozen" marker, e.g. torch==2.13.0), and `pip freeze` of it becomes the frozen part. Run it to move the
# tested versions forward, then `bash scripts/test.sh` (a changed constraints.txt re-installs .venv).
set -euo pipefail
cd "$(dirname "$0")/.."
python="${PYTHON:-python3}"
lock=.venv-lock
tmp="$(mktemp -d)"
trap 'rm -rf "$lock" "$tmp"' EXIT
rm -rf "$lock"
"$python" -m venv "$lock"
sed -n '1,/^# --- frozen/p' requirements/constraints.txt | sed '$d' > "$tmp/constraints.txt"
sed 's#^-c constraints.txt#-c '"$tmp"'/constraints.txt#' requirements/test.txt > "$tmp/test.txt"
"$lock/bin/python" -m pip install -q --disable-pip-version-check -r "$tmp/test.txt"
"$lock/bin/python" -m pip freeze --exclude-editable > "$tmp/freeze.txt"
"$lock/bin/python" - "$tmp" <<'EOF'
import pathlib
import platform
import sys

tmp = pathlib.Path(sys.argv[1])
models = {line.split("==")[0].lower() for line in pathlib.Path("requirements/models.txt").read_text().splitlines()
          if line and not line.startswith("#")}
policy = (tmp / "constraints.txt").read_text()
pinned = {line.split("==")[0].lower() for line in policy.splitlines() if "==" in line and not line.startswith("#")}
frozen = [line for line in (tmp / "freeze.txt").read_text().splitlines()
          if "==" in line and line.split("==")[0].lower() not in models | pinned]
marker = (f"# --- frozen by scripts/lock.sh: Python {platform.python_version()}, the newest versions pip resolves "
          "for requirements/test.txt ---\n")
pathlib.Path("requirements/constraints.txt").write_text(policy + marker + "\n".join(frozen) + "\n")
print(f"lock.sh: wrote requirements/constraints.txt ({len(frozen)} frozen pins)")
EOF
