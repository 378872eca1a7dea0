"""`mtp tune`: choose ConfAdapt's tau and k_max for a target accuracy drop, with a statistical guarantee.

    mtp tune --model DIR --target-drop 0.02 [--delta 0.05] [--min-speed S] [--speed tokens|wallclock]
             [--taus 0.995,0.99,...] [--k-max 4,8,16] [--dataset PATH|hub] [--start S] [--n 200]
             [--format chat|cot8] [--full-sweep] [--report-dir DIR] [--no-write]

Users pick a speed/accuracy target, not a threshold. The tuner decodes a calibration set end to end with plain
next-token decoding (Static(1), the reference) and with ConfAdapt(tau, k_max) over the paper's grid (§5.2: tau from
0.995 down to 0.6; k_max 4/8/16), certifies the settings whose accuracy drop versus the reference is at most the
target, picks the fastest certified one and writes it into the model's generation config, where `mtp generate` reads
its defaults (`mtp_strategy`, `mtp_k_max`, `mtp_tau`, the fields `mtp export` writes). End to end, not from per-token
labels: a different tau changes the whole trajectory (anchors §C.2, practical caveat).

The statistics: Learn then Test (Angelopoulos, Bates, Candès, Jordan, Lei 2021, arXiv 2110.01052).
  * Per calibration problem i (n of them, drawn i.i.d.): correct_ref[i] for Static(1) and correct_s[i] for a setting
    s = (tau, k_max) of the same checkpoint. The accuracy drop is
        mean(correct_ref) - mean(correct_s) = (b - c) / n,
    b = #(reference right, s wrong) ("regressions"), c = #(reference wrong, s right) ("improvements").
  * Loss l_i = 1[reference right and s wrong]. Its mean b/n is >= the drop, so the null hypothesis
        H0_s: true drop > target    implies    E[l] > target,
    and since b ~ Binomial(n, E[l]), the exact binomial p-value  p_s = P(Binomial(n, target) <= b)  is valid for H0_s
    (LTT §3, binomial tail bound for a {0,1} loss). Conservative: improvements are not credited, so a setting that
    fixes as many problems as it breaks is still charged for the ones it breaks. The report also gives the plain
    drop (b - c) / n.
  * Fixed-sequence testing (LTT §4.1): for each k_max the taus are tested from conservative (0.995) to aggressive
    (0.6) at level delta / (number of k_max sequences) (Bonferroni across the sequences); each tau is certified while
    p_s <= level and the sequence stops at its first non-rejection. With probability >= 1 - delta (over the draw of
    calibration problems) no certified setting has a true drop above the target: family-wise error <= delta.
    The order is fixed before seeing data, so this holds whether or not accuracy is monotone in tau; monotonicity
    only makes the order powerful.
  * Choice: the fastest certified setting (speed = tokens per forward, the paper's hardware-independent
    "acceleration factor"; or wall-clock tokens/s with --speed wallclock); ties go to the higher accuracy. Choosing
    among certified settings keeps the guarantee, since it holds for all of them at once.
  * Nothing certified: said plainly, and the tuner falls back to the lossless self-speculative strategy (its output
    is greedy decoding exactly, so its drop is zero by construction) with the median k_max of the grid.
  * --min-speed S: the most accurate setting with speed >= S instead (a speed target: no certification claim; the
    p-values are still reported).
The smallest n that can certify anything is the n at which zero regressions give p = (1 - target)^n <= level; the
tuner warns when n is below it (e.g. target 0.02 with three k_max sequences at delta 0.05 needs n >= 203).

Data. The calibration problems must be disjoint from the evaluation problems. By default they are the last --n rows
of the local GSM8K *train* file (adaptive.cli.GSM8K_LOCAL), while `mtp evaluate` defaults to the *test* split, so
the two are disjoint unless told otherwise; --start picks other rows. Rows the model was distilled on make a
weaker calibration set (the reference and every setting see the same rows, so the drop is biased less than the
accuracy, but held-out rows are the honest choice).

Sweep. Settings are evaluated lazily in the testing order: once a k_max's sequence has failed a test, its remaining
taus can never be certified and are not decoded, unless --full-sweep (or --min-speed, which may pick any setting)
asks for every point of the Pareto plot.

Outputs, in --report-dir (default DIR/tune), each written atomically: report.json (every setting: tau, k_max,
accuracy, drop, regressions, improvements, p-value, certified, tokens/forward mean and std, tokens/s; the choice;
delta, target, n) and pareto.png (accuracy vs tokens/forward and vs tokens/s, one line per k_max). Then the chosen
strategy goes into DIR/generation_config.json (atomic replace) unless --no-write.
"""

