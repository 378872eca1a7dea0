"""`mtp tune`: choose ConfAdapt's tau and k_max for a target, with a statistical guarantee, never slower than k=1.

    mtp tune --model DIR (--target-drop 0.02 | --target-agreement 0.95 [--agreement answer|tokens:N])
             [--prompts P.jsonl | --dataset PATH|hub [--start S]] [--n 200] [--delta 0.05] [--min-speed S]
             [--speed tokens|wallclock] [--taus 0.995,0.99,...] [--k-max 4,8,16] [--measure 3]
             [--sweep replay|rollout] [--format chat|cot8] [--full-sweep] [--report-dir DIR] [--no-write]

Users pick a target, not a threshold. The tuner decodes a calibration set with plain next-token decoding (Static(1),
the reference: greedy decoding of the same checkpoint) and evaluates ConfAdapt(tau, k_max) over the paper's grid
(§5.2: tau from 0.995 down to 0.6; k_max 4/8/16), certifies the settings that meet the target, and writes its choice
into the model's generation config, where `mtp generate` reads its defaults (`mtp_strategy`, `mtp_k_max`, `mtp_tau`,
the fields `mtp export` writes). End to end, not from per-token labels: a different tau changes the whole trajectory
(the tuning runs decode end to end, as Learn-then-Test assumes of the risk it certifies). Grid points become strategies in one place (`setting_strategy`); a grid value the
replay cannot simulate (`replayable` is false: a per-step choice of the number of masks) is decoded for real.

Two targets, one machinery (Learn then Test, Angelopoulos, Bates, Candès, Jordan, Lei 2021, arXiv 2110.01052):
  * --target-drop D (labelled data, GSM8K-style "#### N" answers). Per problem i: loss l_i = 1[k=1 right and the
    setting wrong]. Its mean b/n ("regressions") is >= the accuracy drop (b - c)/n (c = improvements), so
    H0_s: true drop > D implies E[l] > D, and since b ~ Binomial(n, E[l]) the exact p-value is
        p_s = P(Binomial(n, D) <= b)            (LTT §3, binomial tail bound for a {0,1} loss).
    Conservative: improvements are not credited. The report also gives the plain drop (b - c) / n.
  * --target-agreement A (no labels needed: `--prompts P.jsonl`, one {"prompt": ...} or {"question": ...} per line).
    Loss l_i = 1[the setting disagrees with k=1 on problem i]: by default its final answer (GSM8K-style extraction,
    adaptive.evaluate.extract_answer; two missing answers agree), with --agreement tokens:N its first N generated
    tokens. H0_s: true agreement < A, i.e. E[l] > 1 - A; with d disagreements
        p_s = P(Binomial(n, 1 - A) <= d).
    A = 1 is accepted and can never be certified (p = 1): plain decoding is kept.
  * Fixed-sequence testing (LTT §4.1): for each k_max the taus are tested from conservative (0.995) to aggressive
    (0.6) at level delta / (number of k_max sequences) (Bonferroni across the sequences); each tau is certified while
    p_s <= level and the sequence stops at its first non-rejection. With probability >= 1 - delta (over the draw of
    calibration problems) no certified setting misses the target: family-wise error <= delta. The order is fixed
    before seeing data, so this holds whether or not the loss is monotone in tau.
The smallest n that can certify anything is the n at which zero losses give p = (1 - risk)^n <= level (risk = D, or
1 - A); the tuner warns when n is below it (target drop 0.02 with three k_max sequences at delta 0.05 needs n >= 203;
agreement 0.95 with two sequences at delta 0.10 needs n >= 59).

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
--min-speed S instead ranks the
settings with speed >= S by accuracy (or agreement) — a speed target without a certification claim — and the same
wall-clock rule applies.

Sweep. Settings are evaluated lazily in the testing order, the k_max sequences taking turns (every sequence's first
tau, then every second one, ...), so a time budget (the demo's) shortens all sequences alike; once a k_max's
sequence has failed a test, its remaining taus can never be certified and are not evaluated, unless --full-sweep
(or --min-speed) asks for every point. With --sweep replay (the default) the grid costs about one greedy pass:
  * Until ConfAdapt first accepts a token that differs from greedy, its trajectory *is* the greedy one, so its
    accept count at every step follows from the confidences of the k_max positions read at the greedy prefix it has
    reached. Those come from packed forwards over the k=1 rollout (prompt + generated tokens y_1..y_T) in the
    training layout (distill/layout.py with one ground-truth token per region): after the ground-truth slot of every
    prefix (the prompt's last token, then y_1 .. y_{T-1}) sit `<MTP>` masks at the RoPE positions of the tokens they
    predict, with the block-causal attention of distill/attention.py (tests/test_packing_oracle.py: packed ==
    per-prefix forwards within 1e-4). Under causal attention the first j masks' logits do not depend on how many
    masks follow, so one replay with the largest k_max serves every k_max. Two passes per question: one mask per
    prefix first (positions 1 and 2); the prefixes where both reach the grid's smallest tau and position 2 is
    greedy's token (elsewhere every setting stops or leaves greedy there) are packed again with all k_max - 1 masks.
    The packing is chunked by regions so at most REPLAY_MAX_SLOTS logits are read per forward (bounded memory). The
    confidence is the one the real ConfAdapt thresholds: the model's saved calibrator (adaptive/calibration.py
    load_calibrator), else raw top-1.
  * Per setting and question: accept n = the longest run of confidence >= tau (at least one, cut at the end of the
    greedy output, as the decoder cuts at a stop token or the token budget); if positions 2..n all hold greedy's
    tokens, the step is replayed and the next one starts n tokens later; otherwise the setting diverges there.
    A question that never diverges gets its exact per-step accept counts and k=1's output; a question where the
    setting diverges after c tokens is decoded for real with that setting from prompt + those c greedy tokens on
    (its first forward is the diverging step; the budget is what is left of --max-new-tokens); with cot8's stop
    strings, which the decoder matches across the whole generation, it is decoded from the start instead.
  * Float near-ties aside (a confidence within ~1e-5 of tau, or two logits within rounding of each other, can go
    either way between the packed forward and the decoder's KV-cache forward), replay equals real rollouts
    (tests/test_tuner_replay.py). With cot8's stop strings the step that completes a stop string may count a token
    differently from the decoder; the chat format (the default) stops on stop tokens only.
--sweep rollout decodes every setting on every question (the slower path, kept for comparison).

Data. By default the calibration problems are the last --n rows of the local GSM8K *train* file
(adaptive.loading.GSM8K_LOCAL), disjoint from `mtp evaluate`'s *test* split; --start picks other rows. --prompts reads
unlabelled prompts (agreement target only), the first --n of the file.

Outputs, in --report-dir (default DIR/tune), each written atomically: report.json (k=1's speed on the full set and on
the speed sample; every setting: tau, k_max, accuracy / agreement, losses, p-value, certified, tokens/forward mean and
std, questions replayed vs decoded, measured tok/s and the ratio to k=1 where measured; the choice; delta, target,
n) and pareto.png (accuracy or agreement vs tokens/forward and vs wall-clock tok/s, one line per k_max, k=1's speed as
the reference line). Then the chosen strategy goes into DIR/generation_config.json (atomic replace) unless
--no-write: confadapt with its tau and k_max, or static k=1. Bad input (a target outside its range, both targets,
--target-drop on unlabelled prompts, a prompts file without prompts) is one `error:` line before anything is
written.
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
OBJECTIVES = ("drop", "agreement")
GENERATION_CONFIG = "generation_config.json"
DEFAULT_N = 200
DEFAULT_MEASURE = 3  # certified candidates whose wall-clock speed is measured against k=1
# Packed replay: logits read per forward (position 1 + masks of each region in the chunk), so memory per forward is
# bounded by about REPLAY_MAX_SLOTS x vocabulary floats (SmolLM2: 1024 x 49152 x 4 B = 200 MB).
REPLAY_MAX_SLOTS = 1024
PLAIN = {"strategy": "static", "tau": None, "k_max": 1}  # plain next-token decoding, the reference


# ---------------------------------------------------------------------------------------------------------------------
# The test: pure functions on plain lists and dicts


def _check_fraction(value, what: str, *, closed: bool = False) -> float:
    """value in (0, 1), or (0, 1] with `closed`; UserError otherwise."""
    value = float(value)
    if math.isnan(value) or not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise UserError(f"{what} must be in (0, 1{']' if closed else ')'}, got {value:g}")
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
    target = _check_fraction(target, "target agreement" if agreement else "target drop", closed=agreement)
    risk = 1.0 - target if agreement else target
    delta = _check_fraction(delta, "delta")
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


# ---------------------------------------------------------------------------------------------------------------------
# Grid points -> strategies (the one place; a grid value the replay cannot simulate is decoded for real)


def setting_strategy(tau: float, k_max, scorer=None):
    """The strategy a grid point (tau, k_max) stands for: ConfAdapt on the confidence `scorer` (the model's
    calibrator, or None for raw top-1)."""
    from adaptive.strategies import ConfAdapt

    return ConfAdapt(tau, k_max, scorer=scorer)


def replayable(k_max) -> bool:
    """Can the greedy replay simulate this grid point? Only a fixed number of positions read per forward."""
    return isinstance(k_max, int) and not isinstance(k_max, bool)


# ---------------------------------------------------------------------------------------------------------------------
# One-pass sweep: replay ConfAdapt on the greedy rollout


def _packed_positions(model, seq: list[int], L: int, regions: Sequence[int], masks: int, mask_token_id: int, scorer,
                      max_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and argmax [len(regions), 1 + masks] of the given greedy prefixes (region c: the first L + c tokens
    of `seq`), `masks` `<MTP>` masks each, from packed block-causal forwards (see `greedy_confidences`)."""
    import torch

    from distill.attention import dense_block_mask

    width = 1 + masks
    confidence = np.zeros((len(regions), width), dtype=np.float32)
    argmax = np.zeros((len(regions), width), dtype=np.int64)
    device = model.device
    per_forward = max(1, max_slots // width)
    for r0 in range(0, len(regions), per_forward):
        chunk = list(regions[r0 : r0 + per_forward])
        wanted = {L - 1 + c: c for c in chunk}  # source index of each region's last ground-truth token -> region
        ids, pos, blocks, read = [], [], [], []
        for s in range(L + chunk[-1]):  # ground truth up to the last prefix of this chunk
            ids.append(seq[s])
            pos.append(s)
            blocks.append(-1)
            if s in wanted:
                read.append(len(ids) - 1)
                for j in range(1, masks + 1):
                    ids.append(mask_token_id)
                    pos.append(s + j)
                    blocks.append(wanted[s])
                    read.append(len(ids) - 1)
        mask = dense_block_mask(torch.tensor(blocks, device=device), 1, model.dtype)
        keep = torch.tensor(read, device=device)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device),
                           position_ids=torch.tensor([pos], device=device), attention_mask=mask, logits_to_keep=keep,
                           use_cache=False).logits[0]
            if logits.shape[0] != len(read):  # a model that ignores logits_to_keep returns every slot
                logits = logits[keep]
            logits = logits.view(len(chunk), width, -1)
            confidence[r0 : r0 + len(chunk)] = scorer(logits).float().cpu().numpy()
            argmax[r0 : r0 + len(chunk)] = logits.argmax(dim=-1).cpu().numpy()
    return confidence, argmax


