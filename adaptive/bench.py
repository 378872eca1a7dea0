"""Wall-clock tokens/s of each decoding strategy next to Hugging Face's own decoders, at each concurrency (the
measurement behind `mtp bench-decode`, mtp_cli/bench_decode.py).

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
report the same agreement for information. Every (mode, concurrency) is warmed up once before it is timed.

Repeats (`--repeats N`). A shared machine drifts by several percent over a minute, which is the size of the ratios
this benchmark is read for (is `k_max auto` within 5 % of k=1?). With N rounds every mode runs once per round, in an
order rotated by the round, and each ratio is the median over rounds of the ratio within a round (tokens/s likewise
the median of the rounds'); tokens/forward and agreement are the first round's (the decoding is deterministic).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import torch
from tqdm.auto import tqdm

from adaptive.prompts import chat_ids, held_out_tail, read_jsonl
from distill.errors import UserError

PROMPT_LOOKUP_TOKENS = 10  # the value of HF's prompt-lookup docs/blog
WARMUP_TOKENS = 4

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
    return held_out_tail(questions, n)[0]


def encode_prompt(tokenizer, question: str) -> list[int]:
    """One user turn of the chat template (what `mtp generate` feeds), or the plain text without a template."""
    if getattr(tokenizer, "chat_template", None):
        return chat_ids(tokenizer, question)
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
              k_max: int | str | list, tau: float, scorer=None, prompt_lookup: bool = True, repeats: int = 1,
              progress: bool = True) -> list[dict]:
    """Measure every mode at every concurrency; one dict per (concurrency, mode), ratios taken at the same
    concurrency. `scorer`: ConfAdapt's confidence (the model's calibrator, so tau means what `mtp tune` certified).
    `prompt_lookup`: also run HF prompt-lookup decoding (row by row). `repeats`: rounds of every mode, interleaved
    (round r runs the modes in an order rotated by r); a mode's tokens/s and its ratios are the medians over rounds
    of its per-round figures, each ratio paired within its round, so a slow minute of a shared machine moves one
    round of every mode instead of one mode."""
    from distill.decoding_defaults import stop_token_ids
    from adaptive.decoder import MTPDecoder
    from adaptive.metrics import acceptance_metrics
    from adaptive.strategies import ConfAdapt, SelfSpeculative, Static

    if isinstance(repeats, bool) or not isinstance(repeats, int) or repeats < 1:
        raise UserError(f"repeats must be a positive integer, got {repeats!r}")
    stops = stop_token_ids(model, tokenizer)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stops)
    prompts = [encode_prompt(tokenizer, q) for q in questions]
    k_maxes = k_max if isinstance(k_max, list) else [k_max]
    adaptive = [ConfAdapt(tau, k, scorer=scorer) for k in k_maxes] + [SelfSpeculative(k) for k in k_maxes]
    strategies = [Static(1), Static(3)] + adaptive
    lossless = {"hf-greedy": True, "hf-prompt-lookup": True, "static(k=1)": True}
    lossless.update({s.label: True for s in strategies if s.speculative})
    modes = ["hf-greedy"] + (["hf-prompt-lookup"] if prompt_lookup else []) + [s.label for s in strategies]
    by_label = {s.label: s for s in strategies}

    def run(mode: str, b: int, rows_in: list, new: int) -> dict:
        if mode.startswith("hf-"):
            lookup = mode == "hf-prompt-lookup"
            rows, seconds, calls = _run_hf(model, tokenizer, rows_in, b, new, stops, lookup)
            tokens = sum(len(r) for r in rows)
            # Greedy commits one token per forward; prompt lookup runs batch 1, so calls are per row.
            return {"rows": rows, "seconds": seconds, "tokens": tokens,
                    "tpf": 1.0 if not lookup else tokens / max(calls, 1), "metrics": None}
        strategy = by_label[mode]
        rows, seconds, generated = _run_mtp(decoder, strategy, rows_in, b, new)
        tokens = sum(len(r) for r in rows)
        return {"rows": rows, "seconds": seconds, "tokens": tokens,
                "tpf": tokens / max(sum(r.forward_passes for r in generated), 1),
                "metrics": acceptance_metrics(generated, speculative=strategy.speculative, seconds=seconds)}

    results = []
    bar = tqdm(total=len(concurrency) * len(modes) * repeats, desc="bench-decode", unit="run", disable=not progress)
    for b in concurrency:
        for mode in modes:  # every (mode, concurrency) is warmed up once before it is timed
            warm = prompts[:1] if mode == "hf-prompt-lookup" else prompts[:b]
            run(mode, b, warm, WARMUP_TOKENS)
        rounds: dict[str, list[dict]] = {mode: [] for mode in modes}
        for r in range(repeats):
            for mode in modes[r % len(modes):] + modes[: r % len(modes)]:
                bar.set_postfix_str(f"concurrency {b} {mode}" + (f" round {r + 1}" if repeats > 1 else ""))
                rounds[mode].append(run(mode, b, prompts, max_new_tokens))
                bar.update(1)
        greedy_rows = rounds["hf-greedy"][0]["rows"]
        for mode in modes:
            first = rounds[mode][0]
            equal = sum(r == g for r, g in zip(first["rows"], greedy_rows))
            lookup = mode == "hf-prompt-lookup"
            results.append({
                "concurrency": b, "mode": mode, "tokens": first["tokens"],
                "seconds": round(statistics.median([x["seconds"] for x in rounds[mode]]), 4),
                "tokens_per_second": statistics.median(
                    [x["tokens"] / x["seconds"] if x["seconds"] > 0 else float("nan") for x in rounds[mode]]),
                "tokens_per_forward": first["tpf"], "lossless": lossless.get(mode, False),
                "equal_to_hf_greedy": f"{equal}/{len(first['rows'])}", "equal_fraction": equal / len(first["rows"]),
                "note": "row-by-row (HF assisted generation is batch-1 only)" if lookup and b > 1 else "",
                "repeats": repeats,
                **({"acceptance": first["metrics"]} if first["metrics"] else {}),  # vLLM's names (adaptive/metrics.py)
            })
        at_b = results[-len(modes):]

        def paired(mode: str, against: str) -> float:
            return statistics.median([(x["tokens"] / x["seconds"]) / (y["tokens"] / y["seconds"])
                            for x, y in zip(rounds[mode], rounds[against])])

        for r in at_b:
            r["ratio_vs_hf_greedy"] = paired(r["mode"], "hf-greedy")
            r["ratio_vs_k1"] = paired(r["mode"], "static(k=1)")
    bar.close()
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
