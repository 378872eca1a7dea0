"""One training run from start to final model: validate, build the trainer, train, save atomically (paper §3).

`prepare` checks everything that can be checked cheaply before the slow model load — the resume target, the output
directory, the dataset path and its rows — and `train` builds `MTPDistillTrainer`, removes an earlier run's
checkpoints only when the new run is about to write, trains and saves. Nothing of an earlier run is removed before
the new work is known to be valid.

A relative dataset path is tried against the working directory first, then against the repository root, so the CPU
recipe's `data/gsm8k/train.jsonl` works from anywhere inside the checkout.

The final model is written into `output_dir` (checkpoints stay in `output_dir/checkpoint-N`). It is staged in a
hidden sub-directory and moved in with its `config.json` (`adapter_config.json` for LoRA) last, the file every loader
opens first: a crash mid-save never leaves something that looks like a complete model.

Runs on a cluster (distill/checkpoints.py): `resume_from_checkpoint` true/last continues from the newest complete
checkpoint (read back first; a damaged one is an error), `auto` does so only when there is one (what a requeued job
passes), an output_dir holding an earlier run is never trained over unless asked (`overwrite_output_dir`: its
checkpoints are removed only after the recipe, data, model and output_dir are validated, when the new run is about to
write), and SIGTERM saves a checkpoint and stops without writing the final model (`TrainResult.preempted`).
"""

import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from distill.errors import UserError
from distill.models import REPO

STAGING = ".final.partial"


@dataclass
class TrainResult:
    output_dir: str
    step: int
    preempted: bool  # stopped by SIGTERM: the step's checkpoint is saved, the final model is not
    plot: Path | None  # training.png (main process, finished runs)
    is_main_process: bool



def resolve_dataset(name: str) -> str:
    """A local file (relative to the working directory, else to the repository root) or a hub name unchanged."""
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl", ".parquet"))
    if not looks_local:
        return name
    for candidate in (Path(name).expanduser(), REPO / name):
        if candidate.is_file():
            return str(candidate.resolve())
    raise UserError(f"dataset file {name} not found (looked in {Path.cwd()} and {REPO})")



def _resume_target(config) -> str | None:
    """`resume_from_checkpoint`: a checkpoint directory; true/last/latest for the newest complete one in output_dir
    (an error when there is none); auto for the newest one if any (a requeued job). The checkpoint is read back."""
    from distill.checkpoints import check_checkpoint, last_checkpoint

    value = config.resume_from_checkpoint
    if value is None or str(value).lower() in ("", "false", "no", "none"):
        return None
    if str(value).lower() in ("true", "yes", "last", "latest", "auto"):
        last = last_checkpoint(config.output_dir)
        if last is None and str(value).lower() == "auto":
            return None
        if last is None:
            raise UserError(f"nothing to resume: {config.output_dir} holds no complete checkpoint-N directory "
                            "(start without --resume)")
        value = last
    check_checkpoint(str(value))
    return str(value)


def _check_output_dir(config, resuming: bool) -> list[Path]:
    """Never train over an earlier run by accident: its checkpoint-N directories would be overwritten. Returns the old
    run's checkpoint directories to remove when --overwrite_output_dir asks to start over; the caller removes them only
    once everything else is validated and the new run is about to write (`_remove_old_run`)."""
    from distill.checkpoints import STAGING_PREFIX, last_checkpoint
    from distill.files import check_output_dir

    out = check_output_dir(config.output_dir, "output_dir")
    if resuming or not out.is_dir():
        return []
    final_model = any((out / marker).exists() for marker in ("config.json", "adapter_config.json"))
    if last_checkpoint(str(out)) is None and not final_model:
        return []
    if not config.overwrite_output_dir:
        raise UserError(
            f"output_dir {out} already holds a run; pass --resume to continue it, --overwrite_output_dir true to "
            "start over, or choose another --output_dir"
        )
    # asked to start over: the old checkpoints must not be resumed into the new run later
    return [path for path in [*out.glob("checkpoint-*"), *out.glob(f"{STAGING_PREFIX}*")] if path.is_dir()]


def _remove_old_run(config, paths: list[Path]) -> None:
    if config.should_save:
        for path in paths:
            shutil.rmtree(path)


