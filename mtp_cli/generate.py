"""`mtp generate`: decode prompts with an MTP model, a span per forward pass.

    mtp generate --model outputs/smollm2-cpu --prompt "..." [--strategy static|confadapt|selfspec] [--k K]
                 [--tau T] [--k-max K] [--batch-file prompts.jsonl] [--json] [--html chunks.html]

Decoding defaults come from the model's generation config (`mtp_strategy`, `mtp_k_max`, `mtp_tau`, written by
`mtp export` and `mtp tune`), else ConfAdapt at tau 0.9 (paper §4.2) with k_max auto. tau's scale is explicit and every
strategy label says it: a --tau typed here is the paper's raw top-1 probability unless --calibrated (then the
calibrator `mtp calibrate` saved beside the model); the model's recorded tau keeps the scale `mtp tune` recorded with
it (--no-calibration: raw regardless). A model without a trained `<MTP>` is refused; --add-mtp-token adds an
untrained one (announced on stderr): useful to try the tool on any base, meaningless for speed.
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import asdict

from adaptive.loading import confidence_scorer, load_mtp_model, mtp_defaults
from distill.models import DTYPES
from distill.decoding_defaults import stop_token_ids
from adaptive.prompts import read_prompts
from adaptive.strategies import build_strategy
from distill.errors import UserError
from distill.models import DEFAULT_MODEL
from mtp_cli.args import Parser, add_tau_scale_flags


def main(argv: list[str]) -> int:
    from adaptive.chunkview import render_terminal, summary_line, write_html
    from adaptive.decoder import MTPDecoder

    parser = Parser(prog="mtp generate", description="Decode prompts with an MTP model, a span per forward pass.")
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
    add_tau_scale_flags(parser)
    args = parser.parse_args(argv)

    prompts = read_prompts(args.prompt, args.batch_file)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    if args.batch_size < 1:
        raise UserError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.html:
        from distill.files import check_output_file

        check_output_file(args.html, "--html")  # before the decoding, not after it
    defaults = mtp_defaults(args.model)
    confadapt = (args.strategy or defaults["strategy"]) == "confadapt"
    scorer = confidence_scorer(args.model, defaults, tau_given=args.tau is not None,
                               calibrated=args.calibrated) if confadapt else None
    strategy = build_strategy(defaults, args.strategy, k=args.k, tau=args.tau, k_max=args.k_max, scorer=scorer)
    model, tokenizer = load_mtp_model(args.model, args.dtype, convert=args.add_mtp_token)
    stops = stop_token_ids(model, tokenizer)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stops)
    start = time.perf_counter()
    results = decoder.generate_text(prompts, strategy, max_new_tokens=args.max_new_tokens,
                                    chat_template=not args.no_chat_template, batch_size=args.batch_size,
                                    progress=len(prompts) > args.batch_size)
    wall = time.perf_counter() - start

    if args.json:
        from adaptive.metrics import acceptance_metrics

        for r in results:  # each row: its own acceptance metrics (vLLM's names), over its own wall-clock time
            metrics = acceptance_metrics([r], speculative=strategy.speculative,
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
