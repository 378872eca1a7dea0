"""`mtp calibrate`: fit per-position confidence calibration for ConfAdapt on the model's own rollouts (paper §4.2).

    mtp calibrate --model DIR [--dataset PATH|hub] [--n 32] [--k-max K] [--method temperature|isotonic]

Decodes the last --n questions of the dataset self-speculatively (lossless: its greedy tokens), labels every verified
draft (adaptive/calibration_data.py), fits per-position calibration (adaptive/calibration.py) and saves it beside the
model, where `mtp tune` finds it (and `mtp generate`, `mtp evaluate` with --calibrated).

Quality is measured honestly: the prompts are split in two halves (by prompt, seeded), a calibrator fitted on one half
is scored on the other (the printed table, the reliability diagram and the `metrics` of the JSON). The saved
calibrator is then refit on all prompts (same method, twice the data); its per-position parameters are printed.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

from adaptive.calibration import CALIBRATION_FILE, METHODS, Calibrator, fit
from adaptive.calibration_data import CalibrationSamples, collect, split_by_prompt
from adaptive.loading import load_mtp_model, mtp_defaults
from distill.models import DTYPES, GSM8K_TRAIN
from distill.decoding_defaults import stop_token_ids
from adaptive.metrics import calibration_metrics
from adaptive.prompts import held_out_tail
from adaptive.strategies import MAX_K, parse_k_max
from distill.errors import UserError
from distill.files import check_output_dir
from distill.plots import reliability_diagram
from mtp_cli.args import Parser, at_least

DEFAULT_N = 32  # prompts `mtp calibrate` decodes


def main(argv: list[str]) -> int:
    from adaptive.decoder import MTPDecoder

    parser = Parser(prog="mtp calibrate", description="Fit per-position confidence calibration for ConfAdapt on "
                    "self-speculative rollouts (labels: draft == the model's own greedy token); saved beside the "
                    "model, used by mtp generate / tune / evaluate.")
    parser.add_argument("--model", required=True, help="MTP model directory (with a trained <MTP> token)")
    parser.add_argument("--dataset", default=str(GSM8K_TRAIN),
                        help="questions: a local .jsonl/.json/.parquet or a hub name (default: the GSM8K train file; "
                        "its last --n rows are used, rows a training run on its head has not seen)")
    parser.add_argument("--split", default="train", help="split of a hub dataset (default train)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"questions to decode (default {DEFAULT_N})")
    parser.add_argument("--k-max", type=int, help="span positions per forward (default: the model's k_max)")
    parser.add_argument("--method", choices=METHODS, default="temperature", help="default temperature")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the questions as-is, no chat template")
    parser.add_argument("--output", help=f"directory for {CALIBRATION_FILE} and reliability.png (default: the model "
                        "directory, where mtp generate finds the calibrator)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split of the prompts")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    # Everything checkable is checked before the model loads.
    at_least("--n", args.n, 2)
    at_least("--max-new-tokens", args.max_new_tokens, 2)
    at_least("--batch-size", args.batch_size, 1)
    if args.k_max is not None and not 2 <= args.k_max <= MAX_K:
        raise UserError(f"--k-max must be in [2, {MAX_K}] (position 1 is always the greedy token), got {args.k_max}")
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"--model {args.model} is not a model directory")
    _require_trained_mtp(model_dir)
    output = Path(args.output).expanduser() if args.output else model_dir
    check_output_dir(output, "--output")  # before the decoding, not after it

    k_max = args.k_max or parse_k_max(mtp_defaults(str(model_dir))["k_max"])[0]  # auto:N -> its bound N
    if not 2 <= k_max <= MAX_K:
        raise UserError(f"the model's k_max is {k_max}; pass --k-max in [2, {MAX_K}]")
    questions = _held_out_questions(args.dataset, args.split, args.n)
    model, tokenizer = load_mtp_model(str(model_dir), args.dtype)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    print(f"decoding the last {len(questions)} questions of {args.dataset} self-speculatively (k_max={k_max}, "
          f"lossless) to label every draft", file=sys.stderr)
    samples, results = collect(decoder, questions, k_max, max_new_tokens=args.max_new_tokens,
                               chat_template=not args.no_chat_template, batch_size=args.batch_size, progress=True)
    tokens = sum(len(r.token_ids) for r in results)
    forwards = sum(r.forward_passes for r in results)
    print(f"{len(samples)} verified drafts from {len(questions)} prompts ({tokens} tokens, "
          f"{tokens / max(forwards, 1):.2f} tokens/forward)")
    if len(np.unique(samples.prompt)) < 2:
        raise UserError("fewer than 2 prompts produced verified drafts; use a larger --n or --max-new-tokens")

    fit_half, held = split_by_prompt(samples, 0.5, args.seed)
    half = fit(fit_half, args.method)
    calibrated_held = half.calibrate_samples(held)
    before = calibration_metrics(held.confidence, held.correct)
    after = calibration_metrics(calibrated_held, held.correct)
    calibrator = fit(samples, args.method)
    calibrator.metrics = {
        "on": "held-out prompts: fitted on half of the prompts, scored on the other half; the saved parameters are "
              "then refit on all prompts",
        "fit_prompts": len(np.unique(fit_half.prompt)),
        "held_out_prompts": len(np.unique(held.prompt)),
        "before": before,
        "after": after,
        "in_sample": calibrator.metrics,
        "dataset": str(args.dataset),
        "max_new_tokens": args.max_new_tokens,
    }
    output.mkdir(parents=True, exist_ok=True)
    path = calibrator.save(output)
    png = reliability_diagram(output / "reliability.png", {
        "raw top-1 probability": (held.confidence, held.correct),
        f"{args.method} (fit on the other half)": (calibrated_held, held.correct),
    }, title=f"mtp calibrate: {model_dir.name}, held-out drafts (j >= 2)")

    print(_metrics_table({"raw top-1 probability": before, f"{args.method}": after}))
    print()
    print(_position_table(calibrator, held, calibrated_held))
    print(f"wrote {path} ({args.method}, refit on all {len(samples)} drafts) and {png}")
    if output.resolve() == model_dir.resolve():
        print(f"ConfAdapt now scores confidence with it: mtp generate --model {args.model} ...")
    return 0


def _require_trained_mtp(model_dir: Path) -> None:
    from transformers import AutoConfig

    from distill.models import read_config
    from distill.tokens import MTP_TOKEN

    read_config(model_dir)  # a config that is not a model config is reported as such
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {model_dir}: cannot read its config ({str(exc).splitlines()[0]})") from None
    if getattr(config, "mtp_mask_token_id", None) is None:
        raise UserError(f"--model {model_dir} has no {MTP_TOKEN} token; calibration needs a model distilled with "
                        "`mtp train`")


def _metrics_table(rows: dict[str, dict]) -> str:
    head = f"{'held-out':<22} {'n':>6} {'accuracy':>8} {'mean conf':>9} {'ECE':>7} {'MCE':>7} {'Brier':>7} {'AUROC':>7}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        auroc = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
        lines.append(f"{name:<22} {m['n']:>6} {m['accuracy']:>8.3f} {m['mean_confidence']:>9.3f} {m['ece']:>7.3f} "
                     f"{m['mce']:>7.3f} {m['brier']:>7.3f} {auroc:>7}")
    return "\n".join(lines)


def _position_table(calibrator: Calibrator, held: CalibrationSamples, calibrated: np.ndarray) -> str:
    head = f"{'j':>3} {'n':>6} {'accuracy':>8} {'raw conf':>8} {'calibrated':>10}  parameters (fit on all prompts)"
    lines = [head, "-" * len(head)]
    for j in range(2, calibrator.k_max + 1):
        at_j = held.position == j
        p = calibrator.params(j)
        what = (f"T={p['temperature']:.3f}" if calibrator.method == "temperature"
                else f"{len(p['x'])} breakpoints") + (" (pooled)" if p.get("source") == "pooled" else "")
        if at_j.any():
            lines.append(f"{j:>3} {int(at_j.sum()):>6} {held.correct[at_j].mean():>8.3f} "
                         f"{held.confidence[at_j].mean():>8.3f} {calibrated[at_j].mean():>10.3f}  {what}")
        else:
            lines.append(f"{j:>3} {0:>6} {'-':>8} {'-':>8} {'-':>10}  {what}")
    return "\n".join(lines)


def _held_out_questions(dataset: str, split: str, n: int) -> list[str]:
    from distill.data import load_examples, quiet_datasets

    with quiet_datasets():  # a few dozen questions: datasets' "Generating train split" bars would only be noise
        ds = load_examples(dataset, split)
    if len(ds) < n:
        raise UserError(f"dataset {dataset} has {len(ds)} rows; --n asks for {n}")
    return list(held_out_tail(ds["query"], n)[0])
