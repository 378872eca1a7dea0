"""`mtp bench-decode`: wall-clock tokens/s of each decoding strategy next to Hugging Face's own decoders, at each
concurrency.

    mtp bench-decode [--model alias|DIR] [--concurrency 1,16] [--prompts N] [--max-new-tokens 32]
                     [--k-max 4,8,auto] [--no-prompt-lookup] [--plot sweep.png] [--json]

k_max and tau default to the model's own MTP defaults (generation config / config.mtp_k_max), else 16 and 0.9;
`--k-max` takes a list (e.g. `4,8,auto`); without it the model's k_max and `auto` (the cost-aware controller,
adaptive/controller.py) are measured.
The prompts are the last rows of the GSM8K file, the rows `mtp demo` holds out of its training data.

Same model, same prompts (the held-out tail of GSM8K, as one user turn of the chat template), same machine, one run
(speed-ups are only meaningful side by side; tokens/forward alone hides the longer per-step query of
2·k_max−1 tokens, paper §5.7). Modes:

* hf-greedy          `model.generate(do_sample=False)`, batched with left padding: the reference for every ratio;
* hf-prompt-lookup   `model.generate(prompt_lookup_num_tokens=10)`: HF assisted generation does not accept batches,
                     so at concurrency > 1 it runs row by row and is labelled `row-by-row` (its throughput is then a
                     batch-1 throughput, compared with batched greedy); `--no-prompt-lookup` leaves it out, which a
                     sweep over many concurrencies wants: it would repeat the batch-1 decode at every one;
* static(k=1), static(k=3), confadapt(tau, k_max), selfspec(k_max) for every k_max given: `MTPDecoder` with the
  batch's rows ragged. Ratios are given against HF greedy and against this decoder's static(k=1) (plain next-token
  decoding with the same code path: the speed a user loses or gains by turning MTP on).

Concurrency (`--concurrency 1,4,16,64`; `--batch-sizes` is the same flag under its older name). At concurrency c the
prompts are decoded in consecutive batches of c, each batch started together and finished when its last row ends
(no continuous batching: a new request never joins a running batch); every concurrency decodes the same prompts, so
`--prompts` must be at least the largest c and defaults to max(16, largest c). Every ratio is taken at the same
concurrency. The question the sweep answers is the serving debriefs' (`PHASE3D_DEBRIEF.md` of the paper authors'
SGLang fork, github.com/jwkirchenbauer/sglang-mtp-lm): there ConfAdapt(k_max=16, tau=0.9) runs at 2.31x non-MTP
throughput at concurrency 1 but 0.26x at concurrency 16, because a decode batch must share one query length and the
scheduler defers the other requests, while EAGLE-3 holds 1.39x at 16 (`COLLAPSE_ANCHORS`). Here rows of different
query lengths share every forward (adaptive/decoder.py, "Batching"). `--plot` draws the ratio to HF greedy against
concurrency, one line per mode, with those two anchors (distill/plots.py, `concurrency_plot`).

Tokens are counted per row up to and including the first stop token. For the lossless modes (static k=1, selfspec,
prompt lookup) the table says whether each row's tokens equal HF greedy's at the same concurrency; the lossy ones
report the same agreement for information. Every (mode, concurrency) is warmed up once before it is timed. Bad flags,
a `--prompts` below the largest concurrency and an unusable `--plot` path are refused before the model loads; the
plot is written atomically once every measurement is done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptive.prompts import read_jsonl
from distill.errors import UserError
from distill.models import DEFAULT_MODEL

PROMPT_LOOKUP_TOKENS = 10  # the value of HF's prompt-lookup docs/blog
WARMUP_TOKENS = 4
DEFAULT_CONCURRENCY = "1,16"
MIN_DEFAULT_PROMPTS = 16  # --prompts without a value: max(this, the largest concurrency)

# Throughput x non-MTP at concurrency 16 (and 1) in the authors' SGLang fork (jwkirchenbauer/sglang-mtp-lm,
# PHASE3D_DEBRIEF.md): Llama-3.1-8B MTP checkpoint (EAGLE-3: Llama-3.1-8B-Instruct with its EAGLE-3 drafter), GSM8K,
# 128 new tokens, bf16, one GPU, server-side generation throughput.
_DEBRIEF = "jwkirchenbauer/sglang-mtp-lm PHASE3D_DEBRIEF.md"
COLLAPSE_ANCHORS = (
    {"label": "authors' SGLang ConfAdapt(k_max=16, tau=0.9)", "short": "SGLang ConfAdapt", "concurrency": 16,
     "ratio": 0.26, "ratio_at_concurrency_1": 2.31, "source": _DEBRIEF},
    {"label": "EAGLE-3 in SGLang", "short": "SGLang EAGLE-3", "concurrency": 16, "ratio": 1.39,
     "ratio_at_concurrency_1": 2.07, "source": _DEBRIEF},
)


def held_out_questions(path: str | Path, n: int) -> list[str]:
    """The last n questions of a GSM8K-style JSON-lines file (the tail the demo's training never sees)."""
    path = Path(path)
    questions = []
    for lineno, row in read_jsonl(path, "prompt file (--dataset)"):
        fields = row if isinstance(row, dict) else {}
        text = next((fields[k] for k in ("question", "query", "prompt") if isinstance(fields.get(k), str)), None)
        if text is None:
            raise UserError(f'{path}:{lineno}: expected a "question", "query" or "prompt" string field')
        questions.append(text)
    if len(questions) < n:
        raise UserError(f"{path} has {len(questions)} questions, fewer than --prompts {n}")
    return questions[len(questions) - n :]


def encode_prompt(tokenizer, question: str) -> list[int]:
    """One user turn of the chat template (what `mtp generate` feeds), or the plain text without a template."""
    if getattr(tokenizer, "chat_template", None):
        messages = [{"role": "user", "content": question}]
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                  return_dict=True)["input_ids"])
    return list(tokenizer(question)["input_ids"])


