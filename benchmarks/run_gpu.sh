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
# lists versions, every command, its status and its time against the estimate. The logs, the GPU tests' JUnit XML
# and the step benchmarks' own reports are written under $WORK and packed into $OUT/logs.tar.gz after every step:
# $OUT never holds more than 6 files (the device tool brings back 8), even when the run is stopped from outside.
# Exit status: 0 when every step passed (or was skipped for a missing optional package), 1 otherwise.
#
# Packages the GPU machine lacks: each step names the Python modules it imports (diffusers for the Wan step and the
# VAE). A GPU image without network (the lent H100 / H200 one has torch, triton, transformers and peft, but no
# diffusers) gets them as wheels carried with the working tree: `--fetch-wheels` downloads the pinned list of
# benchmarks/gpu_wheels.txt for the GPU machine's Python into .whl/ (ignored by git), and every run installs what
# .whl/ holds into $SITE and puts it on PYTHONPATH before it checks the steps' imports. A step whose import is
# missing fails at once (dry run included) with the module's name, never after the build and the tests.
#
#   bash benchmarks/run_gpu.sh --fetch-wheels   here, with a registry: .whl/ for the GPU's Python (GPU_PYTHON_VERSION,
#                                               default 3.12); carry .whl with the working tree
#   bash benchmarks/run_gpu.sh --dry-run    on any machine: checks every step (files, imports, each script's
#                                           arguments through its own --dry-run / --help, the test selection
#                                           collects), prints the plan with its estimates, fails over budget
#   bash benchmarks/run_gpu.sh              on the GPU
#   bash benchmarks/run_gpu.sh --import DIR  here, after the run: DIR is the $OUT that came back; its rows are
#                                           appended to benchmarks/results/*.csv (once) and its report copied to
#                                           benchmarks/reports/, ready to commit
# Environment: OUT (output folder; default a temporary one), WORK (logs before packing; default a temporary one),
# BUDGET_S, DEADLINE_S, STEPS (space-separated subset of the step names, default all), PYTHON (default python, else
# python3), WHEELS (default .whl), SITE (where the carried wheels are installed; default /tmp/vidpo_gpu_site),
# GPU_WHEELS_LIST (default benchmarks/gpu_wheels.txt), RESULTS_DIR (default benchmarks/results) and REPORTS_DIR
# (default benchmarks/reports): where the rows are appended and the dated report is written.
set -uo pipefail
cd "$(dirname "$0")/.."

DRY_RUN=0
FETCH=0
IMPORT_FROM=""
USAGE="usage: bash benchmarks/run_gpu.sh [--dry-run | --fetch-wheels | --import DIR]"
case "${1:-}" in
    --dry-run) DRY_RUN=1 ;;
    --fetch-wheels) FETCH=1 ;;
    --import)
        IMPORT_FROM="${2:-}"
        [[ -n "$IMPORT_FROM" && -d "$IMPORT_FROM" ]] || { echo "$USAGE (--import needs the folder \$OUT came back in)" >&2; exit 2; } ;;
    "") ;;
    *) echo "$USAGE" >&2; exit 2 ;;
esac
# The GPU image's interpreter is `python3`; `python` is not always there.
PY="${PYTHON:-$(command -v python || command -v python3 || echo python)}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/vidpo_gpu_site}"
WHEEL_LIST="${GPU_WHEELS_LIST:-benchmarks/gpu_wheels.txt}"
RESULTS_DIR="${RESULTS_DIR:-benchmarks/results}"
REPORTS_DIR="${REPORTS_DIR:-benchmarks/reports}"

