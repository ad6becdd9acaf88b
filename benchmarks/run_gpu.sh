#!/usr/bin/env bash
# Every GPU measurement of vidpo in one run, sized for one H100 / H200 in under 8 minutes (BUDGET_S=480):
#
#   env        versions: GPU, driver, python, torch, CUDA, triton, nvcc, ncu, diffusers, DALI
#   build      the extension with its CUDA kernels: pip install --no-build-isolation --no-deps --no-index -e .
#              (setup.py builds vidpo._C for sm_90a and sm_80 when torch has CUDA and nvcc is found); then checks
#              that vidpo.kernels.cuda_backend is available
#   tests      the triton and cuda backends against float64 on the GPU (tests/test_losses.py, tests/test_csrc.py
#              with TRITON_INTERPRET=0); any failure or skip STOPS the run: no speed of an unchecked kernel
#   dense_dpo  the fused loss: triton and cuda against eager and torch.compile, GB/s against the copy bandwidth of
#              the same run, Wan latents 16 x 21 x 60 x 104, B = 2 and 16 pairs (each provider is checked against
#              float64 before it is timed; a failed check is never timed and fails the run)
#   step_*     the DPO step of Wan 2.1 1.3B (diffusers WanTransformer3DModel, random weights) in bf16, one pair:
#              LoRA and full fine-tuning at 32,760 tokens per video (480p, 21 x 60 x 104 latents), LoRA at 75,600
#              (720p, 21 x 90 x 160; optimized only, one timed step); plain (separate reference copy, eager loss) against optimized (LoRA-off
#              reference, fused loss), both with activation checkpointing: without it one pair needs ~200 GiB of
#              activations at 32k tokens (`vidpo scale`), so the ac=none flip is the measured reason
#   vae        Wan 2.1 VAE decode of a 16 x 21 x 60 x 104 latent (81 frames of 480 x 832) in bf16, frames/s
#   dali       DALI's NVDEC decode (benchmarks/bench_decode.py --providers dali), when DALI and PyAV import
#
# Each step has an estimate (seconds); the run refuses to start, and --dry-run fails, when they add up to more
# than BUDGET_S. A step that would start after DEADLINE_S (default 560 s: the device tool stops a command at
# 600 s) is skipped and reported. Rows go to $OUT/results/*.csv (a fresh CSV per script) and are appended to
# benchmarks/results/*.csv; the dated report benchmarks/reports/<yyyy-mm-dd>_gpu_<device>.md (copied to $OUT)
# lists versions, every command, its status and its time against the estimate. Logs: $OUT/logs/<step>.log.
# Exit status: 0 when every step passed (or was skipped for a missing optional package), 1 otherwise.
#
#   bash benchmarks/run_gpu.sh --dry-run    on any machine: checks every step (files, each script's arguments
#                                           through its own --dry-run / --help, the test selection collects),
#                                           prints the plan with its estimates, fails over budget
#   bash benchmarks/run_gpu.sh              on the GPU
# Environment: OUT (output folder; default a temporary one), BUDGET_S, DEADLINE_S, STEPS (space-separated subset
# of the step names, default all), PYTHON (default python).
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    "") ;;
    *) echo "usage: bash benchmarks/run_gpu.sh [--dry-run]" >&2; exit 2 ;;
esac
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-480}"
DEADLINE_S="${DEADLINE_S:-560}"
ALL_STEPS="env build tests dense_dpo step_lora_32k step_full_32k step_lora_75k vae dali"
STEPS="${STEPS:-$ALL_STEPS}"
OUT_DIR="${OUT:-$(mktemp -d /tmp/vidpo_gpu.XXXXXX)}"
RUN_RESULTS="$OUT_DIR/results"
LOGS="$OUT_DIR/logs"
mkdir -p "$RUN_RESULTS" "$LOGS"
STAMP="$(date -u +%Y-%m-%d)"
export PYTHONUNBUFFERED=1

# The tests of the GPU backends: every parametrisation with the triton or cuda backend, less what does not run
# the kernels on the GPU (the nvcc compile tests rebuild what `build` built; the tilings test drives the
# interpreter's tile on CPU tensors).
TEST_FILES="tests/test_losses.py tests/test_csrc.py"
TEST_SELECT="(triton or cuda) and not compile and not typechecks and not tilings and not requires_the_interpreter"
WAN_32K="--frames 21 --height 60 --width 104"
WAN_75K="--frames 21 --height 90 --width 160"
# Each configuration runs one untimed step (which also warms up), then --repeats timed ones; peak memory comes from
# the timed steps (--no-memory skips the separate activation-memory steps: the CPU run measures those).
STEP_COMMON="benchmarks/bench_step.py --model wan --preset 1.3b --device cuda --pairs 1 --cond-len 512 --segments 5 --ac full --warmup 0 --no-breakdown --no-memory"

# name | estimate (s) | critical (1: stop the run on failure) | dry-run check | command
declare -a NAMES ESTIMATES CRITICAL CHECKS COMMANDS
add_step() { NAMES+=("$1"); ESTIMATES+=("$2"); CRITICAL+=("$3"); CHECKS+=("$4"); COMMANDS+=("$5"); }