from __future__ import annotations

import json
import math
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from functools import lru_cache
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

from distill.errors import UserError
from distill.files import replace_atomically, write_text_atomically

TAU_GRID = (0.995, 0.99, 0.98, 0.97, 0.96, 0.95, 0.9, 0.87, 0.85, 0.8, 0.75, 0.7, 0.65, 0.6)  # paper §5.2
K_MAX_GRID = (4, 8, 16)
SPEEDS = {"tokens": "tokens_per_forward_mean", "wallclock": "tokens_per_second"}  # --speed -> setting field
SPEED_UNITS = {"tokens": "tokens/forward", "wallclock": "tok/s"}
GENERATION_CONFIG = "generation_config.json"
DEFAULT_N = 200


# ---------------------------------------------------------------------------------------------------------------------
# The test: pure functions on plain lists and dicts


def _check_fraction(value, what: str) -> float:
    value = float(value)
    if math.isnan(value) or not 0.0 < value < 1.0:
        raise UserError(f"{what} must be in (0, 1), got {value:g}")
    return value


def paired_counts(reference: Sequence[bool], correct: Sequence[bool]) -> tuple[int, int]:
    """(b, c): problems the reference solves and the setting does not (regressions), and the reverse."""
    ref = np.asarray(reference, dtype=bool)
    cur = np.asarray(correct, dtype=bool)
    if ref.shape != cur.shape or ref.ndim != 1 or ref.size == 0:
        raise ValueError(f"reference and setting correctness must be equal-length, non-empty lists; got "
                         f"{ref.shape} and {cur.shape}")
    return int(np.count_nonzero(ref & ~cur)), int(np.count_nonzero(~ref & cur))


@lru_cache(maxsize=65536)  # pure and called once per setting per simulation draw in the tests
def binomial_pvalue(losses: int, n: int, target: float) -> float:
    """P(Binomial(n, target) <= losses): valid p-value for H0 "E[loss] > target" given `losses` of n {0,1} losses."""
    from scipy.stats import binom

    if n < 1 or not 0 <= losses <= n:
        raise ValueError(f"need 0 <= losses <= n and n >= 1, got losses={losses}, n={n}")
    return float(binom.cdf(int(losses), int(n), float(target)))


def fixed_sequence(pvalues: Sequence[float], level: float) -> list[bool]:
    """Fixed-sequence testing (LTT §4.1): reject (certify) in order while p <= level; stop at the first failure."""
    certified, going = [], True
    for p in pvalues:
        going = going and p <= level
        certified.append(going)
    return certified


def min_certifiable_n(target: float, level: float) -> int:
    """Smallest n at which zero regressions certify: (1 - target)^n <= level."""
    return math.ceil(math.log(level) / math.log1p(-target) - 1e-9)


def _speed(setting: dict, speed: str) -> float:
    value = setting.get(SPEEDS[speed])
    return float("nan") if value is None else float(value)


