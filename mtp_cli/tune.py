"""`mtp tune`: choose ConfAdapt's tau and k_max for a target, with a statistical guarantee, never slower than k=1.

    mtp tune --model DIR (--target-drop 0.02 | --target-agreement 0.95 [--agreement answer|tokens:N])
             [--prompts P.jsonl | --dataset PATH|hub [--start S]] [--n 200] [--delta 0.05] [--min-speed S]
             [--speed tokens|wallclock] [--taus 0.995,0.99,...] [--k-max 4,8,16] [--measure 3]
             [--sweep replay|rollout] [--format chat|cot8] [--full-sweep] [--report-dir DIR] [--no-write]

The tuning itself is adaptive/tuner.py's `tune` (the reference run, the sweep, the certificate of adaptive/ltt.py, the
wall-clock check against k=1, report.json and pareto.png in --report-dir, default DIR/tune) and the chosen strategy
goes into DIR/generation_config.json unless --no-write. This module parses and checks the flags, reads the
calibration problems and loads the model.

Data. By default the calibration problems are the last --n rows of the local GSM8K *train* file
(distill.models.GSM8K_TRAIN), disjoint from `mtp evaluate`'s *test* split; --start picks other rows. --prompts reads
unlabelled prompts (agreement target only), the first --n of the file.

Bad input (a target outside its range, both targets, --target-drop on unlabelled prompts, a prompts file without
prompts) is one `error:` line before anything is written. With too few problems to certify anything at the target and
level (adaptive/ltt.py `min_certifiable_n`) the command warns and runs anyway.
"""

from __future__ import annotations

import sys
from pathlib import Path

from adaptive.loading import load_model_calibrator, load_mtp_model
from distill.models import DTYPES, GSM8K_TRAIN
from distill.decoding_defaults import stop_token_ids
from adaptive.ltt import SPEEDS, min_certifiable_n
from adaptive.prompts import held_out_tail, load_prompts
from adaptive.strategies import MAX_K
from adaptive.tuner import DEFAULT_MEASURE, DEFAULT_N, K_MAX_GRID, TAU_GRID, read_generation_config, tune
from distill.errors import UserError
from distill.files import check_output_dir
from distill.models import resolve_model_path
from distill.decoding_defaults import check_tau
from mtp_cli.args import Parser, at_least, check_fraction, number_list


