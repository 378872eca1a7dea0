"""`mtp generate` (decode prompts with an MTP model) and `mtp demo` (the first thing a newcomer runs).

    mtp generate --model outputs/smollm2-cpu --prompt "..." [--strategy static|confadapt|selfspec] [--k K]
                 [--tau T] [--k-max K] [--batch-file prompts.jsonl] [--json] [--html chunks.html]

Decoding defaults come from the model's generation config (`mtp_strategy`, `mtp_k_max`, `mtp_tau`, written by
`mtp export`), else ConfAdapt with k_max 16 and tau 0.9 (paper §4.2). A model without `<MTP>` gets one added on the
fly (an untrained conversion, announced on stderr): useful to try the tool on any base, meaningless for speed.

    mtp demo [--steps 30] [--output-dir outputs/demo] [--dataset path.jsonl]

distils the default model on GSM8K for a few steps on the CPU (`mtp train` with recipes/smollm2-cpu.yaml), then
decodes held-out questions with Static(1) (plain next-token decoding) and ConfAdapt and prints the comparison, and
writes the chunk view to <output-dir>/chunks.html.
"""

from __future__ import annotations

import argparse
import json
import re
import shutil
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from distill.errors import UserError
from distill.models import DEFAULT_MODEL, load_model, load_tokenizer
from distill.tokens import MTP_TOKEN, add_mtp_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DEFAULT_STRATEGY, DEFAULT_K_MAX, DEFAULT_TAU = "confadapt", 16, 0.9  # paper §4.2, §7.7
REPO = Path(__file__).resolve().parents[1]
DEMO_RECIPE = REPO / "recipes" / "smollm2-cpu.yaml"
GSM8K_LOCAL = REPO.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
DEMO_MARKER = ".mtp-demo"  # marks a directory the demo created, so a re-run may replace it and nothing else


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line, exit 2 (distill/cli.py), instead of argparse's usage dump
        raise UserError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Shared by generate, demo and bench-decode


def load_mtp_model(name_or_path: str, dtype: str = "float32"):
    """(model, tokenizer) in eval mode; adds an untrained <MTP> (with a one-line warning) if the model has none."""
    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    tokenizer = load_tokenizer(name_or_path)
    model = load_model(name_or_path, dtype=DTYPES[dtype])
    if MTP_TOKEN not in tokenizer.get_vocab() or getattr(model.config, "mtp_mask_token_id", None) is None:
        print(f"warning: {name_or_path} has no {MTP_TOKEN} token; added an untrained one (untrained conversion: "
              "spans beyond the first token are not meaningful until it is distilled with `mtp train`)",
              file=sys.stderr)
        add_mtp_token(model, tokenizer)
    model.eval()
    return model, tokenizer


def mtp_defaults(name_or_path: str) -> dict:
    """Decoding defaults recorded by `mtp export` in generation_config.json (config.mtp_k_max written by the trainer
    as a fallback for k_max), else the paper's. Read from the JSON files, so bad flags fail before the model loads."""
    from transformers import AutoConfig, GenerationConfig

    from distill.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        gen = None
    try:
        k_max_trained = getattr(AutoConfig.from_pretrained(path), "mtp_k_max", None)
    except (OSError, ValueError):
        k_max_trained = None
    return {
        "strategy": getattr(gen, "mtp_strategy", None) or DEFAULT_STRATEGY,
        "k_max": int(getattr(gen, "mtp_k_max", None) or k_max_trained or DEFAULT_K_MAX),
        "tau": float(getattr(gen, "mtp_tau", None) or DEFAULT_TAU),
    }


def build_strategy(defaults: dict, name: str | None, *, k: int | None, tau: float | None, k_max: int | None):
    """Command-line values override the model's defaults; make_strategy validates them (UserError)."""
    from adaptive.strategies import make_strategy

    name = name or defaults["strategy"]
    if name == "static":
        if k is None and k_max is None:
            if defaults["strategy"] != "static":
                raise UserError("--strategy static needs --k (tokens per forward pass)")
            k = defaults["k_max"]
        return make_strategy(name, k=k, k_max=k_max)
    if k is None and k_max is None:
        k_max = defaults["k_max"]
    tau = defaults["tau"] if tau is None else tau
    return make_strategy(name, k=k, k_max=k_max, tau=tau if name == "confadapt" else None)


