#!/usr/bin/env bash
# Set up vidpo's Python environment in .venv (idempotent: reinstalls only when setup.py or csrc/ changed).
#
# torch is installed FIRST and the package is built with --no-build-isolation: otherwise pip resolves an
# unpinned torch (for the build env or a dependency) and pulls gigabytes of CUDA wheels. On these CPU
# machines `torch==2.13.0` is a local CPU wheel. A GPU user who already has a CUDA torch in the Python that
# creates the venv sets VIDPO_SYSTEM_TORCH=1 (the venv then sees the system site-packages and torch is not
# reinstalled); see README "GPU install".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
VENV=${VIDPO_VENV:-.venv}
if [ ! -x "$VENV/bin/python" ]; then
  if [ "${VIDPO_SYSTEM_TORCH:-0}" = "1" ]; then
    "$PY" -m venv --system-site-packages "$VENV"
  else
    "$PY" -m venv "$VENV"
  fi
fi
# shellcheck disable=SC1091
. "$VENV/bin/activate"
stamp="$VENV/.vidpo-installed"
want=$(cat setup.py csrc/* 2>/dev/null | sha1sum | cut -d' ' -f1)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  python -m pip install -q --upgrade pip >/dev/null 2>&1 || true
  if ! python -c "import torch" >/dev/null 2>&1; then
    python -m pip install -q "torch==${VIDPO_TORCH_VERSION:-2.13.0}"
  fi
  python -m pip install -q --no-build-isolation -e ".[test]"
  echo "$want" > "$stamp"
fi