def greedy_confidences(model, prompt_ids: Sequence[int], generated: Sequence[int], k_max: int, mask_token_id: int,
                       scorer=None, max_slots: int = REPLAY_MAX_SLOTS,
                       min_tau: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and argmax of the k_max positions ConfAdapt reads at every greedy prefix, from packed forwards.

    prompt_ids + generated is the k=1 rollout (T = len(generated)). Row c (c = 0 .. T-1) is the forward ConfAdapt
    would run with c generated tokens committed: position 1 is the next-token prediction at the last committed token,
    positions 2..k_max the `<MTP>` masks after it. Layout (distill/layout.py with one ground-truth token per region,
    after a plain prompt prefix): ground-truth slots carry the rollout's tokens at their own positions; after the slot
    of source index L-1+c sit the masks of region c at positions L+c, L+c+1, ...; distill/attention.py's block-causal
    rule lets ground truth see ground truth causally and each mask the ground truth up to its prefix plus the earlier
    masks of its own region. Chunked by regions so at most `max_slots` logits are read per forward.

    `min_tau` (the smallest tau of the grid) skips work that cannot matter: a first pass reads positions 1 and 2 of
    every prefix (one mask each); only prefixes where both reach min_tau and position 2 holds greedy's token (else
    every grid setting stops or leaves greedy there) get the second pass with all k_max - 1 masks. Positions not
    read are reported as confidence 0 and argmax -1. Causal attention makes both passes' numbers those of the full
    k_max forward.
    Returns (confidence [T, k_max] float32 from `scorer` (raw top-1 when None), argmax ids [T, k_max] int64).
    """
    from adaptive.strategies import top1_probability

    scorer = scorer or top1_probability
    prompt_ids, generated = [int(t) for t in prompt_ids], [int(t) for t in generated]
    L, T = len(prompt_ids), len(generated)
    if L < 1 or k_max < 1:
        raise ValueError("greedy_confidences needs a non-empty prompt and k_max >= 1")
    seq = prompt_ids + generated
    if T == 0:
        return np.zeros((0, k_max), dtype=np.float32), np.zeros((0, k_max), dtype=np.int64)
    if min_tau is None or k_max <= 2:
        return _packed_positions(model, seq, L, range(T), k_max - 1, mask_token_id, scorer, max_slots)
    confidence = np.zeros((T, k_max), dtype=np.float32)
    argmax = np.full((T, k_max), -1, dtype=np.int64)
    confidence[:, :2], argmax[:, :2] = _packed_positions(model, seq, L, range(T), 1, mask_token_id, scorer, max_slots)
    gen = np.asarray(generated + [-1])  # position 2 at the last prefix is past the end: nothing more to read
    threshold = np.float32(min_tau)
    alive = np.flatnonzero((confidence[:, 0] >= threshold) & (confidence[:, 1] >= threshold)
                           & (argmax[:, 1] == gen[1:]))
    if alive.size:
        confidence[alive], argmax[alive] = _packed_positions(model, seq, L, alive.tolist(), k_max - 1, mask_token_id,
                                                             scorer, max_slots)
    return confidence, argmax


def replay_steps(confidence: np.ndarray, argmax: np.ndarray, generated: Sequence[int], tau: float,
                 k_max: int) -> tuple[list[int], int | None]:
    """ConfAdapt(tau, k_max) on the greedy trajectory: (accept count of every step, None) when it never leaves it,
    else (the steps before the first step that accepts a non-greedy token, the number of tokens committed then).

    confidence / argmax: [T, >= k_max] from `greedy_confidences`. A step at c accepts n = the longest run of
    confidence >= tau among the first k_max positions (at least one), cut at the end of the greedy output (the
    decoder cuts at the stop token or the token budget, so what would follow does not matter)."""
    gen = np.asarray(list(generated), dtype=np.int64)
    T = gen.size
    if T == 0:
        return [], None
    hits = np.asarray(confidence)[:, :k_max] >= np.float32(tau)  # float32, as ConfAdapt compares in torch
    run = np.maximum(np.cumprod(hits, axis=1).sum(axis=1), 1)
    tokens = np.asarray(argmax)[:, :k_max]
    steps, c = [], 0
    while c < T:
        n = min(int(run[c]), T - c)
        if n > 1 and not np.array_equal(tokens[c, 1:n], gen[c + 1 : c + n]):
            return steps, c
        steps.append(n)
        c += n
    return steps, None


def continue_rollouts(decoder, starts: Sequence[tuple[Sequence[int], Sequence[int]]], strategy, *,
                      max_new_tokens: int, batch_size: int = 16) -> list[tuple[list[int], list[int], str]]:
    """Decode `strategy` from given points of its trajectory: starts = [(prompt ids, tokens already generated)].

    For a setting that follows greedy for c tokens and then leaves it, the real rollout is exactly the greedy tokens
    so far (their steps are replayed) followed by what the decoder produces from prompt + those c tokens: its first
    forward is the step that diverges. Each row's budget is max_new_tokens - c; rows decoded together run to the
    largest budget and are cut afterwards as the decoder cuts (the step that crosses the budget keeps what fits).
    Returns, per start: (all generated tokens, the steps after the start, the text cut at the first stop token).
    No stop strings (a stop string begun before the start would not be seen); callers decode from the start then.
    """
    stops = set(decoder.stop_token_ids)
    order = sorted(range(len(starts)), key=lambda j: -(len(starts[j][0]) + len(starts[j][1])))
    out: list = [None] * len(starts)
    for b in range(0, len(order), batch_size):
        chunk = order[b : b + batch_size]
        budgets = [max_new_tokens - len(starts[j][1]) for j in chunk]
        if min(budgets) < 1:
            raise ValueError("a start already holds max_new_tokens tokens")
        results = decoder.generate([list(starts[j][0]) + list(starts[j][1]) for j in chunk], strategy,
                                   max(budgets))
        for j, budget, result in zip(chunk, budgets, results):
            tokens, steps = [], []
            for count in result.accepted_per_step:
                take = min(count, budget - len(tokens))
                if take <= 0:
                    break
                tokens += result.token_ids[len(tokens) : len(tokens) + take]
                steps.append(take)
            generated = list(starts[j][1]) + tokens
            end = next((t for t, tok in enumerate(generated) if tok in stops), len(generated))
            out[j] = (generated, steps, decoder.tokenizer.decode(generated[:end], skip_special_tokens=False))
    return out


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
    target = _check_fraction(target, "target agreement" if agreement else "target drop", closed=agreement)
    risk = 1.0 - target if agreement else target
    level = _check_fraction(delta, "delta") / len(k_maxes)
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
# Outputs: Pareto plot, report, generation config


def pareto_plot(path, settings: Sequence[dict], reference: dict, *, choice: dict | None = None,
                target: float | None = None, title: str | None = None, objective: str = "drop") -> Path:
    """Accuracy (or agreement with k=1) vs tokens/forward (left) and vs measured wall-clock tokens/s (right): one
    line per k_max over tau (annotated), certified settings filled, the chosen one starred, k=1's speed as a vertical
    reference line (1 token/forward; its measured tok/s) and the target band shaded. PNG, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    agreement = objective == "agreement"
    quality = "agreement" if agreement else "accuracy"
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    panels = (("tokens_per_forward_mean", "tokens per forward (acceleration factor)"),
              ("tokens_per_second", "wall-clock tokens/s (measured beside k=1, same batch size)"))
    ref_y = 1.0 if agreement else float(reference["accuracy"])
    chosen = (choice or {}).get("setting")
    k_maxes = sorted({int(s["k_max"]) for s in settings})
    colors = plt.cm.viridis(np.linspace(0.1, 0.85, max(len(k_maxes), 1)))
    ref_x = {"tokens_per_forward_mean": 1.0,
             "tokens_per_second": reference.get("speed_sample_tokens_per_second") or reference.get("tokens_per_second")}
    for ax, (field, xlabel) in zip(axes, panels):
        if target is not None:
            low = target if agreement else ref_y - target
            ax.axhspan(low, ref_y, color="tab:green", alpha=0.12, lw=0,
                       label=f"within target ({'agreement >= ' if agreement else 'drop <= '}{target:g})")
            ax.axhline(low, color="tab:green", ls="--", lw=1)
        if ref_x[field] is not None:
            ax.axvline(ref_x[field], color="black", ls=":", lw=1.5, label="k=1 (plain decoding): slower to the left")
            ax.plot(ref_x[field], ref_y, "s", color="black", ms=8, label="Static(1) reference")
        for color, k in zip(colors, k_maxes):
            rows = sorted((s for s in settings if int(s["k_max"]) == k and s.get(field) is not None
                           and s.get(quality) is not None), key=lambda s: -s["tau"])
            if not rows:
                continue
            xs, ys = [s[field] for s in rows], [s[quality] for s in rows]
            ax.plot(xs, ys, "-", color=color, lw=1.2, label=f"ConfAdapt k_max={k}")
            for s, x, y in zip(rows, xs, ys):
                ax.plot(x, y, "o", ms=7, color=color, mfc=color if s.get("certified") else "white", mew=1.5)
                ax.annotate(f"{s['tau']:g}", (x, y), textcoords="offset points", xytext=(4, 4), fontsize=7)
        if chosen is not None and chosen.get(field) is not None:
            ax.plot(chosen[field], chosen[quality], "*", color="tab:red", ms=18, mec="black",
                    label=f"chosen: tau={chosen['tau']:g}, k_max={chosen['k_max']}")
        ax.set_xlabel(xlabel)
        ax.set_ylabel("agreement with k=1" if agreement else "accuracy")
        ax.grid(alpha=0.3)
    axes[0].plot([], [], "o", color="gray", mfc="gray", label="certified")
    axes[0].plot([], [], "o", color="gray", mfc="white", label="not certified")
    axes[0].legend(fontsize=7, loc="lower left")
    axes[1].legend(fontsize=7, loc="lower left")
    if chosen is None and choice is not None:
        axes[1].set_title("chosen: plain decoding (k=1)", fontsize=9)
    fig.suptitle(title or f"mtp tune: {quality} vs speed")

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
    """Set `mtp_strategy`, `mtp_k_max`, `mtp_tau` (None unless confadapt) in model_dir/generation_config.json,
    atomically: confadapt with its tau and k_max, static with k_max 1 (plain decoding), or selfspec.

    The same extra attributes `mtp export` writes (distill.export.mtp_generation_config) and `mtp generate` reads
    (adaptive.loading.mtp_defaults); every other field of the file is kept.
    """
    from adaptive.strategies import make_strategy

    model_dir = Path(model_dir)
    if not model_dir.is_dir():
        raise UserError(f"{model_dir} is not a model directory")
    make_strategy(strategy, k_max=k_max, tau=tau)  # validates: UserError before anything is written
    if strategy == "static" and str(k_max) != "1":
        raise UserError("the tuner writes confadapt, selfspec or plain decoding (static k=1), not static k>1")
    gen = _read_generation_config(model_dir)
    # A config derived from config.json is flagged `_from_model_config`, and transformers then drops every extra
    # attribute on reload (see distill.export.mtp_generation_config).
    gen._from_model_config = False
    gen.mtp_strategy = strategy
    gen.mtp_k_max = k_max if isinstance(k_max, str) and k_max.startswith("auto") else int(k_max)
    gen.mtp_tau = float(tau) if strategy == "confadapt" else None
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