def select(reference: Sequence[bool], settings: Sequence[dict], *, target: float, delta: float = 0.05,
           n_sequences: int | None = None, min_speed: float | None = None, speed: str = "tokens") -> dict:
    """Run LTT on evaluated settings and choose one.

    reference: per-problem correctness of Static(1). settings: dicts with "tau", "k_max", "correct" (per-problem
    correctness, same problems and order) and the speed fields "tokens_per_forward_mean" / "tokens_per_second";
    other keys are carried through. n_sequences: number of k_max sequences in the grid (the Bonferroni divisor;
    default: the distinct k_max values present). A sequence may be a prefix of its grid (the sweep stops early):
    taus never evaluated are simply not certified.

    Returns {"settings": [annotated copies in testing order, without "correct"], "choice": {...}, "n", "target",
    "delta", "level", "n_sequences", "speed", "reference_accuracy", "min_certifiable_n"}. The choice has "strategy"
    ("confadapt" or the lossless fallback "selfspec"), "tau", "k_max", "certified", "rule" ("fastest-certified",
    "min-speed" or "fallback"), "reason" (one sentence) and, unless it is the fallback, the chosen "setting".
    """
    target = _check_fraction(target, "target drop")
    delta = _check_fraction(delta, "delta")
    if speed not in SPEEDS:
        raise UserError(f"unknown speed metric {speed!r}; choose one of {', '.join(SPEEDS)}")
    if not settings:
        raise ValueError("select needs at least one evaluated setting")
    ref = np.asarray(reference, dtype=bool)
    n = int(ref.size)
    k_maxes = sorted({int(s["k_max"]) for s in settings})
    m = int(n_sequences or len(k_maxes))
    if m < len(k_maxes):
        raise ValueError(f"n_sequences={m} but settings hold {len(k_maxes)} k_max values")
    level = delta / m

    annotated = []
    for k in k_maxes:
        sequence = sorted((s for s in settings if int(s["k_max"]) == k), key=lambda s: -float(s["tau"]))
        rows = []
        for s in sequence:
            b, c = paired_counts(ref, s["correct"])
            row = {key: value for key, value in s.items() if key != "correct"}
            row.update(tau=float(s["tau"]), k_max=k, n=n, accuracy=float(np.mean(np.asarray(s["correct"], bool))),
                       drop=(b - c) / n, regressions=b, improvements=c, p_value=binomial_pvalue(b, n, target))
            rows.append(row)
        certified = fixed_sequence([r["p_value"] for r in rows], level)
        for i, row in enumerate(rows):  # tested: reached by the sequence (every earlier tau was certified)
            row.update(certified=certified[i], tested=i == 0 or certified[i - 1])
        annotated += rows

    out = {"settings": annotated, "n": n, "target": target, "delta": delta, "level": level, "n_sequences": m,
           "speed": speed, "reference_accuracy": float(ref.mean()), "min_certifiable_n": min_certifiable_n(target, level)}
    unit = SPEED_UNITS[speed]

    def fastest_then_most_accurate(row):
        return (_speed(row, speed), row["accuracy"], row["tau"])

    if min_speed is not None:
        fast = [r for r in annotated if _speed(r, speed) >= min_speed]
        if not fast:
            best = max((_speed(r, speed) for r in annotated), default=float("nan"))
            raise UserError(f"no setting reaches --min-speed {min_speed:g} {unit}; the fastest seen is {best:.2f}")
        row = max(fast, key=lambda r: (r["accuracy"], _speed(r, speed), r["tau"]))
        out["choice"] = {"strategy": "confadapt", "tau": row["tau"], "k_max": row["k_max"],
                         "certified": bool(row["certified"]), "rule": "min-speed", "setting": row,
                         "reason": f"the most accurate setting with speed >= {min_speed:g} {unit} (a speed target; "
                                   + ("it is also among the certified settings)" if row["certified"] else
                                      f"its accuracy drop is not certified at delta={delta:g})")}
        return out

    certified = [r for r in annotated if r["certified"]]
    if certified:
        row = max(certified, key=fastest_then_most_accurate)
        out["choice"] = {"strategy": "confadapt", "tau": row["tau"], "k_max": row["k_max"], "certified": True,
                         "rule": "fastest-certified", "setting": row,
                         "reason": f"the fastest of {len(certified)} certified settings: accuracy drop <= {target:g} "
                                   f"with probability >= {1 - delta:g} (Learn then Test, fixed-sequence, n={n})"}
        return out
    k_max = statistics.median_low(k_maxes)
    hint = (f"; n={n} cannot certify anything at this target and level (needs n >= {out['min_certifiable_n']})"
            if n < out["min_certifiable_n"] else "")
    out["choice"] = {"strategy": "selfspec", "tau": None, "k_max": k_max, "certified": False, "rule": "fallback",
                     "setting": None,
                     "reason": f"no setting is certified to lose at most {target:g} accuracy at delta={delta:g}"
                               f"{hint}; falling back to the lossless self-speculative strategy (output equals greedy "
                               f"decoding) with the median k_max {k_max}"}
    return out