def stop_ids(model, tokenizer) -> list[int]:
    from distill.export import stop_token_ids

    return stop_token_ids(model, tokenizer)


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; a missing file or a bad line is one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    rows = []
    for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append((lineno, json.loads(line)))
        except json.JSONDecodeError as exc:
            raise UserError(f"{path}:{lineno}: not valid JSON ({exc.msg})") from None
    return rows


def read_prompts(prompts: list[str] | None, batch_file: str | None) -> list[str]:
    """--prompt values, then the prompts of a JSON-lines file ({"prompt": ...} per line; blank lines skipped)."""
    out = list(prompts or [])
    if batch_file:
        path = Path(batch_file)
        for lineno, row in read_jsonl(path, "batch file"):
            if not isinstance(row, dict) or not isinstance(row.get("prompt"), str):
                raise UserError(f'{path}:{lineno}: expected an object with a string "prompt" field')
            out.append(row["prompt"])
    if not out:
        raise UserError("no prompt given; pass --prompt TEXT or --batch-file prompts.jsonl")
    for p in out:
        if not p.strip():
            raise UserError("empty prompt")
    return out


# ---------------------------------------------------------------------------------------------------------------------
# mtp generate


def generate_main(argv: list[str]) -> int:
    from adaptive.chunkview import render_terminal, summary_line, write_html
    from adaptive.decoder import MTPDecoder

    parser = _Parser(prog="mtp generate", description="Decode prompts with an MTP model, a span per forward pass.")
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"model directory or alias (default {DEFAULT_MODEL})")
    parser.add_argument("--prompt", action="append", help="a prompt (repeatable)")
    parser.add_argument("--batch-file", help='JSON lines file, one {"prompt": ...} per line')
    parser.add_argument("--strategy", choices=("static", "confadapt", "selfspec"),
                        help="default: the model's generation config, else confadapt")
    parser.add_argument("--k", type=int, help="static: tokens per forward pass")
    parser.add_argument("--tau", type=float, help="confadapt: confidence threshold in (0, 1]")
    parser.add_argument("--k-max", type=int, help="confadapt/selfspec: positions read per forward pass")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as-is, no chat template")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    parser.add_argument("--html", help="write the chunk view of every generation to this HTML file")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    prompts = read_prompts(args.prompt, args.batch_file)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.html and Path(args.html).is_dir():
        raise UserError(f"--html {args.html} is a directory")
    strategy = build_strategy(mtp_defaults(args.model), args.strategy, k=args.k, tau=args.tau, k_max=args.k_max)
    model, tokenizer = load_mtp_model(args.model, args.dtype)
    stops = stop_ids(model, tokenizer)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stops)
    start = time.perf_counter()
    results = decoder.generate_text(prompts, strategy, max_new_tokens=args.max_new_tokens,
                                    chat_template=not args.no_chat_template, batch_size=args.batch_size,
                                    progress=len(prompts) > args.batch_size)
    wall = time.perf_counter() - start

    if args.json:
        for r in results:
            print(json.dumps({**asdict(r), "strategy": strategy.label}, ensure_ascii=False))
    else:
        color = sys.stdout.isatty()
        for n, r in enumerate(results, 1):
            if len(results) > 1:
                print(f"--- {n}/{len(results)}: {r.prompt[:70]!r}")
            print(render_terminal(r, tokenizer, color=color, stop_token_ids=stops))
            print(summary_line(r, strategy.label))
        if len(results) > 1:
            tokens = sum(len(r.token_ids) for r in results)
            forwards = sum(r.forward_passes for r in results)
            print(f"total: {tokens} tokens, {forwards} forwards, {tokens / max(forwards, 1):.2f} tokens/forward, "
                  f"{tokens / wall:.1f} tok/s over {wall:.1f} s")
    if args.html:
        path = write_html(args.html, results, tokenizer, title="mtp generate", strategy_label=strategy.label,
                          stop_token_ids=stops)
        print(f"wrote {path}", file=sys.stderr)
    return 0


# ---------------------------------------------------------------------------------------------------------------------
# mtp demo

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


def demo_main(argv: list[str]) -> int:
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