add_step env 15 0 \
    "command -v $PY >/dev/null" \
    "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader; nvcc --version | tail -n 2; ncu --version | tail -n 1; $PY -c 'import sys, torch, triton; print(\"python\", sys.version.split()[0], \"torch\", torch.__version__, \"cuda\", torch.version.cuda, \"triton\", triton.__version__)'; $PY -c 'import diffusers; print(\"diffusers\", diffusers.__version__)'; $PY -c 'import nvidia.dali as d; print(\"dali\", d.__version__)' || echo 'dali: not importable'"
add_step build 90 1 \
    "test -f setup.py && ls csrc/*.cu csrc/*.cpp >/dev/null && $PY -m pip install --dry-run --no-build-isolation --no-deps --no-index -e . >/dev/null" \
    "command -v nvcc && MAX_JOBS=16 $PY -m pip install --no-build-isolation --no-deps --no-index -e . && $PY -c 'from vidpo.kernels import cuda_backend as c; assert c.available(), c.unavailable_reason(); print(\"vidpo._C with CUDA kernels: ok\")'"
add_step tests 75 1 \
    "$PY -m pytest -q -p no:cacheprovider --collect-only $TEST_FILES -k '$TEST_SELECT' | grep -q 'tests collected'" \
    "TRITON_INTERPRET=0 $PY -m pytest -q -x -p no:cacheprovider -rs $TEST_FILES -k '$TEST_SELECT' --junitxml=$LOGS/gpu_tests.xml && $PY benchmarks/run_gpu_checks.py $LOGS/gpu_tests.xml"
# Estimates from the model FLOPs (bench_step --dry-run prints them): 2.26 PFLOP a step at 32k tokens, ~2.8 with the
# checkpoint recomputation, ~7 s at 400 TFLOP/s; 75k tokens ~12 PFLOP (attention grows as n^2), ~30 s a step.
add_step dense_dpo 50 0 \
    "$PY benchmarks/bench_dense_dpo.py --dry-run --device cuda --pairs 2,16 --providers torch,compile,triton,cuda" \
    "TRITON_INTERPRET=0 $PY benchmarks/bench_dense_dpo.py --device cuda --quick --pairs 2,16 --providers torch,compile,triton,cuda --out $RUN_RESULTS/dense_dpo.csv"
add_step step_lora_32k 75 0 \
    "$PY $STEP_COMMON $WAN_32K --train lora --repeats 2 --flips ref_lora_off --dry-run" \
    "$PY $STEP_COMMON $WAN_32K --train lora --repeats 2 --flips ref_lora_off --out $RUN_RESULTS/step.csv --report $OUT_DIR/step_wan1.3b_lora_32k.md"
add_step step_full_32k 50 0 \
    "$PY $STEP_COMMON $WAN_32K --train full --repeats 2 --flips none --dry-run" \
    "$PY $STEP_COMMON $WAN_32K --train full --repeats 2 --flips none --out $RUN_RESULTS/step.csv --report $OUT_DIR/step_wan1.3b_full_32k.md"
add_step step_lora_75k 75 0 \
    "$PY $STEP_COMMON $WAN_75K --train lora --repeats 1 --flips none --no-plain --dry-run" \
    "$PY $STEP_COMMON $WAN_75K --train lora --repeats 1 --flips none --no-plain --out $RUN_RESULTS/step.csv --report $OUT_DIR/step_wan1.3b_lora_75k.md"
add_step vae 35 0 \
    "$PY benchmarks/bench_vae.py --dry-run --device cuda" \
    "$PY benchmarks/bench_vae.py --device cuda --warmup 1 --repeats 2 --out $RUN_RESULTS/vae.csv"
add_step dali 15 0 \
    "$PY benchmarks/bench_decode.py --help >/dev/null" \
    "if $PY -c 'import nvidia.dali, av' 2>/dev/null; then $PY benchmarks/bench_decode.py --quick --providers dali --codecs h264 --sizes 512,1280x720 --gops 16 --frames 64 --out $RUN_RESULTS/decode.csv; else echo 'SKIPPED: nvidia.dali or av is not importable'; fi"

selected() { [[ " $STEPS " == *" $1 "* ]]; }
for wanted in $STEPS; do
    [[ " $ALL_STEPS " == *" $wanted "* ]] || { echo "unknown step '$wanted' in STEPS; valid: $ALL_STEPS" >&2; exit 2; }
done

total=0
echo "plan (estimated seconds; budget $BUDGET_S):"
for i in "${!NAMES[@]}"; do
    selected "${NAMES[$i]}" || continue
    total=$((total + ESTIMATES[i]))
    printf '  %-14s %4s s  %s\n' "${NAMES[$i]}" "${ESTIMATES[$i]}" "${COMMANDS[$i]}"
done
echo "  total          $total s"
if (( total > BUDGET_S )); then
    echo "OVER BUDGET: the steps are estimated at $total s, more than BUDGET_S=$BUDGET_S" >&2
    exit 1
