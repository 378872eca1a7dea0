"""`mtp train` (mtp_cli/train.py over distill/recipe.py and distill/run.py) and `mtp bench-train` (distill/bench.py)
on the tiny random model.

Recipes must load through the real parser (an unknown key would fail), the flagship recipes must carry the paper's
settings, bad input must be one `error:` line with exit status 2, and a real run must save a complete model, refuse to
train over it, and resume from its checkpoint without redoing steps.
"""

from __future__ import annotations

import json
import os
import types
from pathlib import Path

import pytest
import torch

from distill import recipe as recipes
from distill import run
from mtp_cli import train as train_command
from distill.errors import UserError

pytestmark = pytest.mark.usefixtures("restore_environment")  # recipes export their `env:` block
REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
CPU_RECIPE = str(REPO / "recipes" / "smollm2-cpu-full.yaml")


# ------------------------------------------------------------------------------------------------------------ recipes


def test_recipes_exist():
    names = {p.name for p in RECIPES}
    assert {"smollm2-cpu.yaml", "smollm2-cpu-full.yaml", "qwen3-4b-metamath.yaml", "llama31-8b-magpie.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.name)
def test_every_recipe_parses(recipe):
    script_args, config, model_args = recipes.parse_args(["--config", str(recipe)])
    assert model_args.model_name_or_path and config.output_dir.startswith("outputs/")
    assert config.k_min >= 2 and config.k_max >= config.k_min
    # The paper's hard teacher; or ground-truth labels on the model's own greedy answers (`mtp regenerate`), where
    # the ground truth is the teacher's argmax along the greedy path.
    assert config.supervision == "hard" or (config.supervision == "gt" and ".self." in config.dataset_name)
    assert script_args.trust_remote_code is False
    if model_args.use_peft:
        assert config.teacher == "shared-base" and model_args.lora_target_modules == "all-linear"
    else:
        assert config.teacher == "frozen-copy"
    if config.dataset_name.endswith(".jsonl"):
        assert Path(run.resolve_dataset(config.dataset_name)).is_file()


@pytest.mark.parametrize(
    "recipe, model, fmt",
    [
        ("qwen3-4b-metamath.yaml", "Qwen/Qwen3-4B-Instruct-2507", "plain"),  # §3.1: Qwen without chat template
        ("llama31-8b-magpie.yaml", "Magpie-Align/Llama-3.1-8B-Magpie-Align-SFT-v0.1", "chat"),  # chat template on
    ],
)
def test_flagship_recipes_carry_the_paper_settings(recipe, model, fmt):
    _, config, model_args = recipes.parse_args(["--config", str(REPO / "recipes" / recipe)])
    assert model_args.model_name_or_path == model and model_args.dtype == "bfloat16" and config.bf16
    assert config.dataset_name == "meta-math/MetaMathQA" and config.dataset_format == fmt
    # §3.1 / §3.2 / §7.7
    assert (config.seq_len, config.num_regions, config.k_min, config.k_max) == (160, 5, 2, 16)
    assert config.random_offsets and not config.bidirectional
    assert config.learning_rate == 1e-5 and config.warmup_steps == 2000
    assert config.lr_scheduler_type.value == "constant_with_warmup"
    assert config.per_device_train_batch_size * config.gradient_accumulation_steps * 4 == 128  # 4 GPUs x 32
    assert (config.weight_decay, config.adam_beta1, config.adam_beta2, config.max_grad_norm) == (0.1, 0.9, 0.95, 1.0)
    assert config.max_steps == 100160 and config.save_steps == 10000 and config.seed == 42
    assert config.report_to == ["wandb"] and os.environ["WANDB_PROJECT"] == "mtp-selfdistill"


def test_cli_flags_override_the_recipe_and_env_is_exported(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: smollm2-135m\nk_max: 4\nseq_len: 48\nnum_regions: 3\n"
                      "env:\n  MTP_RECIPE_TEST: seven\n")
    script_args, config, model_args = recipes.parse_args(
        [f"--config={recipe}", "--k_max", "6", "--use_peft", "--lora_r", "4"])
    assert config.k_max == 6 and config.seq_len == 48  # CLI wins, the rest comes from the file
    assert model_args.use_peft and model_args.lora_r == 4
    assert os.environ["MTP_RECIPE_TEST"] == "seven"
    assert config.dataset_name == recipes.DEFAULT_DATASET  # no dataset named: GSM8K train


@pytest.mark.parametrize(
    "recipe_text, flags, message",
    [
        ("model_name_or_path: x\nlearnin_rate: 0.1\n", [], "unknown key(s) in"),
        ("model_name_or_path: x\n", ["--no_such_flag", "1"], "unknown option(s): --no_such_flag 1"),
        ("model_name_or_path: x\n", ["--learning_rat", "0.1"], "unknown option(s): --learning_rat"),  # no prefix match
        ("model_name_or_path: x\n", ["--k_max", "many"], "invalid int value"),
        ("model_name_or_path: x\nk_max: [1\n", [], "not valid YAML"),
        ("- a list\n- not a mapping\n", [], "YAML mapping"),
        ("model_name_or_path: x\nk_max: 40\nseq_len: 96\nnum_regions: 3\n", [], "does not fit"),
        ("model_name_or_path: x\nload_in_4bit: true\n", [], "not supported"),
        ("model_name_or_path: x\ndtype: auto\n", [], "dtype auto"),
    ],
)
def test_bad_input_is_one_error_line(tmp_path, capsys, recipe_text, flags, message):
    from mtp_cli.main import main as mtp

    recipe = tmp_path / "bad.yaml"
    recipe.write_text(recipe_text)
    assert mtp(["train", "--config", str(recipe), *flags]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err


def test_help_lists_every_option_group(capsys):
    assert train_command.main(["--help"]) == 0
    out = capsys.readouterr().out
    for flag in ("--config", "--k_max", "--teacher", "--dataset_name", "--use_peft", "--lora_r", "--learning_rate"):
        assert flag in out


def test_missing_config_file_is_an_error():
    with pytest.raises(UserError, match="not found"):
        recipes.parse_args(["--config", "recipes/nope.yaml"])
    with pytest.raises(UserError, match="needs a file path"):
        recipes.parse_args(["--config"])


def test_dataset_path_is_found_from_any_directory(tmp_path, monkeypatch, gsm8k_path):
    monkeypatch.chdir(tmp_path)  # not the repository: the relative recipe path falls back to the repo root
    assert Path(run.resolve_dataset(recipes.DEFAULT_DATASET)) == gsm8k_path.resolve()
    assert run.resolve_dataset("meta-math/MetaMathQA") == "meta-math/MetaMathQA"
    with pytest.raises(UserError, match="not found"):
        run.resolve_dataset("../nowhere/rows.jsonl")


# ------------------------------------------------------------------------------------------------------- final save


class _FakeTrainer:
    """Just what save_final touches: a single process whose save_model writes a model directory."""

    def __init__(self, tag: str):
        self.tag = tag
        self.accelerator = types.SimpleNamespace(wait_for_everyone=lambda: None)

    def is_world_process_zero(self):
        return True

    def save_model(self, path):
        os.makedirs(path)
        for name in ("model.safetensors", "config.json", "tokenizer.json"):
            Path(path, name).write_text(self.tag)


def test_final_save_moves_the_config_last(tmp_path, monkeypatch):
    moved = []
    real_replace = os.replace
    monkeypatch.setattr(run.os, "replace", lambda a, b: (moved.append(Path(b).name), real_replace(a, b)))
    run.save_final(_FakeTrainer("new"), str(tmp_path))
    assert moved[-1] == "config.json" and sorted(moved) == ["config.json", "model.safetensors", "tokenizer.json"]
    assert all((tmp_path / name).read_text() == "new" for name in moved)
    assert not (tmp_path / run.STAGING).exists()


def test_interrupted_final_save_never_looks_complete(tmp_path, monkeypatch):
    for name in ("model.safetensors", "config.json", "tokenizer.json"):
        (tmp_path / name).write_text("old")
    real_replace, calls = os.replace, []

    def crash_on_second(a, b):
        calls.append(b)
        if len(calls) == 2:
            raise OSError("disk full")
        real_replace(a, b)

    monkeypatch.setattr(run.os, "replace", crash_on_second)
    with pytest.raises(OSError):
        run.save_final(_FakeTrainer("new"), str(tmp_path))
    # A mix of old and new weights is on disk, but without config.json no loader accepts the directory.
    assert not (tmp_path / "config.json").exists()


# --------------------------------------------------------------------------------------------------------- real runs


def _run_args(model_dir: str, out: Path, *extra: str) -> list[str]:
    return ["--config", CPU_RECIPE, "--model_name_or_path", model_dir, "--output_dir", str(out),
            "--max_train_samples", "32", "--eval_fraction", "0", "--per_device_train_batch_size", "2",
            "--save_steps", "2", "--disable_tqdm", "true", *extra]


def test_train_saves_refuses_to_overwrite_and_resumes(tiny_model_dir, gsm8k_path, tmp_path, capsys, monkeypatch):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from distill.trainer import MTPDistillTrainer
    from distill.tokens import MTP_TOKEN

    out = tmp_path / "run"
    assert train_command.main(_run_args(tiny_model_dir, out, "--max_steps", "2")) == 0
    assert f"saved model + tokenizer to {out} (step 2)" in capsys.readouterr().out
    assert not (out / run.STAGING).exists() and (out / "checkpoint-2").is_dir()
    model = AutoModelForCausalLM.from_pretrained(out, use_safetensors=True)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert model.config.mtp_mask_token_id == tokenizer.convert_tokens_to_ids(MTP_TOKEN)
    assert model.config.mtp_k_max == 8  # the CPU recipe's k_max
    before = load_file(Path(tiny_model_dir) / "model.safetensors")
    after = load_file(out / "model.safetensors")
    assert not torch.equal(before["model.layers.0.self_attn.q_proj.weight"],
                           after["model.layers.0.self_attn.q_proj.weight"])  # it trained

    with pytest.raises(UserError, match="already holds a run"):
        train_command.main(_run_args(tiny_model_dir, out, "--max_steps", "4"))

    # Resume: only steps 3 and 4 run, on top of the checkpoint's state.
    steps = []
    real_step = MTPDistillTrainer.training_step
    monkeypatch.setattr(MTPDistillTrainer, "training_step",
                        lambda self, *a, **k: (steps.append(self.state.global_step), real_step(self, *a, **k))[1])
    assert train_command.main(_run_args(tiny_model_dir, out, "--max_steps", "4", "--resume_from_checkpoint", "true")) == 0
    assert steps == [2, 3]
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 4 and (out / "checkpoint-4").is_dir()
    assert [e["step"] for e in state["log_history"] if "loss" in e] == [1, 2, 3, 4]

    with pytest.raises(UserError, match="not a checkpoint directory"):
        train_command.main(_run_args(tiny_model_dir, out, "--max_steps", "6", "--resume_from_checkpoint", str(tmp_path)))


def test_lora_run_saves_adapter_and_tokenizer(tiny_model_dir, gsm8k_path, tmp_path, capsys):
    out = tmp_path / "lora"
    argv = _run_args(tiny_model_dir, out, "--max_steps", "1", "--save_strategy", "no")
    argv[1] = str(REPO / "recipes" / "smollm2-cpu.yaml")
    assert train_command.main(argv) == 0
    assert f"saved LoRA adapter + tokenizer to {out}" in capsys.readouterr().out
    adapter = json.loads((out / "adapter_config.json").read_text())
    assert Path(adapter["base_model_name_or_path"]) == Path(tiny_model_dir)
    assert (out / "adapter_model.safetensors").is_file() and (out / "tokenizer.json").is_file()


# -------------------------------------------------------------------------------------------------------- bench-train


def test_bench_train_reports_both_ratios(tiny_model_dir, gsm8k_path, capsys):
    from mtp_cli.bench_train import main as bench

    argv = ["--model", tiny_model_dir, "--steps", "2", "--warmup", "1", "--batch-size", "2", "--json"]
    assert bench(argv) == 0
    report = json.loads(capsys.readouterr().out)
    time_, memory = report["step_time"], report["memory"]
    assert len(time_["sft_steps_s"]) == len(time_["mtp_steps_s"]) == 2
    assert time_["ratio"] == pytest.approx(time_["mtp_median_s"] / time_["sft_median_s"])
    assert memory["sft_lora_mib"] > 0 and memory["mtp_lora_mib"] > 0
    assert memory["ratio"] == pytest.approx(memory["mtp_lora_mib"] / memory["sft_lora_mib"])
    assert "RSS" in memory["method"] or "cuda" in memory["method"]


def test_bench_train_rejects_bad_flags():
    from mtp_cli.bench_train import main as bench

    with pytest.raises(UserError, match="--steps"):
        bench(["--steps", "0"])
    with pytest.raises(UserError, match="nothing to measure"):
        bench(["--skip-time", "--skip-memory"])
    with pytest.raises(UserError, match="does not fit"):
        bench(["--seq-len", "12", "--num-regions", "3", "--k-max", "8"])


@pytest.mark.skipif(torch.cuda.is_available(), reason="on a CUDA machine --bf16 is valid (launch/gpu_check.sh runs it)")
def test_bench_train_bf16_needs_cuda(capsys):
    from mtp_cli.main import main as mtp_main

    assert mtp_main(["bench-train", "--bf16", "--skip-memory"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error:") and "--bf16" in err and err.count("\n") == 1
