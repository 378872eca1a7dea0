"""`mtp regenerate`: the model's own greedy answers to a dataset's prompts, as training data for `mtp train`.

    mtp regenerate --model M --dataset D --output data.jsonl [--max-new-tokens 256] [--batch-size 16] [--start S]
                   [--limit N] [--format auto|chat|plain] [--question-column C] [--overwrite]

Regeneration, its fingerprint and its resumption are adaptive/regenerate.py's; this module parses the flags, checks
them before the model loads, and prints one line: what was written, or that the output is up to date.
"""

from __future__ import annotations

from adaptive.regenerate import build_fingerprint, check_output_path, default_strategy, fingerprint_path, regenerate
from distill.errors import UserError
from mtp_cli.args import Parser, at_least


def main(argv: list[str], on_batch=None) -> int:
    from distill.data import FORMATS, load_questions, resolve_format
    from distill.models import DEFAULT_MODEL, check_position_ids, load_model, load_tokenizer, resolve_model_path

    parser = Parser(prog="mtp regenerate", description="Write a model's own greedy answers to a dataset's prompts, "
                    "in the format `mtp train` reads (resumable; fingerprinted).")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory, alias or hub id (default "
                        f"{DEFAULT_MODEL})")
    parser.add_argument("--dataset", required=True, help="local .jsonl/.json/.parquet or hub dataset")
    parser.add_argument("--split", default="train", help="hub split (default train)")
    parser.add_argument("--question-column", help="prompt column (default: question, query or prompt)")
    parser.add_argument("--output", required=True, help="JSON lines file to write")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--start", type=int, default=0, help="first dataset row (default 0)")
    parser.add_argument("--limit", type=int, help="rows from --start (default: all)")
    parser.add_argument("--format", default="auto", choices=FORMATS,
                        help="auto: the chat template when the tokenizer has one (as `mtp train`), else plain")
    parser.add_argument("--strategy", choices=("auto", "static", "selfspec"), default="auto",
                        help="auto: selfspec when the model has a trained <MTP>, else static k=1 (both give the model's "
                             "greedy tokens)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--overwrite", action="store_true",
                        help="replace an output (or discard a partial run) made with another fingerprint")
    args = parser.parse_args(argv)
    for flag, value, low in (("--max-new-tokens", args.max_new_tokens, 1), ("--batch-size", args.batch_size, 1),
                             ("--start", args.start, 0), ("--limit", args.limit, 1)):
        at_least(flag, value, low)
    check_output_path(args.output)
    resolve_model_path(args.model)  # a missing model is reported before the dataset is read
    questions = load_questions(args.dataset, args.split, column=args.question_column)
    if args.start >= len(questions):
        raise UserError(f"--start {args.start} is past the end of {args.dataset} ({len(questions)} rows)")
    end = len(questions) if args.limit is None else min(len(questions), args.start + args.limit)
    questions = questions[args.start : end]

    import torch

    from adaptive.strategies import SelfSpeculative, Static

    tokenizer = load_tokenizer(args.model)
    fmt = resolve_format(args.format, tokenizer)
    model = load_model(args.model, dtype=getattr(torch, args.dtype)).eval()
    check_position_ids(model)
    strategy = default_strategy(model)
    if args.strategy == "static":
        strategy = Static(1)
    elif args.strategy == "selfspec" and not isinstance(strategy, SelfSpeculative):
        raise UserError(f"--strategy selfspec needs a model with a trained <MTP>; {args.model} has none")
    fingerprint = build_fingerprint(model, tokenizer, questions, start=args.start, fmt=fmt,
                                    max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                                    strategy=strategy)
    source = {"model": args.model, "dataset": args.dataset,
              "command": "mtp regenerate " + " ".join(argv)}
    result = regenerate(model, tokenizer, questions, args.output, fingerprint=fingerprint, strategy=strategy,
                        fmt=fmt, start=args.start, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                        overwrite=args.overwrite, source=source, progress=True, on_batch=on_batch)
    s = result["summary"]
    if result["reused"]:
        print(f"{args.output} is up to date ({s.get('rows')} rows, same fingerprint); nothing to do")
        return 0
    print(f"wrote {args.output}: {s['rows']} rows ({result['generated']} decoded now, {result['resumed']} resumed) "
          f"in {result['seconds']:.0f} s, {strategy.label}, {s['tokens_per_forward']:.2f} tokens/forward; "
          f"round trip {s['round_trip']}/{s['rows']} ({100 * s['round_trip_rate']:.1f}%); "
          f"{s['finished_by_length']} answers cut at --max-new-tokens {args.max_new_tokens}; "
          f"fingerprint in {fingerprint_path(args.output)}")
    return 0