fi

if (( DRY_RUN )); then
    # The checks are independent: run them side by side, then report each.
    declare -A PIDS
    for i in "${!NAMES[@]}"; do
        selected "${NAMES[$i]}" || continue
        bash -c "${CHECKS[$i]}" >"$LOGS/${NAMES[$i]}.dry.log" 2>&1 &
        PIDS[$i]=$!
    done
    failed=0
    for i in "${!NAMES[@]}"; do
        selected "${NAMES[$i]}" || continue
        if wait "${PIDS[$i]}"; then
            echo "dry run: ${NAMES[$i]} ok"
        else
            echo "dry run: ${NAMES[$i]} FAILED: ${CHECKS[$i]}" >&2
            grep -v '^USDT' "$LOGS/${NAMES[$i]}.dry.log" | tail -n 20 >&2
            failed=1
        fi
    done
    (( failed )) && exit 1
    echo "dry run: every step checked; estimated $total s of $BUDGET_S"
    exit 0
fi

device_name="$($PY -c 'import torch; n=torch.cuda.get_device_name(0).lower(); print("h200" if "h200" in n else "h100" if "h100" in n else n.split()[-1].replace("-", ""))' 2>/dev/null || echo unknown)"
report="benchmarks/reports/${STAMP}_gpu_${device_name}.md"
# The report is rewritten after every step, so a run stopped from outside still leaves one in $OUT.
write_report() {
    {
        echo "# vidpo GPU measurements: $device_name, $STAMP"
        echo
        echo "Produced by \`bash benchmarks/run_gpu.sh\` in $((SECONDS - start_all)) s (budget $BUDGET_S s). Rows: \`benchmarks/results/{dense_dpo,step,vae,decode}.csv\` (this run's timestamps); logs were in \`\$OUT/logs\`."
        echo
        echo "## Versions"
        echo
        echo '```'
        grep -v '^USDT' "$LOGS/env.log" 2>/dev/null || echo "(env step not run)"
        echo '```'
        echo
        echo "## Steps"
        echo
        echo "| step | status | seconds | estimate | command |"
        echo "|---|---|---|---|---|"
        printf '%s\n' "${status_lines[@]}"
        for part in dense_dpo vae dali; do
            [[ -f "$LOGS/$part.log" ]] || continue
            echo
            echo "## $part"
            echo
            echo '```'
            grep -v '^USDT' "$LOGS/$part.log" | tail -n 60
            echo '```'
        done
        for step_report in "$OUT_DIR"/step_wan*.md; do
            [[ -f "$step_report" ]] || continue
            echo
            echo "## $(basename "$step_report" .md)"
            echo
            sed -e '1d' "$step_report"
        done
    } >"$report"
    cp "$report" "$OUT_DIR/"
}

status_lines=()
overall=0
md_command() { local c="$1"; printf '%s' "${c//|/\\|}"; }     # a pipe would end the table cell
start_all=$SECONDS
for i in "${!NAMES[@]}"; do
    name="${NAMES[$i]}"
    selected "$name" || continue
    elapsed_all=$((SECONDS - start_all))
    if (( elapsed_all + ESTIMATES[i] > DEADLINE_S )); then
        status_lines+=("| $name | skipped: out of time ($elapsed_all s used) | - | ${ESTIMATES[$i]} | \`$(md_command "${COMMANDS[$i]}")\` |")
        echo "== $name: SKIPPED (out of time)"
        overall=1
        write_report
        continue
    fi
    echo "== $name (estimate ${ESTIMATES[$i]} s)"
    t0=$SECONDS
    timeout $((ESTIMATES[i] * 2 + 30)) bash -c "${COMMANDS[$i]}" >"$LOGS/$name.log" 2>&1
    rc=$?
    took=$((SECONDS - t0))
    grep -v '^USDT' "$LOGS/$name.log" | tail -n 25
    if (( rc == 0 )); then
        state="ok"
        grep -q '^SKIPPED' "$LOGS/$name.log" && state="$(grep -m1 '^SKIPPED' "$LOGS/$name.log")"
    else
        state="FAILED (exit $rc$( (( rc == 124 )) && echo ': timed out'))"
        overall=1
    fi
    status_lines+=("| $name | $state | $took | ${ESTIMATES[$i]} | \`$(md_command "${COMMANDS[$i]}")\` |")
    echo "== $name: $state in $took s"
    write_report
    if (( rc != 0 && CRITICAL[i] )); then
        echo "STOPPED: $name failed; no speed is measured for kernels that did not pass their checks" >&2
        break
    fi
done

# Rows of this run: fresh CSVs under $OUT/results, appended to the committed ones (header kept once).
for csv in "$RUN_RESULTS"/*.csv; do
    [[ -f "$csv" ]] || continue
    target="benchmarks/results/$(basename "$csv")"
    if [[ -s "$target" ]]; then tail -n +2 "$csv" >>"$target"; else cp "$csv" "$target"; fi
done

write_report
echo "report: $report (copy in $OUT_DIR)"
exit $overall