# ---------------------------------------------------------------------------------------------------------------------
# The sweep: evaluate settings lazily, in the testing order


def ordered_sequences(taus: Sequence[float], k_maxes: Sequence[int]) -> list[tuple[int, list[float]]]:
    """[(k_max, taus from conservative to aggressive)] in the order the k_max values were given."""
    return [(int(k), sorted({float(t) for t in taus}, reverse=True)) for k in k_maxes]


def _setting_fields(report, tau: float, k_max: int) -> dict:
    """Plain dict of an EvalReport-like object: what `select`, the report and the plot need."""
    fields = {"tau": float(tau), "k_max": int(k_max), "correct": [bool(x) for x in report.correct]}
    for key in ("accuracy", "stderr", "agreement", "tokens_per_forward_mean", "tokens_per_forward_std",
                "tokens_per_second", "tokens", "forwards", "seconds"):
        value = getattr(report, key, None)
        if value is not None and not isinstance(value, int):
            value = float(value) if math.isfinite(value) else None  # e.g. the stderr of n = 1: JSON has no NaN
        fields[key] = value
    return fields


def sweep(evaluate_setting: Callable[[float, int], object], taus: Sequence[float], k_maxes: Sequence[int], *,
          reference: Sequence[bool], target: float, delta: float = 0.05, full: bool = False,
          progress: bool = False, deadline: float | None = None) -> list[dict]:
    """Evaluate ConfAdapt settings end to end, in testing order; return their dicts (see `select`).

    evaluate_setting(tau, k_max) returns an EvalReport-like object (.correct, .accuracy, .tokens_per_forward_mean,
    .tokens_per_forward_std, .tokens_per_second). Without `full`, a k_max's sequence stops after its first failed
    test (p > delta / len(k_maxes)), exactly where `select` stops certifying it. `deadline` (a time.perf_counter()
    value) ends the sweep before the next setting once passed (the first setting always runs): the sequences are then
    shorter, which testing allows (an untested tau is simply not certified).
    """
    target = _check_fraction(target, "target drop")
    level = _check_fraction(delta, "delta") / len(k_maxes)
    ref = np.asarray(reference, dtype=bool)
    order = ordered_sequences(taus, k_maxes)
    bar = tqdm(total=sum(len(t) for _, t in order), desc="tune", unit="setting", disable=not progress)
    settings = []
    try:
        for k_max, sequence in order:
            for i, tau in enumerate(sequence):
                if deadline is not None and settings and time.perf_counter() > deadline:
                    bar.write(f"tune: time budget spent; {bar.total - bar.n} setting(s) not evaluated")
                    return settings
                bar.set_postfix_str(f"k_max={k_max} tau={tau:g}")
                setting = _setting_fields(evaluate_setting(tau, k_max), tau, k_max)
                settings.append(setting)
                bar.update(1)
                b, _ = paired_counts(ref, setting["correct"])
                if not full and binomial_pvalue(b, ref.size, target) > level:
                    bar.total -= len(sequence) - i - 1  # never certifiable: not decoded
                    bar.refresh()
                    break
    finally:
        bar.close()
    return settings


# ---------------------------------------------------------------------------------------------------------------------
# Outputs: Pareto plot, report, generation config