def save_final(trainer, output_dir: str) -> str:
    """Trainer.save_model into a staging directory, then move the files in, marker file (config) last."""
    out = Path(output_dir)
    staging = out / STAGING
    if trainer.is_world_process_zero():
        shutil.rmtree(staging, ignore_errors=True)
    trainer.accelerator.wait_for_everyone()
    # Every rank calls save_model: under ZeRO-3 / FSDP it gathers the shards; only the main process writes.
    try:
        trainer.save_model(str(staging))
    except Exception as exc:  # disk full, quota, I/O error (safetensors, torch and json raise different types)
        if trainer.is_world_process_zero():
            shutil.rmtree(staging, ignore_errors=True)
        reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UserError(f"could not save the final model to {out}: {reason}; the checkpoints in {out} are intact "
                        "(continue with --resume once the cause is fixed)") from exc
    trainer.accelerator.wait_for_everyone()
    if trainer.is_world_process_zero():
        from distill.files import share_files

        share_files(staging)  # the user's umask, not the savers' 0600
        markers = ("config.json", "adapter_config.json")
        for marker in markers:  # un-commit the previous final model first (resumed runs)
            (out / marker).unlink(missing_ok=True)
        for path in sorted(staging.iterdir(), key=lambda p: p.name in markers):
            os.replace(path, out / path.name)
        staging.rmdir()
    trainer.accelerator.wait_for_everyone()
    return str(out)


@dataclass
class Prepared:
    resume: str | None
    old_run: list


def prepare(config) -> Prepared:
    """Validate the run before anything loads: the resume target, the output directory (an earlier run is refused
    unless overwrite_output_dir), the dataset path (resolved in place) and its rows (columns, empty or null rows, bad
    lines)."""
    from distill.data import load_examples

    resume = _resume_target(config)
    old_run = _check_output_dir(config, resuming=resume is not None)
    config.dataset_name = resolve_dataset(config.dataset_name)
    # read and checked before the slow model load; the trainer reads it again from the datasets cache
    load_examples(config.dataset_name, config.dataset_split, question_column=config.question_column,
                  answer_column=config.answer_column)
    return Prepared(resume, old_run)


def train(config, model_args, prepared: Prepared, *, trust_remote_code: bool = False,
          callbacks: list | None = None) -> TrainResult:
    """Build the trainer from `config` (MTPDistillConfig) and `model_args` (trl.ModelConfig), train and save the final
    model. `callbacks`: TrainerCallback instances (e.g. `mtp demo`'s time budget)."""
    from trl import get_peft_config

    from distill.models import load_tokenizer
    from distill.trainer import MTPDistillTrainer

    # The model goes to the trainer by name, loaded with these kwargs (TRL's model_init_kwargs convention); keys the
    # recipe sets in model_init_kwargs win over the ModelConfig fields, except trust_remote_code (distill/recipe.py).
    config.model_init_kwargs = {
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        **(config.model_init_kwargs or {}),
        "trust_remote_code": trust_remote_code,
    }
    out = Path(config.output_dir)
    created = not out.exists()
    try:
        tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=trust_remote_code)
        # No datasets passed: the trainer loads config.dataset_name, tokenizes it for the packing's raw length and
        # carves the eval split (eval_fraction), see distill.trainer.prepare_datasets.
        trainer = MTPDistillTrainer(
            model=model_args.model_name_or_path,
            args=config,
            processing_class=tokenizer,
            peft_config=get_peft_config(model_args),
            callbacks=callbacks,
        )
    except BaseException:
        if created and out.is_dir() and not any(out.iterdir()):
            out.rmdir()  # a run that never started leaves nothing behind
        raise
    _remove_old_run(config, prepared.old_run)  # the new run is about to write its first file
    trainer.train(resume_from_checkpoint=prepared.resume)
    main_process = trainer.is_world_process_zero()
    plot = None
    if not trainer.preempted:
        save_final(trainer, config.output_dir)
        if main_process:
            trainer.save_state()
            from distill.plots import training_plot

            plot = training_plot(trainer.state.log_history, Path(config.output_dir) / "training.png")

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # ZeRO-3 aborts at exit without it
    return TrainResult(str(config.output_dir), trainer.state.global_step, bool(trainer.preempted), plot, main_process)
