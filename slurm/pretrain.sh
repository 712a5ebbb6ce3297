#!/usr/bin/env bash
# Pretraining on a Slurm allocation; arguments are Hydra overrides for orchestra-train.
#
#   sbatch slurm/pretrain.sh model=llama-1b strategy=fsdp trainer.global_batch_size=256
#   sbatch --nodes=4 --time=2-00:00:00 slurm/pretrain.sh model=llama-1b strategy=fsdp trainer.global_batch_size=512
#   ORCHESTRA_ACCELERATOR=cpu sbatch --gpus-per-node=0 --ntasks-per-node=1 slurm/pretrain.sh experiment=debug
#
# Every #SBATCH line below is a default: options on the sbatch command line win. One rank per
# GPU (ntasks-per-node = gpus-per-node). On USR1 (sent --signal lead seconds before the time
# limit or a preemption) or TERM, every rank checkpoints at its next step and the job requeues
# itself; it resumes in the same run dir (named after the job id). Before any rank starts,
# orchestra-plan sizes the job and refuses a layout certain to run out of GPU memory, naming the
# fix (ORCHESTRA_SKIP_PLAN=1 submits anyway). See docs/slurm.md and docs/scaling.md.
#
#SBATCH --job-name=orchestra-pretrain
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -uo pipefail  # no -e: the exit status of the training step is examined, not fatal

# sbatch runs a copy of this file from Slurm's spool directory: find the helper in the repository.
# shellcheck source=slurm/common.sh
source "${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" \
    || { echo "cannot find slurm/common.sh: submit from the repository root or set ORCHESTRA_HOME" >&2; exit 2; }

orch_setup_env
orch_setup_rendezvous
orch_setup_run_id
orch_hydra_args "$@"
orch_plan_check  # refuses a layout certain to run out of GPU memory (ORCHESTRA_SKIP_PLAN=1 skips it)
# --kill-on-bad-exit: one rank that dies must not leave the others waiting in a collective.
orch_run_step srun --kill-on-bad-exit=1 "$ORCH_PYTHON" -m orchestra.cli.train "${ORCH_ARGS[@]}"
