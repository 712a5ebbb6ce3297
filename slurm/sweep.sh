#!/usr/bin/env bash
# Hyperparameter search on a Slurm cluster: an array of workers sharing one Optuna study.
# Arguments are orchestra-train's Hydra overrides (a study: sweep=<name>, conf/sweep/), plus
# workers=N (read here, not by Hydra).
#
#   sbatch slurm/sweep.sh sweep=lr workers=4                        # submits a 4-element array
#   sbatch slurm/sweep.sh sweep=arch workers=8 hydra.sweeper.n_trials=64 hydra.sweeper.dir=/shared/sweeps/arch
#   sbatch --array=0-3 slurm/sweep.sh sweep=lr                       # the same, the array given directly
#   ORCHESTRA_ACCELERATOR=cpu sbatch --gpus-per-node=0 slurm/sweep.sh sweep=lr workers=2
#
# Submitted with workers=N and no --array, this first job only submits the array: N elements
# with this job's CPUs, GPUs, tasks, nodes, partition and time limit, logs beside this job's as
# <job name>-<array id>_<element>.out. Each element is a worker: it runs `orchestra-sweep` (the
# same loop as `orchestra-train -m`), asking the study for a trial, training it as a full
# orchestra-train on the element's allocation (srun over its ranks when it has more than one:
# any strategy, multi-GPU trials), telling the study the result, until the study has n_trials.
# The study's storage (a journal file, by default <hydra.sweeper.dir>/study.journal) must be on
# a filesystem every node sees; the workers share it through its lock.
#
# Requeue-safe: a requeued element (preemption, node failure) starts again, fails the trial it
# was running and queues it again with the same parameters (Optuna's retry), and goes on. The
# exit code is orchestra-sweep's: 0 when the study is done, 1 a Hydra error, 2 an invalid sweep
# (a search space that does not parse, a key the schema lacks, an unreadable storage). See
# docs/sweeps.md.
#
#SBATCH --job-name=orchestra-sweep
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%A_%a.out
#SBATCH --open-mode=append
#SBATCH --requeue

set -uo pipefail

# shellcheck source=slurm/common.sh
source "${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" \
    || { echo "cannot find slurm/common.sh: submit from the repository root or set ORCHESTRA_HOME" >&2; exit 2; }

orch_sweep_fail() { orch_log "error: $*"; exit 2; }

workers=1
ORCH_PASS=()
for arg in "$@"; do
    case $arg in
        workers=*) workers=${arg#workers=} ;;
        *) ORCH_PASS+=("$arg") ;;
    esac
done
[[ $workers =~ ^[1-9][0-9]*$ ]] || orch_sweep_fail "workers=$workers: give a positive number of workers"

orch_setup_env

if [[ -z ${SLURM_ARRAY_TASK_ID:-} ]] && ((workers > 1)); then
    # Not an array yet: submit one of `workers` elements with this job's resources, then stop.
    limit=$(squeue -h -j "$SLURM_JOB_ID" -o %l 2>/dev/null)
    stdout=$(scontrol show job -o "$SLURM_JOB_ID" 2>/dev/null | sed -n 's/.*StdOut=\([^ ]*\).*/\1/p')
    logs=$(dirname "${stdout:-$ORCHESTRA_HOME/x}")
    submit=(sbatch --parsable --array="0-$((workers - 1))" --job-name="${SLURM_JOB_NAME:-orchestra-sweep}"
            --nodes="${SLURM_JOB_NUM_NODES:-1}" --ntasks-per-node="${SLURM_NTASKS_PER_NODE:-1}"
            --cpus-per-task="${SLURM_CPUS_PER_TASK:-1}" --gpus-per-node="${SLURM_GPUS_PER_NODE:-0}"
            --output="$logs/%x-%A_%a.out" --export=ALL)
    [[ -n ${SLURM_JOB_PARTITION:-} ]] && submit+=(--partition="$SLURM_JOB_PARTITION")
    [[ -n $limit && $limit != UNLIMITED ]] && submit+=(--time="$limit")
    array=$("${submit[@]}" "$ORCHESTRA_HOME/slurm/sweep.sh" "${ORCH_PASS[@]}") \
        || orch_sweep_fail "could not submit the array of $workers workers"
    orch_log "submitted $workers workers as array ${array%%;*}; their logs: $logs/${SLURM_JOB_NAME:-orchestra-sweep}-${array%%;*}_<i>.out"
    exit 0
fi

orch_setup_rendezvous
ORCH_ARGS=("trainer.num_nodes=$ORCH_NUM_NODES" "trainer.devices=$ORCH_DEVICES"
           "trainer.preempt_signal=${ORCHESTRA_PREEMPT_SIGNAL:-USR1}")
[[ -n ${ORCHESTRA_ACCELERATOR:-} ]] && ORCH_ARGS+=("trainer.accelerator=$ORCHESTRA_ACCELERATOR")
named=0
for arg in "${ORCH_PASS[@]}"; do [[ $arg == strategy=* || $arg == hydra.sweeper.launcher=* ]] && named=1; done
if ((ORCH_NUM_NODES * ORCH_DEVICES > 1 && named == 0)); then
    # A trial spans the element's ranks: each is an srun step over them.
    ORCH_ARGS+=("strategy=${ORCHESTRA_STRATEGY:-ddp}" "hydra.sweeper.launcher=[srun,--kill-on-bad-exit=1]")
fi
ORCH_ARGS+=("${ORCH_PASS[@]}")

orch_log "worker ${SLURM_ARRAY_TASK_ID:-0} of job ${SLURM_ARRAY_JOB_ID:-$SLURM_JOB_ID} (restart ${SLURM_RESTART_COUNT:-0}): $ORCH_NUM_NODES node(s) x $ORCH_DEVICES rank(s)"
orch_log "command: $ORCH_PYTHON -m orchestra.cli.sweep ${ORCH_ARGS[*]}"
"$ORCH_PYTHON" -m orchestra.cli.sweep "${ORCH_ARGS[@]}"
rc=$?
if ((rc == 0)); then
    orch_log "worker done: the study has its trials"
else
    orch_log "error: orchestra-sweep failed with exit code $rc (see above)"
fi
exit "$rc"