def pareto_plot(path, settings: Sequence[dict], reference: dict, *, choice: dict | None = None,
                target: float | None = None, title: str | None = None) -> Path:
    """Accuracy vs tokens/forward (left) and vs wall-clock tokens/s (right): one line per k_max over tau (annotated),
    the Static(1) reference, certified settings filled, the chosen one starred, and the target band
    [reference accuracy - target, reference accuracy] shaded. PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    panels = (("tokens_per_forward_mean", "tokens per forward (acceleration factor)"),
              ("tokens_per_second", "wall-clock tokens/s"))
    ref_acc = float(reference["accuracy"])
    chosen = (choice or {}).get("setting")
    k_maxes = sorted({int(s["k_max"]) for s in settings})
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(k_maxes), 1)))
    for ax, (field, xlabel) in zip(axes, panels):
        if target is not None:
            ax.axhspan(ref_acc - target, ref_acc, color="tab:green", alpha=0.12, lw=0,
                       label=f"within target drop ({target:g})")
            ax.axhline(ref_acc - target, color="tab:green", ls="--", lw=1)
        for color, k in zip(colors, k_maxes):
            rows = sorted((s for s in settings if int(s["k_max"]) == k and s.get(field) is not None),
                          key=lambda s: -s["tau"])
            if not rows:
                continue
            xs, ys = [s[field] for s in rows], [s["accuracy"] for s in rows]
            ax.plot(xs, ys, "-", color=color, lw=1.2, label=f"ConfAdapt k_max={k}")
            for s, x, y in zip(rows, xs, ys):
                ax.plot(x, y, "o", ms=7, color=color, mfc=color if s.get("certified") else "white", mew=1.5)
                ax.annotate(f"{s['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if reference.get(field) is not None:
            ax.plot(reference[field], ref_acc, "s", color="black", ms=8, label="Static(1) reference")
        if chosen is not None and chosen.get(field) is not None:
            ax.plot(chosen[field], chosen["accuracy"], "*", color="tab:red", ms=18, mec="black",
                    label=f"chosen: tau={chosen['tau']:g}, k_max={chosen['k_max']}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("accuracy")
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "o", color="gray", mfc="gray", label="certified")
    axes[0].plot([], [], "o", color="gray", mfc="white", label="not certified")
    axes[0].legend(fontsize=7, loc="lower left")
    fig.suptitle(title or "mtp tune: accuracy vs speed")

    def write(tmp: Path) -> None:
        fig.savefig(tmp, format="png", dpi=120)

    try:
        return replace_atomically(Path(path), write)
    finally:
        plt.close(fig)


def _read_generation_config(model_dir: Path):
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


def write_decoding_defaults(model_dir, strategy: str, k_max: int, tau: float | None) -> Path:
    """Set `mtp_strategy`, `mtp_k_max`, `mtp_tau` (None for selfspec) in model_dir/generation_config.json, atomically.

    The same extra attributes `mtp export` writes (distill.export.mtp_generation_config) and `mtp generate` reads
    (adaptive.cli.mtp_defaults); every other field of the file is kept.
    """
    from adaptive.strategies import make_strategy

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a model directory")
    make_strategy(strategy, k_max=k_max, tau=tau)  # validates: UserError before anything is written
    if strategy == "static":
        raise UserError("the tuner writes confadapt or selfspec defaults, not static")
    gen = _read_generation_config(model_dir)
    # A config derived from config.json is flagged `_from_model_config`, and transformers then drops every extra
    # attribute on reload (see distill.export.mtp_generation_config).
    gen._from_model_config = False
    gen.mtp_strategy = strategy
    gen.mtp_k_max = int(k_max)
    gen.mtp_tau = None if strategy == "selfspec" else float(tau)
    target = model_dir / GENERATION_CONFIG
    mode = target.stat().st_mode & 0o777 if target.exists() else 0o644
    return replace_atomically(target, lambda tmp: gen.to_json_file(tmp), mode=mode)


def format_table(selection: dict) -> str:
    header = (f"{'k_max':>5} {'tau':>6} {'accuracy':>8} {'drop':>7} {'regr':>5} {'impr':>5} {'p-value':>9} "
              f"{'certified':>9} {'tok/fwd':>12} {'tok/s':>8}")
    lines = [header, "-" * len(header)]
    for s in selection["settings"]:
        status = "yes" if s["certified"] else ("no" if s["tested"] else "untested")
        tpf = f"{s['tokens_per_forward_mean']:.2f}±{s.get('tokens_per_forward_std') or 0:.2f}"
        tps = "-" if s.get("tokens_per_second") is None else f"{s['tokens_per_second']:.1f}"
        lines.append(f"{s['k_max']:>5} {s['tau']:>6g} {s['accuracy']:>8.3f} {s['drop']:>+7.3f} {s['regressions']:>5} "
                     f"{s['improvements']:>5} {s['p_value']:>9.2e} {status:>9} {tpf:>12} {tps:>8}")
    return "\n".join(lines)


def choice_line(choice: dict) -> str:
    if choice["strategy"] == "selfspec":
        return f"chosen: selfspec k_max={choice['k_max']} (not certified) - {choice['reason']}"
    s = choice["setting"]
    return (f"chosen: confadapt tau={choice['tau']:g} k_max={choice['k_max']}: {s['tokens_per_forward_mean']:.2f} "
            f"tokens/forward, accuracy {s['accuracy']:.3f} (drop {s['drop']:+.3f}; {s['regressions']} regressions, "
            f"{s['improvements']} improvements) - {choice['reason']}")


# ---------------------------------------------------------------------------------------------------------------------
# mtp tune


def _number_list(text: str, flag: str, cast) -> list:
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            values.append(cast(item))
        except ValueError:
            raise UserError(f"{flag}: {item!r} is not a{'n integer' if cast is int else ' number'}") from None
    if len(set(values)) != len(values):
        raise UserError(f"{flag} lists a value twice: {text}")
    return values


def _check_args(args) -> tuple[list[float], list[int]]:
    from adaptive.strategies import MAX_K

    _check_fraction(args.target_drop, "--target-drop")
    _check_fraction(args.delta, "--delta")
    taus = _number_list(args.taus, "--taus", float)
    for tau in taus:
        if math.isnan(tau) or not 0.0 < tau <= 1.0:
            raise UserError(f"--taus: every tau must be in (0, 1], got {tau:g}")
    k_maxes = _number_list(args.k_max, "--k-max", int)
    for k in k_maxes:
        if not 1 <= k <= MAX_K:
            raise UserError(f"--k-max: every k_max must be in [1, {MAX_K}], got {k}")
    if args.min_speed is not None and not args.min_speed > 0:
        raise UserError(f"--min-speed must be > 0, got {args.min_speed:g}")
    for flag, value, low in (("--n", args.n, 1), ("--max-new-tokens", args.max_new_tokens, 1),
                             ("--batch-size", args.batch_size, 1), ("--start", args.start, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    return taus, k_maxes


def _calibration_problems(args) -> tuple[list[dict], int]:
    from adaptive.evaluate import load_problems

    if args.start is not None:
        problems = load_problems(args.dataset, args.split, limit=args.n, start=args.start)
        start = args.start
    else:  # the tail: rows a default training run is least likely to have seen, never `mtp evaluate`'s test split
        everything = load_problems(args.dataset, args.split)
        start = max(0, len(everything) - args.n)
        problems = everything[start:]
    if len(problems) < args.n:
        raise UserError(f"{args.dataset} has only {len(problems)} rows from row {start}; --n asks for {args.n}")
    return problems, start


def _reference_fields(report) -> dict:
    out = _setting_fields(report, 1.0, 1)
    for key in ("tau", "k_max", "correct"):
        out.pop(key)
    return {"strategy": "static(k=1)", **out}


def main(argv: list[str]) -> int:
    from adaptive.cli import DTYPES, GSM8K_LOCAL, _Parser

    parser = _Parser(prog="mtp tune", description="Choose ConfAdapt's tau and k_max for a target accuracy drop "
                     "versus k=1, certified by Learn-then-Test, and write them into the model's generation config.")
    parser.add_argument("--model", required=True, help="MTP model directory (its generation config is updated)")
    parser.add_argument("--target-drop", type=float, required=True,
                        help="largest acceptable accuracy drop versus k=1, as a fraction (0.02 = 2 points)")
    parser.add_argument("--delta", type=float, default=0.05,
                        help="error level: the guarantee holds with probability >= 1 - delta (default 0.05)")
    parser.add_argument("--min-speed", type=float,
                        help="instead: the most accurate setting at least this fast (no certification)")
    parser.add_argument("--speed", choices=tuple(SPEEDS), default="tokens",
                        help="speed metric: tokens per forward (default, hardware independent) or wall-clock tok/s")
    parser.add_argument("--taus", default=",".join(f"{t:g}" for t in TAU_GRID), help="comma-separated tau grid")
    parser.add_argument("--k-max", default=",".join(map(str, K_MAX_GRID)), help="comma-separated k_max values")
    parser.add_argument("--dataset", default=str(GSM8K_LOCAL),
                        help="calibration problems: a hub name or a local jsonl (default: the GSM8K train file)")
    parser.add_argument("--split", default="train", help="split of a hub dataset (default train; evaluate uses test)")
    parser.add_argument("--start", type=int, help="first row (default: the last --n rows)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"calibration problems (default {DEFAULT_N})")
    parser.add_argument("--format", choices=("chat", "cot8"), default="chat",
                        help="prompt format: chat (the format mtp train distils on) or cot8 (8-shot GSM8K CoT)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--full-sweep", action="store_true",
                        help="decode every setting, also those that can no longer be certified")
    parser.add_argument("--report-dir", help="where report.json and pareto.png go (default: DIR/tune)")
    parser.add_argument("--no-write", action="store_true", help="leave the model's generation config untouched")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    # Everything that can be checked is checked before the model loads.
    taus, k_maxes = _check_args(args)
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir() and not (args.no_write and args.report_dir):
        raise UserError(f"--model {args.model} is not a directory; pass a model directory (the tuned defaults are "
                        "written into its generation config), or --no-write with --report-dir")
    if model_dir.is_dir():
        from distill.models import resolve_model_path

        resolve_model_path(str(model_dir))  # UserError unless it is a model directory
    if not args.no_write:
        _read_generation_config(model_dir)  # a corrupt file fails now, not after the sweep
    report_dir = Path(args.report_dir).expanduser() if args.report_dir else model_dir / "tune"
    from distill.files import check_output_dir

    check_output_dir(report_dir, "--report-dir")  # before the sweep, not after it
    level = args.delta / len(k_maxes)
    if args.min_speed is None and args.n < min_certifiable_n(args.target_drop, level):
        print(f"warning: with --n {args.n} nothing can be certified (zero regressions give p = "
              f"{(1 - args.target_drop) ** args.n:.3f} > {level:.4f} = delta / {len(k_maxes)} k_max sequences); "
              f"use --n >= {min_certifiable_n(args.target_drop, level)}, a larger --target-drop or --delta, or fewer "
              "--k-max values. Running anyway; expect the lossless fallback.", file=sys.stderr)
    problems, start = _calibration_problems(args)

    from adaptive.calibration import load_calibrator
    from adaptive.cli import load_mtp_model, stop_ids
    from adaptive.decoder import MTPDecoder
    from distill.models import resolve_model_path

    model, tokenizer = load_mtp_model(args.model, args.dtype)
    # tau is tuned on the confidence scale `mtp generate` will gate on: the saved calibrator's, when there is one
    calibrator = load_calibrator(resolve_model_path(args.model))
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_ids(model, tokenizer))
    print(f"reference: static(k=1) on {len(problems)} problems (rows {start}..{start + len(problems) - 1} of "
          f"{args.dataset})", file=sys.stderr)
    tune(decoder, problems, target_drop=args.target_drop, delta=args.delta, taus=taus, k_maxes=k_maxes,
         prompt_format=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
         scorer=calibrator, min_speed=args.min_speed, speed=args.speed, full_sweep=args.full_sweep,
         report_dir=report_dir, model_dir=None if args.no_write else model_dir,
         extra={"model": str(args.model), "dataset": str(args.dataset), "split": args.split, "start": start},
         title=f"mtp tune: {model_dir.name}, n={len(problems)}, target drop {args.target_drop:g}, "
               f"delta {args.delta:g}")
    return 0


def tune(decoder, problems: list[dict], *, target_drop: float, delta: float, taus: Sequence[float],
         k_maxes: Sequence[int], prompt_format: str = "chat", max_new_tokens: int = 256, batch_size: int = 16,
         scorer=None, min_speed: float | None = None, speed: str = "tokens", full_sweep: bool = False,
         report_dir, model_dir=None, extra: dict | None = None, title: str | None = None,
         deadline: float | None = None) -> dict:
    """Reference run, lazy sweep, LTT selection, report.json + pareto.png in `report_dir`; the choice goes into
    `model_dir`'s generation config when given. Returns the report (its "choice" holds strategy, tau, k_max).

    `problems` are evaluate.load_problems rows; `scorer` is the ConfAdapt confidence (a fitted calibrator or None
    for the raw top-1 probability). `mtp tune` and `mtp demo` both come through here.
    """
    from adaptive.evaluate import run_eval
    from adaptive.strategies import ConfAdapt, Static

    common = {"prompt_format": prompt_format, "max_new_tokens": max_new_tokens, "batch_size": batch_size}
    # Warm-up (first forwards allocate and pick kernels) so the reference's wall-clock is not charged for it.
    run_eval(decoder, problems[:1], Static(1), **{**common, "max_new_tokens": min(4, max_new_tokens)},
             progress=False)
    reference = run_eval(decoder, problems, Static(1), **common, progress=True)

    def evaluate_setting(tau: float, k_max: int):
        return run_eval(decoder, problems, ConfAdapt(tau, k_max, scorer=scorer), **common, reference=reference,
                        progress=False)

    settings = sweep(evaluate_setting, taus, k_maxes, reference=reference.correct, target=target_drop,
                     delta=delta, full=full_sweep or min_speed is not None, progress=True, deadline=deadline)
    selection = select(reference.correct, settings, target=target_drop, delta=delta,
                       n_sequences=len(k_maxes), min_speed=min_speed, speed=speed)
    choice = selection["choice"]
    evaluated = {(s["tau"], s["k_max"]): s for s in settings}
    ref_fields = _reference_fields(reference)

    # Per-problem correctness as "0"/"1" strings, so anyone can recompute every count and p-value from the report.
    def bits(correct) -> str:
        return "".join("1" if ok else "0" for ok in correct)

    report = {
        **(extra or {}),
        "n": len(problems), "format": prompt_format, "max_new_tokens": max_new_tokens,
        "target_drop": target_drop, "delta": delta, "level_per_test": selection["level"],
        "n_sequences": len(k_maxes), "speed": speed, "min_speed": min_speed,
        "calibrated_confidence": scorer is not None,
        "method": "Learn then Test (Angelopoulos et al. 2021): binomial p-value P(Bin(n, target) <= regressions) "
                  "per setting, fixed-sequence testing per k_max from conservative to aggressive tau at level "
                  "delta / n_sequences; improvements are not credited (conservative); drop = (b - c) / n",
        "min_certifiable_n": selection["min_certifiable_n"],
        "reference": {**ref_fields, "correct": bits(reference.correct)},
        "settings": [{**s, "correct": bits(evaluated[(s["tau"], s["k_max"])]["correct"])}
                     for s in selection["settings"]],
        "not_evaluated": [{"tau": t, "k_max": k} for k, seq in ordered_sequences(taus, k_maxes) for t in seq
                          if (t, k) not in evaluated],
        "certified": choice["certified"],
        "choice": {key: value for key, value in choice.items() if key != "setting"},
    }
    report_dir = Path(report_dir)
    report_dir.mkdir(parents=True, exist_ok=True)
    report_path = write_text_atomically(report_dir / "report.json", json.dumps(report, indent=2) + "\n")
    plot_path = pareto_plot(report_dir / "pareto.png", selection["settings"], ref_fields, choice=choice,
                            target=target_drop, title=title)

    print(f"reference static(k=1): accuracy {reference.accuracy:.3f} "
          f"({sum(map(bool, reference.correct))}/{len(problems)}), {reference.tokens_per_forward_mean:.2f} "
          f"tokens/forward, {reference.tokens_per_second:.1f} tok/s"
          + (" | ConfAdapt uses the model's calibrated confidence" if scorer is not None else ""))
    print(format_table(selection))
    n_cert = sum(s["certified"] for s in selection["settings"])
    print(f"certified at delta={delta:g} (per-test level {selection['level']:.4g}, {len(k_maxes)} k_max "
          f"sequences): {n_cert} of {len(selection['settings'])} evaluated settings")
    print(choice_line(choice))
    print(f"wrote {report_path} and {plot_path}")
    if model_dir is not None:
        path = write_decoding_defaults(model_dir, choice["strategy"], choice["k_max"], choice["tau"])
        print(f"wrote {path}: `mtp generate --model {model_dir}` now decodes with {choice['strategy']}"
              + (f" tau={choice['tau']:g}" if choice["tau"] is not None else "") + f" k_max={choice['k_max']}")
    return report
