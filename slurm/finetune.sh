#!/usr/bin/env bash
# Fine-tuning on a Slurm allocation; arguments are Hydra overrides for orchestra-train.
#
#   sbatch slurm/finetune.sh task=sft finetune=lora model=hf model.path=/models/my-llama trainer.global_batch_size=64
#   sbatch slurm/finetune.sh task=classification finetune=full trainer.global_batch_size=64 \
#       finetune.init_from=runs/pretrain/123/checkpoints/last.ckpt
#   sbatch --nodes=2 slurm/finetune.sh task=dpo finetune=full model=hf model.path=/models/my-llama strategy=fsdp \
#       trainer.global_batch_size=128
#   ORCHESTRA_ACCELERATOR=cpu sbatch --gpus-per-node=0 --ntasks-per-node=1 slurm/finetune.sh task=sft finetune=lora ...
#
# The global batch must split over the ranks (8 per node by default): trainer.global_batch_size is
# a multiple of trainer.micro_batch_size x ranks.
#
# The same job mechanics as slurm/pretrain.sh (one rank per GPU, USR1/TERM -> checkpoint at the
# next step and requeue, run dir named after the job id, see docs/slurm.md); only the defaults
# differ: a fine-tune usually fits one node and a shorter time limit. The base model must be on a
# filesystem every node reads (finetune.init_from or model.path); the job stops with exit code 2
# and one message naming the key when it is missing. See docs/finetune.md.
#
#SBATCH --job-name=orchestra-finetune
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=8
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=8
#SBATCH --time=08:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue
#SBATCH --signal=B:USR1@300

set -uo pipefail  # no -e: the exit status of the training step is examined, not fatal

# shellcheck source=slurm/common.sh
source "${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" \
    || { echo "cannot find slurm/common.sh: submit from the repository root or set ORCHESTRA_HOME" >&2; exit 2; }

orch_setup_env
orch_setup_rendezvous
orch_setup_run_id
orch_hydra_args "$@"
orch_run_step srun --kill-on-bad-exit=1 "$ORCH_PYTHON" -m orchestra.cli.train "${ORCH_ARGS[@]}"
