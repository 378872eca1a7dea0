"""`mtp bench-decode`: wall-clock tokens/s of each decoding strategy next to Hugging Face's own decoders.

    mtp bench-decode [--model alias|DIR] [--prompts 16] [--max-new-tokens 32] [--batch-sizes 1,16]
                     [--k-max 4,8,auto] [--json]

k_max and tau default to the model's own MTP defaults (generation config / config.mtp_k_max), else 16 and 0.9;
`--k-max` takes a list (e.g. `4,8,auto`); without it the model's k_max and `auto` (the cost-aware controller,
adaptive/controller.py) are measured.
The prompts are the last rows of the GSM8K file, the rows `mtp demo` holds out of its training data.

Same model, same prompts (the held-out tail of GSM8K, as one user turn of the chat template), same machine, one run
(speed-ups are only meaningful side by side; tokens/forward alone hides the longer per-step query of
2·k_max−1 tokens, paper §5.7). Modes:

* hf-greedy          `model.generate(do_sample=False)`, batched with left padding: the reference for every ratio;
* hf-prompt-lookup   `model.generate(prompt_lookup_num_tokens=10)`: HF assisted generation does not accept batches,
                     so at batch > 1 it runs row by row and is labelled `row-by-row` (its throughput is then a
                     batch-1 throughput, compared with batched greedy);
* static(k=1), static(k=3), confadapt(tau, k_max), selfspec(k_max) for every k_max given: `MTPDecoder` with the
  batch's rows ragged. Ratios are given against HF greedy and against this decoder's static(k=1) (plain next-token
  decoding with the same code path: the speed a user loses or gains by turning MTP on).

Tokens are counted per row up to and including the first stop token. For the lossless modes (static k=1, selfspec,
prompt lookup) the table says whether each row's tokens equal HF greedy's at the same batch size; the lossy ones
report the same agreement for information. Every (mode, batch size) is warmed up once before it is timed.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptive.cli import read_jsonl
from distill.errors import UserError
from distill.models import DEFAULT_MODEL

PROMPT_LOOKUP_TOKENS = 10  # the value of HF's prompt-lookup docs/blog
WARMUP_TOKENS = 4


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


def _run_hf(model, tokenizer, prompts, batch_size, max_new_tokens, stops, lookup: bool):
    """(rows of generated ids, seconds, forward calls)."""
    extra = {"prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS} if lookup else {}
    step = 1 if lookup else batch_size  # assisted generation is batch-1 only in HF
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


def _run_mtp(decoder, strategy, prompts, batch_size, max_new_tokens):
    """(rows of generated ids, seconds, the GenerationResults)."""
    results = []
    _sync(decoder.model.device)
    start = time.perf_counter()
    for i in range(0, len(prompts), batch_size):
        results += decoder.generate(prompts[i : i + batch_size], strategy, max_new_tokens=max_new_tokens)
    _sync(decoder.model.device)
    return [r.token_ids for r in results], time.perf_counter() - start, results


def run_bench(model, tokenizer, questions: list[str], *, batch_sizes: list[int], max_new_tokens: int,
              k_max: int | str | list, tau: float, scorer=None, progress: bool = True) -> list[dict]:
    """Measure every mode at every batch size; one dict per (batch size, mode). `scorer`: ConfAdapt's confidence
    (the model's calibrator, so tau means what `mtp tune` certified)."""
    from adaptive.cli import stop_ids
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
    modes = ["hf-greedy", "hf-prompt-lookup"] + [s.label for s in strategies]
    by_label = {s.label: s for s in strategies}
    results = []
    bar = tqdm(total=len(batch_sizes) * len(modes), desc="bench-decode", unit="run", disable=not progress)
    for b in batch_sizes:
        greedy_rows = None
        for mode in modes:
            bar.set_postfix_str(f"batch {b} {mode}")
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
                "batch_size": b, "mode": mode, "tokens": tokens, "seconds": round(seconds, 4),
                "tokens_per_second": tokens / seconds if seconds > 0 else float("nan"),
                "tokens_per_forward": tpf, "lossless": lossless.get(mode, False),
                "equal_to_hf_greedy": f"{equal}/{len(rows)}", "equal_fraction": equal / len(rows), "note": note,
                **({"acceptance": metrics} if metrics else {}),  # vLLM's names (adaptive/metrics.py)
            })
            bar.update(1)
    bar.close()
    for b in batch_sizes:
        at_b = [r for r in results if r["batch_size"] == b]
        base = next(r for r in at_b if r["mode"] == "hf-greedy")["tokens_per_second"]
        plain = next(r for r in at_b if r["mode"] == "static(k=1)")["tokens_per_second"]
        for r in at_b:
            r["ratio_vs_hf_greedy"] = r["tokens_per_second"] / base
            r["ratio_vs_k1"] = r["tokens_per_second"] / plain
    return results


