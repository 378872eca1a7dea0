"""`mtp demo`: the first thing a newcomer runs (README command 1).

    mtp demo [--steps 30] [--output-dir outputs/demo] [--dataset path.jsonl]

distils the default model on GSM8K for a few steps on the CPU (`mtp train` with recipes/smollm2-cpu.yaml), then
decodes held-out questions with Static(1) (plain next-token decoding) and ConfAdapt and prints the comparison, and
writes the chunk view to <output-dir>/chunks.html.
"""

from __future__ import annotations

import json
import re
import shutil
import sys
import time
from pathlib import Path

from adaptive.cli import DEFAULT_K_MAX, DEFAULT_TAU, GSM8K_LOCAL, REPO, _Parser, load_mtp_model, mtp_defaults, stop_ids
from distill.errors import UserError

DEMO_RECIPE = REPO / "recipes" / "smollm2-cpu.yaml"
DEMO_MARKER = ".mtp-demo"  # marks a directory the demo created, so a re-run may replace it and nothing else


HELD_OUT = 64  # the dataset's last rows: never trained on, the demo's questions come from here


def final_answer(text: str) -> str | None:
    """GSM8K-style final answer: the number after '####', else the last number in the text (commas dropped)."""
    marked = re.search(r"####\s*\$?(-?[\d,]*\.?\d+)", text)
    numbers = [marked.group(1)] if marked else re.findall(r"-?\d[\d,]*\.?\d*", text)
    if not numbers:
        return None
    value = numbers[-1].replace(",", "").rstrip(".")
    try:
        number = float(value)
    except ValueError:
        return value
    return str(int(number)) if number.is_integer() else f"{number:g}"


