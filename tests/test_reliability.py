"""What a cluster does to a training job, on the tiny model (CPU, fixed seed).

* SIGKILL mid-save and mid-step, then SIGTERM, each followed by `--resume`: the run ends with exactly the weights and
  losses of an uninterrupted run, and no torn checkpoint is ever picked.
* Guards: a non-finite loss skips its step (no update) and is counted; N in a row end the run; an output_dir holding a
  run is never trained over unless asked.
* Bad input: one `error:` line, exit status 2, and not one byte changed on disk.

The interrupted runs are real subprocesses that kill themselves at a chosen point (a small driver patches `torch.save`
or `training_step`); SIGKILL cannot be caught, so what is on disk afterwards is what a cluster would leave.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from distill import run
from mtp_cli import train as train_command
from mtp_cli.main import main as mtp

pytestmark = pytest.mark.usefixtures("restore_environment")  # recipes export their `env:` block
REPO = Path(__file__).resolve().parents[1]
CPU_RECIPE = str(REPO / "recipes" / "smollm2-cpu-full.yaml")
STEPS = 6


def train_args(model: str, data: str, out, *extra: str) -> list[str]:
    """The CPU recipe shrunk: 2 rows per step, a checkpoint every 2 steps (the recipe keeps the newest 2)."""
    return ["--config", CPU_RECIPE, "--model_name_or_path", model, "--dataset_name", data, "--output_dir", str(out),
            "--eval_fraction", "0", "--per_device_train_batch_size", "2", "--save_steps", "2", "--warmup_steps", "0",
            "--learning_rate", "1e-3", "--logging_steps", "1", "--disable_tqdm", "true", "--report_to", "none",
            *extra]


def snapshot(root: Path) -> dict[str, str]:
    """Every path under root with a digest of its bytes."""
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(Path(root).rglob("*"))}


def one_error(capsys, argv: list[str], message: str) -> str:
    """`mtp ARGV` fails with exit status 2 and exactly one `error:` line containing `message`."""
    assert mtp(argv) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0], err[-2000:]
    assert "Traceback" not in err
    return errors[0]


def losses(run_dir: Path) -> dict[int, float]:
    state = json.loads((Path(run_dir) / "trainer_state.json").read_text())
    return {e["step"]: e["loss"] for e in state["log_history"] if "loss" in e}


@pytest.fixture(scope="module")
def reference_run(tiny_model_dir, gsm8k_rows, tmp_path_factory) -> Path:
    """The uninterrupted run: 6 steps, checkpoints at 4 and 6 kept, final model (one thread, like the drivers)."""
    out = tmp_path_factory.mktemp("reference") / "run"
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    saved = dict(os.environ)
    try:
        assert train_command.main(train_args(tiny_model_dir, gsm8k_rows, out, "--max_steps", str(STEPS))) == 0
    finally:
        torch.set_num_threads(threads)
        os.environ.clear()
        os.environ.update(saved)
    return out


@pytest.fixture
def earlier_run(reference_run, tmp_path) -> Path:
    """A private copy of the reference run's output_dir."""
    out = tmp_path / "run"
    shutil.copytree(reference_run, out)
    return out


# ------------------------------------------------------------------------------------------- kills and preemption

DRIVER = '''
import os, signal, sys
import torch
from distill.trainer import MTPDistillTrainer
from mtp_cli.main import main

mode, at = sys.argv[1], int(sys.argv[2])
if mode == "kill-mid-save":  # SIGKILL once the weights of checkpoint-AT are written, before its optimizer state
    real_save = torch.save
    def save(obj, f, *args, **kwargs):
        if f"checkpoint-{at}" in str(f) and str(f).endswith("optimizer.pt"):
            os.kill(os.getpid(), signal.SIGKILL)
        return real_save(obj, f, *args, **kwargs)
    torch.save = save
elif mode in ("kill-mid-step", "term-mid-step"):  # the signal arrives after step AT's backward, before its update
    sig = signal.SIGKILL if mode == "kill-mid-step" else signal.SIGTERM
    real_step = MTPDistillTrainer.training_step
    def training_step(self, *args, **kwargs):
        loss = real_step(self, *args, **kwargs)
        if self.state.global_step == at - 1:
            os.kill(os.getpid(), sig)
        return loss
    MTPDistillTrainer.training_step = training_step
sys.exit(main(["train", *sys.argv[3:]]))
'''


