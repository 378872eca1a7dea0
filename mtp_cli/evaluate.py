"""`mtp evaluate`: GSM8K accuracy and speed of decoding strategies on one checkpoint (paper §3.3, §5.2).

    mtp evaluate --model DIR [--dataset test.jsonl|openai/gsm8k] [--limit N] [--start S] [--format cot8|chat]
                 [--strategies "static:3,confadapt:0.9:16,selfspec:16"] [--extract flexible|project]
                 [--max-new-tokens 256] [--json report.json]

The prompt, stop strings and answer extraction are lm-eval's `gsm8k_cot` (adaptive/gsm8k.py); by default the answer
is read and compared exactly as lm-eval's "flexible-extract" filter and exact_match do, `--extract project` reads it
with the project's extraction instead. Static(1) runs first as the reference of every other strategy; the scoring is
adaptive/evaluate.py's.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from adaptive.evaluate import format_table, parse_strategies, run_eval
from adaptive.gsm8k import EXTRACTIONS, PROMPT_FORMATS, encode_prompt, load_problems
from adaptive.loading import confidence_scorer, load_mtp_model, mtp_defaults
from distill.models import DTYPES, GSM8K_TRAIN
from distill.decoding_defaults import stop_token_ids
from distill.errors import UserError
from mtp_cli.args import Parser, add_tau_scale_flags, at_least

GSM8K_TEST = GSM8K_TRAIN.with_name("test.jsonl")
DEFAULT_STRATEGIES = "static:3,confadapt,selfspec"


def write_json(path: Path, payload: dict) -> Path:
    """Atomic: a reader never sees a half-written report, and a failure leaves any earlier file intact."""
    from distill.files import write_text_atomically

    return write_text_atomically(path, json.dumps(payload, indent=2, ensure_ascii=False) + "\n")


def main(argv: list[str]) -> int:
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import Static

    default_dataset = str(GSM8K_TEST)
    parser = Parser(prog="mtp evaluate", description="GSM8K accuracy (flexible-extract, ± stderr), agreement with "
                    "k=1 decoding of the same checkpoint, tokens per forward and wall-clock speed of each strategy.")
    parser.add_argument("--model", required=True, help="MTP model directory (from mtp train / mtp export) or alias")
    parser.add_argument("--dataset", default=default_dataset,
                        help=f"local .jsonl/.json/.parquet or hub name (default {default_dataset})")
    parser.add_argument("--split", default="test", help="hub split (default test; a local file is one split)")
    parser.add_argument("--limit", type=int, help="number of problems (default: all)")
    parser.add_argument("--start", type=int, default=0, help="first problem (row index)")
    parser.add_argument("--format", choices=PROMPT_FORMATS, default="cot8",
                        help="cot8: lm-eval gsm8k_cot 8-shot + \"Let's think step by step.\" (default); "
                        "chat: zero-shot, one user turn of the chat template")
    parser.add_argument("--strategies", default=DEFAULT_STRATEGIES,
                        help="comma-separated static:K, confadapt[:TAU[:K_MAX]], selfspec[:K_MAX]; values left out "
                        f"come from the model's generation config (default {DEFAULT_STRATEGIES!r}); "
                        "static:1 (the reference) always runs first")
    parser.add_argument("--extract", choices=EXTRACTIONS, default="flexible",
                        help="flexible: lm-eval gsm8k_cot's flexible-extract (the last number) scored by its "
                        "exact_match (default); project: \"The answer is N\", else \"#### N\", else the last number "
                        "not glued to a word, compared as numbers")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    add_tau_scale_flags(parser)
    parser.add_argument("--json", help="write the full report (every answer and text) to this JSON file")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--batch-size", args.batch_size, 1)
    json_path = Path(args.json) if args.json else None
    if json_path is not None and (json_path.is_dir() or not json_path.parent.is_dir()):
        raise UserError(f"--json {json_path}: not a file in an existing directory")
    defaults = mtp_defaults(args.model)
    strategies = parse_strategies(args.strategies, defaults, scorer=lambda tau_given: confidence_scorer(
        args.model, defaults, tau_given=tau_given, calibrated=args.calibrated))
    strategies = [s for s in strategies if s.label != Static(1).label]
    problems = load_problems(args.dataset, args.split, limit=args.limit, start=args.start)

    model, tokenizer = load_mtp_model(args.model, args.dtype)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))
    encode_prompt(problems[0]["question"], args.format, tokenizer)  # a bad --format fails before any decoding
    if any(getattr(s, "tau_scale", None) == "calibrated" for s in strategies):
        print("ConfAdapt rows marked calibrated threshold the model's fitted calibrator; the others the raw top-1 "
              "probability", file=sys.stderr)
    print(f"evaluating {args.model} on {len(problems)} problems of {args.dataset} (from row {args.start}), "
          f"format {args.format}, max {args.max_new_tokens} new tokens", file=sys.stderr, flush=True)
    decoder.generate([encode_prompt(problems[0]["question"], args.format, tokenizer)], Static(1), 2)  # warm-up

    common = dict(prompt_format=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
                  extract=args.extract)
    reference = run_eval(decoder, problems, Static(1), **common)
    reports = [reference] + [run_eval(decoder, problems, s, reference=reference, **common) for s in strategies]
    print(format_table(reports, reference))

    if json_path is not None:
        from adaptive.metrics import acceptance_metrics

        runs = []
        for r, strategy in zip(reports, [Static(1)] + strategies):
            ratio = r.tokens_per_second / reference.tokens_per_second if reference.tokens_per_second else None
            # vLLM's acceptance metrics under their names (adaptive/metrics.py); the report's own fields win
            metrics = acceptance_metrics(r.results, speculative=strategy.speculative, seconds=r.seconds)
            runs.append({**metrics, **r.to_dict(), "speedup_vs_k1": ratio})
        payload = {
            "model": args.model, "dataset": args.dataset, "split": args.split, "start": args.start,
            "n": len(problems), "format": args.format, "extract": args.extract, "max_new_tokens": args.max_new_tokens,
            "batch_size": args.batch_size, "reference": reference.label,
            "calibrated": any(getattr(s, "tau_scale", None) == "calibrated" for s in strategies),
            "indices": [p["index"] for p in problems], "gold": [p["answer"] for p in problems], "runs": runs,
        }
        print(f"wrote {write_json(json_path, payload)}", file=sys.stderr)
    return 0
