"""`mtp demo`: distil, calibrate, tune and evaluate the default model on a CPU, offline, in one command.

    mtp demo [--minutes 20] [--output-dir outputs/demo] [--dataset path.jsonl|openai/gsm8k]
             [--target-agreement 0.95] [--delta 0.10] [--train-data self|dataset] [--reuse-model]

The pipeline is adaptive/demo.py's `run_demo` (its stages, the time budget, the artefacts in --output-dir, what the
table's rows mean); it prints each stage's header as it starts. This module parses and checks the flags, runs it,
and prints the table and the closing lines. Bad flags are one `error:` line before anything is written.
"""

from __future__ import annotations

from pathlib import Path

from adaptive.demo import DELTA, DEMO_RECIPE, SELF_DATA, TUNE_AGREEMENT, DemoOptions, run_demo
from distill.models import GSM8K_TRAIN, REPO
from distill.errors import UserError
from mtp_cli.args import Parser, check_fraction


def _table(rows: list[dict]) -> str:
    head = f"{'decoding':<48} {'accuracy':>14} {'agree k=1':>9} {'tok/fwd':>12} {'tok/s':>7} {'× k=1':>6}"
    lines = [head, "-" * len(head)]
    base = rows[0]["tokens_per_second"] or 1e-9
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}"
        agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.0f}%"
        tpf = f"{r['tokens_per_forward_mean']:.2f} ± {r['tokens_per_forward_std']:.2f}"
        lines.append(f"{r['label']:<48} {acc:>14} {agree:>9} {tpf:>12} {r['tokens_per_second']:>7.1f} "
                     f"{r['tokens_per_second'] / base:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    parser = Parser(prog="mtp demo", description="Distil the default model on GSM8K, calibrate its confidence, "
                    "tune tau for certified agreement with k=1 (never slower than k=1), and compare decoding "
                    "strategies on held-out questions.")
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget on 2 CPU cores (default 20)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--dataset", default=str(GSM8K_TRAIN),
                        help="GSM8K-style data (local .jsonl or hub name); its last rows are held out")
    parser.add_argument("--target-agreement", type=float, default=TUNE_AGREEMENT,
                        help="agreement with k=1's final answers the tuner must certify, in (0, 1] "
                             f"(default {TUNE_AGREEMENT:g})")
    parser.add_argument("--delta", type=float, default=DELTA, help=f"Learn-then-Test error level (default {DELTA:.2f})")
    parser.add_argument("--train-data", choices=("self", "dataset"),
                        help="self: the default model's own greedy answers to the dataset's head questions "
                             f"({SELF_DATA.relative_to(REPO)}, made by `mtp regenerate`); dataset: the dataset's "
                             "reference answers (default: self with the default dataset, else dataset)")
    parser.add_argument("--reuse-model", action="store_true", help="skip training if the demo's model exists")
    args = parser.parse_args(argv)
    if not 1 <= args.minutes <= 24 * 60:
        raise UserError(f"--minutes must be in [1, 1440], got {args.minutes:g}")
    if not 0 < args.target_agreement <= 1:
        raise UserError(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
    check_fraction(args.delta, "--delta")
    if not DEMO_RECIPE.is_file():
        raise UserError(f"recipe {DEMO_RECIPE} not found (run the demo from a checkout of the repository)")
    default_dataset = Path(args.dataset).expanduser().resolve() == GSM8K_TRAIN.resolve()
    train_data = args.train_data or ("self" if default_dataset else "dataset")
    if train_data == "self" and not default_dataset:
        raise UserError(f"--train-data self: {SELF_DATA.name} answers the questions of {GSM8K_TRAIN.name}; with "
                        "another --dataset use --train-data dataset (or make your own with `mtp regenerate`)")

    result = run_demo(DemoOptions(minutes=args.minutes, output_dir=Path(args.output_dir), dataset=args.dataset,
                                  target_agreement=args.target_agreement, delta=args.delta, train_data=train_data,
                                  reuse_model=args.reuse_model))

    print(f"\n{_table(result.rows)}")
    if result.lossless:
        print(f"\nthe tuner chose the lossless self-speculative mode for the generation config: "
              f"{result.choice['reason']}")
    elif not result.certified:
        print(f"\nthe tuner kept plain decoding (k=1) in the generation config: {result.choice['reason']}")
    print(f"distillation kept the model's own k=1 final answer on {100 * result.base_agreement:.0f}% of the questions "
          f"({result.same_tokens}/{result.n_eval} token for token)")
    print("\nwrote " + ", ".join(str(p) for p in result.artefacts))
    print(f"total {result.timings['total'] / 60:.1f} min; next: mtp generate --model {result.model_dir} --prompt "
          "\"...\" --html chunks.html   (uses the tuned setting)")
    return 0