def run_driver(tmp_path: Path, mode: str, at: int, argv: list[str]) -> subprocess.CompletedProcess:
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), "WANDB_MODE": "disabled"}
    return subprocess.run([sys.executable, str(driver), mode, str(at), *argv], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)


def test_killed_and_preempted_run_resumes_to_the_uninterrupted_weights(tiny_model_dir, gsm8k_rows, reference_run,
                                                                        tmp_path):
    from transformers.trainer_utils import get_last_checkpoint

    out = tmp_path / "run"
    argv = train_args(tiny_model_dir, gsm8k_rows, out, "--max_steps", str(STEPS))

    # 1. SIGKILL while checkpoint-4 is being written: its weights are on disk, under the hidden staging name only.
    done = run_driver(tmp_path, "kill-mid-save", 4, argv)
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert (out / ".partial-checkpoint-4" / "checkpoint-4" / "model.safetensors").is_file()
    assert not (out / "checkpoint-4").exists() and not (out / "config.json").exists()
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-2")

    # 2. --resume continues from checkpoint-2; SIGKILL in the middle of step 5 (after its backward).
    done = run_driver(tmp_path, "kill-mid-step", 5, [*argv, "--resume"])
    assert done.returncode == -signal.SIGKILL, done.stderr[-3000:]
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-4")
    assert not list(out.glob(".partial-*"))  # the torn save was cleared by the next one

    # 3. SIGTERM during step 5 (preemption): checkpoint-5 is saved, the process exits 0, no final model yet.
    done = run_driver(tmp_path, "term-mid-step", 5, [*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"stopped on SIGTERM at step 5: saved {out / 'checkpoint-5'}; continue with --resume" in done.stdout
    assert get_last_checkpoint(str(out)) == str(out / "checkpoint-5")
    assert not (out / "config.json").exists()

    # 4. --resume finishes the run: the same weights and per-step losses as the uninterrupted one.
    done = run_driver(tmp_path, "none", 0, [*argv, "--resume"])
    assert done.returncode == 0, done.stderr[-3000:]
    assert f"saved model + tokenizer to {out} (step {STEPS})" in done.stdout
    expected, got = load_file(reference_run / "model.safetensors"), load_file(out / "model.safetensors")
    assert expected.keys() == got.keys()
    for name in expected:
        torch.testing.assert_close(got[name], expected[name], rtol=0, atol=0, msg=name)
    assert losses(out) == losses(reference_run) and len(losses(out)) == STEPS


# ------------------------------------------------------------------------------------------------------- guards


def test_a_non_finite_step_is_skipped_and_counted(tiny_model_dir, gsm8k_path, tmp_path, monkeypatch):
    from transformers import TrainerCallback

    import distill.trainer as trainer_module
    from distill.data import load_examples
    from distill.models import load_model, load_tokenizer
    from distill.trainer import MTPDistillConfig, MTPDistillTrainer

    objective = trainer_module.mtp_objective

    def nan_at_step_1(*args, **kwargs):
        loss, metrics = objective(*args, **kwargs)
        return (loss * float("nan") if trainer.state.global_step == 1 else loss), metrics

    monkeypatch.setattr(trainer_module, "mtp_objective", nan_at_step_1)
    weights = []

    class Snapshot(TrainerCallback):
        def on_step_end(self, args, state, control, **kwargs):
            weights.append({n: p.detach().clone() for n, p in kwargs["model"].named_parameters()})

    args = MTPDistillConfig(output_dir=str(tmp_path / "out"), seq_len=48, num_regions=3, k_min=2, k_max=6,
                            per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, warmup_steps=0,
                            logging_steps=1, save_strategy="no", report_to="none", max_nonfinite_steps=2)
    trainer = MTPDistillTrainer(load_model(tiny_model_dir), args, processing_class=load_tokenizer(tiny_model_dir),
                                train_dataset=load_examples(str(gsm8k_path)).select(range(8)),
                                callbacks=[Snapshot()])
    trainer.train()
    assert trainer.state.global_step == 3
    step1, step2, step3 = weights
    assert all(torch.equal(step2[n], step1[n]) for n in step1)  # step 2 (global_step 1 -> 2) was skipped
    assert any(not torch.equal(step3[n], step2[n]) for n in step2)  # and training went on
    logs = [e for e in trainer.state.log_history if "loss" in e]
    assert [e["nonfinite_steps"] for e in logs] == [0.0, 1.0, 1.0]
    assert all(torch.isfinite(torch.tensor([e["loss"] for e in logs])))  # the skipped loss is not averaged in


def test_non_finite_steps_in_a_row_stop_the_run_and_change_nothing(tiny_model_dir, gsm8k_rows, earlier_run, capsys,
                                                                   monkeypatch):
    import distill.trainer as trainer_module

    objective = trainer_module.mtp_objective

    def always_inf(*args, **kwargs):
        loss, metrics = objective(*args, **kwargs)
        return loss * float("inf"), metrics

    monkeypatch.setattr(trainer_module, "mtp_objective", always_inf)
    before = snapshot(earlier_run)
    argv = train_args(tiny_model_dir, gsm8k_rows, earlier_run, "--max_steps", "8", "--resume",
                      "--max_nonfinite_steps", "2")
    line = one_error(capsys, ["train", *argv], "non-finite loss (NaN/inf) at 2 optimizer steps in a row (steps 7..8")
    assert f"the last complete checkpoint is {earlier_run / 'checkpoint-6'}" in line
    assert snapshot(earlier_run) == before


def test_an_earlier_run_is_never_trained_over_unless_asked(tiny_model_dir, gsm8k_rows, earlier_run, capsys):
    before = snapshot(earlier_run)
    argv = train_args(tiny_model_dir, gsm8k_rows, earlier_run, "--max_steps", "1")
    one_error(capsys, ["train", *argv], f"output_dir {earlier_run} already holds a run; pass --resume to continue it")
    assert snapshot(earlier_run) == before

    assert mtp(["train", *argv, "--save_steps", "1", "--overwrite_output_dir", "true"]) == 0
    assert sorted(p.name for p in earlier_run.glob("checkpoint-*")) == ["checkpoint-1"]  # the old ones are gone
    assert json.loads((earlier_run / "trainer_state.json").read_text())["global_step"] == 1


def test_resume_auto_continues_only_when_there_is_a_checkpoint(earlier_run, tmp_path):
    """What a requeued SLURM job passes: the newest complete checkpoint if any, else a fresh start."""
    from types import SimpleNamespace

    (earlier_run / ".partial-checkpoint-8" / "checkpoint-8").mkdir(parents=True)  # a killed save: never picked
    auto = SimpleNamespace(resume_from_checkpoint="auto", output_dir=str(earlier_run))
    assert run._resume_target(auto) == str(earlier_run / "checkpoint-6")
    assert run._resume_target(SimpleNamespace(resume_from_checkpoint="auto",
                                                      output_dir=str(tmp_path / "new"))) is None


# --------------------------------------------------------------------------------------------------- bad input


def _tiny_copy(tiny_model_dir: str, dest: Path) -> Path:
    shutil.copytree(tiny_model_dir, dest)
    return dest


def test_tokenizer_without_pad_token_is_handled(tiny_model_dir, gsm8k_rows, tmp_path, capsys):
    from transformers import AutoTokenizer

    model = _tiny_copy(tiny_model_dir, tmp_path / "nopad")
    config = json.loads((model / "tokenizer_config.json").read_text())
    config.pop("pad_token", None)
    (model / "tokenizer_config.json").write_text(json.dumps(config))
    assert AutoTokenizer.from_pretrained(model).pad_token is None
    out = tmp_path / "run"
    assert mtp(["train", *train_args(str(model), gsm8k_rows, out, "--max_steps", "1", "--save_strategy", "no")]) == 0
    assert "saved model + tokenizer" in capsys.readouterr().out


def test_teacher_with_another_vocabulary_is_an_error(tiny_model_dir, gsm8k_rows, tmp_path, capsys):
    from distill.models import load_model, load_tokenizer

    teacher = tmp_path / "teacher"
    tokenizer, model = load_tokenizer(tiny_model_dir), load_model(tiny_model_dir)
    tokenizer.add_tokens(["<extra_a>", "<extra_b>"])
    model.resize_token_embeddings(len(tokenizer))
    model.save_pretrained(teacher)
    tokenizer.save_pretrained(teacher)
    capsys.readouterr()
    before = snapshot(tmp_path)
    argv = train_args(tiny_model_dir, gsm8k_rows, tmp_path / "run", "--teacher", str(teacher), "--max_steps", "1")
    one_error(capsys, ["train", *argv], "vocab mismatch: teacher")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("case, flags, message", [
    ("k_max wider than a region", ["--k_max", "40"], "k=40 does not fit: seq_len=96 // num_regions=3 = 32 slots"),
    ("k below 2 (training)", ["--k_min", "0"], "need 2 <= k_min <= k_max, got k_min=0"),
    ("unknown recipe key", ["--config", "BADRECIPE"], "unknown key(s) in"),
    ("missing dataset file", ["--dataset_name", "MISSING"], "dataset file"),
    ("missing dataset column", ["--dataset_name", "NOCOLUMN"], "name the question and answer columns explicitly"),
    ("named column absent", ["--question_column", "prompt", "--answer_column", "answer"], "has no column 'prompt'"),
    ("rows shorter than one region", ["--dataset_name", "SHORT", "--dataset_format", "plain"],
     "rows of SHORT (train) are shorter than one MTP region"),
    ("resume with nothing to resume", ["--resume"], "nothing to resume"),
    ("resume and another checkpoint", ["--resume", "--resume_from_checkpoint", "x"], "--resume conflicts"),
])
def test_bad_training_input_is_one_error_line_and_changes_nothing(tiny_model_dir, gsm8k_rows, tmp_path, capsys,
                                                                   case, flags, message):
    (tmp_path / "bad.yaml").write_text(Path(CPU_RECIPE).read_text() + "learnin_rate: 0.1\n")
    (tmp_path / "nocolumn.jsonl").write_text('{"prompt": "2+2?", "completion": "4"}\n' * 4)
    (tmp_path / "short.jsonl").write_text('{"question": "2+2?", "answer": "4"}\n' * 4)
    subst = {"BADRECIPE": str(tmp_path / "bad.yaml"), "MISSING": str(tmp_path / "missing.jsonl"),
             "NOCOLUMN": str(tmp_path / "nocolumn.jsonl"), "SHORT": str(tmp_path / "short.jsonl")}
    flags = [subst.get(f, f) for f in flags]
    message = message.replace("SHORT", subst["SHORT"])
    (tmp_path / "run").mkdir()
    before = snapshot(tmp_path)
    argv = train_args(tiny_model_dir, gsm8k_rows, tmp_path / "run", "--max_steps", "1")
    if "--config" in flags:  # replace the recipe
        i = flags.index("--config")
        argv[1], flags = flags[i + 1], flags[:i] + flags[i + 2:]
    one_error(capsys, ["train", *argv, *flags], message)
    assert snapshot(tmp_path) == before, case


def test_unsupported_architecture_is_an_error(tiny_model_dir, gsm8k_rows, tmp_path, capsys):
    from transformers import BloomConfig, BloomForCausalLM

    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    bloom = tmp_path / "bloom"
    BloomForCausalLM(BloomConfig(vocab_size=len(tokenizer), hidden_size=32, n_layer=1, n_head=2)).save_pretrained(bloom)
    tokenizer.save_pretrained(bloom)
    capsys.readouterr()
    before = snapshot(tmp_path)
    argv = train_args(str(bloom), gsm8k_rows, tmp_path / "run", "--max_steps", "1")
    one_error(capsys, ["train", *argv], "unsupported architecture BloomForCausalLM: its forward takes no position_ids")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("damage, message", [
    ("truncate-weights", "checkpoint-6 is corrupt: model.safetensors cannot be read"),
    ("truncate-optimizer", "checkpoint-6 is corrupt: optimizer.pt cannot be read"),
    ("garble-state", "checkpoint-6 is corrupt: trainer_state.json cannot be read"),
])
def test_corrupt_checkpoint_is_an_error(tiny_model_dir, gsm8k_rows, earlier_run, capsys, damage, message):
    checkpoint = earlier_run / "checkpoint-6"
    if damage == "garble-state":
        (checkpoint / "trainer_state.json").write_text('{"global_step": 6, "log_hist')
    else:
        path = checkpoint / ("model.safetensors" if damage == "truncate-weights" else "optimizer.pt")
        with open(path, "r+b") as fh:
            fh.truncate(path.stat().st_size // 2)
    before = snapshot(earlier_run)
    argv = train_args(tiny_model_dir, gsm8k_rows, earlier_run, "--max_steps", "8", "--resume")
    one_error(capsys, ["train", *argv], message)
    assert snapshot(earlier_run) == before


def test_disk_full_while_saving_is_an_error_and_keeps_the_last_checkpoint(tiny_model_dir, gsm8k_rows, earlier_run,
                                                                           capsys, monkeypatch):
    real_save = torch.save

    def full_disk(obj, f, *args, **kwargs):
        if "checkpoint-8" in str(f):
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(f))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", full_disk)
    before = snapshot(earlier_run)
    argv = train_args(tiny_model_dir, gsm8k_rows, earlier_run, "--max_steps", "8", "--resume")
    line = one_error(capsys, ["train", *argv], f"could not save checkpoint-8 to {earlier_run}: [Errno 28] No space")
    assert f"the last complete checkpoint is {earlier_run / 'checkpoint-6'}" in line
    assert snapshot(earlier_run) == before  # the half-written checkpoint-8 is gone; nothing else was touched


# ------------------------------------------------------------------------------------------------ mtp generate


def test_model_without_mtp_token_given_to_generate_is_an_error(tiny_model_dir, tmp_path, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    from distill.models import load_tokenizer

    tokenizer = load_tokenizer(tiny_model_dir)
    base = tmp_path / "base"
    LlamaForCausalLM(LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                 num_attention_heads=2, num_key_value_heads=1)).save_pretrained(base)
    tokenizer.save_pretrained(base)
    capsys.readouterr()
    before = snapshot(tmp_path)
    html = tmp_path / "view.html"
    one_error(capsys, ["generate", "--model", str(base), "--prompt", "hi", "--html", str(html)],
              "is not an MTP model (no config.mtp_mask_token_id); train it with `mtp train`")
    assert snapshot(tmp_path) == before


@pytest.mark.parametrize("flags, message", [
    (["--strategy", "confadapt", "--tau", "0"], "tau must be in (0, 1]"),
    (["--strategy", "confadapt", "--tau", "1.5"], "tau must be in (0, 1]"),
    (["--strategy", "static", "--k", "0"], "k must be an integer"),
    (["--strategy", "confadapt", "--k-max", "0"], "k_max"),
])
def test_bad_decoding_input_is_one_error_line_and_changes_nothing(tiny_model_dir, tmp_path, capsys, flags, message):
    html = tmp_path / "view.html"
    before = snapshot(tmp_path)
    one_error(capsys, ["generate", "--model", tiny_model_dir, "--prompt", "hi", "--html", str(html), *flags], message)
    assert snapshot(tmp_path) == before
