"""`mtp bench-decode`: wall-clock tokens/s of each decoding strategy next to Hugging Face's own decoders, at each
concurrency (the measurement is adaptive/bench.py's).

    mtp bench-decode [--model alias|DIR] [--concurrency 1,16] [--prompts N] [--max-new-tokens 32]
                     [--k-max 4,8,auto] [--no-prompt-lookup] [--plot sweep.png] [--json]

k_max and tau default to the model's own MTP defaults (generation config / config.mtp_k_max), else 16 and 0.9;
`--k-max` takes a list (e.g. `4,8,auto`); without it the model's k_max and `auto` (the cost-aware controller,
adaptive/controller.py) are measured. `--prompts` defaults to max(16, the largest concurrency). Bad flags, a
`--prompts` below the largest concurrency and an unusable `--plot` path are refused before the model loads; the plot
is written atomically once every measurement is done.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch

from adaptive.bench import (COLLAPSE_ANCHORS, PROMPT_LOOKUP_TOKENS, format_sweep, format_table, held_out_questions,
                            run_bench)
from adaptive.loading import confidence_scorer, load_mtp_model, mtp_defaults
from distill.models import DTYPES, GSM8K_TRAIN
from distill.errors import UserError
from distill.models import DEFAULT_MODEL
from mtp_cli.args import Parser, add_tau_scale_flags, at_least

DEFAULT_CONCURRENCY = "1,16"
MIN_DEFAULT_PROMPTS = 16  # --prompts without a value: max(this, the largest concurrency)


def parse_concurrency(text: str) -> list[int]:
    """`--concurrency` (alias `--batch-sizes`): comma-separated positive integers, returned sorted, each once."""
    flag = "--concurrency (--batch-sizes)"
    try:
        levels = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"{flag} must be comma-separated integers, got {text!r}") from None
    if not levels or min(levels) < 1:
        raise UserError(f"{flag} must be positive integers, got {text!r}")
    return sorted(set(levels))


def prompt_count(prompts: int | None, concurrency: list[int]) -> int:
    """--prompts, or max(MIN_DEFAULT_PROMPTS, the largest concurrency) when not given; UserError when it is below the
    largest concurrency (that batch would never be full, and the row would measure a smaller one)."""
    largest = max(concurrency)
    if prompts is None:
        return max(MIN_DEFAULT_PROMPTS, largest)
    if prompts < 1:
        raise UserError(f"--prompts must be >= 1, got {prompts}")
    if prompts < largest:
        raise UserError(f"--prompts {prompts} is below the largest --concurrency {largest}: every concurrency decodes "
                        f"the same prompts in batches of that size; pass --prompts {largest} or more, or leave it out")
    return prompts


def check_plot_path(text: str) -> Path:
    """`--plot`: a .png file (new, or one to replace) in an existing, writable directory; checked before any slow
    work."""
    from distill.files import check_output_file

    path = Path(text).expanduser()
    if path.suffix.lower() != ".png":
        raise UserError(f"--plot {path}: the plot is a PNG; give a path ending in .png")
    if not path.is_dir() and not path.parent.is_dir():
        raise UserError(f"--plot {path}: {path.parent} is not an existing directory")
    return check_output_file(path, "--plot")


def _device(name: str) -> torch.device:
    """--device as a torch.device; UserError for a name torch does not know or a device this machine lacks."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError):
        raise UserError(f"--device {name!r} is not a device; use auto, cpu, cuda or cuda:N") from None
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise UserError(f"--device {name}: no CUDA GPU is available on this machine; use --device cpu")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        raise UserError(f"--device {name}: only cpu and cuda devices are supported")
    return device