def _trim(ids: list[int], stops: set[int]) -> list[int]:
    """Generated ids up to and including the first stop token."""
    for i, t in enumerate(ids):
        if t in stops:
            return ids[: i + 1]
    return ids


def _sync(device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class _ForwardCounter:
    """Counts model forward calls (HF generate does not report them)."""

    def __init__(self, model):
        self.calls = 0
        self._handle = model.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.calls += 1

    def close(self):
        self._handle.remove()


def _hf_generate(model, tokenizer, batch: list[list[int]], max_new_tokens: int, stops: list[int], **extra):
    """HF generate on a left-padded batch; returns each row's generated ids (trimmed at the first stop)."""
    from transformers import GenerationConfig

    width = max(len(r) for r in batch)
    pad = tokenizer.pad_token_id
    ids = torch.tensor([[pad] * (width - len(r)) + r for r in batch], device=model.device)
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in batch], device=model.device)
    config = GenerationConfig(max_new_tokens=max_new_tokens, do_sample=False, eos_token_id=stops, pad_token_id=pad,
                              **extra)
    with torch.inference_mode():
        out = model.generate(input_ids=ids, attention_mask=mask, generation_config=config)
    return [_trim(row[width:].tolist(), set(stops)) for row in out]


def _run_hf(model, tokenizer, prompts, concurrency, max_new_tokens, stops, lookup: bool):
    """(rows of generated ids, seconds, forward calls): the prompts in consecutive batches of `concurrency`."""
    extra = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if lookup else {}
    step = 1 if lookup else concurrency  # assisted generation is batch-1 only in HF
    rows, counter = [], _ForwardCounter(model)
    try:
        _sync(model.device)
        start = time.perf_counter()
        for i in range(0, len(prompts), step):
            rows += _hf_generate(model, tokenizer, prompts[i : i + step], max_new_tokens, stops, **extra)
        _sync(model.device)
        seconds = time.perf_counter() - start
    finally:
        counter.close()
    return rows, seconds, counter.calls


def _run_mtp(decoder, strategy, prompts, concurrency, max_new_tokens):
    """(rows of generated ids, seconds, the GenerationResults): the prompts in consecutive batches of `concurrency`."""
    results = []
    _sync(decoder.model.device)
    start = time.perf_counter()
    for i in range(0, len(prompts), concurrency):
        results += decoder.generate(prompts[i : i + concurrency], strategy, max_new_tokens=max_new_tokens)
    _sync(decoder.model.device)
    return [r.token_ids for r in results], time.perf_counter() - start, results


