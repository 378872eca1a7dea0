"""A training run's configuration: a YAML recipe plus overrides -> the three TRL-style dataclasses (paper §3).

TRL-style: `trl.TrlParser` over three dataclasses, as `trl sft` and the alignment-handbook scripts do:
  * `MTPDistillConfig` (distill/trainer.py): every `transformers.TrainingArguments` flag plus the MTP knobs
    (k_min/k_max, num_regions, seq_len, teacher, supervision, ...) and the dataset (dataset_name, dataset_format,
    eval_fraction, ...);
  * `trl.ModelConfig`: the model (`model_name_or_path`, `dtype`, `attn_implementation`) and the LoRA options
    (`use_peft`, `lora_r`, `lora_alpha`, `lora_dropout`, `lora_target_modules`, `lora_modules_to_save`), turned into a
    `peft.LoraConfig` by `trl.get_peft_config`;
  * `ScriptArguments` (below): what neither holds.
The YAML file supplies defaults, command-line flags (or `load_recipe`'s keyword overrides) override them, a top-level
`env:` mapping is exported to the environment. An unknown key, in the file or on the command line, is an error: a
typo must not silently train with a default.

Safety: remote code runs only when `trust_remote_code` is explicitly true, the command line winning over the recipe
(also over its `model_init_kwargs`); `--hub_token` is moved into HF_TOKEN and never saved.
"""

import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

from distill.errors import UserError

DEFAULT_DATASET = "data/gsm8k/train.jsonl"  # GSM8K train (the paper's data is GSM8K-train-derived, §3.1)


@dataclass
class ScriptArguments:
    """Options of this script that neither the trainer config nor trl.ModelConfig carries."""

    trust_remote_code: bool = field(default=False, metadata={"help": "Allow model code from the hub (off: safer)."})
    resume: bool = field(
        default=False,
        metadata={"help": "Continue from the newest complete checkpoint-N in output_dir (= --resume_from_checkpoint "
                          "last); an error when there is none."},
    )



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


def load_recipe(path, **overrides):
    """`parse_args` for callers in Python: the recipe at `path` with `key=value` overrides (the names of the recipe's
    keys), validated exactly as `mtp train --config path --key value ...` is."""
    argv = ["--config", str(path)]
    for key, value in overrides.items():
        argv += [f"--{key}", str(value)]
    return parse_args(argv)