def main(argv: list[str]) -> int:
    from adaptive.strategies import ConfAdapt, parse_k_max

    parser = Parser(prog="mtp bench-decode",
                    description="tokens/s of each strategy vs HF greedy and prompt lookup, at each concurrency")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default=str(GSM8K_TRAIN), help="GSM8K-style JSON lines; its tail is used")
    parser.add_argument("--concurrency", "--batch-sizes", dest="concurrency", default=DEFAULT_CONCURRENCY,
                        metavar="LIST", help="requests decoded together, comma-separated (default 1,16); "
                                             "--batch-sizes is the same flag")
    parser.add_argument("--prompts", type=int, help="held-out prompts decoded at every concurrency (default: "
                                                    f"max({MIN_DEFAULT_PROMPTS}, the largest concurrency))")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k-max", help="confadapt/selfspec k_max values, comma-separated, each an integer, auto or "
                                        "auto:N (default: the model's, else 16, and auto)")
    parser.add_argument("--tau", type=float, help="confadapt threshold (default: the model's, else 0.9)")
    add_tau_scale_flags(parser)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-prompt-lookup", action="store_true",
                        help="leave out HF prompt lookup (batch-1 only: it repeats the row-by-row run at every "
                             "concurrency)")
    parser.add_argument("--repeats", type=int, default=3,
                        help="interleaved rounds of every mode; ratios are medians of per-round ratios (default 3)")
    parser.add_argument("--plot", metavar="PATH.png", help="write the ratio-to-HF-greedy vs concurrency figure here")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    concurrency = parse_concurrency(args.concurrency)
    args.prompts = prompt_count(args.prompts, concurrency)
    at_least("--max-new-tokens", args.max_new_tokens, 1)
    at_least("--repeats", args.repeats, 1)
    plot_path = check_plot_path(args.plot) if args.plot else None
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads avoid OpenMP oversubscription
    defaults = mtp_defaults(args.model)
    scorer = confidence_scorer(args.model, defaults, tau_given=args.tau is not None, calibrated=args.calibrated)
    args.tau = args.tau if args.tau is not None else defaults["tau"]
    k_maxes = [k.strip() for k in str(args.k_max or defaults["k_max"]).split(",") if k.strip()]
    for k in k_maxes:
        ConfAdapt(args.tau, k)  # validate before the (slow) model load
    k_maxes = [k if parse_k_max(k)[1] else parse_k_max(k)[0] for k in k_maxes]
    if args.k_max is None and not any(parse_k_max(k)[1] for k in k_maxes):
        k_maxes.append(f"auto:{max(k_maxes)}")  # by default the controller runs beside the model's fixed k_max
    device = _device(args.device)
    questions = held_out_questions(args.dataset, args.prompts)
    model, tokenizer = load_mtp_model(args.model, args.dtype, convert=True)  # untrained conversions are measured too
    model.to(device)
    results = run_bench(model, tokenizer, questions, concurrency=concurrency, max_new_tokens=args.max_new_tokens,
                        k_max=k_maxes, tau=args.tau, scorer=scorer,
                        prompt_lookup=not args.no_prompt_lookup, repeats=args.repeats, progress=True)
    doc = {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "repeats": args.repeats, "concurrency": concurrency,
        "k_max": k_maxes, "tau": args.tau,
        "tau_scale": "raw" if scorer is None else "calibrated",
        "prompt_lookup_num_tokens": None if args.no_prompt_lookup else PROMPT_LOOKUP_TOKENS, "results": results,
        "anchors": list(COLLAPSE_ANCHORS),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"model {args.model} on {doc['device_name']} ({doc['threads']} threads), {args.prompts} GSM8K prompts, "
              f"{args.max_new_tokens} new tokens max, {args.repeats} interleaved round(s), median ratios")
        print(format_table(results))
        if len(concurrency) > 1:
            print()
            print(format_sweep(results))
    sys.stdout.flush()
    if plot_path is not None:
        from distill.plots import concurrency_plot

        title = (f"mtp bench-decode: {args.model} on {doc['device_name']} ({doc['threads']} threads), "
                 f"{args.prompts} prompts, {args.max_new_tokens} new tokens")
        print(f"wrote {concurrency_plot(results, plot_path, anchors=COLLAPSE_ANCHORS, title=title)}", file=sys.stderr)
    return 0
