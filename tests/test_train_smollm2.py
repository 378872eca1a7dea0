"""A real distillation run on SmolLM2-135M-Instruct learns multi-token prediction and leaves a resumable checkpoint.

The run (fixture `trained_smollm2_dir` in conftest.py) is recipes/smollm2-cpu-full.yaml shortened to 30 steps. Progress is
judged on the held-out eval split, evaluated at step 0 and at step 30 on the same rows with the same (k, offset) draws
(the trainer's eval sampler restarts at every evaluation), so the only thing that differs is the student. Training-step
losses are not compared: each step draws its own k, and the loss depends strongly on k.

  * the objective (hard-teacher CE under student forcing, paper §2.2) must fall;
  * student/teacher argmax agreement at positions >= 2 — the <MTP> slots, where a fresh model is near chance — must
    rise. Position 1 is plain next-token prediction and agrees ~100% at step 0 already (student == teacher), so it is
    left out.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow


def _evals(run_dir: str) -> dict[int, dict]:
    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return {entry["step"]: entry for entry in state["log_history"] if "eval_main_loss" in entry}


def test_distillation_lowers_loss_and_raises_agreement(trained_smollm2_dir):
    from conftest import SMOLLM2_SHORT_RUN_STEPS as STEPS

    evals = _evals(trained_smollm2_dir)
    assert set(evals) == {0, STEPS}
    before, after = evals[0], evals[STEPS]
    print(f"\nheld-out eval, step 0 -> {STEPS}: loss {before['eval_main_loss']:.3f} -> {after['eval_main_loss']:.3f}, "
          f"agreement at positions >= 2 {before['eval_agree_pos>=2']:.3f} -> {after['eval_agree_pos>=2']:.3f}")
    assert before["eval_agree_pos1"] > 0.95  # sanity: at step 0 the student *is* the teacher for NTP
    assert after["eval_main_loss"] < 0.9 * before["eval_main_loss"]
    assert after["eval_agree_pos>=2"] > before["eval_agree_pos>=2"] + 0.03


def test_final_model_is_a_complete_mtp_checkpoint(trained_smollm2_dir):
    from transformers import AutoConfig, AutoTokenizer

    from distill.tokens import MTP_TOKEN

    config = AutoConfig.from_pretrained(trained_smollm2_dir)
    tokenizer = AutoTokenizer.from_pretrained(trained_smollm2_dir)
    assert config.mtp_mask_token_id == tokenizer.convert_tokens_to_ids(MTP_TOKEN) == 49152
    assert config.mtp_k_max == 8
    assert (Path(trained_smollm2_dir) / "model.safetensors").is_file()


def test_checkpoint_resumes_and_continues_the_step_count(trained_smollm2_dir, tmp_path, capsys):
    from conftest import REPO, SMOLLM2_SHORT_RUN_STEPS as STEPS

    from mtp_cli.train import main as train

    checkpoint = Path(trained_smollm2_dir) / f"checkpoint-{STEPS}"
    assert (checkpoint / "trainer_state.json").is_file()
    out = tmp_path / "resumed"  # a new output dir: the shared run stays as it is for other tests
    argv = ["--config", str(REPO / "recipes" / "smollm2-cpu-full.yaml"), "--output_dir", str(out),
            "--resume_from_checkpoint", str(checkpoint), "--max_steps", str(STEPS + 2), "--save_strategy", "no",
            "--seq_len", "64", "--num_regions", "2", "--max_train_samples", "256", "--eval_fraction", "0.02",
            "--logging_steps", "1", "--disable_tqdm", "true"]
    assert train(argv) == 0
    assert f"(step {STEPS + 2})" in capsys.readouterr().out
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == STEPS + 2
    logged = [entry["step"] for entry in state["log_history"] if "loss" in entry]
    assert logged[-2:] == [STEPS + 1, STEPS + 2] and logged.count(STEPS + 1) == 1
