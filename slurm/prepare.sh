#!/usr/bin/env bash
# Data preparation on a Slurm cluster: orchestra-prepare with data.pipeline.executor=slurm.
# Arguments are Hydra overrides for orchestra-prepare.
#
#   sbatch slurm/prepare.sh data=files data.paths='[/shared/crawl/*.jsonl.zst]' data/pipeline=web \
#       data.cache_dir=/shared/data data.name=crawl data.pipeline.tasks=64 data.pipeline.workers=32
#   sbatch slurm/prepare.sh data/pipeline=books data.pipeline.slurm.partition=cpu \
#       data.pipeline.slurm.sbatch_args='{account: myproject}'
#
# This job is the driver: it reads the sources into data.cache_dir (ingest), submits every stage
# as a job array of data.pipeline.tasks elements (data.pipeline.workers running at once), each
# array waiting on the ones before it with --dependency=afterok, and waits for them; then it
# trains the tokenizer and packs the kept documents here. data.cache_dir must be on a filesystem
# every node sees.
#
# Requeue-safe: the stages work in <cache_dir>/.<name>.pipeline-<key>/, and every task writes a
# completion marker when done. Submitted again (or requeued by Slurm) with the same arguments,
# the driver first waits for arrays of its earlier submission that are still queued or running
# (their ids are in slurm-jobs.json there), then submits only the tasks that did not complete.
# A stage that fails stops the arrays waiting on it; the driver exits with code 2 naming the
# stage and its Slurm logs (<work>/logs/<stage>/slurm/<array>_<element>.out).
#
# The environment is set up as in slurm/pretrain.sh (slurm/common.sh: ORCHESTRA_HOME,
# ORCHESTRA_ENV_HOOK, ORCHESTRA_VENV, ORCHESTRA_PYTHON); the arrays inherit it. Exit codes are
# orchestra-prepare's: 0 done, 1 Hydra error (e.g. an unknown key), 2 invalid config or data, or
# a stage that failed. See docs/data.md.
#
#SBATCH --job-name=orchestra-prepare
#SBATCH --nodes=1
#SBATCH --ntasks=1
#SBATCH --cpus-per-task=4
#SBATCH --time=24:00:00
#SBATCH --output=%x-%j.out
#SBATCH --open-mode=append
#SBATCH --requeue

set -uo pipefail

# shellcheck source=slurm/common.sh
source "${ORCHESTRA_HOME:-${SLURM_SUBMIT_DIR:-$PWD}}/slurm/common.sh" \
    || { echo "cannot find slurm/common.sh: submit from the repository root or set ORCHESTRA_HOME" >&2; exit 2; }

orch_setup_env
# The driver tokenizes with the job's CPUs; the arrays set their own.
export OMP_NUM_THREADS=${SLURM_CPUS_PER_TASK:-1}
args=("data.pipeline.executor=slurm" "data.tokenize_workers=${SLURM_CPUS_PER_TASK:-1}" "$@")
orch_log "job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0}: $ORCH_PYTHON -m orchestra.cli.prepare ${args[*]}"
"$ORCH_PYTHON" -m orchestra.cli.prepare "${args[@]}"
rc=$?
if ((rc == 0)); then
    orch_log "dataset prepared"
else
    orch_log "error: orchestra-prepare failed with exit code $rc (see above)"
fi
exit "$rc"
