"""`mtp generate`: decode prompts with an MTP model, a span per forward pass.

    mtp generate --model outputs/smollm2-cpu --prompt "..." [--strategy static|confadapt|selfspec] [--k K]
                 [--tau T] [--k-max K] [--batch-file prompts.jsonl] [--json] [--html chunks.html]

Decoding defaults come from the model's generation config (`mtp_strategy`, `mtp_k_max`, `mtp_tau`, written by
`mtp export` and `mtp tune`), else ConfAdapt with k_max 16 and tau 0.9 (paper §4.2). ConfAdapt thresholds the
calibrated confidence when `mtp calibrate` saved a calibrator beside the model (--no-calibration: the raw top-1
probability). A model without a trained `<MTP>` is refused; --add-mtp-token adds an untrained one (announced on
stderr): useful to try the tool on any base, meaningless for speed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import asdict
from pathlib import Path

import torch

from adaptive.strategies import DEFAULT_K_MAX, DEFAULT_STRATEGY, DEFAULT_TAU  # noqa: F401  re-exported (paper §4.2, §7.7)
from distill.adapters import attach_mask_adapter, exported_adapter
from distill.errors import UserError
from distill.models import DEFAULT_MODEL, load_model, load_tokenizer
from distill.tokens import MTP_TOKEN, add_mtp_token

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
REPO = Path(__file__).resolve().parents[1]
GSM8K_LOCAL = REPO / "data" / "gsm8k" / "train.jsonl"  # GSM8K (MIT, openai/grade-school-math), carried by the repository


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one `error: ...` line, exit 2 (distill/cli.py), instead of argparse's usage dump
        raise UserError(message)


# ---------------------------------------------------------------------------------------------------------------------
# Shared by generate, demo, bench-decode, evaluate and tune


def load_mtp_model(name_or_path: str, dtype: str = "float32", *, convert: bool = False):
    """(model, tokenizer) in eval mode. A model without <MTP> (config.mtp_mask_token_id) is an error, unless
    `convert`: then an untrained <MTP> is added, with a one-line warning (bench-decode measures such conversions)."""
    from distill.models import check_position_ids, read_config, resolve_model_path

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    not_mtp = UserError(f"{name_or_path} is not an MTP model (no config.mtp_mask_token_id); train it with "
                        "`mtp train`, or pass --add-mtp-token to try an untrained conversion")
    path = Path(resolve_model_path(name_or_path))
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        # A LoRA run's output (`mtp train` with use_peft): the base gets the same <MTP> row, then the adapter is
        # merged in, exactly as `mtp export` does; a mask-only adapter is attached and gated (distill/adapters.py).
        from distill.export import load_for_export

        model, tokenizer = load_for_export(str(path), mask_adapter="gate")
        model = model.to(DTYPES[dtype])
    else:
        tokenizer = load_tokenizer(name_or_path)
        config_file = path / "config.json"
        if not convert and config_file.is_file() and read_config(path).get("mtp_mask_token_id") is None:
            raise not_mtp  # before loading the weights
        model = load_model(name_or_path, dtype=DTYPES[dtype])
        kept = exported_adapter(path)
        if kept is not None:  # an export that keeps its mask-only adapter beside the base weights
            model = attach_mask_adapter(model, kept)
    check_position_ids(model)
    if MTP_TOKEN not in tokenizer.get_vocab() or getattr(model.config, "mtp_mask_token_id", None) is None:
        if not convert:
            raise not_mtp
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

    from adaptive.strategies import decoding_defaults
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
    return decoding_defaults(gen, k_max_trained)


def build_strategy(defaults: dict, name: str | None, *, k: int | None, tau: float | None, k_max: int | None,
                   scorer=None):
    """Command-line values override the model's defaults; make_strategy validates them (UserError). `scorer`:
    ConfAdapt's confidence (a fitted calibrator), ignored by the other strategies."""
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
    if name == "confadapt":
        return make_strategy(name, k=k, k_max=k_max, tau=tau, scorer=scorer)
    return make_strategy(name, k=k, k_max=k_max)


def stop_ids(model, tokenizer) -> list[int]:
    from distill.export import stop_token_ids

    return stop_token_ids(model, tokenizer)


def read_jsonl(path: str | Path, what: str) -> list[tuple[int, object]]:
    """(line number, parsed value) of every non-blank line; a missing file or a bad line is one UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{what} {path} does not exist")
    rows = []
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise UserError(f"{what} {path} is not UTF-8 text (byte {exc.start})") from None
    for lineno, line in enumerate(text.split("\n"), 1):  # not splitlines: U+2028 and friends sit inside strings
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
        try:
            p.encode("utf-8")
        except UnicodeEncodeError:  # undecodable bytes on the command line arrive as lone surrogates
            raise UserError(f"prompt {p[:40]!r} is not valid UTF-8 text") from None
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
    parser.add_argument("--k-max", help="confadapt/selfspec: positions read per forward pass (an integer), or auto / "
                                        "auto:N: masks chosen per step from the measured forward cost and the "
                                        "acceptance so far, at most N - 1 (default: the model's, else auto)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the prompt as-is, no chat template")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--json", action="store_true", help="one JSON object per prompt per line")
    parser.add_argument("--html", help="write the chunk view of every generation to this HTML file")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--add-mtp-token", action="store_true",
                        help="allow a model without <MTP>: add an untrained one (spans beyond the first token are "
                             "not meaningful until it is trained with `mtp train`)")
    parser.add_argument("--no-calibration", action="store_true",
                        help="confadapt: threshold the raw top-1 probability even if the model has a calibrator")
    args = parser.parse_args(argv)

    prompts = read_prompts(args.prompt, args.batch_file)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.html:
        from distill.files import check_output_file

        check_output_file(args.html, "--html")  # before the decoding, not after it
    from adaptive.calibration import load_calibrator

    scorer = None if args.no_calibration else load_calibrator(args.model)
    strategy = build_strategy(mtp_defaults(args.model), args.strategy, k=args.k, tau=args.tau, k_max=args.k_max,
                              scorer=scorer)
    model, tokenizer = load_mtp_model(args.model, args.dtype, convert=args.add_mtp_token)
    stops = stop_ids(model, tokenizer)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stops)
    start = time.perf_counter()
    results = decoder.generate_text(prompts, strategy, max_new_tokens=args.max_new_tokens,
                                    chat_template=not args.no_chat_template, batch_size=args.batch_size,
                                    progress=len(prompts) > args.batch_size)
    wall = time.perf_counter() - start

    if args.json:
        from adaptive.metrics import acceptance_metrics, is_speculative

        for r in results:  # each row: its own acceptance metrics (vLLM's names), over its own wall-clock time
            metrics = acceptance_metrics([r], speculative=is_speculative(strategy),
                                         seconds=r.prefill_seconds + r.decode_seconds)
            print(json.dumps({**asdict(r), "strategy": strategy.label, "metrics": metrics}, ensure_ascii=False))
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
