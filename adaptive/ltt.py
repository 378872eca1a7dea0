"""Learn then Test for ConfAdapt settings: exact binomial p-values, fixed-sequence testing, the choice among them.

Pure functions on plain lists and dicts (per-problem flags in, annotated settings and a choice out); the tuner
(adaptive/tuner.py) evaluates the settings and measures their speed, this module certifies and chooses.

Two targets, one machinery (Learn then Test, Angelopoulos, Bates, Candès, Jordan, Lei 2021, arXiv 2110.01052):
  * --target-drop D (labelled data, GSM8K-style "#### N" answers). Per problem i: loss l_i = 1[k=1 right and the
    setting wrong]. Its mean b/n ("regressions") is >= the accuracy drop (b - c)/n (c = improvements), so
    H0_s: true drop > D implies E[l] > D, and since b ~ Binomial(n, E[l]) the exact p-value is
        p_s = P(Binomial(n, D) <= b)            (LTT §3, binomial tail bound for a {0,1} loss).
    Conservative: improvements are not credited. The report also gives the plain drop (b - c) / n.
  * --target-agreement A (no labels needed: `--prompts P.jsonl`, one {"prompt": ...} or {"question": ...} per line).
    Loss l_i = 1[the setting disagrees with k=1 on problem i]: by default its final answer (GSM8K-style extraction,
    adaptive.gsm8k.extract_answer; two missing answers agree), with --agreement tokens:N its first N generated
    tokens. H0_s: true agreement < A, i.e. E[l] > 1 - A; with d disagreements
        p_s = P(Binomial(n, 1 - A) <= d).
    A = 1 is accepted and can never be certified (p = 1): plain decoding is kept.
  * Fixed-sequence testing (LTT §4.1): for each k_max the taus are tested from conservative (0.995) to aggressive
    (0.6) at level delta / (number of k_max sequences) (Bonferroni across the sequences); each tau is certified while
    p_s <= level and the sequence stops at its first non-rejection. With probability >= 1 - delta (over the draw of
    calibration problems) no certified setting misses the target: family-wise error <= delta. The order is fixed
    before seeing data, so this holds whether or not the loss is monotone in tau.
The smallest n that can certify anything is the n at which zero losses give p = (1 - risk)^n <= level (risk = D, or
1 - A); `mtp tune` warns when n is below it (target drop 0.02 with three k_max sequences at delta 0.05 needs n >= 203;
agreement 0.95 with two sequences at delta 0.10 needs n >= 59).

The choice (`select`). Candidates are the certified settings ranked by the speed metric (tokens per forward, the
paper's "acceleration factor", or wallclock); the choice is the best one measured, wall-clock, at least as fast as k=1
beside it (tokens: the highest tokens/forward; wallclock: the highest measured tok/s). Choosing among certified
settings keeps the guarantee, since it holds for all of them at once. When nothing is certified, or every measured
candidate is slower, the choice is plain decoding (static k=1) with a one-sentence reason. With a minimum speed the
settings at least that fast are ranked by accuracy (or agreement) instead: a speed target without a certification
claim, under the same wall-clock rule.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import lru_cache

import numpy as np

from distill.errors import UserError, check_fraction

SPEEDS = {"tokens": "tokens_per_forward_mean", "wallclock": "tokens_per_second"}  # --speed -> setting field
SPEED_UNITS = {"tokens": "tokens/forward", "wallclock": "tok/s"}
OBJECTIVES = ("drop", "agreement")
PLAIN = {"strategy": "static", "tau": None, "k_max": 1}  # plain next-token decoding, the reference


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


def min_certifiable_n(risk: float, level: float) -> int | None:
    """Smallest n at which zero losses certify: (1 - risk)^n <= level; None when risk is 0 (never)."""
    if risk <= 0:
        return None
    return math.ceil(math.log(level) / math.log1p(-risk) - 1e-9)


def agreement_flags(reference_answers: Sequence, answers: Sequence, *, tokens: int | None = None,
                    reference_tokens: Sequence[Sequence[int]] | None = None,
                    token_ids: Sequence[Sequence[int]] | None = None) -> list[bool]:
    """Per problem: does the setting agree with k=1? Final answers equal (two missing answers agree), or with
    `tokens` = N the first N generated token ids equal (a shorter output must match k=1's whole first N)."""
    if tokens is None:
        return [a == b for a, b in zip(answers, reference_answers, strict=True)]
    return [list(a[:tokens]) == list(b[:tokens]) for a, b in zip(token_ids, reference_tokens, strict=True)]


def _speed(setting: dict, speed: str) -> float:
    value = setting.get(SPEEDS[speed])
    return float("nan") if value is None else float(value)


def _not_slower(row: dict, reference_speed: float | None) -> bool | None:
    """Measured wall-clock speed >= k=1's (the row's own side-by-side k=1 figure, else `reference_speed`);
    None when the row was not measured."""
    ref = row.get("reference_tokens_per_second", reference_speed)
    if row.get("tokens_per_second") is None or ref is None:
        return None
    return float(row["tokens_per_second"]) >= float(ref)


def select(reference: Sequence[bool] | None, settings: Sequence[dict], *, target: float, delta: float = 0.05,
           n_sequences: int | None = None, min_speed: float | None = None, speed: str = "tokens",
           objective: str = "drop", reference_speed: float | None = None) -> dict:
    """Run LTT on evaluated settings and choose one that is never slower than k=1.

    objective "drop": `reference` is the per-problem correctness of Static(1); settings carry "correct" (same
    problems, same order); `target` is the largest accuracy drop. objective "agreement": settings carry "agrees"
    (per problem, agrees with k=1); `target` is the smallest agreement, in (0, 1]; `reference` (k=1's correctness)
    may be None (unlabelled prompts) and only adds accuracies. Speed fields: "tokens_per_forward_mean" and, where the
    setting was measured side by side with k=1, "tokens_per_second" (and "reference_tokens_per_second", k=1's speed
    in that measurement; else `reference_speed`). Other keys are carried through. n_sequences: the Bonferroni
    divisor (default: the distinct k_max values present); a sequence may be a prefix of its grid (an untested tau is
    simply not certified).

    Returns {"settings": [annotated copies in testing order, without the per-problem lists], "candidates": [(tau,
    k_max) ranked: the order in which to measure], "choice": {...}, "n", "target", "risk", "objective", "delta",
    "level", "n_sequences", "speed", "reference_accuracy", "min_certifiable_n"}. The choice has "strategy"
    ("confadapt", or "static" with k_max 1: plain decoding), "tau", "k_max", "certified", "rule"
    ("fastest-certified", "min-speed" or "plain"), "reason" (one sentence) and the chosen "setting" (None for plain).
    """
    if objective not in OBJECTIVES:
        raise ValueError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    agreement = objective == "agreement"
    target = check_fraction(target, "target agreement" if agreement else "target drop", closed=agreement)
    risk = 1.0 - target if agreement else target
    delta = check_fraction(delta, "delta")
    if speed not in SPEEDS:
        raise UserError(f"unknown speed metric {speed!r}; choose one of {', '.join(SPEEDS)}")
    if not settings:
        raise ValueError("select needs at least one evaluated setting")
    ref = None if reference is None else np.asarray(reference, dtype=bool)
    if ref is None and not agreement:
        raise ValueError("the accuracy-drop objective needs the reference's correctness")
    n = int(ref.size) if ref is not None else len(settings[0]["agrees"])
    k_maxes = sorted({int(s["k_max"]) for s in settings})
    m = int(n_sequences or len(k_maxes))
    if m < len(k_maxes):
        raise ValueError(f"n_sequences={m} but settings hold {len(k_maxes)} k_max values")
    level = delta / m
    quality = "agreement" if agreement else "accuracy"

    annotated = []
    for k in k_maxes:
        sequence = sorted((s for s in settings if int(s["k_max"]) == k), key=lambda s: -float(s["tau"]))
        rows = []
        for s in sequence:
            row = {key: value for key, value in s.items() if key not in ("correct", "agrees")}
            row.update(tau=float(s["tau"]), k_max=k, n=n)
            if ref is not None and s.get("correct") is not None:
                b, c = paired_counts(ref, s["correct"])
                row.update(accuracy=float(np.mean(np.asarray(s["correct"], bool))), drop=(b - c) / n,
                           regressions=b, improvements=c)
            if agreement:
                agrees = np.asarray(s["agrees"], dtype=bool)
                if agrees.size != n:
                    raise ValueError(f"setting tau={s['tau']} k_max={k}: {agrees.size} agreement flags for n={n}")
                d = int(np.count_nonzero(~agrees))
                row.update(agreement=float(agrees.mean()), disagreements=d, p_value=binomial_pvalue(d, n, risk))
            else:
                row["p_value"] = binomial_pvalue(row["regressions"], n, risk)
            rows.append(row)
        certified = fixed_sequence([r["p_value"] for r in rows], level)
        for i, row in enumerate(rows):  # tested: reached by the sequence (every earlier tau was certified)
            row.update(certified=certified[i], tested=i == 0 or certified[i - 1])
        annotated += rows
    for row in annotated:
        row["not_slower_than_k1"] = _not_slower(row, reference_speed)

    out = {"settings": annotated, "n": n, "objective": objective, "target": target, "risk": risk, "delta": delta,
           "level": level, "n_sequences": m, "speed": speed,
           "reference_accuracy": None if ref is None else float(ref.mean()),
           "min_certifiable_n": min_certifiable_n(risk, level)}
    unit = SPEED_UNITS[speed]

    def fast_enough(rows: list[dict]) -> list[dict]:
        return [r for r in rows if r["not_slower_than_k1"]]

    def plain(reason: str) -> dict:
        return {**PLAIN, "certified": False, "rule": "plain", "setting": None,
                "reason": reason + "; keeping plain decoding (static k=1) as the default"}

    def slower_note(rows: list[dict]) -> str:
        measured = [r for r in rows if r["not_slower_than_k1"] is not None]
        if not measured:
            return "none of them was measured against k=1"
        return ("measured slower than k=1: " + ", ".join(
            f"tau={r['tau']:g} k_max={r['k_max']} {r['tokens_per_second']:.1f} vs "
            f"{r.get('reference_tokens_per_second', reference_speed):.1f} tok/s" for r in measured))

    if min_speed is not None:
        def reaches(row) -> bool | None:  # None: wall-clock speed not measured yet
            value = _speed(row, speed)
            return None if math.isnan(value) else value >= min_speed

        possible = [r for r in annotated if reaches(r) is not False]
        if not possible:
            best = max((_speed(r, speed) for r in annotated), default=float("nan"))
            raise UserError(f"no setting reaches --min-speed {min_speed:g} {unit}; the fastest seen is {best:.2f}")
        ranked = sorted(possible, key=lambda r: (-(r.get(quality) or 0.0), -(_speed(r, "tokens")), -r["tau"]))
        out["candidates"] = [(r["tau"], r["k_max"]) for r in ranked]
        ok = [r for r in fast_enough(ranked) if reaches(r)]
        if not ok:
            out["choice"] = plain(f"{len(possible)} setting(s) may reach --min-speed {min_speed:g} {unit}, but "
                                  + slower_note(ranked))
            return out
        row = ok[0]
        out["choice"] = {"strategy": "confadapt", "tau": row["tau"], "k_max": row["k_max"],
                         "certified": bool(row["certified"]), "rule": "min-speed", "setting": row,
                         "reason": f"the most {'agreeing' if agreement else 'accurate'} setting with speed >= "
                                   f"{min_speed:g} {unit} and measured no slower than k=1 (a speed target; "
                                   + ("it is also among the certified settings)" if row["certified"] else
                                      f"its {objective} target is not certified at delta={delta:g})")}
        return out

    certified = [r for r in annotated if r["certified"]]
    ranked = sorted(certified, key=lambda r: (-_speed(r, "tokens"), -r.get(quality, 0.0), -r["tau"]))
    out["candidates"] = [(r["tau"], r["k_max"]) for r in ranked]
    what = (f"agreement with k=1 >= {target:g}" if agreement else f"accuracy drop <= {target:g}")
    ok = fast_enough(ranked)
    if ok:
        if speed == "wallclock":
            row = max(ok, key=lambda r: (r["tokens_per_second"], r.get(quality, 0.0), r["tau"]))
        else:
            row = ok[0]
        out["choice"] = {"strategy": "confadapt", "tau": row["tau"], "k_max": row["k_max"], "certified": True,
                         "rule": "fastest-certified", "setting": row,
                         "reason": f"the fastest ({unit}) of the certified settings measured no slower than k=1 "
                                   f"({len(certified)} certified: {what} with probability >= {1 - delta:g}, Learn "
                                   f"then Test, fixed-sequence, n={n})"}
        return out
    if certified:
        out["choice"] = plain(f"{len(certified)} setting(s) are certified ({what} at delta={delta:g}) but "
                              + slower_note(ranked))
        return out
    need = out["min_certifiable_n"]
    hint = ("; agreement 1 can never be certified (p = 1)" if need is None else
            f"; n={n} cannot certify anything at this target and level (needs n >= {need})" if n < need else "")
    out["choice"] = plain(f"no setting is certified ({what} at delta={delta:g}){hint}")
    return out

