# Shared by slurm/*.sh (sourced, not run): environment, rendezvous, one srun step, requeue.
#
# Environment variables a user may set (sbatch exports the submitting shell's environment):
#   ORCHESTRA_HOME          repository to run from (default: the directory sbatch was called in)
#   ORCHESTRA_ENV_HOOK      shell code run first, e.g. 'module load cuda/12.4; conda activate orchestra'
#   ORCHESTRA_VENV          virtual environment to activate (default: $ORCHESTRA_HOME/.venv if present)
#   ORCHESTRA_PYTHON        interpreter (default: python from the activated environment)
#   ORCHESTRA_ACCELERATOR   passed as trainer.accelerator (e.g. cpu on nodes without GPUs)
#   ORCHESTRA_STRATEGY      strategy used on more than one rank when the arguments name none (ddp)
#   ORCHESTRA_PREEMPT_SIGNAL signal forwarded to the ranks on a warning (USR1; match --signal)
#   ORCHESTRA_MAX_REQUEUES  stop requeueing after this many restarts (default 50)
#   ORCHESTRA_RUNS          where run dirs go (default runs/ under ORCHESTRA_HOME); on a shared filesystem
#   ORCHESTRA_JOB_ID        set here: <cluster>-<job id>-<first start time>, the run dir's name
#   ORCHESTRA_PREEMPT_MARKER file the ranks write once the preemption checkpoint is saved
#                           (default $ORCHESTRA_RUNS/.slurm/<job id>.preempted)
#
# Exit codes of the training command (orchestra/cli/train.py, orchestra/train/callbacks/preemption.py):
#   0 done; 1 Hydra error (e.g. a mistyped override); 2 invalid config/data/checkpoint;
#   3 preempted: a checkpoint was saved, requeue me;
#   4 interrupted: a stop signal went unanswered or a collective timed out (orchestra/train/watchdog.py),
#     requeue me (the job resumes from its newest periodic checkpoint);
#   5 the loss guard stopped a diverging run (orchestra/train/callbacks/loss_guard.py): not requeued,
#     training again would diverge again; guard.json in the run dir says where and why.

ORCH_PREEMPTED_EXIT_CODE=3
ORCH_INTERRUPTED_EXIT_CODE=4

orch_log() { echo "[orchestra-slurm $(date +%H:%M:%S)] $*"; }

# Repository, environment, threads.
orch_setup_env() {
    ORCHESTRA_HOME=${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}
    cd "$ORCHESTRA_HOME" || { orch_log "error: ORCHESTRA_HOME=$ORCHESTRA_HOME does not exist"; exit 2; }
    if [[ -n ${ORCHESTRA_ENV_HOOK:-} ]]; then
        eval "$ORCHESTRA_ENV_HOOK" || { orch_log "error: ORCHESTRA_ENV_HOOK failed: $ORCHESTRA_ENV_HOOK"; exit 2; }
    fi
    local venv=${ORCHESTRA_VENV:-}
    [[ -z $venv && -z ${ORCHESTRA_ENV_HOOK:-} && -f $ORCHESTRA_HOME/.venv/bin/activate ]] && venv=$ORCHESTRA_HOME/.venv
    if [[ -n $venv ]]; then
        # shellcheck disable=SC1091
        source "$venv/bin/activate" || { orch_log "error: cannot activate ORCHESTRA_VENV=$venv"; exit 2; }
    fi
    ORCH_PYTHON=${ORCHESTRA_PYTHON:-python}
    # One rank per device: give each its cores, not every core of the node.
    export OMP_NUM_THREADS=${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}
    export PYTHONUNBUFFERED=1
}

# The job's run id, the same across its requeues, never shared with another job: job ids repeat
# (a cluster whose state was reset, two clusters on one filesystem), so a first start adds the
# cluster's name and the time; a requeue reads back what its first start wrote.
orch_setup_run_id() {
    local key="${SLURM_CLUSTER_NAME:-cluster}-$SLURM_JOB_ID"
    local file="${ORCHESTRA_RUNS:-runs}/.slurm/$key.run-id"
    mkdir -p "$(dirname "$file")"
    if ((${SLURM_RESTART_COUNT:-0} == 0)) || [[ ! -s $file ]]; then
        echo "$key-$(date +%Y%m%d-%H%M%S)" >"$file.tmp.$$" && mv "$file.tmp.$$" "$file"
    fi
    ORCHESTRA_JOB_ID=$(<"$file")
    export ORCHESTRA_JOB_ID
}

