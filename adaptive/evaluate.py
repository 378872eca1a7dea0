"""Scoring decoding strategies on GSM8K problems: accuracy, agreement with k=1 and speed (paper §3.3, §5.2).

`run_eval` decodes every problem with one strategy (prompts, stop strings and answer extraction from adaptive/gsm8k.py)
and returns an `EvalReport`; `run_side_by_side` does the same for several runs, interleaved forward by forward so their
wall-clock figures are comparable. Accuracy is reported with lm-eval's standard error sqrt(p(1-p)/(n-1)).

Static(1), plain next-token decoding of the same checkpoint, is the reference every other strategy is compared with
("agreement": the fraction of problems where both extract the same answer) because MTP decoding trades agreement
with k=1 for speed. Speed is tokens per forward pass, mean ± std over all decoding steps of all generations (the
paper's "Eff. k", §3.3), and wall-clock generated tokens per second measured around the decoder calls only.
"""

from __future__ import annotations

import math
import statistics
import sys
import time
from dataclasses import dataclass, field, fields

from adaptive.gsm8k import EXTRACTIONS, STOP_STRINGS, answer_key, encode_prompt, gold_key
from adaptive.prompts import length_sorted_batches
from distill.errors import UserError


@dataclass
class EvalReport:
    label: str
    n: int
    accuracy: float
    stderr: float  # lm-eval's sqrt(p(1-p)/(n-1)); NaN for n = 1
    agreement: float | None  # fraction of answers equal to the reference (k=1) run's; None without a reference
    tokens_per_forward_mean: float  # over all decoding steps of all generations (paper §3.3 "Eff. k")
    tokens_per_forward_std: float
    tokens: int
    forwards: int
    seconds: float  # wall-clock inside the decoder calls (prefill + decode)
    tokens_per_second: float
    answers: list[str | None]
    correct: list[bool]
    results: list  # the GenerationResults (not serialised)
    texts: list[str] = field(default_factory=list)  # generated texts, cut at the stop string
    finish_reasons: dict = field(default_factory=dict)  # {"stop": n, "length": m}

    def to_dict(self) -> dict:
        out = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "results"}
        return {k: None if isinstance(v, float) and not math.isfinite(v) else v for k, v in out.items()}


def run_eval(decoder, problems: list[dict], strategy, *, prompt_format: str = "cot8", max_new_tokens: int = 256,
             batch_size: int = 16, reference: EvalReport | None = None, progress: bool = True,
             on_step=None, extract: str = "project") -> EvalReport:
    """Decode every problem with `strategy` (batches of similar prompt length), extract answers and score them.

    `extract`: "project" or "flexible" (lm-eval's flexible-extract and exact_match), adaptive/gsm8k.py; the reference
    run must have used the same. `on_step`: passed to every `decoder.generate` call of this run (e.g. a
    calibration collector)."""
    from tqdm.auto import tqdm

    _check_inputs(problems, batch_size, extract)
    if reference is not None and reference.n != len(problems):
        raise UserError(f"the reference run has {reference.n} answers for {len(problems)} problems")
    prompts = [encode_prompt(p["question"], prompt_format, decoder.tokenizer) for p in problems]
    stop_strings = STOP_STRINGS[prompt_format]
    results: list = [None] * len(problems)
    if getattr(strategy, "auto", False):  # the one-time forward-cost measurement stays out of the timed decode
        decoder.forward_cost.prepare(min(batch_size, len(problems)))
    seconds = 0.0
    with tqdm(total=len(problems), desc=f"evaluate {strategy.label}", unit="problem", disable=not progress,
              file=sys.stderr) as bar:
        for chunk in length_sorted_batches(prompts, batch_size):  # results go back to problem order
            began = time.perf_counter()
            batch = decoder.generate([prompts[i] for i in chunk], strategy, max_new_tokens,
                                     stop_strings=stop_strings, on_step=on_step)
            seconds += time.perf_counter() - began
            for i, result in zip(chunk, batch):
                result.prompt = problems[i]["question"]
                results[i] = result
            bar.update(len(chunk))

    return _report(strategy.label, problems, results, seconds, reference, extract)


def _check_inputs(problems: list[dict], batch_size, extract: str) -> None:
    if not problems:
        raise UserError("no problems to evaluate")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    if extract not in EXTRACTIONS:
        raise UserError(f"unknown answer extraction {extract!r}; choose one of: {', '.join(EXTRACTIONS)}")


def _report(label: str, problems: list[dict], results: list, seconds: float, reference: EvalReport | None,
            extract: str) -> EvalReport:
    answers = [answer_key(r.text, extract) for r in results]
    gold = [gold_key(str(p["answer"]), extract) for p in problems]
    correct = [a is not None and a == g for a, g in zip(answers, gold)]
    n = len(problems)
    accuracy = sum(correct) / n
    steps = [k for r in results for k in r.accepted_per_step]
    tokens = sum(len(r.token_ids) for r in results)
    agreement = None
    if reference is not None:  # two runs that both find no answer agree: they produced the same (missing) answer
        agreement = sum(a == b for a, b in zip(answers, reference.answers)) / n
    reasons: dict = {}
    for r in results:
        reasons[r.finish_reason] = reasons.get(r.finish_reason, 0) + 1
    return EvalReport(
        label=label,
        n=n,
        accuracy=accuracy,
        stderr=math.sqrt(accuracy * (1 - accuracy) / (n - 1)) if n > 1 else float("nan"),
        agreement=agreement,
        tokens_per_forward_mean=statistics.fmean(steps) if steps else 0.0,
        tokens_per_forward_std=statistics.pstdev(steps) if steps else 0.0,
        tokens=tokens,
        forwards=len(steps),
        seconds=seconds,
        tokens_per_second=tokens / seconds if seconds > 0 else 0.0,
        answers=answers,
        correct=correct,
        results=results,
        texts=[r.text for r in results],
        finish_reasons=reasons,
    )


