"""The `mtp` command: one console script, one subcommand per job.

    mtp train --config recipes/smollm2-cpu.yaml [--key value ...]   distill an MTP model (TrlParser style)
    mtp bench-train [--json]                                        MTP step vs plain SFT step, side by side
    mtp export --model DIR --output DIR                             merge LoRA, write a plain HF directory
    mtp generate --model DIR|alias --prompt ...                     decode with static / confadapt / selfspec
    mtp bench-decode [--concurrency 1,16] [--plot F.png] [--json]   tokens/s of each strategy vs HF baselines
    mtp calibrate --model DIR                                       fit confidence calibration (saved beside the model)
    mtp tune --model DIR --target-agreement 0.95 --prompts P.jsonl  certified tau / k_max, never slower than k=1
    mtp evaluate --model DIR                                        GSM8K accuracy and speed of decoding strategies
    mtp demo [--minutes 20]                                         distil, calibrate, tune and evaluate the default model
    mtp regenerate --model M --dataset D --output F.jsonl           the model's own greedy answers, for `mtp train`

`python -m mtp_cli ...` runs the same. Subcommand modules are imported lazily so `mtp --help` stays fast. A `UserError` anywhere becomes one
`error: ...` line on stderr and exit status 2; nothing else is printed.
"""

from __future__ import annotations

import importlib
import os
import sys

from distill.errors import UserError

# name -> (module, function, one-line help)
COMMANDS = {
    "train": ("mtp_cli.train", "main", "distill an MTP model from a YAML recipe"),
    "bench-train": ("mtp_cli.bench_train", "main", "MTP step time and LoRA memory vs plain SFT, measured side by side"),
    "export": ("mtp_cli.export", "main", "merge LoRA and save a plain safetensors HF directory"),
    "generate": ("mtp_cli.generate", "main", "generate with static / confadapt / selfspec decoding"),
    "bench-decode": ("mtp_cli.bench_decode", "main", "wall-clock tokens/s of each strategy vs HF greedy and prompt "
                     "lookup, at each concurrency"),
    "calibrate": ("mtp_cli.calibrate", "main", "fit per-position confidence calibration; reliability diagram"),
    "tune": ("mtp_cli.tune", "main", "pick tau / k_max for a certified accuracy drop or agreement with k=1, "
             "never slower than k=1 (Learn-then-Test)"),
    "evaluate": ("mtp_cli.evaluate", "main", "GSM8K accuracy, agreement with k=1, tokens/forward, wall-clock"),
    "demo": ("mtp_cli.demo", "main", "distil the default model, calibrate, tune and evaluate in one command"),
    "regenerate": ("mtp_cli.regenerate", "main", "the model's own greedy answers to a dataset's prompts (train data)"),
}


def _usage() -> str:
    lines = ["usage: mtp <command> [options]", "", "commands:"]
    lines += [f"  {name:<13} {help_}" for name, (_, _, help_) in COMMANDS.items()]
    lines += ["", "Run `mtp <command> --help` for the options of one command."]
    return "\n".join(lines)


def _quiet_environment() -> None:
    # wandb stays offline unless the user says otherwise: `mtp train` sets WANDB_MODE=offline when it reports to wandb
    # (distill/trainer.py), so no other command announces an offline wandb it never uses.
    os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
    # DeepSpeed (imported by transformers/accelerate) falls back to the CPU accelerator by itself but warns on every
    # command; name it up front when there is no GPU.
    if "DS_ACCELERATOR" not in os.environ:
        import torch

        if not torch.cuda.is_available():
            os.environ["DS_ACCELERATOR"] = "cpu"


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    name, rest = argv[0], argv[1:]
    if name not in COMMANDS:
        print(f"error: unknown command {name!r}\n\n{_usage()}", file=sys.stderr)
        return 2
    _quiet_environment()
    module_name, func_name, _ = COMMANDS[name]
    try:
        func = getattr(importlib.import_module(module_name), func_name)
        return int(func(rest) or 0)
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        return 130