# MASTER_ADDR/PORT, node and device counts from the allocation.
orch_setup_rendezvous() {
    MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
    # Unique per job: two jobs sharing a node must not race for one port.
    MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 40000))}
    export MASTER_ADDR MASTER_PORT
    ORCH_NUM_NODES=${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}
    # "4" or "4(x2)": ranks per node; one rank drives one device.
    local per_node=${SLURM_NTASKS_PER_NODE:-${SLURM_TASKS_PER_NODE:-1}}
    ORCH_DEVICES=${per_node%%(*}
    ORCH_DEVICES=${ORCH_DEVICES%%,*}
}

# The Hydra arguments: allocation-derived values first, so the user's own arguments win.
orch_hydra_args() {
    ORCH_ARGS=("trainer.num_nodes=$ORCH_NUM_NODES" "trainer.devices=$ORCH_DEVICES"
               "trainer.preempt_signal=${ORCHESTRA_PREEMPT_SIGNAL:-USR1}")
    [[ -n ${ORCHESTRA_ACCELERATOR:-} ]] && ORCH_ARGS+=("trainer.accelerator=$ORCHESTRA_ACCELERATOR")
    local arg named=0
    for arg in "$@"; do [[ $arg == strategy=* ]] && named=1; done
    if ((named == 0 && ORCH_NUM_NODES * ORCH_DEVICES > 1)); then
        ORCH_ARGS+=("strategy=${ORCHESTRA_STRATEGY:-ddp}")
    fi
    ORCH_ARGS+=("$@")
}

# orchestra-plan on the job's own overrides before any rank starts: a layout certain to run out
# of GPU memory (over ORCHESTRA_PLAN_FAIL_ABOVE x the GPU's, default 1.1) is refused here with
# the fix to try, not after minutes of start-up. The GPU is ORCHESTRA_PLAN_GPU (a key of
# `orchestra-plan`'s table), else the batch node's own (nvidia-smi). Skipped on CPU jobs (unless
# ORCHESTRA_PLAN_GPU names a GPU) and with ORCHESTRA_SKIP_PLAN=1. A plan that cannot be made
# (no GPU found, a config error the training step will report itself) only warns.
orch_plan_check() {
    [[ ${ORCHESTRA_SKIP_PLAN:-0} == 1 ]] && return 0
    local arg cpu=0
    for arg in "${ORCH_ARGS[@]}"; do [[ $arg == trainer.accelerator=cpu ]] && cpu=1; done
    if ((cpu == 1)) && [[ -z ${ORCHESTRA_PLAN_GPU:-} ]]; then return 0; fi
    local rc=0
    "$ORCH_PYTHON" -m orchestra.cli.plan "${ORCH_ARGS[@]}" "plan.gpu=${ORCHESTRA_PLAN_GPU:-auto}" \
        "plan.fail_above=${ORCHESTRA_PLAN_FAIL_ABOVE:-1.1}" || rc=$?
    if ((rc == 7)); then
        orch_log "error: orchestra-plan: this layout runs out of GPU memory (see above); not starting, not requeueing"
        exit 2
    elif ((rc != 0)); then
        orch_log "warning: orchestra-plan could not plan this job (exit $rc); starting it anyway"
    fi
    return 0
}

# A warning signal (preemption, time limit) reaches the batch shell: pass it to every rank,
# which checkpoint at their next step boundary and exit with ORCH_PREEMPTED_EXIT_CODE.
_orch_on_signal() {
    ORCH_SIGNALLED=$1
    [[ -n ${ORCH_REQUEUEING:-} ]] && return 0  # scontrol requeue's own SIGTERM
    local fwd=${ORCHESTRA_PREEMPT_SIGNAL:-USR1}
    orch_log "received SIG$1: asking every rank (SIG$fwd) to checkpoint at the next step"
    scancel --signal="$fwd" "$SLURM_JOB_ID" 2>/dev/null \
        || { [[ -n ${ORCH_STEP_PID:-} ]] && kill -s "$fwd" "$ORCH_STEP_PID" 2>/dev/null; } || true
}

