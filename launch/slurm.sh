#!/bin/bash
#SBATCH --job-name=mtp-selfdistill
#SBATCH --ntasks-per-node=1
#SBATCH --gres=gpu:4
#SBATCH --exclusive
#SBATCH --requeue
#SBATCH --signal=B:TERM@300
#SBATCH --open-mode=append
#SBATCH --time=2-00:00:00
#SBATCH --output=logs/%x-%j.out
#
# Multi-node `mtp train` on SLURM that survives preemption and the time limit.
#
# usage: sbatch launch/slurm.sh --config RECIPE.yaml [--accelerate NAME] [--nodes N] [--launcher accelerate|torchrun]
#                               [--gpus-per-node G] [--key value ...]
#
#   sbatch launch/slurm.sh --config recipes/qwen3-4b-metamath.yaml --accelerate zero2 --nodes 1
#   sbatch launch/slurm.sh --config recipes/llama31-8b-magpie.yaml --accelerate zero3 --nodes 2 \
#       --per_device_train_batch_size 16                                   # 8 GPUs: keep the global batch at 128
#   launch/slurm.sh --config recipes/llama31-8b-magpie.yaml --accelerate zero3 --nodes 2   # submits itself
#
# --accelerate NAME: launch/NAME.yaml (single, multi_gpu, zero2 (default), zero3, zero3_offload, fsdp); with
#   --launcher torchrun the matching DeepSpeed JSON (launch/ds_NAME.json) is passed to `mtp train` instead.
# --nodes N: nodes to train on (default: the job's). A job holding another number of nodes resubmits itself with
#   sbatch --nodes=N and ends; outside a job the script submits itself. Other arguments go to `mtp train`.
# One task per node runs the launcher for the node's GPUs; the first node hosts the c10d rendezvous.
# Preemption / time limit: SLURM sends SIGTERM (300 s before the limit too: --signal=B:TERM@300); the script forwards
#   it to the trainers, which save a checkpoint at the end of the current step and exit 0, and requeues the job. A
#   requeued job (SLURM_RESTART_COUNT > 0) continues from the newest complete checkpoint (--resume_from_checkpoint
#   auto); the first start never resumes, so an output_dir holding an earlier run is an error, not a silent resume.
# Environment: GPUS_PER_NODE (SLURM_GPUS_ON_NODE, else 4), MASTER_PORT (6000), VENV (.venv, activated when present),
#   GRACE_SECONDS (240: how long a launcher waits for its trainers to checkpoint before killing them).
# Run from the repository root; logs/ must exist (mkdir -p logs).
set -euo pipefail

usage() { sed -n '/^# Multi-node/,/^# Run from/p' "$0" | sed 's/^# \{0,1\}//'; }
die() { echo "error: $*" >&2; exit 2; }

ARGS=("$@")
CONFIG="" ACCELERATE=zero2 NODES="" LAUNCHER=accelerate GPUS_PER_NODE="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-4}}"
TRAIN_ARGS=()
while [[ $# -gt 0 ]]; do
    case "$1" in
        -h|--help) usage; exit 0 ;;
        --config|--accelerate|--nodes|--launcher|--gpus-per-node)
            [[ $# -ge 2 ]] || die "$1 needs a value"
            case "$1" in
                --config) CONFIG="$2" ;;
                --accelerate) ACCELERATE="$2" ;;
                --nodes) NODES="$2" ;;
                --launcher) LAUNCHER="$2" ;;
                --gpus-per-node) GPUS_PER_NODE="$2" ;;
            esac
            shift 2 ;;
        *) TRAIN_ARGS+=("$1"); shift ;;
    esac
done
if [[ -z "$CONFIG" ]]; then
    usage >&2
    exit 2
fi
[[ -f "$CONFIG" ]] || die "recipe $CONFIG not found (run from the repository root)"
[[ -f "launch/$ACCELERATE.yaml" ]] || die "no accelerate config launch/$ACCELERATE.yaml"
[[ -z "$NODES" || "$NODES" =~ ^[1-9][0-9]*$ ]] || die "--nodes must be a positive integer, got $NODES"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer, got $GPUS_PER_NODE"

# Not inside a job, or inside one with the wrong number of nodes: submit this script with the right allocation.
if [[ -z "${SLURM_JOB_ID:-}" ]]; then
    exec sbatch ${NODES:+--nodes="$NODES"} "$0" "${ARGS[@]}"
fi
NODES="${NODES:-${SLURM_NNODES:-1}}"
if [[ "$NODES" != "${SLURM_NNODES:-1}" ]]; then
    echo "job $SLURM_JOB_ID has ${SLURM_NNODES:-1} node(s) but --nodes $NODES was asked: resubmitting"
    sbatch --nodes="$NODES" "$0" "${ARGS[@]}"
    exit 0
