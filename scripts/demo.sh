#!/usr/bin/env bash
# Set up .venv (scripts/setup.sh) and run the main job: the embedded DenseDPO/Flow-DPO demo on the shapes
# world, from the committed base checkpoint. Results land in ${1:-runs/demo} (summary.json, report.html).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
# shellcheck disable=SC1091
. "${VIDPO_VENV:-.venv}/bin/activate"
OUT=${1:-runs/demo}
if [ -f recipes/shapes/dpo_demo.yaml ]; then
  vidpo run recipes/shapes/dpo_demo.yaml --out "$OUT"
else
  vidpo train recipes/shapes/pretrain.yaml --out "$OUT"
fi
echo "results: $OUT/summary.json  report: $OUT/report.html"