def parse_agreement(text: str) -> int | None:
    """--agreement: "answer" -> None (final answers), "tokens:N" -> N (first N generated tokens)."""
    text = str(text).strip()
    if text == "answer":
        return None
    if text.startswith("tokens:"):
        try:
            n = int(text.split(":", 1)[1])
        except ValueError:
            n = 0
        if n >= 1:
            return n
    raise UserError(f"--agreement must be 'answer' or 'tokens:N' with N >= 1, got {text!r}")


def _check_args(args) -> tuple[list[float], list[int]]:
    from adaptive.strategies import MAX_K

    if args.target_drop is not None and args.target_agreement is not None:
        raise UserError("give one target: --target-drop (labelled data) or --target-agreement (agreement with k=1), "
                        "not both")
    if args.target_drop is None and args.target_agreement is None:
        raise UserError("give a target: --target-drop D (accuracy drop vs k=1, labelled data) or "
                        "--target-agreement A (agreement with k=1, no labels needed)")
    if args.target_drop is not None:
        _check_fraction(args.target_drop, "--target-drop")
        if args.prompts is not None:
            raise UserError("--target-drop needs labelled problems (gold answers); with --prompts use "
                            "--target-agreement")
    else:
        _check_fraction(args.target_agreement, "--target-agreement", closed=True)
    if args.agreement != "answer" and args.target_agreement is None:
        raise UserError("--agreement goes with --target-agreement")
    parse_agreement(args.agreement)
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
                             ("--batch-size", args.batch_size, 1), ("--start", args.start, 0),
                             ("--measure", args.measure, 0)):
        if value is not None and value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    return taus, k_maxes


