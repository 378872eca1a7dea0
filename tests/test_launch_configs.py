"""launch/: accelerate and DeepSpeed configs load, the launchers build the right command, and a real DeepSpeed run works.

The launcher scripts are run for real with stand-ins for torchrun / deepspeed / accelerate / srun / scontrol placed
first on PATH; each stand-in records its arguments, so the test sees the exact command a cluster would run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["torchrun.sh", "deepspeed.sh", "slurm.sbatch"]


# ------------------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "name, distributed_type, extra",
    [
        ("deepspeed_zero2", "DEEPSPEED", {"zero_stage": 2}),
        ("deepspeed_zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True}),
        ("multi_gpu", "MULTI_GPU", {}),
        ("fsdp", "FSDP", {"fsdp_auto_wrap_policy": "TRANSFORMER_BASED_WRAP", "fsdp_state_dict_type": "FULL_STATE_DICT"}),
    ],
)
def test_accelerate_configs_load(name, distributed_type, extra):
    from accelerate.commands.config.config_args import load_config_from_file

    path = LAUNCH / f"{name}.yaml"
    raw = yaml.safe_load(path.read_text())
    config = load_config_from_file(str(path))  # accelerate's own loader: unknown keys or bad values raise
    assert config.distributed_type.value == distributed_type
    assert raw["mixed_precision"] == "bf16" and raw["use_cpu"] is False
    section = raw.get("deepspeed_config") or raw.get("fsdp_config") or {}
    for key, value in extra.items():
        assert section[key] == value


@pytest.mark.parametrize("name, stage", [("ds_zero2", 2), ("ds_zero3", 3)])
def test_deepspeed_json_uses_auto_sizes(name, stage):
    config = json.loads((LAUNCH / f"{name}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # Sizes and precision come from the recipe through the HF Trainer ("auto"), never from a second source.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    # env.md §2: with train_batch_size present a CPU run under torchrun fails DeepSpeed's batch-size assertion.
    assert "train_batch_size" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True


# ---------------------------------------------------------------------------------------------------------- launchers


@pytest.mark.parametrize("script", SCRIPTS)
def test_scripts_parse_and_document_usage(script):
    path = LAUNCH / script
    assert os.access(path, os.X_OK), f"{script} is not executable"
    assert subprocess.run(["bash", "-n", str(path)]).returncode == 0
    helped = subprocess.run(["bash", str(path), "--help"], capture_output=True, text=True)
    assert helped.returncode == 0 and "usage:" in helped.stdout
    bare = subprocess.run(["bash", str(path)], capture_output=True, text=True, env={**os.environ, "VENV": "/none"})
    assert bare.returncode == 2 and "usage:" in bare.stderr


@pytest.fixture
def fake_tools(tmp_path):
    """Stand-ins for the cluster tools; each appends `name args...` (and the NCCL setting) to a log file."""
    bin_dir, log = tmp_path / "bin", tmp_path / "calls.log"
    bin_dir.mkdir()
    recorder = '#!/bin/bash\necho "$(basename "$0") $* | NCCL_ASYNC_ERROR_HANDLING=${NCCL_ASYNC_ERROR_HANDLING:-}" >> "$LOG"\n'
    for tool in ("torchrun", "deepspeed", "accelerate"):
        (bin_dir / tool).write_text(recorder)
    (bin_dir / "scontrol").write_text("#!/bin/bash\nprintf 'node-a\\nnode-b\\n'\n")
    # srun: record, then run the node command as the node with rank 1 would (SLURM_PROCID set per task by SLURM).
    (bin_dir / "srun").write_text(recorder + 'while [[ $# -gt 0 && "$1" != bash ]]; do shift; done\n'
                                  'SLURM_PROCID=1 "$@"\n')
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LOG": str(log), "VENV": "/none"}
    return env, log


def _calls(log: Path) -> dict[str, str]:
    return {line.split(" ", 1)[0]: line.split(" ", 1)[1] for line in log.read_text().splitlines()}


def test_torchrun_launcher_command(fake_tools):
    env, log = fake_tools
    recipe = "recipes/qwen3-4b-metamath.yaml"
    done = subprocess.run(["launch/torchrun.sh", "4", recipe, "--deepspeed", "launch/ds_zero2.json"], cwd=REPO, env=env)
    assert done.returncode == 0
    call = _calls(log)["torchrun"]
    assert call.startswith("--standalone --nproc_per_node 4 -m distill.cli train --config " + recipe)
    assert "--deepspeed launch/ds_zero2.json" in call and call.endswith("NCCL_ASYNC_ERROR_HANDLING=1")
    assert (REPO / recipe).is_file()

    log.unlink()
    env = {**env, "NNODES": "2", "NODE_RANK": "1", "MASTER_ADDR": "node-a", "MASTER_PORT": "29600"}
    assert subprocess.run(["launch/torchrun.sh", "4", recipe], cwd=REPO, env=env).returncode == 0
    call = _calls(log)["torchrun"]
    assert "--nnodes 2 --node_rank 1 --rdzv_backend c10d --rdzv_endpoint node-a:29600 --nproc_per_node 4" in call


def test_deepspeed_launcher_command(fake_tools):
    env, log = fake_tools
    recipe = "recipes/llama31-8b-magpie.yaml"
    env = {**env, "DS_CONFIG": "launch/ds_zero3.json", "HOSTFILE": "hosts.txt"}
    assert subprocess.run(["launch/deepspeed.sh", "8", recipe, "--max_steps", "10"], cwd=REPO, env=env).returncode == 0
    call = _calls(log)["deepspeed"]
    # --no_local_rank: `mtp` takes its subcommand first, so nothing may be prepended to its arguments.
    assert call.startswith("--hostfile hosts.txt --num_gpus 8 --master_port 29500 --no_local_rank --module distill.cli "
                           f"train --config {recipe} --deepspeed launch/ds_zero3.json --max_steps 10")


def test_slurm_launcher_command(fake_tools):
    env, log = fake_tools
    recipe = "recipes/llama31-8b-magpie.yaml"
    env = {**env, "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
    done = subprocess.run(["bash", "launch/slurm.sbatch", recipe, "deepspeed_zero3", "--per_device_train_batch_size", "16"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = _calls(log)
    assert "--nodes=2 --ntasks=2 bash -c" in calls["srun"]
    launch = calls["accelerate"]
    for part in ("launch --config_file launch/deepspeed_zero3.yaml", "--num_machines 2", "--num_processes 8",
                 "--main_process_ip node-a", "--main_process_port 6000",
                 "--machine_rank 1",  # expanded inside the srun task, i.e. per node
                 f"-m distill.cli train --config {recipe} --per_device_train_batch_size 16",
                 "NCCL_ASYNC_ERROR_HANDLING=1"):
        assert part in launch, part
    assert (LAUNCH / "deepspeed_zero3.yaml").is_file()


# --------------------------------------------------------------------------------------------------- real DeepSpeed


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_deepspeed_zero2_cpu_run(tiny_model_dir, gsm8k_path, tmp_path):
    """Two steps of `mtp train` through DeepSpeed ZeRO-2 in one CPU process (env.md §2 recipe).

    ~25 s once DeepSpeed's shared-memory op is compiled; the very first run on a machine compiles it (JIT, g++,
    cached in ~/.cache/torch_extensions), which takes 20 s to a few minutes.
    """
    out = tmp_path / "ds-run"
    env = {**os.environ, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(_free_port()), "RANK": "0", "LOCAL_RANK": "0",
           "WORLD_SIZE": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled"}
    cmd = [sys.executable, "-m", "distill.cli", "train", "--config", "recipes/smollm2-cpu.yaml",
           "--model_name_or_path", tiny_model_dir, "--deepspeed", "launch/ds_zero2.json", "--optim", "adamw_torch",
           "--use_cpu", "true", "--max_steps", "2", "--save_steps", "2", "--max_train_samples", "16",
           "--eval_fraction", "0", "--per_device_train_batch_size", "2", "--output_dir", str(out),
           "--disable_tqdm", "true"]
    done = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"saved model + tokenizer to {out} (step 2)" in done.stdout
    # The checkpoint was written by a DeepSpeed engine (its ZeRO state lives in global_step2/) ...
    assert (out / "checkpoint-2" / "global_step2").is_dir()
    # ... and the final model is a plain HF directory.
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    assert model.config.mtp_k_max == 8 and model.config.mtp_mask_token_id is not None
