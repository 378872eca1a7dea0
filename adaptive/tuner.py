"""Choose ConfAdapt's tau and k_max for a target, with a statistical guarantee, never slower than k=1.

`mtp tune` (mtp_cli/tune.py) and `mtp demo` both come through `tune`. Users pick a target, not a threshold. The tuner
decodes a calibration set with plain next-token decoding (Static(1), the reference: greedy decoding of the same
checkpoint) and evaluates ConfAdapt(tau, k_max) over the paper's grid (§5.2: tau from 0.995 down to 0.6; k_max
4/8/16), certifies the settings that meet the target (Learn then Test, adaptive/ltt.py), and writes its choice into
the model's generation config, where `mtp generate` reads its defaults (`mtp_strategy`, `mtp_k_max`, `mtp_tau`, the
fields `mtp export` writes). End to end, not from per-token labels: a different tau changes the whole trajectory (the
tuning runs decode end to end, as Learn-then-Test assumes of the risk it certifies). Grid points become strategies in
one place (`setting_strategy`); a grid value the replay cannot simulate (adaptive/replay.py `replayable` is false: a
per-step choice of the number of masks) is decoded for real.

Never slower than k=1. The chosen setting must be measured, wall-clock, at least as fast as plain k=1 of the same
checkpoint, both decoded side by side in the same run at the same batch size on the same questions (the first
min(n, --batch-size) calibration problems: k=1 once, then each candidate). Candidates are the certified settings
ranked by the speed metric (tokens per forward, the paper's "acceleration factor", or --speed wallclock), the first
--measure of them are measured, and the choice is the best measured one that is not slower than k=1 (--speed tokens:
the highest tokens/forward; wallclock: the highest measured tok/s). Choosing among certified settings keeps the
guarantee, since it holds for all of them at once. When nothing is certified, or every measured candidate is slower,
the tuner says so plainly and keeps plain decoding (static k=1) as the default. The lossless self-speculative mode
(k_max auto) is timed on the same sample too: it returns k=1's tokens exactly, so it needs no certificate, and it
becomes the default when it is measured faster than k=1 and than the chosen ConfAdapt setting (--no-lossless: off).
--min-speed S instead ranks the settings with speed >= S by accuracy (or agreement) — a speed target without a
certification claim — and the same wall-clock rule applies. The ranking and the choice are adaptive/ltt.py's `select`.

Sweep. Settings are evaluated lazily in the testing order, the k_max sequences taking turns (every sequence's first
tau, then every second one, ...), so a time budget (the demo's) shortens all sequences alike; once a k_max's
sequence has failed a test, its remaining taus can never be certified and are not evaluated, unless --full-sweep
(or --min-speed) asks for every point; with the replay they are still screened for free (`screen`: on how many
questions each leaves greedy, a lower bound on its agreement, its tokens per forward on the greedy prefix; the
report's "not_evaluated"). With --sweep replay (the default) the grid costs about one greedy pass: the
replay of adaptive/replay.py, real decoding only from where a setting leaves greedy. --sweep rollout decodes every
setting on every question (the slower path, kept for comparison).

Outputs, in the report directory (`mtp tune`: --report-dir, default DIR/tune), each written atomically: report.json
(k=1's speed on the full set and on the speed sample; every setting: tau, k_max, accuracy / agreement, losses,
p-value, certified, tokens/forward mean and std, questions replayed vs decoded, measured tok/s and the ratio to k=1
where measured; the choice; delta, target, n) and pareto.png (accuracy or agreement vs tokens/forward and vs
wall-clock tok/s, one line per k_max, k=1's speed as the reference line; distill/plots.py `pareto_plot`). Then the
chosen strategy goes into DIR/generation_config.json (atomic replace) unless --no-write: confadapt with its tau and
k_max, selfspec (lossless), or static k=1.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from adaptive.ltt import agreement_flags, binomial_pvalue, paired_counts, select
from adaptive.replay import continue_rollouts, greedy_confidences, replay_steps, replayable
from distill.decoding_defaults import record_decoding_defaults
from distill.errors import UserError, check_fraction
from distill.files import replace_atomically, write_text_atomically
from distill.plots import pareto_plot

TAU_GRID = (0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.87, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # paper §5.2
K_MAX_GRID = (4, 8, 16)
GENERATION_CONFIG = "generation_config.json"
DEFAULT_N = 200
DEFAULT_MEASURE = 3  # certified candidates whose wall-clock speed is measured against k=1


# ---------------------------------------------------------------------------------------------------------------------
# Grid points -> strategies (the one place; a grid value the replay cannot simulate is decoded for real)


def setting_strategy(tau: float, k_max, scorer=None):
    """The strategy a grid point (tau, k_max) stands for: ConfAdapt on the confidence `scorer` (the model's
    calibrator, or None for raw top-1)."""
    from adaptive.strategies import ConfAdapt

    return ConfAdapt(tau, k_max, scorer=scorer)

# ---------------------------------------------------------------------------------------------------------------------
# The sweep: evaluate settings lazily, in the testing order


def ordered_sequences(taus: Sequence[float], k_maxes: Sequence[int]) -> list[tuple[int, list[float]]]:
    """[(k_max, taus from conservative to aggressive)] in the order the k_max values were given."""
    return [(int(k), sorted({float(t) for t in taus}, reverse=True)) for k in k_maxes]


FIELDS = ("accuracy", "stderr", "agreement", "tokens_per_forward_mean", "tokens_per_forward_std",
          "tokens_per_second", "tokens", "forwards", "seconds", "replayed", "decoded")


def _setting_fields(report, tau: float, k_max: int) -> dict:
    """Plain dict of a setting's evaluation (a dict, or an EvalReport-like object): what `select`, the report and
    the plot need."""
    get = report.get if isinstance(report, dict) else (lambda key, default=None: getattr(report, key, default))
    fields = {"tau": float(tau), "k_max": int(k_max)}
    for key in ("correct", "agrees"):
        if get(key) is not None:
            fields[key] = [bool(x) for x in get(key)]
    for key in FIELDS:
        value = get(key)
        if value is not None and not isinstance(value, int):
            value = float(value) if math.isfinite(value) else None  # e.g. the stderr of n = 1: JSON has no NaN
        fields[key] = value
    return fields


def _losses(setting: dict, reference, objective: str) -> tuple[int, int]:
    """(losses, n) of an evaluated setting under the objective."""
    if objective == "agreement":
        agrees = np.asarray(setting["agrees"], dtype=bool)
        return int(np.count_nonzero(~agrees)), int(agrees.size)
    b, _ = paired_counts(reference, setting["correct"])
    return b, len(setting["correct"])


def sweep(evaluate_setting: Callable[[float, int], object], taus: Sequence[float], k_maxes: Sequence[int], *,
          reference: Sequence[bool] | None = None, target: float, delta: float = 0.05, objective: str = "drop",
          full: bool = False, progress: bool = False, deadline: float | None = None) -> list[dict]:
    """Evaluate ConfAdapt settings end to end, in testing order; return their dicts (see `select`).

    evaluate_setting(tau, k_max) returns a dict or an EvalReport-like object with the per-problem "correct"
    (objective drop; `reference` is k=1's) or "agrees" (objective agreement; `target` is then the agreement) and the
    speed fields. The sequences take turns (first tau of every k_max, then the second, ...). Without `full`, a
    k_max's sequence stops after its first failed test (p > delta / len(k_maxes)), exactly where `select` stops
    certifying it. `deadline` (a time.perf_counter() value) ends the sweep before the
    next setting once passed (the first setting always runs): the sequences are then shorter, which testing allows
    (an untested tau is simply not certified).
    """
    agreement = objective == "agreement"
    target = check_fraction(target, "target agreement" if agreement else "target drop", closed=agreement)
    risk = 1.0 - target if agreement else target
    level = check_fraction(delta, "delta") / len(k_maxes)
    ref = None if reference is None else np.asarray(reference, dtype=bool)
    order = ordered_sequences(taus, k_maxes)
    bar = tqdm(total=sum(len(t) for _, t in order), desc="tune", unit="setting", disable=not progress)
    settings = []
    position = {k_max: 0 for k_max, _ in order}  # next tau of each sequence; len(sequence) once it has stopped
    try:
        # Round robin over the k_max sequences (tau rank by tau rank), each in its own testing order, so a deadline
        # shortens every sequence alike instead of dropping the last k_max values.
        while any(position[k] < len(sequence) for k, sequence in order):
            for k_max, sequence in order:
                i = position[k_max]
                if i >= len(sequence):
                    continue
                if deadline is not None and settings and time.perf_counter() > deadline:
                    bar.write(f"tune: time budget spent; {bar.total - bar.n} setting(s) not evaluated")
                    return settings
                tau = sequence[i]
                bar.set_postfix_str(f"k_max={k_max} tau={tau:g}")
                setting = _setting_fields(evaluate_setting(tau, k_max), tau, k_max)
                settings.append(setting)
                bar.update(1)
                position[k_max] = i + 1
                losses, n = _losses(setting, ref, objective)
                if not full and binomial_pvalue(losses, n, risk) > level:
                    bar.total -= len(sequence) - i - 1  # never certifiable: not evaluated
                    bar.refresh()
                    position[k_max] = len(sequence)
    finally:
        bar.close()
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: generation config, text report


def screen(traces, greedy_tokens, tau: float, k_max: int) -> dict:
    """A setting the sweep did not evaluate, from the replay alone (nothing decoded): on how many questions ConfAdapt
    leaves the greedy trajectory, so a lower bound on its agreement with k=1 (a question that never leaves it gives
    k=1's tokens), and its tokens per forward over the greedy prefix it follows. Not a certificate: fixed-sequence
    testing stopped before it."""
    left, steps = 0, []
    for (confidence, argmax), tokens in zip(traces, greedy_tokens):
        replayed, diverged_at = replay_steps(confidence, argmax, tokens, tau, k_max)
        left += diverged_at is not None
        steps += replayed
    n = len(traces)
    return {"tau": tau, "k_max": k_max, "left_greedy": left, "agreement_at_least": (n - left) / n if n else None,
            "greedy_prefix_tokens_per_forward": statistics.fmean(steps) if steps else 0.0}


def read_generation_config(model_dir: Path):
    """The directory's generation config, else one derived from config.json, else the defaults; UserError if the
    file exists but cannot be read (it is then left untouched)."""
    from transformers import AutoConfig, GenerationConfig

    if (model_dir / GENERATION_CONFIG).is_file():
        try:
            return GenerationConfig.from_pretrained(model_dir)
        except (OSError, ValueError) as exc:
            raise UserError(f"cannot read {model_dir / GENERATION_CONFIG}: {str(exc).splitlines()[0]}") from None
    try:
        return GenerationConfig.from_model_config(AutoConfig.from_pretrained(model_dir))
    except (OSError, ValueError):
        return GenerationConfig()  # e.g. a LoRA adapter directory: no config.json


def write_decoding_defaults(model_dir, strategy: str, k_max: int, tau: float | None, tau_scale: str = "raw") -> Path:
    """Set `mtp_strategy`, `mtp_k_max`, `mtp_tau` and `mtp_tau_scale` (None unless confadapt) in
    model_dir/generation_config.json, atomically: confadapt with its tau (on the scale it was tuned on) and k_max,
    static with k_max 1 (plain decoding), or selfspec.

    The attributes of distill/decoding_defaults.py, which `mtp export` writes too and every decoder reads; every
    other field of the file is kept.
    """
    from adaptive.strategies import make_strategy

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a model directory")
    make_strategy(strategy, k_max=k_max, tau=tau)  # validates: UserError before anything is written
    if strategy == "static" and str(k_max) != "1":
        raise UserError("the tuner writes confadapt, selfspec or plain decoding (static k=1), not static k>1")
    gen = read_generation_config(model_dir)
    record_decoding_defaults(gen, strategy=strategy, k_max=k_max, tau=tau if strategy == "confadapt" else None,
                             tau_scale=tau_scale)
    target = model_dir / GENERATION_CONFIG
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    return replace_atomically(target, lambda tmp: gen.to_json_file(tmp), mode=mode)


def _lossless_choice(decoder, sample: list[dict], choice: dict, k1_sample, k_maxes: Sequence[int], common: dict):
    """(choice, report row, k=1's run on the sample): the self-speculative mode under the span controller, timed
    beside k=1 on the speed sample. It returns k=1's tokens exactly (no certificate needed), so it replaces the
    choice when it is faster than k=1 and than a chosen ConfAdapt setting's measured speed."""
    from adaptive.evaluate import run_eval
    from adaptive.strategies import SelfSpeculative, Static

    k_max = f"auto:{max(int(k) for k in k_maxes)}"
    if k1_sample is None:
        k1_sample = run_eval(decoder, sample, Static(1), **common, progress=False)
    run = run_eval(decoder, sample, SelfSpeculative(k_max), **common, progress=False)
    reference = k1_sample.tokens_per_second
    row = {"strategy": "selfspec", "k_max": k_max, "tokens_per_second": run.tokens_per_second,
           "reference_tokens_per_second": reference, "speed_sample": len(sample),
           "tokens_per_forward": run.tokens_per_forward_mean,
           "speedup_vs_k1": run.tokens_per_second / reference if reference else None}
    print(f"  selfspec k_max={k_max} (lossless): {run.tokens_per_second:.1f} tok/s vs k=1 {reference:.1f} "
          f"({row['speedup_vs_k1']:.2f}x)", file=sys.stderr)
    rival = reference
    if choice["strategy"] == "confadapt":
        rival = max(rival, choice["setting"].get("tokens_per_second") or 0.0)
    if run.tokens_per_second > rival:
        choice = {"strategy": "selfspec", "tau": None, "k_max": k_max, "certified": True, "rule": "lossless-faster",
                  "setting": None, "speedup_vs_k1": row["speedup_vs_k1"],
                  "reason": f"the lossless self-speculative mode (k=1's tokens exactly, no certificate needed) measured "
                            f"{run.tokens_per_second:.1f} tok/s, faster than k=1's {reference:.1f}"
                            + (" and the certified ConfAdapt setting's" if rival > reference else "")}
    return choice, row, k1_sample


def _fmt(value, spec: str, width: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}{spec}}"


def format_table(selection: dict) -> str:
    agreement = selection.get("objective") == "agreement"
    loss = "disagr" if agreement else "regr"
    header = (f"{'k_max':>5} {'tau':>6} {'accuracy':>8} {'agree':>6} {loss:>6} {'p-value':>9} {'certified':>9} "
              f"{'tok/fwd':>12} {'decoded':>7} {'tok/s':>7} {'x k=1':>6}")
    lines = [header, "-" * len(header)]
    for s in selection["settings"]:
        status = "yes" if s["certified"] else ("no" if s["tested"] else "untested")
        tpf = f"{s['tokens_per_forward_mean']:.2f}±{s.get('tokens_per_forward_std') or 0:.2f}"
        ratio = (s["tokens_per_second"] / s["reference_tokens_per_second"]
                 if s.get("tokens_per_second") is not None and s.get("reference_tokens_per_second") else None)
        decoded = "-" if s.get("decoded") is None else f"{s['decoded']}/{s['n']}"
        lines.append(f"{s['k_max']:>5} {s['tau']:>6g} {_fmt(s.get('accuracy'), '.3f', 8)} "
                     f"{_fmt(s.get('agreement'), '.3f', 6)} {s['disagreements' if agreement else 'regressions']:>6} "
                     f"{s['p_value']:>9.2e} {status:>9} {tpf:>12} {decoded:>7} "
                     f"{_fmt(s.get('tokens_per_second'), '.1f', 7)} {_fmt(ratio, '.2f', 6)}")
    return "\n".join(lines)


def choice_line(choice: dict) -> str:
    if choice["strategy"] == "selfspec":
        return f"chosen: selfspec k_max={choice['k_max']} (lossless) - {choice['reason']}"
    if choice["strategy"] != "confadapt":
        return f"chosen: plain decoding (static k=1) - {choice['reason']}"
    s = choice["setting"]
    quality = (f"agreement with k=1 {s['agreement']:.3f}" if "disagreements" in s else
               f"accuracy {s['accuracy']:.3f} (drop {s['drop']:+.3f}; {s['regressions']} regressions, "
               f"{s['improvements']} improvements)")
    speed = ""
    if s.get("tokens_per_second") is not None and s.get("reference_tokens_per_second"):
        ratio = s["tokens_per_second"] / s["reference_tokens_per_second"]
        speed = f", {s['tokens_per_second']:.1f} tok/s = {ratio:.2f}x k=1's {s['reference_tokens_per_second']:.1f}"
    return (f"chosen: confadapt tau={choice['tau']:g} k_max={choice['k_max']}: {s['tokens_per_forward_mean']:.2f} "
            f"tokens/forward{speed}, {quality} - {choice['reason']}")


# ---------------------------------------------------------------------------------------------------------------------
# The whole tuning run: reference, sweep, selection, wall-clock check, report


def _reference_fields(report, labelled: bool) -> dict:
    out = _setting_fields(report, 1.0, 1)
    for key in ("tau", "k_max", "correct", "agrees", "agreement", "replayed", "decoded"):
        out.pop(key, None)
    if not labelled:
        out["accuracy"] = out["stderr"] = None
    return {"strategy": "static(k=1)", **out}


def tune(decoder, problems: list[dict], *, target_drop: float | None = None, target_agreement: float | None = None,
         agreement_tokens: int | None = None, delta: float, taus: Sequence[float], k_maxes: Sequence[int],
         prompt_format: str = "chat", max_new_tokens: int = 256, batch_size: int = 16, scorer=None,
         min_speed: float | None = None, speed: str = "tokens", full_sweep: bool = False, sweep_mode: str = "replay",
         measure: int = DEFAULT_MEASURE, labelled: bool = True, report_dir, model_dir=None,
         extra: dict | None = None, title: str | None = None, deadline: float | None = None,
         lossless: bool = True) -> dict:
    """Reference run, sweep (replay or rollouts), LTT selection, wall-clock check against k=1, report.json +
    pareto.png in `report_dir`; the choice goes into `model_dir`'s generation config when given. Returns the report
    (its "choice" holds strategy, tau, k_max).

    One target: `target_drop` (labelled problems) or `target_agreement` (agreement with k=1 on final answers, or on
    the first `agreement_tokens` tokens). `problems` are evaluate.load_problems rows (or prompts.load_prompts rows
    with labelled=False); `scorer` is the ConfAdapt confidence (a fitted calibrator or None for the raw top-1
    probability).
    `deadline` (time.perf_counter()) stops starting settings; at least one is evaluated and one candidate measured.
    `lossless`: also time the self-speculative mode (k_max auto, bounded by the largest k_max); it returns k=1's tokens
    exactly, so it needs no certificate, and it is the choice when it is measured faster than k=1 and than the chosen
    ConfAdapt setting. `mtp tune` and `mtp demo` both come through here.
    """
    from adaptive.evaluate import run_eval
    from adaptive.gsm8k import STOP_STRINGS, encode_prompt, extract_answer, normalize_number
    from adaptive.strategies import Static

    if (target_drop is None) == (target_agreement is None):
        raise UserError("give exactly one target: target_drop or target_agreement")
    objective = "agreement" if target_agreement is not None else "drop"
    target = target_agreement if target_agreement is not None else target_drop
    if objective == "drop" and not labelled:
        raise UserError("the accuracy-drop target needs labelled problems; use the agreement target")
    if sweep_mode not in ("replay", "rollout"):
        raise UserError(f"unknown sweep {sweep_mode!r}; choose replay or rollout")
    common = {"prompt_format": prompt_format, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    n = len(problems)
    # Warm-up (first forwards allocate and pick kernels) so the reference's wall-clock is not charged for it.
    run_eval(decoder, problems[:1], Static(1), **{**common, "max_new_tokens": min(4, max_new_tokens)},
             progress=False)
    began = time.perf_counter()
    reference = run_eval(decoder, problems, Static(1), **common, progress=True)
    ref_tokens = [list(r.token_ids) for r in reference.results]
    gold = [normalize_number(str(p["answer"])) if labelled else None for p in problems]
    sweep_began = time.perf_counter()

    traces = None
    # A diverging question is decoded from its divergence point on (the greedy tokens before it are the setting's
    # own), except with stop strings, which the decoder matches across the tokens of the whole generation.
    continue_from_divergence = not STOP_STRINGS[prompt_format]
    prompts = [encode_prompt(p["question"], prompt_format, decoder.tokenizer) for p in problems]
    if sweep_mode == "replay" and any(replayable(k) for k in k_maxes):
        k_read = max(k for k in k_maxes if replayable(k))
        was_training = decoder.model.training
        decoder.model.eval()
        try:
            traces = [greedy_confidences(decoder.model, prompts[i], ref_tokens[i], k_read, decoder.mask_token_id,
                                         scorer, min_tau=min(taus))
                      for i in tqdm(range(n), desc="replay (packed greedy prefixes)", unit="question", file=sys.stderr)]
        finally:
            decoder.model.train(was_training)
    replay_seconds = time.perf_counter() - sweep_began

    def evaluate_setting(tau: float, k_max) -> dict:
        strategy = setting_strategy(tau, k_max, scorer)
        t0 = time.perf_counter()
        answers, token_ids = list(reference.answers), [list(t) for t in ref_tokens]
        steps: list = [None] * n
        decode, resume = [], []  # decoded from the start / continued from the divergence point
        if traces is not None and replayable(k_max):
            for i, (confidence, argmax) in enumerate(traces):
                replayed, diverged_at = replay_steps(confidence, argmax, ref_tokens[i], tau, k_max)
                if diverged_at is None:
                    steps[i] = replayed
                elif continue_from_divergence:
                    resume.append((i, diverged_at, replayed))
                else:
                    decode.append(i)
        else:
            decode = list(range(n))
        if decode:
            real = run_eval(decoder, [problems[i] for i in decode], strategy, **common, progress=False)
            for j, i in enumerate(decode):
                answers[i], token_ids[i] = real.answers[j], list(real.results[j].token_ids)
                steps[i] = list(real.results[j].accepted_per_step)
        if resume:
            continued = continue_rollouts(decoder, [(prompts[i], ref_tokens[i][:c]) for i, c, _ in resume], strategy,
                                          max_new_tokens=max_new_tokens, batch_size=batch_size)
            for (i, _, replayed), (tokens, more_steps, text) in zip(resume, continued):
                answers[i], token_ids[i], steps[i] = extract_answer(text), tokens, replayed + more_steps
            decode += [i for i, _, _ in resume]
        every = [s for row in steps for s in row]
        correct = [a is not None and a == g for a, g in zip(answers, gold)] if labelled else None
        agree_answers = agreement_flags(reference.answers, answers)
        fields = {"correct": correct, "agreement": sum(agree_answers) / n,
                  "agrees": agreement_flags(reference.answers, answers, tokens=agreement_tokens,
                                            reference_tokens=ref_tokens, token_ids=token_ids)
                  if agreement_tokens else agree_answers,
                  "accuracy": sum(correct) / n if labelled else None,
                  "tokens_per_forward_mean": statistics.fmean(every) if every else 0.0,
                  "tokens_per_forward_std": statistics.pstdev(every) if every else 0.0,
                  "tokens": sum(len(t) for t in token_ids), "forwards": len(every),
                  "replayed": n - len(decode), "decoded": len(decode), "seconds": time.perf_counter() - t0}
        return fields

    settings = sweep(evaluate_setting, taus, k_maxes, reference=reference.correct if objective == "drop" else None,
                     target=target, delta=delta, objective=objective,
                     full=full_sweep or min_speed is not None, progress=True, deadline=deadline)
    sweep_seconds = time.perf_counter() - sweep_began
    select_args = dict(target=target, delta=delta, n_sequences=len(k_maxes), min_speed=min_speed, speed=speed,
                       objective=objective)
    ref_correct = reference.correct if labelled else None
    selection = select(ref_correct, settings, **select_args)

    # Never slower than k=1: measure candidates wall-clock beside k=1 on the same questions at the same batch size.
    sample = problems[: min(n, batch_size)]
    k1_sample = None
    by_key = {(s["tau"], s["k_max"]): s for s in settings}
    candidates = selection["candidates"][:measure]
    if candidates:
        print(f"measuring up to {len(candidates)} candidate(s) wall-clock beside k=1 on {len(sample)} questions "
              f"(batch size {batch_size})", file=sys.stderr)
        k1_sample = run_eval(decoder, sample, Static(1), **common, progress=False)
        for index, (tau, k_max) in enumerate(candidates):
            if index and deadline is not None and time.perf_counter() > deadline:
                print(f"tune: time budget spent; {len(candidates) - index} candidate(s) not measured", file=sys.stderr)
                break
            run = run_eval(decoder, sample, setting_strategy(tau, k_max, scorer), **common, progress=False)
            s = by_key[(tau, k_max)]
            s.update(tokens_per_second=run.tokens_per_second,
                     reference_tokens_per_second=k1_sample.tokens_per_second, speed_sample=len(sample),
                     speedup_vs_k1=run.tokens_per_second / k1_sample.tokens_per_second
                     if k1_sample.tokens_per_second else None)
            print(f"  tau={tau:g} k_max={k_max}: {run.tokens_per_second:.1f} tok/s vs k=1 "
                  f"{k1_sample.tokens_per_second:.1f} ({s['speedup_vs_k1']:.2f}x)", file=sys.stderr)
            not_slower = run.tokens_per_second >= k1_sample.tokens_per_second
            if min_speed is not None:  # ranked by accuracy / agreement: the first eligible one is the choice
                if not_slower and (speed == "tokens" or run.tokens_per_second >= min_speed):
                    break
            elif speed == "tokens" and not_slower:
                break  # ranked by tokens/forward: the first one not slower than k=1 is the choice
        selection = select(ref_correct, settings, **select_args)
    choice = selection["choice"]
    lossless_row = None
    if lossless:
        choice, lossless_row, k1_sample = _lossless_choice(decoder, sample, choice, k1_sample, k_maxes, common)
    ref_fields = _reference_fields(reference, labelled)
    if k1_sample is not None:
        ref_fields.update(speed_sample=len(sample), speed_sample_tokens_per_second=k1_sample.tokens_per_second)
    evaluated = {(s["tau"], s["k_max"]): s for s in settings}
    screened = [screen(traces, ref_tokens, t, k) if traces is not None and replayable(k) else {"tau": t, "k_max": k}
                for k, seq in ordered_sequences(taus, k_maxes) for t in seq if (t, k) not in evaluated]

    # Per-problem flags as "0"/"1" strings, so anyone can recompute every count and p-value from the report.
    def bits(flags) -> str | None:
        return None if flags is None else "".join("1" if ok else "0" for ok in flags)

    risk = selection["risk"]
    loss = ("1[disagrees with k=1 on the " + (f"first {agreement_tokens} tokens]" if agreement_tokens else
                                              "final answer]")) if objective == "agreement" else \
        "1[k=1 right and the setting wrong] (improvements not credited; drop = (b - c) / n)"
    report = {
        **(extra or {}),
        "n": n, "format": prompt_format, "max_new_tokens": max_new_tokens, "batch_size": batch_size,
        "objective": objective, "target": target,
        "target_drop": target_drop, "target_agreement": target_agreement,
        "agreement": None if objective == "drop" else (f"tokens:{agreement_tokens}" if agreement_tokens else "answer"),
        "labelled": labelled, "delta": delta, "level_per_test": selection["level"],
        "n_sequences": len(k_maxes), "speed": speed, "min_speed": min_speed,
        "calibrated_confidence": scorer is not None,
        "method": f"Learn then Test (Angelopoulos et al. 2021): loss {loss}; binomial p-value "
                  f"P(Bin(n, {risk:g}) <= losses) per setting, fixed-sequence testing per k_max from conservative to "
                  "aggressive tau at level delta / n_sequences; the choice must be measured no slower than k=1",
        "min_certifiable_n": selection["min_certifiable_n"],
        "sweep": {"mode": sweep_mode if traces is not None else "rollout", "reference_seconds": sweep_began - began,
                  "replay_forward_seconds": replay_seconds if traces is not None else None,
                  "seconds": sweep_seconds, "settings": len(settings),
                  "decoded_questions": sum(s.get("decoded") or 0 for s in settings),
                  "replayed_questions": sum(s.get("replayed") or 0 for s in settings)},
        "reference": {**ref_fields, "correct": bits(reference.correct) if labelled else None},
        "settings": [{**s, "correct": bits(evaluated[(s["tau"], s["k_max"])].get("correct")),
                      "agrees": bits(evaluated[(s["tau"], s["k_max"])].get("agrees"))}
                     for s in selection["settings"]],
        "not_evaluated": screened,
        "certified": choice["certified"],
        "choice": {key: value for key, value in choice.items() if key != "setting"},
        "lossless": lossless_row,
    }
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    report_path = write_text_atomically(report_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_path = pareto_plot(report_dir / "pareto.png", selection["settings"], ref_fields, choice=choice,
                            target=target, title=title, objective=objective)

    accuracy = (f"accuracy {reference.accuracy:.3f} ({sum(map(bool, reference.correct))}/{n}), " if labelled else "")
    print(f"reference static(k=1): {accuracy}{reference.tokens_per_second:.1f} tok/s"
          + (f" ({k1_sample.tokens_per_second:.1f} on the {len(sample)}-question speed sample)" if k1_sample else "")
          + (" | ConfAdapt uses the model's calibrated confidence" if scorer is not None else ""))
    print(f"sweep ({report['sweep']['mode']}): {len(settings)} settings in {sweep_seconds:.1f} s after the "
          f"{sweep_began - began:.1f} s reference run; {report['sweep']['decoded_questions']} question decodes, "
          f"{report['sweep']['replayed_questions']} replayed")
    print(format_table(selection))
    n_cert = sum(s["certified"] for s in selection["settings"])
    print(f"certified at delta={delta:g} (per-test level {selection['level']:.4g}, {len(k_maxes)} k_max "
          f"sequences): {n_cert} of {len(selection['settings'])} evaluated settings")
    for row in screened:
        if "left_greedy" in row:
            print(f"not evaluated: tau={row['tau']:g} k_max={row['k_max']} (screened by the replay, nothing decoded): "
                  f"leaves greedy on {row['left_greedy']}/{n} questions, agreement >= {row['agreement_at_least']:.3f}, "
                  f"{row['greedy_prefix_tokens_per_forward']:.2f} tokens/forward on the greedy prefix")
    print(choice_line(choice))
    print(f"wrote {report_path} and {plot_path}")
    if model_dir is not None:
        path = write_decoding_defaults(model_dir, choice["strategy"], choice["k_max"], choice["tau"],
                                       tau_scale="raw" if scorer is None else "calibrated")
        print(f"wrote {path}: `mtp generate --model {model_dir}` now decodes with "
              + (f"confadapt tau={choice['tau']:g} ({'raw' if scorer is None else 'calibrated'}) "
                 f"k_max={choice['k_max']}" if choice["strategy"] == "confadapt"
                 else f"selfspec k_max={choice['k_max']} (lossless)" if choice["strategy"] == "selfspec"
                 else "plain decoding (static k=1)"))
    return report