def _claim_demo_dir(out: Path) -> None:
    """The demo only ever writes inside a directory it created (marked), so a re-run cannot clobber user files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and not (out / DEMO_MARKER).is_file():
        raise UserError(f"{out} exists and was not created by `mtp demo`; choose another --output-dir")
    out.mkdir(parents=True, exist_ok=True)
    (out / DEMO_MARKER).write_text("created by `mtp demo`; a re-run replaces this directory's contents\n")


def _write_jsonl(path: Path, rows) -> None:
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row, ensure_ascii=False) + "\n")
    tmp.replace(path)


def main(argv: list[str]) -> int:
    from adaptive.chunkview import render_terminal, write_html
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import ConfAdapt, Static
    from distill.data import load_examples

    parser = _Parser(prog="mtp demo", description="Distil the default model on GSM8K for a few CPU steps, then "
                     "compare plain next-token decoding with ConfAdapt on held-out questions.")
    parser.add_argument("--steps", type=int, default=30, help="training steps (default 30: a few minutes on 2 cores)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--dataset", default=str(GSM8K_LOCAL) if GSM8K_LOCAL.is_file() else "openai/gsm8k",
                        help="GSM8K-style data (local .jsonl or hub name); its last rows are held out")
    parser.add_argument("--questions", type=int, default=4, help="held-out questions to decode")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU)
    parser.add_argument("--k-max", type=int, help="ConfAdapt positions per forward (default: the trained k_max)")
    parser.add_argument("--reuse-model", action="store_true", help="skip training if the demo's model exists")
    args = parser.parse_args(argv)
    if args.steps < 1 or not 1 <= args.questions <= HELD_OUT or args.max_new_tokens < 1:
        raise UserError(f"--steps and --max-new-tokens must be >= 1 and --questions in [1, {HELD_OUT}]")
    ConfAdapt(args.tau, args.k_max or DEFAULT_K_MAX)  # bad tau / k_max: fail before minutes of training
    if not DEMO_RECIPE.is_file():
        raise UserError(f"recipe {DEMO_RECIPE} not found (run the demo from a checkout of the repository)")

    out = Path(args.output_dir)
    _claim_demo_dir(out)
    ds = load_examples(args.dataset)
    if len(ds) <= HELD_OUT + 16:
        raise UserError(f"dataset {args.dataset} has {len(ds)} rows; the demo needs more than {HELD_OUT + 16}")
    held_out = ds.select(range(len(ds) - HELD_OUT, len(ds)))
    (out / "data").mkdir(exist_ok=True)
    train_file = out / "data" / "train.jsonl"
    _write_jsonl(train_file, ({"question": q, "answer": a}
                              for q, a in zip(ds["query"][: len(ds) - HELD_OUT], ds["response"][: len(ds) - HELD_OUT])))

    # (a) a short self-distillation run (paper §2.2, shrunk to CPU size by the recipe)
    model_dir = out / "model"
    if args.reuse_model and (model_dir / "config.json").is_file():
        print(f"reusing {model_dir}")
    else:
        from distill import trainer_cli

        shutil.rmtree(model_dir, ignore_errors=True)  # inside the demo's own (marked) directory
        print(f"== distilling the default model for {args.steps} steps (recipe {DEMO_RECIPE.name}) ==", flush=True)
        trainer_cli.main(["--config", str(DEMO_RECIPE), "--max_steps", str(args.steps), "--output_dir",
                          str(model_dir), "--dataset_name", str(train_file.resolve()), "--save_strategy", "no",
                          "--report_to", "none"])

    # (b) decode held-out questions: Static(1) is plain next-token decoding, ConfAdapt the paper's readout (§4.2)
    defaults = mtp_defaults(str(model_dir))
    model, tokenizer = load_mtp_model(str(model_dir))
    stops = stop_ids(model, tokenizer)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stops)
    questions = held_out["query"][: args.questions]
    gold = [final_answer(a) for a in held_out["response"][: args.questions]]
    runs = {}
    decoder.generate_text(questions[:1], Static(1), max_new_tokens=2)  # warm-up: one-time costs stay out of tok/s
    for strategy in (Static(1), ConfAdapt(args.tau, args.k_max or defaults["k_max"])):
        print(f"== decoding {len(questions)} held-out questions with {strategy.label} ==", flush=True)
        start = time.perf_counter()
        results = decoder.generate_text(questions, strategy, max_new_tokens=args.max_new_tokens,
                                        batch_size=len(questions))
        runs[strategy.label] = (strategy, results, time.perf_counter() - start)

    (s_label, (_, base, _)), (c_label, (conf_strategy, conf, _)) = runs.items()
    print(f"\n{'strategy':<28} {'tokens':>6} {'forwards':>8} {'tok/fwd':>7} {'tok/s':>7}")
    for label, (_, results, seconds) in runs.items():
        tokens = sum(len(r.token_ids) for r in results)
        forwards = sum(r.forward_passes for r in results)
        print(f"{label:<28} {tokens:>6} {forwards:>8} {tokens / max(forwards, 1):>7.2f} {tokens / seconds:>7.1f}")
    conf_tokens = sum(len(r.token_ids) for r in conf)
    if conf_tokens < 1.2 * sum(r.forward_passes for r in conf):
        print(f"note: a short run's mask predictions are rarely >= {args.tau:g} confident, so ConfAdapt commits about "
              "one token per forward; train longer (--steps 300) or lower --tau to see longer spans")
    print(f"\n{'#':>2}  {'gold':>8}  {'static(k=1)':>11}  {'confadapt':>9}  same answer?")
    for n, (g, a, b) in enumerate(zip(gold, base, conf), 1):
        x, y = final_answer(a.text), final_answer(b.text)
        print(f"{n:>2}  {g or '-':>8}  {x or '-':>11}  {y or '-':>9}  {'yes' if x == y else 'no'}")
    print(f"\nConfAdapt chunks of question 1 ({'colour' if sys.stdout.isatty() else '[brackets]'} = one forward pass):")
    print(render_terminal(conf[0], tokenizer, color=sys.stdout.isatty(), stop_token_ids=stops))

    # (c) the chunk view of every ConfAdapt generation (paper Fig. 1 style)
    page = write_html(out / "chunks.html", conf, tokenizer, title="mtp demo: ConfAdapt chunks",
                      strategy_label=conf_strategy.label, stop_token_ids=stops)
    print(f"\nwrote {page}\nnext: mtp generate --model {model_dir} --prompt \"...\" --html chunks.html")
    return 0