fi

VENV="${VENV:-.venv}"
if [[ -f "$VENV/bin/activate" ]]; then
    # shellcheck disable=SC1091
    source "$VENV/bin/activate"
fi

WORLD_SIZE=$((NODES * GPUS_PER_NODE))
# The first node of the allocation hosts the rendezvous. (Not `| head -n 1`: under pipefail the SIGPIPE that head
# sends scontrol would abort the job.)
mapfile -t HOSTS < <(scontrol show hostnames "$SLURM_JOB_NODELIST")
MASTER_ADDR="${HOSTS[0]}"
MASTER_PORT="${MASTER_PORT:-6000}"

if [[ "$LAUNCHER" == accelerate ]]; then
    # \$SLURM_PROCID is escaped: it must expand inside each srun task (the node's rank), not here in the batch step.
    LAUNCH="accelerate launch --config_file launch/$ACCELERATE.yaml --num_machines $NODES --num_processes $WORLD_SIZE \
--main_process_ip $MASTER_ADDR --main_process_port $MASTER_PORT --machine_rank \$SLURM_PROCID --rdzv_backend c10d \
--tee 3"
elif [[ "$LAUNCHER" == torchrun ]]; then
    case "$ACCELERATE" in
        zero2|zero3|zero3_offload) TRAIN_ARGS+=(--deepspeed "launch/ds_$ACCELERATE.json") ;;
        single|multi_gpu) ;;
        *) die "--launcher torchrun runs DeepSpeed (zero2, zero3, zero3_offload) or DDP (single, multi_gpu);" \
               "use --launcher accelerate for $ACCELERATE" ;;
    esac
    LAUNCH="torchrun --nnodes $NODES --nproc_per_node $GPUS_PER_NODE --rdzv_id $SLURM_JOB_ID --rdzv_backend c10d \
--rdzv_endpoint $MASTER_ADDR:$MASTER_PORT"
else
    die "--launcher must be accelerate or torchrun, got $LAUNCHER"
fi

# A requeued job continues the run; SLURM counts the restarts.
if [[ "${SLURM_RESTART_COUNT:-0}" -gt 0 ]]; then
    TRAIN_ARGS+=(--resume_from_checkpoint auto)
fi

printf -v TRAIN '%q ' -m mtp_cli train --config "$CONFIG" "${TRAIN_ARGS[@]}"

# Crash on NCCL errors (a hung collective) instead of waiting for the timeout, so the job ends and can be requeued.
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1
# On SIGTERM a launcher passes the signal on and waits this long for its trainers (torch elastic; default 30 s).
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT="${GRACE_SECONDS:-240}"

echo "START $(date) job=$SLURM_JOB_ID restart=${SLURM_RESTART_COUNT:-0} nodes=$NODES world=$WORLD_SIZE" \
     "master=$MASTER_ADDR:$MASTER_PORT recipe=$CONFIG launcher=$LAUNCHER/$ACCELERATE"

# srun runs in the background so that this shell can take SIGTERM while training runs (bash delays traps until a
# foreground command ends); srun passes the signal on to every task.
SRUN_PID=""
TERMINATED=0
on_term() {
    TERMINATED=1
    echo "SIGTERM $(date): asking the trainers to save a checkpoint"
    if [[ -n "$SRUN_PID" ]]; then
        kill -TERM "$SRUN_PID" 2>/dev/null || true
    fi
}
trap on_term TERM

# --kill-on-bad-exit: one failed node ends the step; --wait=60: the others get 60 s to flush logs.
srun --wait=60 --kill-on-bad-exit=1 --nodes="$NODES" --ntasks="$NODES" --ntasks-per-node=1 \
    bash -c "exec $LAUNCH $TRAIN" &
SRUN_PID=$!
STATUS=0
wait "$SRUN_PID" || STATUS=$?
while kill -0 "$SRUN_PID" 2>/dev/null; do  # `wait` returned early for the trap: wait for srun itself
    STATUS=0
    wait "$SRUN_PID" || STATUS=$?
done

if [[ "$TERMINATED" == 1 ]]; then
    # A preempted job is requeued by SLURM itself; one at its time limit is not: ask for it (harmless if pending).
    scontrol requeue "$SLURM_JOB_ID" || true
    echo "END $(date): stopped by SIGTERM (status $STATUS); requeued, the next start resumes from the last checkpoint"
    exit 0
fi
echo "END $(date) status=$STATUS"
exit "$STATUS"