# Run "$@" (the srun command line) in the background so traps run, wait for it, then requeue
# or exit with its status.
orch_run_step() {
    ORCH_SIGNALLED=
    ORCH_REQUEUEING=
    ORCHESTRA_PREEMPT_MARKER=${ORCHESTRA_PREEMPT_MARKER:-${ORCHESTRA_RUNS:-runs}/.slurm/$SLURM_JOB_ID.preempted}
    # Written by a rank that failed for a reason a requeue cannot fix (orchestra/cli/train.py).
    ORCHESTRA_FAIL_MARKER=${ORCHESTRA_FAIL_MARKER:-${ORCHESTRA_RUNS:-runs}/.slurm/$SLURM_JOB_ID.failed}
    export ORCHESTRA_PREEMPT_MARKER ORCHESTRA_FAIL_MARKER
    mkdir -p "$(dirname "$ORCHESTRA_PREEMPT_MARKER")" "$(dirname "$ORCHESTRA_FAIL_MARKER")"
    rm -f "$ORCHESTRA_PREEMPT_MARKER" "$ORCHESTRA_FAIL_MARKER"
    trap '_orch_on_signal USR1' USR1
    trap '_orch_on_signal USR2' USR2
    trap '_orch_on_signal TERM' TERM

    orch_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} (run id ${ORCHESTRA_JOB_ID:-none}): $ORCH_NUM_NODES node(s) x $ORCH_DEVICES rank(s), MASTER_ADDR=$MASTER_ADDR MASTER_PORT=$MASTER_PORT"
    orch_log "command: $*"
    "$@" &
    ORCH_STEP_PID=$!
    local rc
    while :; do
        wait "$ORCH_STEP_PID"
        rc=$?
        # wait returns early (status > 128) when a trapped signal arrives; wait again.
        if ((rc > 128)) && kill -0 "$ORCH_STEP_PID" 2>/dev/null; then continue; fi
        break
    done
    orch_decide "$rc"
}

orch_requeue() {
    local max=${ORCHESTRA_MAX_REQUEUES:-50}
    if ((${SLURM_RESTART_COUNT:-0} >= max)); then
        orch_log "error: $1, but the job was already requeued ${SLURM_RESTART_COUNT} times (ORCHESTRA_MAX_REQUEUES=$max); not requeueing"
        exit 1
    fi
    orch_log "$1: requeueing job $SLURM_JOB_ID (it resumes from the newest checkpoint in its run dir)"
    ORCH_REQUEUEING=1
    # Sends SIGTERM to this shell at once (trapped above); the checkpoint is already on disk.
    scontrol requeue "$SLURM_JOB_ID" || { orch_log "error: scontrol requeue failed"; exit 1; }
    exit 0
}

orch_decide() {
    local rc=$1
    if ((rc == ORCH_PREEMPTED_EXIT_CODE)) || [[ -f $ORCHESTRA_PREEMPT_MARKER ]]; then
        orch_log "training stopped for preemption after saving a checkpoint ($(cat "$ORCHESTRA_PREEMPT_MARKER" 2>/dev/null))"
        rm -f "$ORCHESTRA_PREEMPT_MARKER"
        orch_requeue "preempted"
    elif ((rc == ORCH_INTERRUPTED_EXIT_CODE)); then
        # A rank was stuck (a stop signal went unanswered) or a collective timed out: the
        # periodic checkpoints are what the requeued job resumes from.
        orch_log "training interrupted (exit code $rc: a stuck rank or a collective timeout, see above)"
        orch_requeue "interrupted"
    elif ((rc == 0)); then
        orch_log "training finished"
        exit 0
    elif [[ -f $ORCHESTRA_FAIL_MARKER ]]; then
        # A rank failed for a reason a requeue cannot fix; srun may report the others' SIGTERM (143).
        local code
        code=$(sed -n 's/.*"exit_code": *\([0-9]*\).*/\1/p' "$ORCHESTRA_FAIL_MARKER")
        orch_log "error: training failed with exit code ${code:-$rc} on a rank ($(cat "$ORCHESTRA_FAIL_MARKER")); not requeueing"
        exit "${code:-$rc}"
    elif ((rc == 1 || rc == 2)); then
        # A bad override, config, corpus or checkpoint: a requeue would fail the same way.
        orch_log "error: training failed with exit code $rc (configuration or data error, see above); not requeueing"
        exit "$rc"
    elif ((rc == 5)); then
        orch_log "error: the loss guard stopped the run (see guard.json in the run dir); not requeueing"
        exit "$rc"
    elif ((rc > 128)); then
        # A rank was killed by a signal (the OOM killer, a node agent, a user) before it could
        # checkpoint, and srun ended the others: the periodic checkpoints are what the requeued
        # job resumes from. A failure of our own would have left the marker above.
        orch_log "training ended with exit code $rc (a rank was killed by signal $((rc - 128)))"
        orch_requeue "killed"
    elif [[ -n $ORCH_SIGNALLED ]]; then
        # Signalled before a checkpoint could be agreed (e.g. still starting up): the periodic
        # checkpoints are what the requeued job resumes from.
        orch_log "training ended with exit code $rc after SIG$ORCH_SIGNALLED without a preemption checkpoint"
        orch_requeue "interrupted"
    else
        orch_log "error: training failed with exit code $rc; not requeueing"
        exit "$rc"
    fi
}
