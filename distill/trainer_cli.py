"""`mtp train --config recipes/X.yaml [--key value ...]`: distil a causal LM into an MTP model (paper §3).

TRL-style: `trl.TrlParser` over three dataclasses, as `trl sft` and the alignment-handbook scripts do:
  * `MTPDistillConfig` (distill/trainer.py): every `transformers.TrainingArguments` flag plus the MTP knobs
    (k_min/k_max, num_regions, seq_len, teacher, supervision, ...) and the dataset (dataset_name, dataset_format,
    eval_fraction, ...);
  * `trl.ModelConfig`: the model (`model_name_or_path`, `dtype`, `attn_implementation`) and the LoRA options
    (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, `lora_modules_to_save`), turned into a
    `peft.LoraConfig` by `trl.get_peft_config`;
  * `ScriptArguments` (below): what neither holds.
The YAML file supplies defaults, command-line flags override them, a top-level `env:` mapping is exported to the
environment. An unknown key, in the file or on the command line, is an error: a typo must not silently train with a
default.

A relative dataset path is tried against the working directory first, then against the repository root, so the CPU
recipe's `data/gsm8k/train.jsonl` works from anywhere inside the checkout. Without a dataset the GSM8K train
split is used. `regenerate: true` trains on the starting model's own greedy answers to the dataset's head rows
instead (`mtp regenerate`; generated once, cached by fingerprint, reused).

The final model is written into `output_dir` (checkpoints stay in `output_dir/checkpoint-N`). It is staged in a
hidden sub-directory and moved in with its `config.json` (`adapter_config.json` for LoRA) last, the file every loader
opens first: a crash mid-save never leaves something that looks like a complete model.

Runs on a cluster (distill/checkpoints.py): `--resume` continues from the newest complete checkpoint (read back first;
a damaged one is an error), `--resume_from_checkpoint auto` does so only when there is one (what a requeued job
passes), an output_dir holding an earlier run is never trained over unless asked (`--overwrite_output_dir true`: its
checkpoints are removed only after the recipe, data, model and output_dir are validated, when the new run is about to
write), and SIGTERM saves a checkpoint and exits 0 without writing the final model.

Safety: remote code runs only when `trust_remote_code` is explicitly true, the command line winning over the recipe
(also over its `model_init_kwargs`), and the run says so; `--hub_token` is moved into HF_TOKEN and never saved.
"""

import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import UserError

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATASET = "data/gsm8k/train.jsonl"  # GSM8K train (the paper's data is GSM8K-train-derived, §3.1)
STAGING = ".final.partial"