def run_side_by_side(runs: list[tuple], problems: list[dict], *, prompt_format: str = "cot8",
                     max_new_tokens: int = 256, batch_size: int = 16, progress: bool = True,
                     extract: str = "project") -> list[EvalReport]:
    """`run_eval` for several (decoder, strategy) runs on the same problems, timed side by side: all runs decode the
    same batch at once, one forward of each in turn (`MTPDecoder.generate_steps`, in an order rotated by the batch,
    after one untimed warm-up generation per run), and each run's seconds are the time inside its own steps. A machine
    that slows down for a few seconds then slows every run alike, where run after run (or batch after batch) it moves
    one run's tokens/s against the others' by several percent. The first run is the reference of every other's
    agreement (k=1 in the demo); the answers are exactly `run_eval`'s."""
    from tqdm.auto import tqdm

    _check_inputs(problems, batch_size, extract)
    if not runs:
        raise UserError("no runs to evaluate")
    prompts = [[encode_prompt(p["question"], prompt_format, decoder.tokenizer) for p in problems]
               for decoder, _ in runs]
    stop_strings = STOP_STRINGS[prompt_format]
    chunks = list(length_sorted_batches(prompts[0], batch_size))
    results = [[None] * len(problems) for _ in runs]
    seconds = [0.0] * len(runs)
    for (decoder, strategy), own in zip(runs, prompts):
        if getattr(strategy, "auto", False):  # the one-time forward-cost measurement stays out of the timing
            decoder.forward_cost.prepare(min(batch_size, len(problems)))
        decoder.generate([own[chunks[0][0]]], strategy, 4, stop_strings=stop_strings)  # warm-up, untimed
    with tqdm(total=len(chunks) * len(runs), desc="evaluate side by side", unit="run", disable=not progress,
              file=sys.stderr) as bar:
        for c, chunk in enumerate(chunks):
            live = {r: runs[r][0].generate_steps([prompts[r][i] for i in chunk], runs[r][1], max_new_tokens,
                                                 stop_strings=stop_strings)
                    for r in [(c + i) % len(runs) for i in range(len(runs))]}
            while live:  # one forward of every unfinished run, in the batch's rotated order
                for r, steps in list(live.items()):
                    began = time.perf_counter()
                    try:
                        next(steps)
                    except StopIteration as done:
                        for i, result in zip(chunk, done.value):
                            result.prompt = problems[i]["question"]
                            results[r][i] = result
                        del live[r]
                        bar.update(1)
                    seconds[r] += time.perf_counter() - began
    reference = _report(runs[0][1].label, problems, results[0], seconds[0], None, extract)
    return [reference] + [_report(strategy.label, problems, results[r], seconds[r], reference, extract)
                          for r, (_, strategy) in enumerate(runs) if r > 0]


def parse_strategies(spec: str, defaults: dict, scorer=None) -> list:
    """"static:3,confadapt:0.9:16,selfspec:16" -> strategies. confadapt[:TAU[:K_MAX]] and selfspec[:K_MAX] take the
    model's decoding defaults (generation config, e.g. written by `mtp tune`) for what is left out. `scorer(tau_given)`
    -> ConfAdapt's confidence for a tau typed in the spec (True) or taken from the defaults (False); None: raw."""
    from adaptive.strategies import make_strategy

    out, labels = [], set()
    for item in spec.split(","):
        name, *values = [part.strip() for part in item.strip().split(":")]
        name = name.lower()
        arity = {"static": (1, 1), "confadapt": (0, 2), "selfspec": (0, 1)}.get(name)
        if arity is None:
            raise UserError(f"unknown strategy {item.strip()!r} in --strategies; use static:K, confadapt[:TAU[:K_MAX]] "
                            "or selfspec[:K_MAX], comma-separated")
        if not arity[0] <= len(values) <= arity[1]:
            raise UserError(f"--strategies item {item.strip()!r}: {name} takes "
                            + ("K" if name == "static" else "at most " + str(arity[1]) + " value(s)"))
        try:
            if name == "static":
                strategy = make_strategy(name, k=int(values[0]))
            elif name == "confadapt":
                tau = float(values[0]) if values else defaults["tau"]
                strategy = make_strategy(name, tau=tau, k_max=values[1] if len(values) > 1 else defaults["k_max"],
                                         scorer=None if scorer is None else scorer(bool(values)))
            else:
                strategy = make_strategy(name, k_max=values[0] if values else defaults["k_max"])
        except ValueError:
            raise UserError(f"--strategies item {item.strip()!r}: K and K_MAX must be integers, TAU a number") from None
        if strategy.label not in labels:
            labels.add(strategy.label)
            out.append(strategy)
    return out


def format_table(reports: list[EvalReport], reference: EvalReport) -> str:
    lines = [f"{'strategy':<30} {'accuracy':>15} {'agree':>6} {'tok/fwd':>13} {'tok/s':>8} {'x k=1':>6}"]
    for r in reports:
        acc = f"{r.accuracy:.3f}" + (f" ± {r.stderr:.3f}" if math.isfinite(r.stderr) else "")
        agree = "ref" if r is reference else ("-" if r.agreement is None else f"{r.agreement:.3f}")
        ratio = r.tokens_per_second / reference.tokens_per_second if reference.tokens_per_second else float("nan")
        lines.append(f"{r.label:<30} {acc:>15} {agree:>6} "
                     f"{r.tokens_per_forward_mean:>5.2f} ± {r.tokens_per_forward_std:<5.2f} "
                     f"{r.tokens_per_second:>8.1f} {ratio:>6.2f}")
    return "\n".join(lines)