def load_prompts(path, n: int | None = None) -> list[dict]:
    """Unlabelled problems from a JSON-lines file: one object per line with a string "prompt" or "question" field
    (blank lines skipped); the first n. UserError for a missing file, a bad line or a file without prompts."""
    from adaptive.prompts import read_jsonl

    problems = []
    for lineno, row in read_jsonl(path, "--prompts file"):
        text = row.get("prompt", row.get("question")) if isinstance(row, dict) else None
        if not isinstance(text, str) or not text.strip():
            raise UserError(f'{path}:{lineno}: expected an object with a non-empty string "prompt" or "question" '
                            "field")
        problems.append({"question": text, "answer": None, "index": lineno})
    if not problems:
        raise UserError(f"--prompts file {path} holds no prompts")
    return problems[:n] if n is not None else problems


def _calibration_problems(args) -> tuple[list[dict], int]:
    from adaptive.gsm8k import load_problems

    if args.prompts is not None:
        return load_prompts(args.prompts, args.n), 0
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


def _reference_fields(report, labelled: bool) -> dict:
    out = _setting_fields(report, 1.0, 1)
    for key in ("tau", "k_max", "correct", "agrees", "agreement", "replayed", "decoded"):
        out.pop(key, None)
    if not labelled:
        out["accuracy"] = out["stderr"] = None
    return {"strategy": "static(k=1)", **out}


