#!/usr/bin/env bash
# Launch `mtp train` with torchrun (one process per GPU; several nodes through a c10d rendezvous).
#
# usage: launch/torchrun.sh NPROC_PER_NODE RECIPE.yaml [--key value ...]
#
#   launch/torchrun.sh 4 recipes/qwen3-4b-metamath.yaml                                  # DDP, one node
#   launch/torchrun.sh 4 recipes/qwen3-4b-metamath.yaml --deepspeed launch/ds_zero2.json  # DeepSpeed ZeRO-2
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 launch/torchrun.sh 4 recipes/llama31-8b-magpie.yaml \
#       --deepspeed launch/ds_zero3.json                                                 # run on every node
#   launch/torchrun.sh 2 recipes/smollm2-cpu-full.yaml --use_cpu true                          # CPU, gloo backend
#
# Extra arguments go to `mtp train` and override the recipe. Environment: NNODES (1), NODE_RANK (0),
# MASTER_ADDR (127.0.0.1), MASTER_PORT (29500).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -lt 2 ]]; then
    sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
NPROC="$1"
RECIPE="$2"
shift 2

NNODES="${NNODES:-1}"
if [[ "$NNODES" == 1 ]]; then
    RDZV=(--standalone)
else
    RDZV=(--nnodes "$NNODES" --node_rank "${NODE_RANK:-0}" --rdzv_backend c10d
          --rdzv_endpoint "${MASTER_ADDR:-127.0.0.1}:${MASTER_PORT:-29500}")
fi

# Fail fast on a hung collective instead of waiting for the NCCL timeout.
export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1

exec torchrun "${RDZV[@]}" --nproc_per_node "$NPROC" -m mtp_cli train --config "$RECIPE" "$@"
