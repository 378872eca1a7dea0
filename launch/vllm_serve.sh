#!/usr/bin/env bash
# Serve an exported MTP checkpoint with vLLM, losslessly: the checkpoint is its own parallel-drafting draft model.
#
#   launch/vllm_serve.sh DIR [K] [-- extra `vllm serve` arguments]     # e.g. launch/vllm_serve.sh exported/ 4 -- --port 8000
#   launch/vllm_serve.sh --print-config DIR [K]                       # only print the speculative config (no vLLM needed)
#
# DIR is a directory written by `mtp export` (its config.json carries `pard_token`, the <MTP> id). vLLM's speculative
# config (vllm/config/speculative.py, SpeculativeConfig; vLLM main at commit 002e77c1):
#   {"method": "draft_model", "model": DIR, "parallel_drafting": true, "num_speculative_tokens": K}
# Each step the draft (this checkpoint) reads K positions in one forward: the last token plus K - 1 copies of the
# parallel-drafting token, whose id vLLM takes from the draft's config.json (`pard_token`,
# vllm/v1/spec_decode/llm_base_proposer.py `_init_parallel_drafting_params`); the target (the same checkpoint)
# verifies them. Greedy requests (temperature 0) get exactly the model's greedy output, sampled ones the model's own
# distribution (vLLM's rejection sampling). The checkpoint runs twice per step (as draft and as target), so it pays
# off only when the mean acceptance length (vLLM logs it) is well above 2; `mtp generate --strategy selfspec` does
# the same verification in one forward per step. Needs a GPU and `pip install vllm` (not a dependency of this package).
#
# A mask-only export (`lora_mask_only`; DIR/mtp_adapter/ beside the base weights) is the base model itself to vLLM,
# which cannot gate an adapter by token. Serve DIR as the target and a merged copy as the draft:
#   mtp export --model RUN --output merged/ --merge-adapter
#   DRAFT=merged/ launch/vllm_serve.sh DIR 4        # target = the base model (its exact outputs), draft = merged/
set -euo pipefail

print_only=0
if [[ "${1:-}" == "--print-config" ]]; then print_only=1; shift; fi
if [[ $# -lt 1 ]]; then
  echo "usage: $0 [--print-config] DIR [K] [-- vllm serve arguments]" >&2
  exit 2
fi
dir=$1; shift
k=4  # draft positions per step: acceptance falls with the position, and every position costs verification work
if [[ $# -gt 0 && "$1" != "--" ]]; then k=$1; shift; fi
if [[ $# -gt 0 && "$1" == "--" ]]; then shift; fi

if [[ ! -f "$dir/config.json" ]]; then
  echo "error: $dir has no config.json (pass a directory written by \`mtp export\`)" >&2
  exit 2
fi
if ! [[ "$k" =~ ^[1-9][0-9]*$ ]]; then
  echo "error: K must be a positive integer, got '$k'" >&2
  exit 2
fi
python_bin=${PYTHON:-python3}
config=$("$python_bin" - "$dir" "$k" "${DRAFT:-}" <<'PY'
import json, os, sys
directory, k, draft = sys.argv[1], int(sys.argv[2]), sys.argv[3] or sys.argv[1]
if os.path.isdir(os.path.join(draft, "mtp_adapter")):
    sys.exit(f"error: {draft} keeps a mask-only adapter beside the base weights, which vLLM would not load; export a "
             "merged draft (`mtp export --merge-adapter`) and pass it as DRAFT=")
for path in (directory, draft):
    if not os.path.isfile(os.path.join(path, "config.json")):
        sys.exit(f"error: {path} has no config.json (pass a directory written by `mtp export`)")
cfg = json.load(open(os.path.join(draft, "config.json"), encoding="utf-8"))
if cfg.get("pard_token") is None:
    sys.exit(f"error: {draft}/config.json has no pard_token: re-export it with `mtp export`")
if cfg.get("pard_token") != cfg.get("mtp_mask_token_id"):
    sys.exit(f"error: {draft}/config.json: pard_token differs from mtp_mask_token_id")
print(json.dumps({"method": "draft_model", "model": os.path.abspath(draft), "parallel_drafting": True,
                  "num_speculative_tokens": k}))
PY
) || exit 2

if [[ $print_only == 1 ]]; then
  echo "$config"
  exit 0
fi
if ! command -v vllm >/dev/null 2>&1; then
  echo "error: vllm is not installed (pip install vllm; it needs a GPU)" >&2
  exit 2
fi
exec vllm serve "$dir" --speculative-config "$config" "$@"
