#!/usr/bin/env bash
# Evaluation on a Slurm allocation: orchestra-eval on one checkpoint per array element (or per task).
# Arguments are Hydra overrides for orchestra-eval, plus ckpts=a,b,... (read here, not by Hydra).
#
#   sbatch --array=0-2 slurm/eval.sh ckpts=runs/tiny/A/checkpoints/last.ckpt,runs/tiny/B/checkpoints/last.ckpt,exports/C \
#       tasks=[perplexity,classification] out=eval/sweep
#   sbatch --array=0-1 slurm/eval.sh ckpt=runs/tiny/A/checkpoints/last.ckpt tasks=[perplexity,generation]
#   sbatch slurm/eval.sh ckpt=runs/tiny/A/checkpoints/last.ckpt tasks=[perplexity] limit=100
#   ORCHESTRA_ACCELERATOR=cpu sbatch --gpus-per-node=0 slurm/eval.sh ckpt=... tasks=[perplexity]
#
# Which element runs what (SLURM_ARRAY_TASK_ID = i):
#   ckpts= names two or more models: element i evaluates ckpts[i] on all of tasks;
#   one model (ckpt=X, or ckpts=X) and several tasks: element i runs tasks[i] alone on X;
#   no --array: one orchestra-eval of ckpt on all of tasks (several ckpts need --array).
#   An index past the end of the list fails that element with exit code 2.
# Results: out=D given -> D/<i> in an array, D without one. No out= -> orchestra-eval's default
#   (<run dir>/eval/<checkpoint name>), plus /<task> per task in the per-task mode so the
#   elements do not write into one folder.
# Every other argument goes to each element unchanged. The exit code of orchestra-eval is the
# job's (0 done, 1 Hydra error such as an unknown key, 2 invalid config/data/checkpoint).
#
# The environment is set up as in slurm/pretrain.sh (slurm/common.sh: ORCHESTRA_HOME,
# ORCHESTRA_ENV_HOOK, ORCHESTRA_VENV, ORCHESTRA_PYTHON; MASTER_ADDR/PORT from the allocation);
# ORCHESTRA_ACCELERATOR=cpu|gpu becomes device=cpu|cuda (before the arguments, which win).
# Each rank gets RANK/WORLD_SIZE/LOCAL_RANK, so --ntasks-per-node>1 or --nodes>1 shards every
# task's examples over the ranks (one GPU each). An element holds no state to resume: a job
# requeued by Slurm (node failure) evaluates again from the start. The log is %x-%j.out, %j
# being each element's own job id (its first line names the array and the element);
# sbatch --output=%x-%A_%a.out names the logs by array id and index instead. See docs/slurm.md.
#
#SBATCH --job-name=orchestra-eval
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=04:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue

set -uo pipefail  # no -e: the exit status of the evaluation step is examined, not fatal

# shellcheck source=slurm/common.sh
source "${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" \
    || { echo "cannot find slurm/common.sh: submit from the repository root or set ORCHESTRA_HOME" >&2; exit 2; }

orch_eval_fail() { orch_log "error: $*"; exit 2; }