def run_bench(model, tokenizer, questions: list[str], *, concurrency: list[int], max_new_tokens: int,
              k_max: int | str | list, tau: float, scorer=None, prompt_lookup: bool = True,
              progress: bool = True) -> list[dict]:
    """Measure every mode at every concurrency; one dict per (concurrency, mode), ratios taken at the same
    concurrency. `scorer`: ConfAdapt's confidence (the model's calibrator, so tau means what `mtp tune` certified).
    `prompt_lookup`: also run HF prompt-lookup decoding (row by row)."""
    from adaptive.loading import stop_ids
    from adaptive.decoder import MTPDecoder
    from adaptive.metrics import acceptance_metrics, is_speculative
    from adaptive.strategies import ConfAdapt, SelfSpeculative, Static

    stops = stop_ids(model, tokenizer)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stops)
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    k_maxes = k_max if isinstance(k_max, list) else [k_max]
    adaptive = [ConfAdapt(tau, k, scorer=scorer) for k in k_maxes] + [SelfSpeculative(k) for k in k_maxes]
    strategies = [Static(1), Static(3)] + adaptive
    lossless = {"hf-greedy": True, "hf-prompt-lookup": True, "static(k=1)": True}
    lossless.update({s.label: True for s in strategies if isinstance(s, SelfSpeculative)})
    modes = ["hf-greedy"] + (["hf-prompt-lookup"] if prompt_lookup else []) + [s.label for s in strategies]
    by_label = {s.label: s for s in strategies}
    results = []
    bar = tqdm(total=len(concurrency) * len(modes), desc="bench-decode", unit="run", disable=not progress)
    for b in concurrency:
        greedy_rows = None
        for mode in modes:
            bar.set_postfix_str(f"concurrency {b} {mode}")
            warm = prompts[:b]
            metrics = None
            if mode.startswith("hf-"):
                lookup = mode == "hf-prompt-lookup"
                _run_hf(model, tokenizer, warm[:1] if lookup else warm, b, WARMUP_TOKENS, stops, lookup)
                rows, seconds, calls = _run_hf(model, tokenizer, prompts, b, max_new_tokens, stops, lookup)
                tokens = sum(len(r) for r in rows)
                # Greedy commits one token per forward; prompt lookup runs batch 1, so calls are per row.
                tpf = 1.0 if not lookup else tokens / max(calls, 1)
                note = "row-by-row (HF assisted generation is batch-1 only)" if lookup and b > 1 else ""
            else:
                strategy = by_label[mode]
                _run_mtp(decoder, strategy, warm, b, WARMUP_TOKENS)
                rows, seconds, generated = _run_mtp(decoder, strategy, prompts, b, max_new_tokens)
                tokens = sum(len(r) for r in rows)
                tpf = tokens / max(sum(r.forward_passes for r in generated), 1)
                metrics = acceptance_metrics(generated, speculative=is_speculative(strategy), seconds=seconds)
                note = ""
            if mode == "hf-greedy":
                greedy_rows = rows
            equal = sum(r == g for r, g in zip(rows, greedy_rows))
            results.append({
                "concurrency": b, "mode": mode, "tokens": tokens, "seconds": round(seconds, 4),
                "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
                "tokens_per_forward": tpf, "lossless": lossless.get(mode, False),
                "equal_to_hf_greedy": f"{equal}/{len(rows)}", "equal_fraction": equal / len(rows), "note": note,
                **({"acceptance": metrics} if metrics else {}),  # vLLM's names (adaptive/metrics.py)
            })
            bar.update(1)
    bar.close()
    for b in concurrency:
        at_b = [r for r in results if r["concurrency"] == b]
        base = next(r for r in at_b if r["mode"] == "hf-greedy")["tokens_per_second"]
        plain = next(r for r in at_b if r["mode"] == "static(k=1)")["tokens_per_second"]
        for r in at_b:
            r["ratio_vs_hf_greedy"] = r["tokens_per_second"] / base
            r["ratio_vs_k1"] = r["tokens_per_second"] / plain
    return results


def format_table(results: list[dict]) -> str:
    width = max([30] + [len(r["mode"]) for r in results])
    header = (f"{'conc':>5}  {'mode':<{width}} {'tok/s':>8} {'x greedy':>8} {'x k=1':>6} {'tok/fwd':>7} "
              f"{'= greedy':>9}  note")
    lines = [header, "-" * len(header)]
    for r in results:
        eq = r["equal_to_hf_greedy"] + ("" if r["lossless"] else "*")
        lines.append(f"{r['concurrency']:>5}  {r['mode']:<{width}} {r['tokens_per_second']:>8.1f} "
                     f"{r['ratio_vs_hf_greedy']:>8.2f} {r['ratio_vs_k1']:>6.2f} {r['tokens_per_forward']:>7.2f} "
                     f"{eq:>9}  {r['note']}")
    lines.append("* lossy mode: agreement with greedy shown for information only")
    return "\n".join(lines)


