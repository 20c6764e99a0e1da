#!/usr/bin/env bash
# Creates .venv (if missing) and installs jaxembed with its test extra. Idempotent: a second
# run only checks that everything is installed. Nothing is fetched but packages from PyPI.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
"$PY" -c 'import sys; assert sys.version_info >= (3, 11)' 2>/dev/null || {
  echo "setup.sh: $PY is $("$PY" --version 2>&1 | head -1); jax, flax, orbax and grain need Python >= 3.11 (set PYTHON=python3.11)" >&2
  exit 2
}
[ -x .venv/bin/python ] || "$PY" -m venv .venv

pip_install() {
  # pip's output without the noise of unreadable extra index folders; its exit status kept.
  local log status=0
  log=$(mktemp)
  .venv/bin/python -m pip install -q --disable-pip-version-check "$@" >"$log" 2>&1 || status=$?
  grep -v '^WARNING: Location' "$log" || true
  rm -f "$log"
  return "$status"
}

# torch first, pinned to the CPU wheel: otherwise sentence-transformers resolves a CUDA build.
pip_install 'torch==2.13.0'
pip_install -e '.[test]'
.venv/bin/python -c "import jaxembed, jax, flax, torch, sentence_transformers; print('setup ok: jax', jax.__version__, 'flax', flax.__version__, 'torch', torch.__version__)"