def main(argv: list[str]) -> int:
    parser = Parser(prog="mtp tune", description="Choose ConfAdapt's tau and k_max for a target (accuracy drop "
                     "versus k=1 on labelled problems, or agreement with k=1 on any prompts), certified by "
                     "Learn-then-Test and never slower than k=1, and write them into the model's generation config.")
    parser.add_argument("--model", required=True, help="MTP model directory (its generation config is updated)")
    parser.add_argument("--target-drop", type=float,
                        help="largest acceptable accuracy drop versus k=1, as a fraction (0.02 = 2 points); needs "
                             "labelled problems")
    parser.add_argument("--target-agreement", type=float,
                        help="smallest acceptable agreement with k=1's output, in (0, 1] (0.95 = 95%%); no labels "
                             "needed")
    parser.add_argument("--agreement", default="answer",
                        help="what must agree: 'answer' (final answer, GSM8K-style extraction; default) or "
                             "'tokens:N' (the first N generated tokens)")
    parser.add_argument("--prompts", help='unlabelled prompts: JSON lines with a "prompt" or "question" field '
                                          "(with --target-agreement)")
    parser.add_argument("--delta", type=float, default=0.05,
                        help="error level: the guarantee holds with probability >= 1 - delta (default 0.05)")
    parser.add_argument("--min-speed", type=float,
                        help="instead: the best setting at least this fast (no certification)")
    parser.add_argument("--no-lossless", action="store_true",
                        help="do not time the lossless self-speculative mode as a candidate (it is chosen when "
                             "measured faster than k=1 and the certified ConfAdapt setting)")
    parser.add_argument("--speed", choices=tuple(SPEEDS), default="tokens",
                        help="rank certified settings by tokens per forward (default) or measured wall-clock tok/s")
    parser.add_argument("--measure", type=int, default=DEFAULT_MEASURE,
                        help=f"candidates measured wall-clock beside k=1 (default {DEFAULT_MEASURE}); the choice is "
                             "never slower than k=1")
    parser.add_argument("--sweep", choices=("replay", "rollout"), default="replay",
                        help="replay: one packed forward per question over the greedy rollout, real decoding only "
                             "where a setting diverges (default); rollout: decode every setting on every question")
    parser.add_argument("--taus", default=",".join(f"{t:g}" for t in TAU_GRID), help="comma-separated tau grid")
    parser.add_argument("--k-max", default=",".join(map(str, K_MAX_GRID)), help="comma-separated k_max values")
    parser.add_argument("--dataset", default=str(GSM8K_TRAIN),
                        help="calibration problems: a hub name or a local jsonl (default: the GSM8K train file)")
    parser.add_argument("--split", default="train", help="split of a hub dataset (default train; evaluate uses test)")
    parser.add_argument("--start", type=int, help="first row (default: the last --n rows)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"calibration problems (default {DEFAULT_N})")
    parser.add_argument("--format", choices=("chat", "cot8"), default="chat",
                        help="prompt format: chat (the format mtp train distils on) or cot8 (8-shot GSM8K CoT)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full-sweep", action="store_true",
                        help="evaluate every setting, also those that can no longer be certified")
    parser.add_argument("--report-dir", help="where report.json and pareto.png go (default: DIR/tune)")
    parser.add_argument("--no-write", action="store_true", help="leave the model's generation config untouched")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    # Everything that can be checked is checked before the model loads.
    taus, k_maxes = _check_args(args)
    agreement_tokens = parse_agreement(args.agreement)
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir() and not (args.no_write and args.report_dir):
        raise UserError(f"--model {args.model} is not a directory; pass a model directory (the tuned defaults are "
                        "written into its generation config), or --no-write with --report-dir")
    if model_dir.is_dir():
        resolve_model_path(str(model_dir))  # UserError unless it is a model directory
    if not args.no_write:
        read_generation_config(model_dir)  # a corrupt file fails now, not after the sweep
    report_dir = Path(args.report_dir).expanduser() if args.report_dir else model_dir / "tune"
    check_output_dir(report_dir, "--report-dir")  # before the sweep, not after it
    problems, start = _calibration_problems(args)
    agreement = args.target_agreement is not None
    risk = 1 - args.target_agreement if agreement else args.target_drop
    level = args.delta / len(k_maxes)
    need = min_certifiable_n(risk, level)
    if args.min_speed is None and (need is None or len(problems) < need):
        print(f"warning: with n={len(problems)} nothing can be certified ("
              + ("agreement 1 has p = 1 whatever the data" if need is None else
                 f"zero {'disagreements' if agreement else 'regressions'} give p = {(1 - risk) ** len(problems):.3f} "
                 f"> {level:.4f} = delta / {len(k_maxes)} k_max sequences; use n >= {need}, a looser target or "
                 "delta, or fewer --k-max values") + "). Running anyway; expect plain decoding (k=1).",
              file=sys.stderr)

    from adaptive.decoder import MTPDecoder

    model, tokenizer = load_mtp_model(args.model, args.dtype)
    # tau is tuned on the confidence scale `mtp generate` will gate on: the saved calibrator's, when there is one
    calibrator = load_model_calibrator(args.model)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    source = args.prompts if args.prompts is not None else args.dataset
    print(f"reference: static(k=1) on {len(problems)} problems "
          + (f"of {source}" if args.prompts is not None else
             f"(rows {start}..{start + len(problems) - 1} of {source})"), file=sys.stderr)
    target_text = (f"target agreement {args.target_agreement:g} ({args.agreement})" if agreement else
                   f"target drop {args.target_drop:g}")
    tune(decoder, problems, target_drop=args.target_drop, target_agreement=args.target_agreement,
         agreement_tokens=agreement_tokens, delta=args.delta, taus=taus, k_maxes=k_maxes,
         prompt_format=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
         scorer=calibrator, min_speed=args.min_speed, speed=args.speed, full_sweep=args.full_sweep,
         sweep_mode=args.sweep, measure=args.measure, labelled=args.prompts is None, lossless=not args.no_lossless,
         report_dir=report_dir, model_dir=None if args.no_write else model_dir,
         extra={"model": str(args.model), "dataset": str(source), "split": args.split, "start": start},
         title=f"mtp tune: {model_dir.name}, n={len(problems)}, {target_text}, delta {args.delta:g}")
    return 0


def parse_agreement(text: str) -> int | None:
    """--agreement: "answer" -> None (final answers), "tokens:N" -> N (first N generated tokens)."""
    text = str(text).strip()
    if text == "answer":
        return None
    if text.startswith("tokens:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise UserError(f"--agreement must be 'answer' or 'tokens:N' with N >= 1, got {text!r}")


def _check_args(args) -> tuple[list[float], list[int]]:
    if args.target_drop is not None and args.target_agreement is not None:
        raise UserError("give one target: --target-drop (labelled data) or --target-agreement (agreement with k=1), "
                        "not both")
    if args.target_drop is None and args.target_agreement is None:
        raise UserError("give a target: --target-drop D (accuracy drop vs k=1, labelled data) or "
                        "--target-agreement A (agreement with k=1, no labels needed)")
    if args.target_drop is not None:
        check_fraction(args.target_drop, "--target-drop")
        if args.prompts is not None:
            raise UserError("--target-drop needs labelled problems (gold answers); with --prompts use "
                            "--target-agreement")
    else:
        check_fraction(args.target_agreement, "--target-agreement", closed=True)
    if args.agreement != "answer" and args.target_agreement is None:
        raise UserError("--agreement goes with --target-agreement")
    parse_agreement(args.agreement)
    check_fraction(args.delta, "--delta")
    taus = number_list(args.taus, "--taus", float)
    for tau in taus:
        check_tau(tau, "--taus: every tau")
    k_maxes = number_list(args.k_max, "--k-max", int)
    for k in k_maxes:
        if not 1 <= k <= MAX_K:
            raise UserError(f"--k-max: every k_max must be in [1, {MAX_K}], got {k}")
    if args.min_speed is not None and not args.min_speed > 0:
        raise UserError(f"--min-speed must be > 0, got {args.min_speed:g}")
    for flag, value, low in (("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--start", args.start, 0),
                             ("--measure", args.measure, 0)):
        at_least(flag, value, low)
    return taus, k_maxes


def _calibration_problems(args) -> tuple[list[dict], int]:
    from adaptive.gsm8k import load_problems

    if args.prompts is not None:
        return load_prompts(args.prompts, args.n), 0
    if args.start is not None:
        problems = load_problems(args.dataset, args.split, limit=args.n, start=args.start)
        start = args.start
    else:  # the tail: rows a default training run is least likely to have seen, never `mtp evaluate`'s test split
        problems, start = held_out_tail(load_problems(args.dataset, args.split), args.n)
    if len(problems) < args.n:
        raise UserError(f"{args.dataset} has only {len(problems)} rows from row {start}; --n asks for {args.n}")
    return problems, start

