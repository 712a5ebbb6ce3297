#!/usr/bin/env bash
# Serving on a Slurm allocation: orchestra-serve (or vLLM with engine=vllm) on one GPU node.
# Arguments are Hydra overrides for orchestra-serve.
#
#   sbatch slurm/serve.sh ckpt=runs/sft/A/checkpoints/last.ckpt version=v2 api_keys_file=$HOME/.orchestra/keys
#   sbatch slurm/serve.sh ckpt=exports/llama-sft engine=vllm port=8001
#   ORCHESTRA_ACCELERATOR=cpu sbatch --gpus-per-node=0 slurm/serve.sh ckpt=exports/debug
#
# The server listens on 0.0.0.0 unless host= is given; the address it serves is written to
# ${ORCHESTRA_RUNS:-runs}/.slurm/<job id>.serve (http://<node>:<port>) and logged, so a router's
# versions file (orchestra-route) can point at it. Slurm's time limit ends the job with SIGTERM
# ahead of SIGKILL (--signal): the server stops accepting, lets the requests in flight finish
# (shutdown_grace_s, default 30 s) and exits 0. A node failure requeues the job (--requeue) and
# the server starts again on the new node (the address file is rewritten).
#
# The environment is set up as in slurm/pretrain.sh (slurm/common.sh: ORCHESTRA_HOME,
# ORCHESTRA_ENV_HOOK, ORCHESTRA_VENV, ORCHESTRA_PYTHON); ORCHESTRA_ACCELERATOR=cpu|gpu becomes
# device=cpu|cuda (before the arguments, which win). See docs/serving.md.
#
#SBATCH --job-name=orchestra-serve
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=1
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=TERM@60

set -uo pipefail

# shellcheck source=slurm/common.sh
source "${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" \
    || { echo "cannot find slurm/common.sh: submit from the repository root or set ORCHESTRA_HOME" >&2; exit 2; }

orch_setup_env

ORCH_ARGS=()
case ${ORCHESTRA_ACCELERATOR:-} in
    "") ;;
    gpu | cuda) ORCH_ARGS+=("device=cuda") ;;
    *) ORCH_ARGS+=("device=$ORCHESTRA_ACCELERATOR") ;;
esac
host=0.0.0.0
port=8000
for arg in "$@"; do
    case $arg in
        host=*) host=${arg#host=} ;;
        port=*) port=${arg#port=} ;;
    esac
done
ORCH_ARGS+=("host=$host" "port=$port" "$@")

node=${SLURMD_NODENAME:-$(hostname)}
address_file=${ORCHESTRA_RUNS:-runs}/.slurm/$SLURM_JOB_ID.serve
mkdir -p "$(dirname "$address_file")"
echo "http://$node:$port" >"$address_file"
orch_log "job $SLURM_JOB_ID${SLURM_RESTART_COUNT:+ (restart $SLURM_RESTART_COUNT)}: serving on http://$node:$port/v1 (address in $address_file)"
orch_log "command: $ORCH_PYTHON -m orchestra.cli.serve ${ORCH_ARGS[*]}"

# The server runs in the background so this shell can pass Slurm's SIGTERM on and wait for the
# drain (bash defers traps while a foreground child runs).
"$ORCH_PYTHON" -m orchestra.cli.serve "${ORCH_ARGS[@]}" &
server=$!
trap 'orch_log "SIGTERM: draining the server"; kill -TERM "$server" 2>/dev/null' TERM
wait "$server"
rc=$?
if ((rc > 128)); then  # wait was interrupted by the trap: wait for the server itself
    wait "$server"
    rc=$?
fi
rm -f "$address_file"
if ((rc == 0)); then
    orch_log "server stopped"
else
    orch_log "error: server exited with code $rc (see above)"
fi
exit "$rc"
