#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the whole test suite on the CPU. Extra args go to pytest.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VIDPO_VENV:-.venv}/bin/activate"
exec python -m pytest -q -n "${VIDPO_TEST_WORKERS:-2}" --durations=15 "$@" tests
