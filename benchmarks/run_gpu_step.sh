#!/usr/bin/env bash
# The GPU step benchmark in one command: the 1.3b preset at 32760 tokens per video
# (2 pairs = 4 videos of Wan-1.3B latents 16 x 21 x 60 x 104, patch 1x2x2, 512 text tokens),
# plain vs optimized vs every lever flipped, written to benchmarks/results/step.csv and the dated report
# benchmarks/reports/<yyyy-mm-dd>_step_<device>.md.
#
# Memory (fp32 master weights, AdamW): 1.42 B params x (4 weights + 4 grads + 8 Adam) ~= 23 GB, a fp32
# reference copy 5.7 GB (bf16 with ref_bf16: 2.8 GB); activations need ac=full at 131k tokens per step.
# On an 80 GB H100 start with PAIRS=2; if the plain row OOMs, rerun with PAIRS=1 (2 x 32760 tokens).
#
# Usage: bash benchmarks/run_gpu_step.sh            (env: PAIRS=2 AC=full FLIPS=all EXTRA="...")
set -euo pipefail
cd "$(dirname "$0")/.."
PAIRS="${PAIRS:-2}"
AC="${AC:-full}"
FLIPS="${FLIPS:-all}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
name="$(python -c 'import torch; n=torch.cuda.get_device_name(0).lower(); print("h200" if "h200" in n else "h100" if "h100" in n else n.split()[-1].replace("-", ""))')"
report="benchmarks/reports/$(date -u +%Y-%m-%d)_step_${name}.md"
PYTHONPATH=benchmarks python -c 'import step_bench as s, torch; print("torch", torch.__version__, "cuda", torch.version.cuda)
for m in ("flash_attn", "transformer_engine.pytorch"): print(m, s._importable(m) or "importable")'
python benchmarks/bench_step.py --device cuda --preset 1.3b --pairs "$PAIRS" --frames 21 --height 60 --width 104 \
    --cond-len 512 --ac "$AC" --flips "$FLIPS" --warmup 3 --repeats 10 --report "$report" ${EXTRA:-}
echo "report: $report"
