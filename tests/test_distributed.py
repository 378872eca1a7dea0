"""Two CPU processes (gloo) under DeepSpeed ZeRO-2 and ZeRO-3 train like one process with the same global batch, and a
ZeRO-3 run preempted on one rank checkpoints on both and resumes.

Every run is `mtp train` on the tiny model: the reference in this process (no DeepSpeed, 4 rows per step), the
distributed ones under `torchrun --nproc_per_node 2` with `--deepspeed launch/ds_zero{2,3}.json` and 2 rows per process
(what DeepSpeed needs on a CPU: `use_cpu`, `optim adamw_torch`, no `train_batch_size` in the DeepSpeed config). Both ranks draw
their own (k, offset) in a real run; here k and the offset are fixed (k_min = k_max, no random offsets) so the packed
problems are the same ones the single process sees, and the runs must agree up to reduction order. Under ZeRO-3 the
frozen teacher is itself a ZeRO-3 engine (TRL's `prepare_deepspeed`), so this also runs the sharded teacher.

The first DeepSpeed run compiles DeepSpeed's shared-memory op (~30 s on 2 cores). These tests compile it once into a
directory of their own: a build killed half-way in the shared ~/.cache/torch_extensions leaves its lock file behind, and
every later build there waits on that lock forever.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mtp_cli import train as train_command

REPO = Path(__file__).resolve().parents[1]
CPU_RECIPE = str(REPO / "recipes" / "smollm2-cpu-full.yaml")
GLOBAL_BATCH, STEPS = 4, 3


def train_args(model: str, data: str, out: Path, per_device: int, *extra: str) -> list[str]:
    return ["--config", CPU_RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out),
            "--eval_fraction", "0", "--per_device_train_batch_size", str(per_device), "--k_min", "4", "--k_max", "4",
            "--random_offsets", "false", "--warmup_steps", "0", "--learning_rate", "1e-2", "--save_steps", "2",
            "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none", "--acceptance_eval_steps", "0",
            *extra]


# SIGTERM reaches rank 1 only, during step AT: the ranks must agree to checkpoint after the same step.
PREEMPT_RANK_1 = '''
import os, signal, sys
from distill.trainer import MTPDistillTrainer
from mtp_cli.main import main

at = int(sys.argv[1])
real_step = MTPDistillTrainer.training_step
def training_step(self, *args, **kwargs):
    loss = real_step(self, *args, **kwargs)
    if self.state.global_step == at - 1 and self.args.process_index == 1:
        os.kill(os.getpid(), signal.SIGTERM)
    return loss
MTPDistillTrainer.training_step = training_step
sys.exit(main(["train", *sys.argv[2:]]))
'''


@pytest.fixture(scope="module", autouse=True)
def own_extensions_dir(tmp_path_factory):
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path_factory.mktemp("torch_extensions")))
        yield


def torchrun(argv: list[str], script: Path | None = None) -> subprocess.CompletedProcess:
    """`torchrun --nproc_per_node 2 -m mtp_cli train ARGV` (or `SCRIPT ARGV`) on CPU."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu", "WANDB_MODE": "disabled",
           "PYTHONPATH": str(REPO)}
    target = [str(script)] if script else ["-m", "mtp_cli", "train"]
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", *target, *argv]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=900)


def losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((run_dir / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


def assert_same_run(run_dir: Path, reference: Path) -> None:
    """Per-step losses and final weights of the two runs agree (fp32; only the reduction order differs).

    Adam moves every weight by about the learning rate per step whatever its gradient's size, so a gradient that
    differs in its last bits can flip a near-zero update: weights are held to 1e-4 absolute, against updates of ~3e-2.
    """
    got, expected = losses(run_dir), losses(reference)
    assert sorted(got) == list(range(1, STEPS + 1))
    for step in expected:
        assert got[step] == pytest.approx(expected[step], rel=1e-5), (step, got, expected)
    weights, reference_weights = load_file(run_dir / "model.safetensors"), load_file(reference / "model.safetensors")
    start = load_file(Path(reference).parent / "start.safetensors")
    assert weights.keys() == reference_weights.keys()
    for name, tensor in reference_weights.items():
        torch.testing.assert_close(weights[name], tensor, rtol=0, atol=1e-4, msg=name)
        assert (tensor - start[name]).abs().max() > 1e-2, name  # every tensor trained well past the tolerance


@pytest.fixture(scope="module")
def single_process(tiny_model_dir, gsm8k_rows, tmp_path_factory) -> Path:
    """The reference: one process, no DeepSpeed, the whole global batch per step."""
    root = tmp_path_factory.mktemp("single")
    (root / "start.safetensors").write_bytes((Path(tiny_model_dir) / "model.safetensors").read_bytes())
    out = root / "run"
    saved = dict(os.environ)
    try:
        argv = train_args(tiny_model_dir, gsm8k_rows, out, GLOBAL_BATCH, "--max_steps", str(STEPS))
        assert train_command.main(argv) == 0
    finally:
        os.environ.clear()
        os.environ.update(saved)
    return out


def test_zero2_two_processes_match_one_process(tiny_model_dir, gsm8k_rows, single_process, tmp_path):
    out = tmp_path / "zero2"
    done = torchrun(train_args(tiny_model_dir, gsm8k_rows, out, GLOBAL_BATCH // 2, "--max_steps", str(STEPS),
                               "--deepspeed", "launch/ds_zero2.json"))
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"saved model + tokenizer to {out} (step {STEPS})" in done.stdout
    assert (out / "checkpoint-2" / "global_step2").is_dir()  # written by the DeepSpeed engine
    config = json.loads((out / "config.json").read_text())  # the final model is a plain HF directory
    assert config["mtp_k_max"] == 4 and config["mtp_mask_token_id"] is not None
    assert_same_run(out, single_process)


def test_zero3_preempted_on_one_rank_resumes_and_matches_one_process(tiny_model_dir, gsm8k_rows, single_process,
                                                                     tmp_path):
    out = tmp_path / "zero3"
    argv = train_args(tiny_model_dir, gsm8k_rows, out, GLOBAL_BATCH // 2, "--max_steps", str(STEPS), "--save_steps",
                      "10", "--deepspeed", "launch/ds_zero3.json")
    driver = tmp_path / "preempt.py"
    driver.write_text(PREEMPT_RANK_1)
    done = torchrun(["2", *argv], script=driver)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"stopped on SIGTERM at step 2: saved {out / 'checkpoint-2'}" in done.stdout
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint-2"]  # no final model: the run is not finished
    shards = sorted(p.name for p in (out / "checkpoint-2" / "global_step2").glob("*model_states.pt"))
    assert shards == ["zero_pp_rank_0_mp_rank_00_model_states.pt", "zero_pp_rank_1_mp_rank_00_model_states.pt"]

    done = torchrun([*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"saved model + tokenizer to {out} (step {STEPS})" in done.stdout
    assert (out / f"checkpoint-{STEPS}").is_dir()  # the end of training saves one (save_steps 10 never fired)
    assert_same_run(out, single_process)