def format_table(results: list[dict]) -> str:
    width = max([30] + [len(r["mode"]) for r in results])
    header = (f"{'batch':>5}  {'mode':<{width}} {'tok/s':>8} {'x greedy':>8} {'x k=1':>6} {'tok/fwd':>7} "
              f"{'= greedy':>9}  note")
    lines = [header, "-" * len(header)]
    for r in results:
        eq = r["equal_to_hf_greedy"] + ("" if r["lossless"] else "*")
        lines.append(f"{r['batch_size']:>5}  {r['mode']:<{width}} {r['tokens_per_second']:>8.1f} "
                     f"{r['ratio_vs_hf_greedy']:>8.2f} {r['ratio_vs_k1']:>6.2f} {r['tokens_per_forward']:>7.2f} "
                     f"{eq:>9}  {r['note']}")
    lines.append("* lossy mode: agreement with greedy shown for information only")
    return "\n".join(lines)


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def _batch_sizes(text: str) -> list[int]:
    try:
        sizes = [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise UserError(f"--batch-sizes must be comma-separated integers, got {text!r}") from None
    if not sizes or min(sizes) < 1:
        raise UserError(f"--batch-sizes must be positive integers, got {text!r}")
    return sizes


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
    from adaptive.cli import DTYPES, GSM8K_LOCAL, load_mtp_model, mtp_defaults
    from adaptive.strategies import ConfAdapt, parse_k_max

    parser = _Parser(prog="mtp bench-decode", description="tokens/s of each strategy vs HF greedy and prompt lookup")
    parser.add_argument("--model", default=DEFAULT_MODEL)
    parser.add_argument("--dataset", default=str(GSM8K_LOCAL), help="GSM8K-style JSON lines; its tail is used")
    parser.add_argument("--prompts", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--batch-sizes", default="1,16")
    parser.add_argument("--k-max", help="confadapt/selfspec k_max values, comma-separated, each an integer, auto or "
                                        "auto:N (default: the model's, else 16, and auto)")
    parser.add_argument("--tau", type=float, help="confadapt threshold (default: the model's, else 0.9)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, ...")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--json", action="store_true", help="print one JSON document instead of the table")
    args = parser.parse_args(argv)
    if args.threads is not None:
        if args.threads < 1:
            raise UserError("--threads must be >= 1")
        torch.set_num_threads(args.threads)  # on a shared CPU, fewer threads avoid OpenMP oversubscription
    if args.prompts < 1 or args.max_new_tokens < 1:
        raise UserError("--prompts and --max-new-tokens must be >= 1")
    batch_sizes = _batch_sizes(args.batch_sizes)
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

    results = run_bench(model, tokenizer, questions, batch_sizes=batch_sizes, max_new_tokens=args.max_new_tokens,
                        k_max=k_maxes, tau=args.tau, scorer=load_calibrator(args.model), progress=True)
    doc = {
        "model": args.model, "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "threads": torch.get_num_threads(), "dtype": args.dtype, "prompts": args.prompts,
        "max_new_tokens": args.max_new_tokens, "batch_sizes": batch_sizes, "k_max": k_maxes, "tau": args.tau,
        "prompt_lookup_num_tokens": PROMPT_LOOKUP_TOKENS, "results": results,
    }
    if args.json:
        print(json.dumps(doc, indent=2))
    else:
        print(f"model {args.model} on {doc['device_name']} ({doc['threads']} threads), {args.prompts} GSM8K prompts, "
              f"{args.max_new_tokens} new tokens max")
        print(format_table(results))
    sys.stdout.flush()
    return 0