def main(argv: list[str]) -> int:
    from adaptive.loading import DTYPES, GSM8K_LOCAL
    from mtp_cli.args import Parser as _Parser

    parser = _Parser(prog="mtp tune", description="Choose ConfAdapt's tau and k_max for a target (accuracy drop "
                     "versus k=1 on labelled problems, or agreement with k=1 on any prompts), certified by "
                     "Learn-then-Test and never slower than k=1, and write them into the model's generation config.")
    parser.add_argument("--model", required=True, help="MTP model directory (its generation config is updated)")
    parser.add_argument("--target-drop", type=float,
                        help="largest acceptable accuracy drop versus k=1, as a fraction (0.02 = 2 points); needs "
                             "labelled problems")
    parser.add_argument("--target-agreement", type=float,
                        help="smallest acceptable agreement with k=1's output, in (0, 1] (0.95 = 95%%); no labels "
                             "needed")
    parser.add_argument("--agreement", default="answer",
                        help="what must agree: 'answer' (final answer, GSM8K-style extraction; default) or "
                             "'tokens:N' (the first N generated tokens)")
    parser.add_argument("--prompts", help='unlabelled prompts: JSON lines with a "prompt" or "question" field '
                                          "(with --target-agreement)")
    parser.add_argument("--delta", type=float, default=0.05,
                        help="error level: the guarantee holds with probability >= 1 - delta (default 0.05)")
    parser.add_argument("--min-speed", type=float,
                        help="instead: the best setting at least this fast (no certification)")
    parser.add_argument("--no-lossless", action="store_true",
                        help="do not time the lossless self-speculative mode as a candidate (it is chosen when "
                             "measured faster than k=1 and the certified ConfAdapt setting)")
    parser.add_argument("--speed", choices=tuple(SPEEDS), default="tokens",
                        help="rank certified settings by tokens per forward (default) or measured wall-clock tok/s")
    parser.add_argument("--measure", type=int, default=DEFAULT_MEASURE,
                        help=f"candidates measured wall-clock beside k=1 (default {DEFAULT_MEASURE}); the choice is "
                             "never slower than k=1")
    parser.add_argument("--sweep", choices=("replay", "rollout"), default="replay",
                        help="replay: one packed forward per question over the greedy rollout, real decoding only "
                             "where a setting diverges (default); rollout: decode every setting on every question")
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
                        help="evaluate every setting, also those that can no longer be certified")
    parser.add_argument("--report-dir", help="where report.json and pareto.png go (default: DIR/tune)")
    parser.add_argument("--no-write", action="store_true", help="leave the model's generation config untouched")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    # Everything that can be checked is checked before the model loads.
    taus, k_maxes = _check_args(args)
    agreement_tokens = parse_agreement(args.agreement)
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
    problems, start = _calibration_problems(args)
    agreement = args.target_agreement is not None
    risk = 1 - args.target_agreement if agreement else args.target_drop
    level = args.delta / len(k_maxes)
    need = min_certifiable_n(risk, level)
    if args.min_speed is None and (need is None or len(problems) < need):
        print(f"warning: with n={len(problems)} nothing can be certified ("
              + ("agreement 1 has p = 1 whatever the data" if need is None else
                 f"zero {'disagreements' if agreement else 'regressions'} give p = {(1 - risk) ** len(problems):.3f} "
                 f"> {level:.4f} = delta / {len(k_maxes)} k_max sequences; use n >= {need}, a looser target or "
                 "delta, or fewer --k-max values") + "). Running anyway; expect plain decoding (k=1).",
              file=sys.stderr)

    from adaptive.calibration import load_calibrator
    from adaptive.loading import load_mtp_model, stop_ids
    from adaptive.decoder import MTPDecoder
    from distill.models import resolve_model_path

    model, tokenizer = load_mtp_model(args.model, args.dtype)
    # tau is tuned on the confidence scale `mtp generate` will gate on: the saved calibrator's, when there is one
    calibrator = load_calibrator(resolve_model_path(args.model))
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_ids(model, tokenizer))
    source = args.prompts if args.prompts is not None else args.dataset
    print(f"reference: static(k=1) on {len(problems)} problems "
          + (f"of {source}" if args.prompts is not None else
             f"(rows {start}..{start + len(problems) - 1} of {source})"), file=sys.stderr)
    target_text = (f"target agreement {args.target_agreement:g} ({args.agreement})" if agreement else
                   f"target drop {args.target_drop:g}")
    tune(decoder, problems, target_drop=args.target_drop, target_agreement=args.target_agreement,
         agreement_tokens=agreement_tokens, delta=args.delta, taus=taus, k_maxes=k_maxes,
         prompt_format=args.format, max_new_tokens=args.max_new_tokens, batch_size=args.batch_size,
         scorer=calibrator, min_speed=args.min_speed, speed=args.speed, full_sweep=args.full_sweep,
         sweep_mode=args.sweep, measure=args.measure, labelled=args.prompts is None, lossless=not args.no_lossless,
         report_dir=report_dir, model_dir=None if args.no_write else model_dir,
         extra={"model": str(args.model), "dataset": str(source), "split": args.split, "start": start},
         title=f"mtp tune: {model_dir.name}, n={len(problems)}, {target_text}, delta {args.delta:g}")
    return 0


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
    the first `agreement_tokens` tokens). `problems` are evaluate.load_problems rows (or load_prompts rows with
    labelled=False); `scorer` is the ConfAdapt confidence (a fitted calibrator or None for the raw top-1 probability).
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
        "not_evaluated": [{"tau": t, "k_max": k} for k, seq in ordered_sequences(taus, k_maxes) for t in seq
                          if (t, k) not in evaluated],
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
    print(choice_line(choice))
    print(f"wrote {report_path} and {plot_path}")
    if model_dir is not None:
        path = write_decoding_defaults(model_dir, choice["strategy"], choice["k_max"], choice["tau"])
        print(f"wrote {path}: `mtp generate --model {model_dir}` now decodes with "
              + (f"confadapt tau={choice['tau']:g} k_max={choice['k_max']}" if choice["strategy"] == "confadapt"
                 else f"selfspec k_max={choice['k_max']} (lossless)" if choice["strategy"] == "selfspec"
                 else "plain decoding (static k=1)"))
    return report