def format_sweep(results: list[dict], anchors=COLLAPSE_ANCHORS) -> str:
    """Throughput ratio to HF greedy, one row per mode and one column per concurrency (tokens/forward in brackets),
    then the anchors of the authors' serving fork at the concurrencies they were measured at."""
    levels = sorted({r["concurrency"] for r in results})
    modes = list(dict.fromkeys(r["mode"] for r in results))
    by = {(r["concurrency"], r["mode"]): r for r in results}
    width = max([30] + [len(m) for m in modes] + [len(a["label"]) for a in anchors])

    def cell(r: dict | None) -> str:
        return "-" if r is None else f"{r['ratio_vs_hf_greedy']:.2f} ({r['tokens_per_forward']:.2f})"

    header = f"{'x HF greedy (tokens/forward)':<{width}}" + "".join(f"{'c=' + str(c):>15}" for c in levels)
    lines = [header, "-" * len(header)]
    lines += [f"{mode:<{width}}" + "".join(f"{cell(by.get((c, mode))):>15}" for c in levels) for mode in modes]
    for a in anchors:
        known = {1: a.get("ratio_at_concurrency_1"), a["concurrency"]: a["ratio"]}
        row = "".join(f"{'' if known.get(c) is None else format(known[c], '.2f'):>15}" for c in levels)
        missing = [c for c, v in known.items() if v is not None and c not in levels]
        lines.append(f"{a['label']:<{width}}{row}" + "".join(f"  ({known[c]:.2f} at c={c})" for c in missing))
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


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
    from adaptive.loading import DTYPES, GSM8K_LOCAL, load_mtp_model, mtp_defaults
    from adaptive.strategies import ConfAdapt, parse_k_max

    parser = _Parser(prog="mtp bench-decode",
                     description="tokens/s of each strategy vs HF greedy and prompt lookup, at each concurrency")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default=str(GSM8K_LOCAL), help="GSM8K-style JSON lines; its tail is used")
    parser.add_argument("--concurrency", "--batch-sizes", dest="concurrency", default=DEFAULT_CONCURRENCY,
                        metavar="LIST", help="requests decoded together, comma-separated (default 1,16); "
                                             "--batch-sizes is the same flag")
    parser.add_argument("--prompts", type=int, help="held-out prompts decoded at every concurrency (default: "
                                                    f"max({MIN_DEFAULT_PROMPTS}, the largest concurrency))")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--k-max", help="confadapt/selfspec k_max values, comma-separated, each an integer, auto or "
                                        "auto:N (default: the model's, else 16, and auto)")
    parser.add_argument("--tau", type=float, help="confadapt threshold (default: the model's, else 0.9)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--no-prompt-lookup", action="store_true",
                        help="leave out HF prompt lookup (batch-1 only: it repeats the row-by-row run at every "
                             "concurrency)")
    parser.add_argument("--plot", metavar="PATH.png", help="write the ratio-to-HF-greedy vs concurrency figure here")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    concurrency = parse_concurrency(args.concurrency)
    args.prompts = prompt_count(args.prompts, concurrency)
    if args.max_new_tokens < 1:
        raise UserError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
    plot_path = check_plot_path(args.plot) if args.plot else None
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads avoid OpenMP oversubscription
    defaults = mtp_defaults(args.model)
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
    from adaptive.calibration import load_calibrator

    results = run_bench(model, tokenizer, questions, concurrency=concurrency, max_new_tokens=args.max_new_tokens,
                        k_max=k_maxes, tau=args.tau, scorer=load_calibrator(args.model),
                        prompt_lookup=not args.no_prompt_lookup, progress=True)
    doc = {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "concurrency": concurrency, "k_max": k_maxes, "tau": args.tau,
        "prompt_lookup_num_tokens": None if args.no_prompt_lookup else PROMPT_LOOKUP_TOKENS, "results": results,
        "anchors": list(COLLAPSE_ANCHORS),
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"model {args.model} on {doc['device_name']} ({doc['threads']} threads), {args.prompts} GSM8K prompts, "
              f"{args.max_new_tokens} new tokens max")
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