@dataclass
class ScriptArguments:
    """Options of this script that neither the trainer config nor trl.ModelConfig carries."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off: safer)."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest complete checkpoint-N in output_dir (= --resume_from_checkpoint "
                          "last); an error when there is none."},
    )


# ----------------------------------------------------------------------------------------------------------- parsing


def _parser():
    from trl import ModelConfig, TrlParser

    from distill.trainer import MTPDistillConfig

    class Parser(TrlParser):
        # argparse would print usage and exit; we want one `error: ...` line from the `mtp` dispatcher instead.
        def error(self, message):
            raise UserError(message)

    # allow_abbrev=False: `--learning_rat 1` must be an error, not a silent prefix match.
    parser = Parser(
        (ScriptArguments, MTPDistillConfig, ModelConfig),
        prog="mtp train",
        usage="mtp train --config RECIPE.yaml [--key value ...]",
        description="Distil a causal LM into a multi-token predictor. --config RECIPE.yaml supplies the defaults (see "
        "recipes/); every option below overrides it; an unknown key or option is an error.",
        allow_abbrev=False,
    )
    parser.set_defaults(dataset_name=DEFAULT_DATASET)
    return parser


def _read_recipe(path: str) -> dict:
    import yaml

    if not Path(path).is_file():
        raise UserError(f"config file {path} not found")
    try:
        text = Path(path).read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"config file {path} is not UTF-8 text (byte {exc.start})") from None
    except OSError as exc:
        raise UserError(f"cannot read config file {path}: {exc.strerror or type(exc).__name__}") from None
    try:
        recipe = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise UserError(f"config file {path} is not valid YAML: {str(exc).splitlines()[0]}") from exc
    if not isinstance(recipe, dict):
        raise UserError(f"config file {path} must hold a YAML mapping of option: value")
    if not isinstance(recipe.get("env", {}), dict):
        raise UserError(f"config file {path}: `env` must be a mapping of VARIABLE: value")
    return recipe


def parse_args(argv: list[str]):
    """(ScriptArguments, MTPDistillConfig, ModelConfig) from `--config FILE` defaults + command-line overrides."""
    argv = list(argv)
    for i, arg in enumerate(argv):  # TrlParser only understands `--config FILE`, not `--config=FILE`
        if arg.startswith("--config="):
            argv[i : i + 1] = ["--config", arg.split("=", 1)[1]]
            break
    parser = _parser()
    recipe: dict = {}
    if "--config" in argv:
        i = argv.index("--config")
        if i + 1 >= len(argv):
            raise UserError("--config needs a file path")
        recipe = _read_recipe(argv[i + 1])
        # TrlParser reports unknown recipe keys as a ValueError listing "--key value" pairs; name them plainly.
        known = {action.dest for action in parser._actions} | {"env"}
        unknown = sorted(set(recipe) - known)
        if unknown:
            raise UserError(f"unknown key(s) in {argv[i + 1]}: {', '.join(unknown)}")
    try:
        script_args, config, model_args, unknown = parser.parse_args_and_config(argv, return_remaining_strings=True)
    except ValueError as exc:  # TrainingArguments.__post_init__ checks (e.g. bf16 without a GPU)
        raise UserError(str(exc).splitlines()[0]) from exc
    if unknown:
        raise UserError(f"unknown option(s): {' '.join(unknown)}")
    _check_model_args(model_args)
    script_args.trust_remote_code = _effective_trust_remote_code(argv, recipe, script_args, config)
    _keep_secrets_out(config)
    if script_args.resume:
        if config.resume_from_checkpoint not in (None, "", "last", "true", "latest"):
            raise UserError(f"--resume conflicts with --resume_from_checkpoint {config.resume_from_checkpoint}; "
                            "give one of them")
        config.resume_from_checkpoint = "last"
    return script_args, config, model_args


def _given_on_command_line(argv: list[str], name: str) -> bool:
    return any(arg == f"--{name}" or arg.startswith(f"--{name}=") for arg in argv)


def _effective_trust_remote_code(argv: list[str], recipe: dict, script_args, config) -> bool:
    """Remote code runs only when asked for explicitly, and the command line has the last word: `--trust_remote_code`
    on the command line wins over the recipe (its `trust_remote_code` and its `model_init_kwargs`); without it, every
    value the recipe or --model_init_kwargs gives must be true. The value is written back into model_init_kwargs, which
    is what loads the model."""
    kwargs = dict(config.model_init_kwargs or {})
    if _given_on_command_line(argv, "trust_remote_code"):
        trust = bool(script_args.trust_remote_code)
    else:
        given = [bool(kwargs["trust_remote_code"])] if "trust_remote_code" in kwargs else []
        if "trust_remote_code" in recipe:
            given.append(bool(script_args.trust_remote_code))
        trust = bool(given) and all(given)
    kwargs["trust_remote_code"] = trust
    config.model_init_kwargs = kwargs
    return trust


def _keep_secrets_out(config) -> None:
    """--hub_token never persists: it is moved into HF_TOKEN (what huggingface_hub reads) and removed from the saved
    arguments (training_args.bin), and from sys.argv, which wandb records with every run."""
    token = config.hub_token
    if not token:
        return
    os.environ["HF_TOKEN"] = token
    config.hub_token = None
    sys.argv = [arg.replace(token, "<HUB_TOKEN>") for arg in sys.argv]
    print("note: --hub_token is handed to the hub through HF_TOKEN and saved nowhere; prefer setting HF_TOKEN in the "
          "environment", file=sys.stderr)


def _check_model_args(model_args) -> None:
    """ModelConfig carries a few options this project does not implement: refuse them instead of ignoring them."""
    if not model_args.model_name_or_path:
        raise UserError("model_name_or_path is required (an alias such as smollm2-135m, a directory or a hub id)")
    if model_args.load_in_4bit or model_args.load_in_8bit:
        raise UserError("load_in_4bit / load_in_8bit are not supported by mtp train (train in bf16 or fp32)")
    if model_args.dtype in (None, "auto"):
        raise UserError("dtype auto is not supported; name it: float32, bfloat16 or float16")
    if model_args.model_revision != "main":
        raise UserError("model_revision is not supported; download the revision and pass its directory")
    if model_args.use_peft and model_args.lora_task_type != "CAUSAL_LM":
        raise UserError("lora_task_type must be CAUSAL_LM")


# -------------------------------------------------------------------------------------------------------------- data


def resolve_dataset(name: str) -> str:
    """A local file (relative to the working directory, else to the repository root) or a hub name unchanged."""
    looks_local = name.startswith((".", "/", "~")) or name.endswith((".json", ".jsonl", ".parquet"))
    if not looks_local:
        return name
    for candidate in (Path(name).expanduser(), REPO / name):
        if candidate.is_file():
            return str(candidate.resolve())
    raise UserError(f"dataset file {name} not found (looked in {Path.cwd()} and {REPO})")


# ------------------------------------------------------------------------------------------------- output directory


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


# -------------------------------------------------------------------------------------------------------------- main


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """`mtp train`; `callbacks` (TrainerCallback instances) is for callers in Python, e.g. `mtp demo`'s time budget."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script_args, config, model_args = parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)

    from trl import get_peft_config

    from distill.data import load_examples
    from distill.models import load_tokenizer
    from distill.trainer import MTPDistillTrainer

    # Everything is validated (recipe, output_dir, data, model, tokenizer, then the trainer loads the model and
    # tokenizes the data) before anything of an earlier run is removed.
    resume = _resume_target(config)
    old_run = _check_output_dir(config, resuming=resume is not None)
    config.dataset_name = resolve_dataset(config.dataset_name)
    # The data is read and checked (columns, empty or null rows, bad lines) before the slow model load; the trainer
    # reads it again from the datasets cache.
    load_examples(config.dataset_name, config.dataset_split, question_column=config.question_column,
                  answer_column=config.answer_column)
    if config.regenerate:  # the starting model's own answers to the head rows (cached; adaptive/regenerate.py)
        from adaptive.regenerate import regenerate_for_training

        with config.main_process_first(desc="regenerating the training data"):
            config.dataset_name = regenerate_for_training(config, model_args.model_name_or_path, model_args.dtype,
                                                          world_size=config.world_size,
                                                          trust_remote_code=script_args.trust_remote_code)
        config.question_column, config.answer_column = "question", "answer"

    # The model goes to the trainer by name, loaded with these kwargs (TRL's model_init_kwargs convention); keys the
    # recipe sets in model_init_kwargs win over the ModelConfig fields, except trust_remote_code (parse_args).
    config.model_init_kwargs = {
        "dtype": model_args.dtype,
        "attn_implementation": model_args.attn_implementation,
        **(config.model_init_kwargs or {}),
        "trust_remote_code": script_args.trust_remote_code,
    }
    if script_args.trust_remote_code:
        print(f"note: remote code is enabled (trust_remote_code true): Python code shipped with "
              f"{model_args.model_name_or_path} may run", file=sys.stderr)
    out = Path(config.output_dir)
    created = not out.exists()
    try:
        tokenizer = load_tokenizer(model_args.model_name_or_path, trust_remote_code=script_args.trust_remote_code)
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
    _remove_old_run(config, old_run)  # the new run is about to write its first file
    trainer.train(resume_from_checkpoint=resume)
    if trainer.preempted:  # SIGTERM: the checkpoint of this step is saved; the run is not finished
        if trainer.is_world_process_zero():
            print(f"stopped on SIGTERM at step {trainer.state.global_step}: saved "
                  f"{Path(config.output_dir) / f'checkpoint-{trainer.state.global_step}'}; continue with --resume")
    else:
        path = save_final(trainer, config.output_dir)
        if trainer.is_world_process_zero():
            trainer.save_state()
            from distill.plots import training_plot

            plot = training_plot(trainer.state.log_history, Path(config.output_dir) / "training.png")
            if plot is not None:
                print(f"wrote {plot}")
            kind = "LoRA adapter" if model_args.use_peft else "model"
            print(f"saved {kind} + tokenizer to {path} (step {trainer.state.global_step})")

    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()  # ZeRO-3 aborts at exit without it
    return 0