# "[a, b]" / "a,b" / "'a'" -> one item a line in ORCH_ITEMS (empty items dropped).
orch_eval_split() {
    local list=$1 item
    list=${list#\[}
    list=${list%\]}
    ORCH_ITEMS=()
    local IFS=,
    for item in $list; do
        item=${item#"${item%%[![:space:]]*}"}
        item=${item%"${item##*[![:space:]]}"}
        item=${item#[\"\']}
        item=${item%[\"\']}
        [[ -n $item ]] && ORCH_ITEMS+=("$item")
    done
}

# orchestra-eval's default out (orchestra/cli/eval.py default_out): <run dir>/eval/<stem> for a
# checkpoint in a run dir's checkpoints/, else eval/<stem>.
orch_eval_default_out() {
    local path=${1%/} name parent stem
    name=${path##*/}
    stem=$name
    [[ $name == ?*.* ]] && stem=${name%.*}
    parent=$(dirname "$path")
    if [[ $(basename "$parent") == checkpoints ]]; then
        echo "$(dirname "$parent")/eval/$stem"
    else
        echo "eval/${stem:-model}"
    fi
}

orch_eval_select() {
    local ckpts='' ckpt='' tasks='' out='' have_tasks=0 arg
    ORCH_PASS=()
    for arg in "$@"; do
        case $arg in
            ckpts=*) ckpts=${arg#ckpts=} ;;
            ckpt=*) ckpt=${arg#ckpt=} ;;
            tasks=*) tasks=${arg#tasks=}; have_tasks=1 ;;
            out=*) out=${arg#out=} ;;
            *) ORCH_PASS+=("$arg") ;;
        esac
    done
    [[ -n $ckpts && -n $ckpt ]] && orch_eval_fail "give either ckpt=X or ckpts=a,b,..., not both"
    local models=()
    if [[ -n $ckpts ]]; then
        orch_eval_split "$ckpts"
        models=("${ORCH_ITEMS[@]}")
        ((${#models[@]} > 0)) || orch_eval_fail "ckpts=$ckpts names no checkpoint"
    elif [[ -n $ckpt ]]; then
        models=("$ckpt")
    else
        orch_eval_fail "give the model(s) to evaluate: ckpt=X, or ckpts=a,b,... with --array=0-<n-1>"
    fi
    local task_list=()
    if ((have_tasks)); then
        orch_eval_split "$tasks"
        task_list=("${ORCH_ITEMS[@]}")
    fi

    local index=${SLURM_ARRAY_TASK_ID:-}
    ORCH_EVAL_TASKS=
    if [[ -z $index ]]; then
        ((${#models[@]} == 1)) \
            || orch_eval_fail "ckpts= names ${#models[@]} checkpoints: submit with sbatch --array=0-$((${#models[@]} - 1)) (one element per checkpoint)"
        ORCH_EVAL_MODE=single
        ORCH_EVAL_CKPT=${models[0]}
        ORCH_EVAL_OUT=$out
        ((have_tasks)) && ORCH_EVAL_TASKS=$tasks
    elif ((${#models[@]} > 1)); then
        ORCH_EVAL_MODE="checkpoint $index of ${#models[@]}"
        ((index < ${#models[@]})) \
            || orch_eval_fail "array index $index, but ckpts= names ${#models[@]} checkpoints (indices 0-$((${#models[@]} - 1)))"
        ORCH_EVAL_CKPT=${models[index]}
        ORCH_EVAL_OUT=${out:+${out%/}/$index}
        ((have_tasks)) && ORCH_EVAL_TASKS=$tasks
    elif ((${#task_list[@]} > 1)); then
        ORCH_EVAL_MODE="task $index of ${#task_list[@]}"
        ((index < ${#task_list[@]})) \
            || orch_eval_fail "array index $index, but tasks= names ${#task_list[@]} tasks (indices 0-$((${#task_list[@]} - 1)))"
        ORCH_EVAL_CKPT=${models[0]}
        ORCH_EVAL_TASKS="[${task_list[index]}]"
        if [[ -n $out ]]; then
            ORCH_EVAL_OUT=${out%/}/$index
        else
            ORCH_EVAL_OUT=$(orch_eval_default_out "$ORCH_EVAL_CKPT")/${task_list[index]}
        fi
    else
        ORCH_EVAL_MODE="checkpoint $index of 1"
        ((index == 0)) \
            || orch_eval_fail "array index $index, but there is one checkpoint and at most one task (index 0 only)"
        ORCH_EVAL_CKPT=${models[0]}
        ORCH_EVAL_OUT=${out:+${out%/}/$index}
        ((have_tasks)) && ORCH_EVAL_TASKS=$tasks
    fi
}

orch_setup_env
orch_setup_rendezvous
orch_eval_select "$@"

ORCH_ARGS=()
case ${ORCHESTRA_ACCELERATOR:-} in
    "") ;;
    gpu | cuda) ORCH_ARGS+=("device=cuda") ;;
    *) ORCH_ARGS+=("device=$ORCHESTRA_ACCELERATOR") ;;
esac
ORCH_ARGS+=("ckpt=$ORCH_EVAL_CKPT")
[[ -n $ORCH_EVAL_TASKS ]] && ORCH_ARGS+=("tasks=$ORCH_EVAL_TASKS")
[[ -n $ORCH_EVAL_OUT ]] && ORCH_ARGS+=("out=$ORCH_EVAL_OUT")
ORCH_ARGS+=("${ORCH_PASS[@]}")

# A rank that fails writes its exit code here (first one wins): srun reports the others, killed
# by --kill-on-bad-exit, with a signal's status.
ORCH_EVAL_RC_FILE=${ORCHESTRA_RUNS:-runs}/.slurm/$SLURM_JOB_ID.eval-rc
mkdir -p "$(dirname "$ORCH_EVAL_RC_FILE")" && rm -f "$ORCH_EVAL_RC_FILE"
export ORCH_EVAL_RC_FILE

# One process group over the job's ranks (orchestra-eval reads torchrun's variables).
# shellcheck disable=SC2016  # expanded by each rank's shell
ORCH_RANK_SHELL='export RANK=$SLURM_PROCID LOCAL_RANK=$SLURM_LOCALID WORLD_SIZE=${SLURM_NTASKS:-${SLURM_NPROCS:-1}}
echo "[orchestra-slurm] rank $RANK/$WORLD_SIZE (local rank $LOCAL_RANK) on ${SLURMD_NODENAME:-$(hostname)}"
"$0" -m orchestra.cli.eval "$@"
rc=$?
if ((rc != 0)); then (set -C; echo "$rc" >"$ORCH_EVAL_RC_FILE") 2>/dev/null; fi
exit "$rc"'

orch_log "job $SLURM_JOB_ID${SLURM_ARRAY_JOB_ID:+ (array $SLURM_ARRAY_JOB_ID, element $SLURM_ARRAY_TASK_ID)}: $ORCH_EVAL_MODE: $ORCH_NUM_NODES node(s) x $ORCH_DEVICES rank(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
orch_log "command: srun $ORCH_PYTHON -m orchestra.cli.eval ${ORCH_ARGS[*]}"
srun --kill-on-bad-exit=1 bash -c "$ORCH_RANK_SHELL" "$ORCH_PYTHON" "${ORCH_ARGS[@]}"
rc=$?
if ((rc != 0)) && [[ -s $ORCH_EVAL_RC_FILE ]]; then
    rc=$(<"$ORCH_EVAL_RC_FILE")
fi
rm -f "$ORCH_EVAL_RC_FILE"
if ((rc == 0)); then
    orch_log "evaluation finished"
else
    orch_log "error: evaluation failed with exit code $rc (see above)"
fi
exit "$rc"
