"""launch/: accelerate and DeepSpeed configs load, and the launchers build the right command.

The launcher scripts are run for real with stand-ins for torchrun / deepspeed / accelerate / srun / scontrol / sbatch
placed first on PATH; each stand-in records its arguments, so the test sees the exact command a cluster would run
(`sbatch` and `srun` cannot run here). Real multi-process DeepSpeed runs are in tests/test_distributed.py.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ["torchrun.sh", "deepspeed.sh", "slurm.sh"]


# ------------------------------------------------------------------------------------------------------------ configs


@pytest.mark.parametrize(
    "name, distributed_type, extra",
    [
        ("single", "NO", {}),
        ("multi_gpu", "MULTI_GPU", {}),
        ("zero2", "DEEPSPEED", {"zero_stage": 2, "offload_optimizer_device": "none"}),
        ("zero3", "DEEPSPEED", {"zero_stage": 3, "zero3_init_flag": True, "zero3_save_16bit_model": True}),
        ("zero3_offload", "DEEPSPEED", {"zero_stage": 3, "offload_optimizer_device": "cpu",
                                        "offload_param_device": "cpu", "zero3_save_16bit_model": True}),
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


@pytest.mark.parametrize("name, stage", [("ds_zero2", 2), ("ds_zero3", 3), ("ds_zero3_offload", 3)])
def test_deepspeed_json_uses_auto_sizes(name, stage):
    config = json.loads((LAUNCH / f"{name}.json").read_text())
    assert config["zero_optimization"]["stage"] == stage
    # Sizes and precision come from the recipe through the HF Trainer ("auto"), never from a second source.
    for key in ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "gradient_clipping"):
        assert config[key] == "auto"
    assert config["bf16"]["enabled"] == "auto" and config["fp16"]["enabled"] == "auto"
    # With train_batch_size present a CPU run under torchrun fails DeepSpeed's batch-size assertion.
    assert "train_batch_size" not in config
    if stage == 3:
        assert config["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    if name.endswith("offload"):
        assert config["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
        assert config["zero_optimization"]["offload_param"]["device"] == "cpu"


def test_every_launch_file_named_in_the_docs_and_recipes_exists():
    """The accelerate configs were renamed after the issue (zero2, zero3, ...): no stale reference may remain."""
    texts = [*REPO.glob("recipes/*.yaml"), *LAUNCH.iterdir()]
    named = {m for path in texts for m in re.findall(r"launch/[a-z0-9_.]+\.(?:yaml|json|sh)", path.read_text())}
    assert {"launch/zero3.yaml", "launch/slurm.sh", "launch/ds_zero2.json"} <= named
    assert all((REPO / name).is_file() for name in named), sorted(n for n in named if not (REPO / n).is_file())


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
    for tool in ("torchrun", "deepspeed", "accelerate", "sbatch"):
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
    assert call.startswith("--standalone --nproc_per_node 4 -m mtp_cli train --config " + recipe)
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
    assert call.startswith("--hostfile hosts.txt --num_gpus 8 --master_port 29500 --no_local_rank --module mtp_cli "
                           f"train --config {recipe} --deepspeed launch/ds_zero3.json --max_steps 10")


def test_slurm_launcher_command(fake_tools):
    env, log = fake_tools
    recipe = "recipes/llama31-8b-magpie.yaml"
    env = {**env, "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]"}
    done = subprocess.run(["bash", "launch/slurm.sh", "--config", recipe, "--accelerate", "zero3", "--nodes", "2",
                           "--per_device_train_batch_size", "16", "--run_name", "two words"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    calls = _calls(log)
    assert "--nodes=2 --ntasks=2 --ntasks-per-node=1 bash -c exec accelerate launch" in calls["srun"]
    assert "--run_name two\\ words" in calls["srun"]  # quoted for the node's shell: one argument
    launch = calls["accelerate"]
    for part in ("launch --config_file launch/zero3.yaml", "--num_machines 2", "--num_processes 8",
                 "--main_process_ip node-a", "--main_process_port 6000",
                 "--machine_rank 1",  # expanded inside the srun task, i.e. per node
                 f"-m mtp_cli train --config {recipe} --per_device_train_batch_size 16 --run_name two words |",
                 "NCCL_ASYNC_ERROR_HANDLING=1"):
        assert part in launch, part
    assert "--resume" not in launch  # a first start never resumes: an earlier run in output_dir stays an error
    assert (LAUNCH / "zero3.yaml").is_file()


def test_slurm_requeued_job_resumes_with_torchrun_rendezvous(fake_tools):
    env, log = fake_tools
    env = {**env, "SLURM_JOB_ID": "42", "SLURM_NNODES": "2", "SLURM_JOB_NODELIST": "node-[a-b]",
           "SLURM_RESTART_COUNT": "1", "GPUS_PER_NODE": "8", "MASTER_PORT": "29555"}
    done = subprocess.run(["bash", "launch/slurm.sh", "--config", "recipes/llama31-8b-magpie.yaml", "--accelerate",
                           "zero3_offload", "--launcher", "torchrun"],
                          cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    call = _calls(log)["torchrun"]
    assert call.startswith("--nnodes 2 --nproc_per_node 8 --rdzv_id 42 --rdzv_backend c10d --rdzv_endpoint "
                           "node-a:29555 -m mtp_cli train --config recipes/llama31-8b-magpie.yaml "
                           "--deepspeed launch/ds_zero3_offload.json --resume_from_checkpoint auto")


def test_slurm_submits_itself_with_the_asked_node_count(fake_tools):
    env, log = fake_tools
    args = ["--config", "recipes/qwen3-4b-metamath.yaml", "--nodes", "2"]
    outside = {k: v for k, v in env.items() if not k.startswith("SLURM_")}
    assert subprocess.run(["bash", "launch/slurm.sh", *args], cwd=REPO, env=outside).returncode == 0
    assert _calls(log) == {"sbatch": f"--nodes=2 launch/slurm.sh {' '.join(args)} | NCCL_ASYNC_ERROR_HANDLING="}

    log.unlink()  # inside a job of 1 node: resubmit with 2 and end without training
    inside = {**env, "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node-a"}
    done = subprocess.run(["bash", "launch/slurm.sh", *args], cwd=REPO, env=inside, capture_output=True, text=True)
    assert done.returncode == 0 and "resubmitting" in done.stdout
    assert set(_calls(log)) == {"sbatch"}


@pytest.mark.parametrize("args, message", [
    (["--config", "recipes/none.yaml"], "recipe recipes/none.yaml not found"),
    (["--config", "recipes/smollm2-cpu-full.yaml", "--accelerate", "zero4"], "no accelerate config launch/zero4.yaml"),
    (["--config", "recipes/smollm2-cpu-full.yaml", "--nodes", "two"], "--nodes must be a positive integer"),
    (["--config", "recipes/smollm2-cpu-full.yaml", "--accelerate", "fsdp", "--launcher", "torchrun"],
     "use --launcher accelerate for fsdp"),
    (["--config"], "--config needs a value"),
])
def test_slurm_bad_arguments(fake_tools, args, message):
    env, log = fake_tools
    env = {**env, "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node-a"}
    done = subprocess.run(["bash", "launch/slurm.sh", *args], cwd=REPO, env=env, capture_output=True, text=True)
    assert done.returncode == 2 and message in done.stderr, done.stderr
    assert not log.exists()  # nothing was launched


def test_slurm_forwards_sigterm_to_the_trainers_and_requeues(fake_tools, tmp_path):
    """Preemption: SIGTERM to the batch shell reaches the trainer (which checkpoints and exits 0), then the job is
    requeued. The stand-in srun forwards signals to its task as srun does."""
    env, log = fake_tools
    bin_dir = Path(env["PATH"].split(":")[0])
    (bin_dir / "srun").write_text(
        '#!/bin/bash\necho "srun $*" >> "$LOG"\nwhile [[ $# -gt 0 && "$1" != bash ]]; do shift; done\n'
        'SLURM_PROCID=0 "$@" &\nchild=$!\ntrap \'kill -TERM $child\' TERM\nwait $child\nwait $child\n')
    (bin_dir / "accelerate").write_text(
        '#!/bin/bash\nsleep 30 &\nnap=$!\n'
        'trap \'echo "trainer got SIGTERM" >> "$LOG"; kill $nap; exit 0\' TERM\n'
        'echo "accelerate $*" >> "$LOG"\nwait $nap\n')
    (bin_dir / "scontrol").write_text(
        '#!/bin/bash\nif [[ "$1" == show ]]; then echo node-a; else echo "scontrol $*" >> "$LOG"; fi\n')
    env = {**env, "SLURM_JOB_ID": "42", "SLURM_NNODES": "1", "SLURM_JOB_NODELIST": "node-a"}
    job = subprocess.Popen(["bash", "launch/slurm.sh", "--config", "recipes/smollm2-cpu-full.yaml", "--accelerate",
                            "single"], cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 20
    while not (log.exists() and "accelerate" in log.read_text()):  # the trainer is up
        assert time.monotonic() < deadline and job.poll() is None, job.communicate()
        time.sleep(0.05)
    job.send_signal(signal.SIGTERM)
    out, err = job.communicate(timeout=20)
    assert job.returncode == 0, err
    lines = log.read_text().splitlines()
    assert "trainer got SIGTERM" in lines and "scontrol requeue 42" in lines
    assert "stopped by SIGTERM" in out and "requeued" in out