if (( FETCH )); then
    # Wheels only (nothing is built there), for the GPU machine's Python and platform, without dependencies: the
    # list names each package the GPU image lacks, pinned, and its dependencies are already there.
    version="${GPU_PYTHON_VERSION:-3.12}"
    mapfile -t wanted < <(sed -e 's/#.*//' -e '/^[[:space:]]*$/d' "$WHEEL_LIST")
    (( ${#wanted[@]} )) || { echo "no packages listed in $WHEEL_LIST" >&2; exit 1; }
    mkdir -p "$WHEELS"
    platforms=()
    for tag in manylinux_2_28_x86_64 manylinux_2_27_x86_64 manylinux_2_17_x86_64 manylinux2014_x86_64; do
        platforms+=(--platform "$tag")
    done
    "$PY" -m pip download --quiet --no-deps --only-binary=:all: --python-version "$version" --implementation cp \
        "${platforms[@]}" -d "$WHEELS" "${wanted[@]}" || { echo "pip download failed for: ${wanted[*]}" >&2; exit 1; }
    ls -l "$WHEELS"/*.whl
    echo "fetched ${#wanted[@]} package(s) for Python $version into $WHEELS ($(du -sh "$WHEELS" | cut -f1)); carry $WHEELS"
    exit 0
fi

# Fresh CSVs (one run's rows, with their header) appended to $RESULTS_DIR's, the header kept once; a CSV whose first
# row is already there was appended before and is skipped.
append_rows() {
    local csv target first
    for csv in "$1"/*.csv; do
        [[ -f "$csv" ]] || continue
        target="$RESULTS_DIR/$(basename "$csv")"
        first="$(sed -n 2p "$csv")"
        if [[ -z "$first" ]]; then continue; fi
        if [[ -s "$target" ]] && grep -qxF -- "$first" "$target"; then
            echo "rows of $csv are already in $target: skipped"
        elif [[ -s "$target" ]]; then
            tail -n +2 "$csv" >>"$target"
            echo "appended $(($(wc -l <"$csv") - 1)) rows to $target"
        else
            cp "$csv" "$target"
            echo "wrote $target"
        fi
    done
}

if [[ -n "$IMPORT_FROM" ]]; then
    mkdir -p "$RESULTS_DIR" "$REPORTS_DIR"
    append_rows "$IMPORT_FROM/results"
    for md in "$IMPORT_FROM"/*_gpu_*.md; do
        [[ -f "$md" ]] || continue
        cp "$md" "$REPORTS_DIR/" && echo "copied $(basename "$md") to $REPORTS_DIR"
    done
    exit 0
fi

# Carried wheels go into $SITE, ahead of the image's own packages, for every step and its subprocesses.
shopt -s nullglob
carried=("$WHEELS"/*.whl)
shopt -u nullglob
if (( ${#carried[@]} )); then
    rm -rf "$SITE"
    "$PY" -m pip install --quiet --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" "${carried[@]}" \
        || { echo "could not install the wheels carried in $WHEELS into $SITE" >&2; exit 1; }
    export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
    echo "installed ${#carried[@]} carried wheel(s) from $WHEELS into $SITE: $(cd "$WHEELS" && ls -- *.whl | tr '\n' ' ')"
fi
BUDGET_S="${BUDGET_S:-480}"
DEADLINE_S="${DEADLINE_S:-560}"
ALL_STEPS="env build tests dense_dpo step_lora_32k step_full_32k step_lora_75k vae dali"
STEPS="${STEPS:-$ALL_STEPS}"
OUT_DIR="${OUT:-$(mktemp -d /tmp/vidpo_gpu.XXXXXX)}"
WORK_DIR="${WORK:-$(mktemp -d /tmp/vidpo_gpu_work.XXXXXX)}"
RUN_RESULTS="$OUT_DIR/results"
LOGS="$WORK_DIR/logs"
mkdir -p "$RUN_RESULTS" "$LOGS" "$RESULTS_DIR" "$REPORTS_DIR"
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
    "$PY $STEP_COMMON $WAN_32K --train lora --repeats 2 --flips ref_lora_off --out $RUN_RESULTS/step.csv --report $WORK_DIR/step_wan1.3b_lora_32k.md"
add_step step_full_32k 50 0 \
    "$PY $STEP_COMMON $WAN_32K --train full --repeats 2 --flips none --dry-run" \
    "$PY $STEP_COMMON $WAN_32K --train full --repeats 2 --flips none --out $RUN_RESULTS/step.csv --report $WORK_DIR/step_wan1.3b_full_32k.md"
add_step step_lora_75k 75 0 \
    "$PY $STEP_COMMON $WAN_75K --train lora --repeats 1 --flips none --no-plain --dry-run" \
    "$PY $STEP_COMMON $WAN_75K --train lora --repeats 1 --flips none --no-plain --out $RUN_RESULTS/step.csv --report $WORK_DIR/step_wan1.3b_lora_75k.md"
add_step vae 35 0 \
    "$PY benchmarks/bench_vae.py --dry-run --device cuda" \
    "$PY benchmarks/bench_vae.py --device cuda --warmup 1 --repeats 2 --out $RUN_RESULTS/vae.csv"
add_step dali 15 0 \
    "$PY benchmarks/bench_decode.py --help >/dev/null" \
    "if $PY -c 'import nvidia.dali, av' 2>/dev/null; then $PY benchmarks/bench_decode.py --quick --providers dali --codecs h264 --sizes 512,1280x720 --gops 16 --frames 64 --out $RUN_RESULTS/decode.csv; else echo 'SKIPPED: nvidia.dali or av is not importable'; fi"

# The Python modules each step imports (dali's are optional: it reports SKIPPED without them).
declare -A REQUIRES=([build]="setuptools torch" [tests]="pytest triton" [dense_dpo]="triton"
                     [step_lora_32k]="diffusers" [step_full_32k]="diffusers" [step_lora_75k]="diffusers"
                     [vae]="diffusers")
# Prints the step's modules that do not import with $PY (nothing when all do).
missing_for() {
    local mods="${REQUIRES[$1]:-}"
    [[ -n "$mods" ]] || return 0
    "$PY" - $mods <<'PYCODE' 2>/dev/null || echo "$mods"
import importlib, sys
missing = []
for name in sys.argv[1:]:
    try:
        importlib.import_module(name)
    except Exception:
        missing.append(name)
print(" ".join(missing))
PYCODE
}
missing_message() {
    echo "needs $1, which $PY cannot import: on a machine with a registry run \`bash benchmarks/run_gpu.sh --fetch-wheels\` (the list is $WHEEL_LIST) and carry $WHEELS"
}

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
        (
            gone="$(missing_for "${NAMES[$i]}")"
            [[ -z "$gone" ]] || { missing_message "$gone"; exit 1; }
            bash -c "${CHECKS[$i]}"
        ) >"$LOGS/${NAMES[$i]}.dry.log" 2>&1 &
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
report="$REPORTS_DIR/${STAMP}_gpu_${device_name}.md"
# The report is rewritten after every step, so a run stopped from outside still leaves one in $OUT.
write_report() {
    {
        echo "# vidpo GPU measurements: $device_name, $STAMP"
        echo
        echo "Produced by \`bash benchmarks/run_gpu.sh\` in $((SECONDS - start_all)) s (budget $BUDGET_S s). Rows: \`benchmarks/results/{dense_dpo,step,vae,decode}.csv\` (this run's timestamps); logs in \`\$OUT/logs.tar.gz\`."
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
        for step_report in "$WORK_DIR"/step_wan*.md; do
            [[ -f "$step_report" ]] || continue
            echo
            echo "## $(basename "$step_report" .md)"
            echo
            sed -e '1d' "$step_report"
        done
    } >"$report"
    cp "$report" "$OUT_DIR/"
    tar -czf "$OUT_DIR/logs.tar.gz.tmp" -C "$WORK_DIR" . && mv "$OUT_DIR/logs.tar.gz.tmp" "$OUT_DIR/logs.tar.gz"
}

status_lines=()
overall=0
md_command() { local c="$1"; printf '%s' "${c//|/\\|}"; }     # a pipe would end the table cell
start_all=$SECONDS
# Every missing import is named up front, before the build and the tests take their minutes.
declare -A MISSING
for i in "${!NAMES[@]}"; do
    selected "${NAMES[$i]}" || continue
    gone="$(missing_for "${NAMES[$i]}")"
    [[ -z "$gone" ]] && continue
    MISSING[${NAMES[$i]}]="$gone"
    echo "WARNING: ${NAMES[$i]} $(missing_message "$gone")" >&2
done
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
    if [[ -n "${MISSING[$name]:-}" ]]; then
        state="FAILED: $(missing_message "${MISSING[$name]}")"
        status_lines+=("| $name | $state | 0 | ${ESTIMATES[$i]} | \`$(md_command "${COMMANDS[$i]}")\` |")
        echo "== $name: $state"
        overall=1
        write_report
        (( CRITICAL[i] )) && { echo "STOPPED: $name cannot run" >&2; break; }
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
append_rows "$RUN_RESULTS"

write_report
echo "report: $report (copy in $OUT_DIR)"
exit $overall
