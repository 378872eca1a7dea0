#!/usr/bin/env bash
# Launch `mtp train` with the DeepSpeed launcher (a local run, or several nodes listed in a hostfile).
#
# usage: launch/deepspeed.sh NUM_GPUS RECIPE.yaml [--key value ...]
#
#   launch/deepspeed.sh 4 recipes/qwen3-4b-metamath.yaml                       # ZeRO-2 (default DS config)
#   DS_CONFIG=launch/ds_zero3.json launch/deepspeed.sh 4 recipes/llama31-8b-magpie.yaml
#   HOSTFILE=hostfile launch/deepspeed.sh 8 recipes/llama31-8b-magpie.yaml     # "node0 slots=8" per line
#
# Extra arguments go to `mtp train` and override the recipe. Environment: DS_CONFIG (launch/ds_zero2.json),
# HOSTFILE (none: this machine only), MASTER_PORT (29500).
set -euo pipefail

if [[ "${1:-}" == "-h" || "${1:-}" == "--help" ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//'
    exit 0
fi
if [[ $# -lt 2 ]]; then
    sed -n '2,11p' "$0" | sed 's/^# \{0,1\}//' >&2
    exit 2
fi
NUM_GPUS="$1"
RECIPE="$2"
shift 2

DS_CONFIG="${DS_CONFIG:-launch/ds_zero2.json}"
HOST_ARGS=()
if [[ -n "${HOSTFILE:-}" ]]; then
    HOST_ARGS=(--hostfile "$HOSTFILE")
fi

export NCCL_ASYNC_ERROR_HANDLING=1 TORCH_NCCL_ASYNC_ERROR_HANDLING=1

# --no_local_rank: `mtp` takes a subcommand first, so the launcher must not prepend --local_rank (LOCAL_RANK is set
# in the environment instead, which TrainingArguments reads).
exec deepspeed "${HOST_ARGS[@]}" --num_gpus "$NUM_GPUS" --master_port "${MASTER_PORT:-29500}" --no_local_rank \
    --module mtp_cli train --config "$RECIPE" --deepspeed "$DS_CONFIG" "$@"
