"""`mtp tune`: the Learn-then-Test statistics on synthetic sweeps, the lazy sweep, the outputs and the command."""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from scipy.optimize import brentq
from scipy.stats import binom

from adaptive.ltt import agreement_flags, binomial_pvalue, fixed_sequence, min_certifiable_n, select
from adaptive.tuner import ordered_sequences, sweep, write_decoding_defaults
from distill.errors import UserError
from distill.plots import pareto_plot
from mtp_cli.tune import parse_agreement

DELTA = 0.05
REPS = 2000
# Monte-Carlo slack for a frequency estimated from REPS repetitions: 3 standard errors at p = delta.
SLACK = 3 * math.sqrt(DELTA * (1 - DELTA) / REPS)


# ---------------------------------------------------------------------------------------------------------------------
# p-values and fixed-sequence testing


def test_binomial_pvalue_hand_values_and_scipy():
    assert binomial_pvalue(0, 10, 0.2) == pytest.approx(0.8 ** 10)
    assert binomial_pvalue(1, 10, 0.2) == pytest.approx(0.8 ** 10 + 10 * 0.2 * 0.8 ** 9)
    assert binomial_pvalue(10, 10, 0.2) == pytest.approx(1.0)
    rng = np.random.default_rng(0)
    for _ in range(50):
        n = int(rng.integers(1, 500))
        b = int(rng.integers(0, n + 1))
        t = float(rng.uniform(0.001, 0.5))
        assert binomial_pvalue(b, n, t) == pytest.approx(binom.cdf(b, n, t), rel=1e-12, abs=1e-300)
    # More regressions is never more evidence of safety.
    assert all(binomial_pvalue(b, 200, 0.05) < binomial_pvalue(b + 1, 200, 0.05) for b in range(30))
    with pytest.raises(ValueError):
        binomial_pvalue(11, 10, 0.2)


def test_fixed_sequence_stops_at_first_failure():
    assert fixed_sequence([0.001, 0.04, 0.2, 0.001], 0.05) == [True, True, False, False]
    assert fixed_sequence([0.5, 0.001], 0.05) == [False, False]
    assert fixed_sequence([], 0.05) == []


def test_min_certifiable_n():
    level = 0.05 / 3
    n = min_certifiable_n(0.02, level)
    assert n == 203
    assert (1 - 0.02) ** n <= level < (1 - 0.02) ** (n - 1)
    assert binomial_pvalue(0, n, 0.02) <= level < binomial_pvalue(0, n - 1, 0.02)


def test_sequences_are_conservative_first_per_k_max():
    assert ordered_sequences([0.6, 0.995, 0.9], [8, 4]) == [(8, [0.995, 0.9, 0.6]), (4, [0.995, 0.9, 0.6])]


# ---------------------------------------------------------------------------------------------------------------------
# select(): rules on hand-made settings


def _setting(tau, k_max, correct, tpf, tps=10.0):
    return {"tau": tau, "k_max": k_max, "correct": list(correct), "tokens_per_forward_mean": tpf,
            "tokens_per_forward_std": 0.1, "tokens_per_second": tps}


def _flip(reference, count):
    """The reference with its first `count` correct answers turned wrong (`count` regressions, no improvements)."""
    out, left = list(reference), count
    for i, ok in enumerate(out):
        if ok and left:
            out[i], left = False, left - 1
    return out


def test_select_fastest_certified_and_ties_go_to_accuracy():
    ref = [True] * 150 + [False] * 50
    improved = list(ref)
    improved[150] = True  # one improvement, no regression: certified, more accurate
    settings = [
        _setting(0.99, 4, ref, 1.5),
        _setting(0.9, 4, ref, 2.0),  # certified, 2.0 tokens/forward, accuracy 0.75
        _setting(0.8, 4, _flip(ref, 40), 3.0),  # fails: fastest seen but not certified
        _setting(0.99, 8, ref, 1.6),
        _setting(0.9, 8, improved, 2.0),  # certified, same speed, more accurate -> the choice
    ]
    out = select(ref, settings, target=0.05, delta=0.05, reference_speed=5.0)
    assert out["level"] == pytest.approx(0.025) and out["n_sequences"] == 2
    by_key = {(s["tau"], s["k_max"]): s for s in out["settings"]}
    assert [by_key[(t, 4)]["certified"] for t in (0.99, 0.9, 0.8)] == [True, True, False]
    assert by_key[(0.8, 4)]["regressions"] == 40 and by_key[(0.8, 4)]["drop"] == pytest.approx(0.2)
    assert by_key[(0.9, 8)]["improvements"] == 1 and by_key[(0.9, 8)]["drop"] == pytest.approx(-1 / 200)
    choice = out["choice"]
    assert (choice["strategy"], choice["tau"], choice["k_max"], choice["certified"]) == ("confadapt", 0.9, 8, True)
    assert choice["rule"] == "fastest-certified"
    assert "correct" not in choice["setting"]


def test_select_wallclock_speed_changes_the_choice():
    ref = [True] * 150 + [False] * 50
    settings = [_setting(0.99, 4, ref, 1.5, tps=30.0), _setting(0.95, 4, ref, 2.0, tps=20.0)]
    assert select(ref, settings, target=0.05, speed="tokens", reference_speed=15.0)["choice"]["tau"] == 0.95
    assert select(ref, settings, target=0.05, speed="wallclock", reference_speed=15.0)["choice"]["tau"] == 0.99


def test_select_min_speed_picks_most_accurate_fast_enough():
    ref = [True] * 150 + [False] * 50
    settings = [
        _setting(0.99, 8, ref, 1.8),
        _setting(0.9, 8, _flip(ref, 30), 3.2),  # fails the test; then every later tau is untested
        _setting(0.8, 8, _flip(ref, 20), 3.5),  # most accurate with >= 3 tokens/forward
        _setting(0.7, 8, _flip(ref, 60), 4.5),
    ]
    out = select(ref, settings, target=0.02, min_speed=3.0, reference_speed=1.0)
    choice = out["choice"]
    assert (choice["rule"], choice["tau"], choice["k_max"], choice["certified"]) == ("min-speed", 0.8, 8, False)
    assert all(s["p_value"] is not None for s in out["settings"])  # reported anyway
    assert [s["tested"] for s in out["settings"]] == [True, True, False, False]
    with pytest.raises(UserError, match=r"--min-speed 5 .*fastest seen is 4\.50"):
        select(ref, settings, target=0.02, min_speed=5.0)


def test_select_keeps_plain_decoding_when_nothing_is_certified():
    ref = [True] * 30 + [False] * 10
    settings = [_setting(0.99, k, _flip(ref, 5), 2.0) for k in (4, 8, 16)]
    out = select(ref, settings, target=0.02, delta=0.05, reference_speed=1.0)
    choice = out["choice"]
    assert (choice["strategy"], choice["tau"], choice["k_max"], choice["certified"]) == ("static", None, 1, False)
    assert choice["rule"] == "plain" and choice["setting"] is None and out["candidates"] == []
    assert "plain decoding (static k=1)" in choice["reason"]
    assert "needs n >= 203" in choice["reason"]  # n=40 can never certify target 0.02 at delta/3
    assert not any(s["certified"] for s in out["settings"])


def test_select_never_picks_a_setting_slower_than_k1():
    ref = [True] * 150 + [False] * 50
    fastest = {**_setting(0.8, 4, ref, 3.0, tps=9.0), "reference_tokens_per_second": 10.0}  # 3 tok/fwd, slower
    second = {**_setting(0.9, 4, ref, 2.0, tps=12.0), "reference_tokens_per_second": 10.0}  # measured faster
    unmeasured = {**_setting(0.9, 8, ref, 2.5), "tokens_per_second": None}  # certified, never measured
    settings = [_setting(0.99, 4, ref, 1.2, tps=None), second, fastest, unmeasured]
    out = select(ref, settings, target=0.05, delta=0.05)
    assert out["candidates"] == [(0.8, 4), (0.9, 8), (0.9, 4), (0.99, 4)]  # measuring order: tokens/forward
    choice = out["choice"]
    assert (choice["strategy"], choice["tau"], choice["k_max"]) == ("confadapt", 0.9, 4)
    rows = {(s["tau"], s["k_max"]): s for s in out["settings"]}
    assert rows[(0.8, 4)]["not_slower_than_k1"] is False and rows[(0.9, 8)]["not_slower_than_k1"] is None
    # Everything measured slower than k=1 (or not measured): plain decoding, and the reason says why.
    second["tokens_per_second"] = 9.5
    out = select(ref, settings, target=0.05, delta=0.05)
    choice = out["choice"]
    assert (choice["strategy"], choice["tau"], choice["k_max"], choice["rule"]) == ("static", None, 1, "plain")
    assert "measured slower than k=1" in choice["reason"] and "tau=0.8 k_max=4 9.0 vs 10.0 tok/s" in choice["reason"]
    # The same rule under --min-speed and --speed wallclock.
    assert select(ref, settings, target=0.05, min_speed=2.0)["choice"]["strategy"] == "static"
    second["tokens_per_second"] = 11.0
    fastest["tokens_per_second"] = 10.5
    assert select(ref, settings, target=0.05, speed="wallclock")["choice"]["tau"] == 0.9  # 11 tok/s beats 10.5
    assert select(ref, settings, target=0.05, speed="tokens")["choice"]["tau"] == 0.8  # 3 tok/fwd, not slower


def test_select_agreement_objective():
    n = 200
    agree_all = [True] * n
    two_off = [True] * (n - 2) + [False] * 2
    settings = [{**_setting(0.99, 4, [True] * n, 1.5), "agrees": agree_all},
                {**_setting(0.9, 4, [True] * n, 2.0), "agrees": two_off},
                {**_setting(0.8, 4, [True] * n, 2.5), "agrees": [True] * 160 + [False] * 40}]
    for s in settings:
        del s["correct"]  # unlabelled prompts: agreement only
    out = select(None, settings, target=0.95, delta=0.05, objective="agreement", reference_speed=1.0)
    rows = out["settings"]
    assert [r["disagreements"] for r in rows] == [0, 2, 40]
    assert [r["agreement"] for r in rows] == [1.0, 0.99, 0.8]
    assert rows[1]["p_value"] == pytest.approx(binom.cdf(2, n, 0.05))
    assert [r["certified"] for r in rows] == [True, True, False] and "accuracy" not in rows[0]
    assert out["risk"] == pytest.approx(0.05) and out["min_certifiable_n"] == 59
    assert (out["choice"]["tau"], out["choice"]["rule"]) == (0.9, "fastest-certified")
    # Agreement 1 is a valid target that can never be certified.
    out = select(None, settings, target=1.0, delta=0.05, objective="agreement", reference_speed=1.0)
    assert out["choice"]["strategy"] == "static" and "can never be certified" in out["choice"]["reason"]
    with pytest.raises(UserError, match=r"target agreement must be in \(0, 1\]"):
        select(None, settings, target=1.5, objective="agreement")


def test_agreement_flags_and_parse():
    assert agreement_flags(["5", None, "3"], ["5", None, "4"]) == [True, True, False]
    ref_tokens, tokens = [[1, 2, 3, 4], [1, 2], [7, 8, 9]], [[1, 2, 3, 9], [1, 2], [7, 8]]
    assert agreement_flags([None] * 3, [None] * 3, tokens=3, reference_tokens=ref_tokens,
                           token_ids=tokens) == [True, True, False]
    assert agreement_flags([None] * 3, [None] * 3, tokens=4, reference_tokens=ref_tokens,
                           token_ids=tokens)[0] is False
    assert parse_agreement("answer") is None and parse_agreement("tokens:32") == 32
    for bad in ("tokens:0", "tokens:x", "words:3", ""):
        with pytest.raises(UserError, match="--agreement must be"):
            parse_agreement(bad)


@pytest.mark.parametrize("kwargs", [{"target": 0.0}, {"target": 1.0}, {"target": 0.02, "delta": 0.0},
                                    {"target": 0.02, "delta": 1.5}, {"target": 0.02, "speed": "fast"}])
def test_select_rejects_bad_levels(kwargs):
    ref = [True, False]
    with pytest.raises(UserError):
        select(ref, [_setting(0.9, 4, ref, 2.0)], **kwargs)


# ---------------------------------------------------------------------------------------------------------------------
# Repeated simulation: the guarantee, the choice, and power


def _simulate(rng, reps, n, ref_acc, sequences):
    """Per-problem correctness for the reference and every setting, over `reps` independent calibration draws.

    sequences: {k_max: [(tau, regression_rate, improvement_rate, tokens_per_forward), ...]}, where the regression
    rate is E[l] = P(reference right and setting wrong) and the improvement rate P(reference wrong and setting right).
    Each setting's answers are drawn independently given the reference (the worst case for multiplicity).
    Returns (reference [reps, n], [(setting template, correct [reps, n], true drop)]).
    """
    ref = rng.random((reps, n)) < ref_acc
    out = []
    for k_max, rows in sequences.items():
        for tau, regress, improve, tpf in rows:
            u = rng.random((reps, n))
            correct = np.where(ref, u >= regress / ref_acc, u < improve / (1 - ref_acc))
            template = {"tau": tau, "k_max": k_max, "tokens_per_forward_mean": tpf, "tokens_per_forward_std": 0.0,
                        "tokens_per_second": 10.0 * tpf}
            out.append((template, correct, regress - improve))
    return ref, out


def _sharp_target(n: int, level: float, b: int) -> float:
    """The target at which P(Bin(n, target) <= b) == level: the binomial test then has size ~level, not less, so a
    setting just above the target is certified as often as the guarantee allows (no discreteness slack)."""
    return brentq(lambda t: binom.cdf(b, n, t) - level, 1e-6, 0.5)


def _run(ref, sims, target, rep, **kwargs):
    settings = [{**template, "correct": correct[rep]} for template, correct, _ in sims]
    return select(ref[rep], settings, target=target, delta=DELTA, reference_speed=0.0, **kwargs)


def _bad_certified(out, sims, target):
    drops = {(t["tau"], t["k_max"]): drop for t, _, drop in sims}
    return any(s["certified"] and drops[(s["tau"], s["k_max"])] > target for s in out["settings"])


def test_simulated_false_certification_rate_is_at_most_delta():
    n, rng = 200, np.random.default_rng(1)
    target = _sharp_target(n, DELTA, 4)
    # One k_max sequence, monotone regression rates: four clearly safe taus, then three just above the target
    # (no improvements, so the true drop equals the regression rate: the test's hardest case), then a bad one.
    rates = [0.0, 0.001, 0.002, 0.004, target + 0.0005, target + 0.001, target + 0.0015, 0.15]
    taus = [0.995, 0.99, 0.97, 0.95, 0.9, 0.85, 0.8, 0.6]
    rows = [(tau, r, 0.0, 1 + i * 0.5) for i, (tau, r) in enumerate(zip(taus, rates))]
    ref, sims = _simulate(rng, REPS, n, 0.6, {8: rows})
    bad = chosen_fastest = 0
    for rep in range(REPS):
        out = _run(ref, sims, target, rep)
        bad += _bad_certified(out, sims, target)
        certified = [s for s in out["settings"] if s["certified"]]
        if certified:
            chosen_fastest += out["choice"]["setting"]["tokens_per_forward_mean"] == max(
                s["tokens_per_forward_mean"] for s in certified)
        else:
            chosen_fastest += out["choice"]["strategy"] == "static" and not out["choice"]["certified"]
    rate = bad / REPS
    print(f"single sequence: target {target:.4f}, observed false certification {rate:.4f} (delta {DELTA})")
    assert rate <= DELTA + SLACK
    assert rate > DELTA / 4  # the simulation is sharp: the bound is nearly attained, so a broken rule would show
    assert chosen_fastest == REPS

    # Negative control: testing every tau on its own (no fixed sequence) breaks the bound on the same draws.
    naive = 0
    for rep in range(REPS):
        for template, correct, drop in sims:
            b = int(np.count_nonzero(ref[rep] & ~correct[rep]))
            if drop > target and binomial_pvalue(b, n, target) <= DELTA:
                naive += 1
                break
    print(f"single sequence: per-tau testing without the fixed sequence: {naive / REPS:.4f}")
    assert naive / REPS > DELTA + SLACK


def test_simulated_bonferroni_over_k_max_sequences():
    n, m, rng = 200, 3, np.random.default_rng(2)
    target = _sharp_target(n, DELTA / m, 3)
    sequences = {}
    for j, k in enumerate((4, 8, 16)):
        rates = [0.0, 0.001, 0.002, target + 0.0005, target + 0.001, 0.12]
        # improvements on the safe taus only: the drop there is below the regression rate (charged conservatively)
        sequences[k] = [(tau, r, 0.01 if r < target else 0.0, (1 + i * 0.5) * (1 + 0.2 * j))
                        for i, (tau, r) in enumerate(zip([0.995, 0.99, 0.95, 0.9, 0.8, 0.6], rates))]
    ref, sims = _simulate(rng, REPS, n, 0.6, sequences)
    bad = naive = wrong_choice = 0
    for rep in range(REPS):
        out = _run(ref, sims, target, rep, n_sequences=m)
        bad += _bad_certified(out, sims, target)
        certified = [s for s in out["settings"] if s["certified"]]
        if certified:
            best = max(s["tokens_per_forward_mean"] for s in certified)
            wrong_choice += out["choice"]["setting"]["tokens_per_forward_mean"] != best
        # Negative control: each k_max sequence tested at the full delta (no Bonferroni), union of certified sets.
        naive += any(_bad_certified(_run(ref, [s for s in sims if s[0]["k_max"] == k], target, rep), sims, target)
                     for k in sequences)
    print(f"{m} sequences: target {target:.4f}, observed false certification {bad / REPS:.4f} (delta {DELTA}); "
          f"without Bonferroni {naive / REPS:.4f}")
    assert bad / REPS <= DELTA + SLACK
    assert naive / REPS > DELTA + SLACK
    assert wrong_choice == 0


def _simulate_agreement(rng, reps, n, sequences):
    """Per-problem agreement with k=1 over `reps` draws: {k_max: [(tau, disagreement_rate, tokens_per_forward)]}."""
    out = []
    for k_max, rows in sequences.items():
        for tau, rate, tpf in rows:
            agrees = rng.random((reps, n)) >= rate
            template = {"tau": tau, "k_max": k_max, "tokens_per_forward_mean": tpf, "tokens_per_forward_std": 0.0,
                        "tokens_per_second": 10.0 * tpf}
            out.append((template, agrees, rate))
    return out


def test_simulated_agreement_false_certification_rate_is_at_most_delta():
    """The label-free certificate: P(some certified setting agrees with k=1 on less than the target) <= delta,
    with one and with two k_max sequences (Bonferroni), on draws sharp enough that a broken rule would show."""
    n, rng = 200, np.random.default_rng(4)
    for m in (1, 2):
        risk = _sharp_target(n, DELTA / m, 4)
        target = 1 - risk  # agreement target
        sequences = {k: [(tau, r, 1 + i * 0.5) for i, (tau, r) in enumerate(zip(
            [0.995, 0.99, 0.95, 0.9, 0.85, 0.8, 0.6], [0.0, 0.002, 0.004, risk + 0.0005, risk + 0.001, risk + 0.0015,
                                                       0.2]))] for k in (4, 8)[:m]}
        sims = _simulate_agreement(rng, REPS, n, sequences)
        bad = naive = 0
        for rep in range(REPS):
            settings = [{**template, "agrees": agrees[rep]} for template, agrees, _ in sims]
            out = select(None, settings, target=target, delta=DELTA, objective="agreement", n_sequences=m,
                         reference_speed=0.0)
            rates = {(t["tau"], t["k_max"]): rate for t, _, rate in sims}
            bad += any(s["certified"] and rates[(s["tau"], s["k_max"])] > risk for s in out["settings"])
            naive += any(rate > risk and binomial_pvalue(int((~agrees[rep]).sum()), n, risk) <= DELTA
                         for _, agrees, rate in sims)
        print(f"agreement, {m} sequence(s): target {target:.4f}, false certification {bad / REPS:.4f}, "
              f"per-setting testing at full delta {naive / REPS:.4f} (delta {DELTA})")
        assert bad / REPS <= DELTA + SLACK
        assert bad / REPS > DELTA / 8  # sharp: the bound is nearly attained
        assert naive / REPS > DELTA + SLACK  # negative control: no fixed sequence, no Bonferroni


def test_simulated_power_with_generous_n():
    n, reps, target, rng = 2000, 200, 0.05, np.random.default_rng(3)
    taus = [0.99, 0.95, 0.9, 0.8, 0.7, 0.6]
    rates = [0.002, 0.005, 0.01, 0.02, 0.1, 0.2]  # 0.8 is the fastest truly safe tau (regression rate 0.02 < 0.05)
    rows = [(tau, r, 0.005, 1 + i) for i, (tau, r) in enumerate(zip(taus, rates))]
    ref, sims = _simulate(rng, reps, n, 0.7, {4: rows, 16: rows})
    hits = 0
    for rep in range(reps):
        choice = _run(ref, sims, target, rep)["choice"]
        hits += choice["certified"] and choice["tau"] == 0.8
    print(f"power: fastest safe tau chosen in {hits / reps:.3f} of {reps} draws at n={n}")
    assert hits / reps >= 0.95


# ---------------------------------------------------------------------------------------------------------------------
# sweep(): lazy evaluation in testing order


class FakeEvaluator:
    """evaluate_setting(tau, k_max) from a table of regression counts; records every call."""

    def __init__(self, reference, regressions):
        self.reference, self.regressions, self.calls = reference, regressions, []

    def __call__(self, tau, k_max):
        self.calls.append((tau, k_max))
        correct = _flip(self.reference, self.regressions[(tau, k_max)])
        tpf = 1 + (1 - tau) * 10 + k_max / 100
        return SimpleNamespace(correct=correct, accuracy=float(np.mean(correct)), tokens_per_forward_mean=tpf,
                               tokens_per_forward_std=0.5, tokens_per_second=20 * tpf)


def test_sweep_stops_a_sequence_at_its_first_failure():
    ref = [True] * 300 + [False] * 100
    taus = [0.6, 0.9, 0.99, 0.95, 0.8]  # any order: tested from conservative to aggressive
    # k_max 4: fails at 0.9 (20 regressions of 400 at target 0.02 is p ~ 0.6); k_max 8: fails at the first tau.
    regressions = {(t, 4): {0.99: 0, 0.95: 1, 0.9: 20, 0.8: 0, 0.6: 0}[t] for t in taus}
    regressions.update({(t, 8): 30 for t in taus})
    fake = FakeEvaluator(ref, regressions)
    settings = sweep(fake, taus, [4, 8], reference=ref, target=0.02, delta=0.05)
    assert fake.calls == [(0.99, 4), (0.99, 8), (0.95, 4), (0.9, 4)]  # turns; k_max 8 stopped at its first
    assert [(s["tau"], s["k_max"]) for s in settings] == fake.calls
    lazy = select(ref, settings, target=0.02, delta=0.05, n_sequences=2, reference_speed=1.0)

    full_fake = FakeEvaluator(ref, regressions)
    full = sweep(full_fake, taus, [4, 8], reference=ref, target=0.02, delta=0.05, full=True)
    assert len(full_fake.calls) == 10
    eager = select(ref, full, target=0.02, delta=0.05, n_sequences=2, reference_speed=1.0)
    # Same certified set and the same choice: the skipped taus could never have been certified (0.8 and 0.6 at
    # k_max 4 have zero regressions but sit behind the failure at 0.9).
    def certified(out):
        return {(s["tau"], s["k_max"]) for s in out["settings"] if s["certified"]}

    assert certified(lazy) == certified(eager) == {(0.99, 4), (0.95, 4)}
    assert lazy["choice"] == {**eager["choice"], "setting": lazy["choice"]["setting"]}
    assert lazy["choice"]["tau"] == 0.95


def test_sweep_deadline_ends_it_after_the_first_setting():
    import time

    ref = [True] * 300 + [False] * 100
    fake = FakeEvaluator(ref, {(t, k): 0 for t in (0.99, 0.9) for k in (4, 8)})
    settings = sweep(fake, [0.99, 0.9], [4, 8], reference=ref, target=0.02, delta=0.05,
                     deadline=time.perf_counter() - 1)
    assert fake.calls == [(0.99, 4)] and len(settings) == 1  # the first setting always runs; then time is up
    out = select(ref, settings, target=0.02, delta=0.05, n_sequences=2, reference_speed=1.0)
    assert out["choice"]["tau"] == 0.99  # an untested tau is simply not certified


# ---------------------------------------------------------------------------------------------------------------------
# Outputs


def test_pareto_plot_writes_a_png(tmp_path):
    import matplotlib.image

    ref = [True] * 150 + [False] * 50
    settings = [_setting(t, k, _flip(ref, r), 1 + (1 - t) * 8 * k / 8, tps=15 + 10 * (1 - t))
                for k in (4, 8) for t, r in ((0.99, 0), (0.9, 2), (0.7, 20))]
    out = select(ref, settings, target=0.05, reference_speed=12.0)
    reference = {"accuracy": 0.75, "tokens_per_forward_mean": 1.0, "tokens_per_second": 12.0}
    path = pareto_plot(tmp_path / "pareto.png", out["settings"], reference, choice=out["choice"], target=0.05)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    height, width = matplotlib.image.imread(path).shape[:2]
    assert width > 1000 and height > 400
    assert [p.name for p in tmp_path.iterdir()] == ["pareto.png"]  # no temp file left behind


def _model_copy(tiny_model_dir, tmp_path) -> Path:
    out = tmp_path / "model"
    shutil.copytree(tiny_model_dir, out)
    return out


def test_write_decoding_defaults_round_trip(tiny_model_dir, tmp_path):
    from adaptive.loading import mtp_defaults

    model = _model_copy(tiny_model_dir, tmp_path)
    before = json.loads((model / "generation_config.json").read_text())
    write_decoding_defaults(model, "confadapt", 8, 0.95)
    assert mtp_defaults(str(model)) == {"strategy": "confadapt", "k_max": 8, "tau": 0.95, "tau_scale": "raw"}
    after = json.loads((model / "generation_config.json").read_text())
    assert after["eos_token_id"] == before["eos_token_id"] and after["pad_token_id"] == before["pad_token_id"]
    write_decoding_defaults(model, "selfspec", 4, None)
    assert json.loads((model / "generation_config.json").read_text())["mtp_tau"] is None
    assert mtp_defaults(str(model))["strategy"] == "selfspec" and mtp_defaults(str(model))["k_max"] == 4
    assert sorted(p.name for p in model.iterdir() if p.name.startswith(".")) == []  # no temp files


def test_write_decoding_defaults_leaves_the_file_alone_on_error(tiny_model_dir, tmp_path):
    model = _model_copy(tiny_model_dir, tmp_path)
    config = model / "generation_config.json"
    original = config.read_bytes()
    for bad in (("confadapt", 8, 1.5), ("confadapt", 0, 0.9), ("static", 4, None), ("nonsense", 4, 0.9)):
        with pytest.raises(UserError):
            write_decoding_defaults(model, *bad)
        assert config.read_bytes() == original
    config.write_text("{not json")
    with pytest.raises(UserError, match="cannot read"):
        write_decoding_defaults(model, "confadapt", 8, 0.9)
    assert config.read_text() == "{not json"


# ---------------------------------------------------------------------------------------------------------------------
# The command


@pytest.mark.parametrize("flags, message", [
    (["--target-drop", "0"], "--target-drop must be in (0, 1)"),
    (["--target-drop", "1.5"], "--target-drop must be in (0, 1)"),
    (["--target-drop", "0.02", "--delta", "0"], "--delta must be in (0, 1)"),
    (["--target-drop", "0.02", "--taus", "0.9,abc"], "--taus: 'abc' is not a number"),
    (["--target-drop", "0.02", "--taus", "0.9,1.2"], "every tau must be in (0, 1]"),
    (["--target-drop", "0.02", "--taus", "0.9,0.9"], "lists a value twice"),
    (["--target-drop", "0.02", "--k-max", "4,0"], "every k_max must be in [1, 64]"),
    (["--target-drop", "0.02", "--k-max", "65"], "every k_max must be in [1, 64]"),
    (["--target-drop", "0.02", "--n", "0"], "--n must be >= 1"),
    (["--target-drop", "0.02", "--min-speed", "-1"], "--min-speed must be > 0"),
    (["--target-drop", "0.02", "--speed", "fast"], "invalid choice"),
    (["--target-drop", "0.02", "--measure", "-1"], "--measure must be >= 0"),
    ([], "give a target: --target-drop"),
    (["--target-agreement", "0"], "--target-agreement must be in (0, 1]"),
    (["--target-agreement", "1.01"], "--target-agreement must be in (0, 1]"),
    (["--target-agreement", "nan"], "--target-agreement must be in (0, 1]"),
    (["--target-agreement", "0.95", "--target-drop", "0.02"], "give one target"),
    (["--target-agreement", "0.95", "--agreement", "tokens:0"], "--agreement must be 'answer' or 'tokens:N'"),
    (["--target-drop", "0.02", "--agreement", "tokens:8"], "--agreement goes with --target-agreement"),
    (["--target-drop", "0.02", "--prompts", "PROMPTS"], "--target-drop needs labelled problems"),
    (["--target-agreement", "0.95", "--prompts", "EMPTY"], "holds no prompts"),
    (["--target-agreement", "0.95", "--prompts", "NO_PROMPTS"], 'a non-empty string "prompt" or "question"'),
    (["--target-agreement", "0.95", "--prompts", "MISSING"], "does not exist"),
])
def test_bad_flags_exit_2_with_one_line_and_write_nothing(tiny_model_dir, tmp_path, capsys, flags, message):
    from mtp_cli.main import main

    model = _model_copy(tiny_model_dir, tmp_path)
    files = {"PROMPTS": tmp_path / "prompts.jsonl", "EMPTY": tmp_path / "empty.jsonl",
             "NO_PROMPTS": tmp_path / "answers.jsonl", "MISSING": tmp_path / "missing.jsonl"}
    files["PROMPTS"].write_text('{"prompt": "What is 2 + 2?"}\n')
    files["EMPTY"].write_text("\n\n")
    files["NO_PROMPTS"].write_text('{"answer": "#### 4"}\n')
    flags = [str(files[f]) if f in files else f for f in flags]
    before = {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()}
    assert main(["tune", "--model", str(model), *flags]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("error: ") and message in err
    assert {p.name: p.read_bytes() for p in model.iterdir() if p.is_file()} == before
    assert not (model / "tune").exists()


def test_missing_model_directory_is_one_line(tmp_path, capsys):
    from mtp_cli.main import main

    assert main(["tune", "--model", str(tmp_path / "nope"), "--target-drop", "0.02"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "is not a directory" in err


def _problems_file(tmp_path) -> Path:
    rows = [("Tom has 3 apples and buys 2 more. How many apples does he have?", "3 + 2 = 5\n#### 5"),
            ("A book costs $12. How much do 3 books cost?", "3 * 12 = 36\n#### 36"),
            ("Sara had 10 pens and gave away 4. How many are left?", "10 - 4 = 6\n#### 6"),
            ("There are 7 days in a week. How many days are in 2 weeks?", "2 * 7 = 14\n#### 14")]
    path = tmp_path / "calibration.jsonl"
    path.write_text("".join(json.dumps({"question": q, "answer": a}) + "\n" for q, a in rows))
    return path


@pytest.fixture
def one_torch_thread():
    """Many small forwards: on a shared 2-core machine two OpenMP threads spin against other processes
    (tests/test_decoder.py measured 3x), so decoding tests run single-threaded."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _never_slower(report) -> None:
    """The tuner's own report: a ConfAdapt or lossless choice was measured at least as fast as k=1 beside it."""
    choice = report["choice"]
    if choice["strategy"] == "selfspec":  # k=1's tokens exactly: chosen only when measured faster than k=1
        lossless = report["lossless"]
        assert lossless["tokens_per_second"] > lossless["reference_tokens_per_second"] > 0
        assert choice["rule"] == "lossless-faster" and choice["k_max"] == lossless["k_max"]
    elif choice["strategy"] == "confadapt":
        chosen = next(s for s in report["settings"] if (s["tau"], s["k_max"]) == (choice["tau"], choice["k_max"]))
        assert chosen["tokens_per_second"] >= chosen["reference_tokens_per_second"] > 0
        assert chosen["certified"] and choice["rule"] == "fastest-certified"
    else:
        assert (choice["strategy"], choice["k_max"], choice["tau"], choice["rule"]) == ("static", 1, None, "plain")


def test_mtp_tune_end_to_end_on_the_tiny_model(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    from adaptive.loading import mtp_defaults
    from mtp_cli.main import main

    model = _model_copy(tiny_model_dir, tmp_path)
    common = ["tune", "--model", str(model), "--dataset", str(_problems_file(tmp_path)), "--n", "4",
              "--max-new-tokens", "8", "--batch-size", "4"]
    grid = ["--taus", "0.9,0.5", "--k-max", "2,4"]

    # A 2-point target cannot be certified from 4 problems: said up front, then plain decoding is kept (the lossless
    # mode, timed against k=1 on a tiny model, would win or lose by noise: its choice is checked below).
    assert main([*common, *grid, "--target-drop", "0.02", "--no-lossless"]) == 0
    captured = capsys.readouterr()
    assert "nothing can be certified" in captured.err and "chosen: plain decoding (static k=1)" in captured.out
    report = json.loads((model / "tune" / "report.json").read_text())
    assert report["certified"] is False and report["choice"]["rule"] == "plain"
    assert [(s["k_max"], s["tau"]) for s in report["settings"]] == [(2, 0.9), (4, 0.9)]  # each sequence stopped
    assert [(r["k_max"], r["tau"]) for r in report["not_evaluated"]] == [(2, 0.5), (4, 0.5)]
    assert mtp_defaults(str(model))["strategy"] == "static" and mtp_defaults(str(model))["k_max"] == 1
    assert report["sweep"]["mode"] == "replay"

    # A loose target is certifiable at n=4 (zero regressions: p = 0.1^4 <= 0.05 / 2): every setting is evaluated,
    # the certified ones are measured beside k=1, and the choice is never slower than k=1.
    assert main([*common, *grid, "--target-drop", "0.9"]) == 0
    out = capsys.readouterr().out
    report = json.loads((model / "tune" / "report.json").read_text())
    assert (report["n"], report["target_drop"], report["delta"], report["n_sequences"]) == (4, 0.9, 0.05, 2)
    assert len(report["settings"]) == 4 and report["not_evaluated"] == []
    for s in report["settings"]:
        assert {"tau", "k_max", "accuracy", "drop", "regressions", "improvements", "p_value", "certified",
                "tokens_per_forward_mean", "tokens_per_forward_std", "tokens_per_second", "replayed",
                "decoded"} <= set(s)
        assert len(s["correct"]) == 4 and s["replayed"] + s["decoded"] == 4
        assert s["p_value"] == pytest.approx(binomial_pvalue(s["regressions"], 4, 0.9))
    assert any(s.get("tokens_per_second") is not None for s in report["settings"])  # at least one measured
    assert report["reference"]["speed_sample_tokens_per_second"] > 0
    _never_slower(report)
    choice = report["choice"]
    if choice["strategy"] == "confadapt":
        assert mtp_defaults(str(model)) == {"strategy": "confadapt", "k_max": choice["k_max"], "tau": choice["tau"],
                                            "tau_scale": "raw"}
        assert f"chosen: confadapt tau={choice['tau']:g} k_max={choice['k_max']}" in out
    elif choice["strategy"] == "selfspec":  # the lossless mode measured faster than k=1 on this run
        assert mtp_defaults(str(model))["strategy"] == "selfspec" and "(lossless)" in out
    else:
        assert "measured slower than k=1" in choice["reason"] and "chosen: plain decoding (static k=1)" in out
        assert mtp_defaults(str(model))["strategy"] == "static"
    assert (model / "tune" / "pareto.png").read_bytes()[:4] == b"\x89PNG"
    assert sorted(p.name for p in (model / "tune").iterdir()) == ["pareto.png", "report.json"]

    # --no-write leaves the generation config alone.
    before = (model / "generation_config.json").read_bytes()
    assert main([*common, "--taus", "0.9", "--k-max", "2", "--target-drop", "0.02", "--no-write",
                 "--report-dir", str(tmp_path / "r")]) == 0
    assert (model / "generation_config.json").read_bytes() == before
    assert (tmp_path / "r" / "report.json").is_file()


def test_mtp_tune_target_agreement_on_unlabelled_prompts(tiny_model_dir, tmp_path, capsys, one_torch_thread):
    """--target-agreement with --prompts: no gold answers; the certificate is about agreeing with k=1."""
    from adaptive.loading import mtp_defaults
    from mtp_cli.main import main

    model = _model_copy(tiny_model_dir, tmp_path)
    prompts = tmp_path / "traffic.jsonl"
    rows = [{"prompt": "Write one word."}, {"question": "What is 3 + 4?"}, {"prompt": "Name a colour."},
            {"question": "Count to three."}, {"prompt": "Say hello."}]
    prompts.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    argv = ["tune", "--model", str(model), "--prompts", str(prompts), "--target-agreement", "0.5",
            "--taus", "0.9,0.5", "--k-max", "2,4", "--max-new-tokens", "8", "--batch-size", "4", "--delta", "0.2"]
    for agreement in ("answer", "tokens:4"):
        assert main([*argv, "--agreement", agreement]) == 0
        out = capsys.readouterr().out
        report = json.loads((model / "tune" / "report.json").read_text())
        assert (report["objective"], report["target"], report["agreement"], report["labelled"]) == (
            "agreement", 0.5, agreement, False)
        assert report["n"] == 5 and report["reference"]["accuracy"] is None and report["reference"]["correct"] is None
        for s in report["settings"]:
            # p = P(Bin(5, 0.5) <= disagreements); zero disagreements: 1/32 <= 0.2 / 2
            assert s["p_value"] == pytest.approx(binom.cdf(s["disagreements"], 5, 0.5))
            assert len(s["agrees"]) == 5 and s["agreement"] == s["agrees"].count("1") / 5
            assert s.get("accuracy") is None and s["correct"] is None
        assert "disagr" in out and "agree" in out
        _never_slower(report)
        written = mtp_defaults(str(model))
        assert written["strategy"] == report["choice"]["strategy"]


def test_select_min_speed_in_wallclock_ranks_unmeasured_settings_as_candidates():
    ref = [True] * 150 + [False] * 50
    settings = [{**_setting(0.99, 4, ref, 1.2), "tokens_per_second": None},
                {**_setting(0.9, 4, _flip(ref, 2), 2.0), "tokens_per_second": None}]
    out = select(ref, settings, target=0.05, min_speed=20.0, speed="wallclock", reference_speed=15.0)
    assert out["candidates"] == [(0.99, 4), (0.9, 4)] and out["choice"]["strategy"] == "static"
    settings[0]["tokens_per_second"], settings[1]["tokens_per_second"] = 18.0, 25.0  # 18 < min speed 20
    choice = select(ref, settings, target=0.05, min_speed=20.0, speed="wallclock", reference_speed=15.0)["choice"]
    assert (choice["rule"], choice["tau"]) == ("min-speed", 0.9)
    settings[1]["tokens_per_second"] = 19.0
    with pytest.raises(UserError, match="no setting reaches --min-speed 20"):
        select(ref, settings, target=0.05, min_speed=20.0, speed="wallclock", reference_speed=15.0)


@pytest.mark.parametrize("selfspec_tps, confadapt_tps, expected", [
    (120.0, None, "selfspec"),   # faster than k=1, nothing certified: the lossless mode
    (95.0, None, "static"),      # slower than k=1: plain decoding stays
    (120.0, 130.0, "confadapt"),  # a certified ConfAdapt setting measured faster still
    (140.0, 130.0, "selfspec"),
])
def test_lossless_mode_is_chosen_only_when_measured_faster(monkeypatch, selfspec_tps, confadapt_tps, expected):
    """The self-speculative mode needs no certificate (k=1's tokens exactly) but must beat k=1 and the chosen
    ConfAdapt setting on the measured sample (speeds stubbed: tests never time anything)."""
    from types import SimpleNamespace

    import adaptive.evaluate as evaluate
    from adaptive.strategies import SelfSpeculative
    from adaptive.ltt import PLAIN
    from adaptive.tuner import _lossless_choice

    def fake_run(decoder, sample, strategy, **kwargs):
        tps = selfspec_tps if isinstance(strategy, SelfSpeculative) else 100.0
        if isinstance(strategy, SelfSpeculative):
            assert strategy.auto and strategy.k_max == 8
        return SimpleNamespace(tokens_per_second=tps, tokens_per_forward_mean=1.4)

    monkeypatch.setattr(evaluate, "run_eval", fake_run)
    choice = {**PLAIN, "certified": False, "rule": "plain", "setting": None, "reason": "nothing certified"}
    if confadapt_tps is not None:
        choice = {"strategy": "confadapt", "tau": 0.9, "k_max": 4, "certified": True, "rule": "fastest-certified",
                  "setting": {"tokens_per_second": confadapt_tps}, "reason": "certified"}
    chosen, row, k1 = _lossless_choice(None, [{}], choice, None, [4, 8], {})
    assert chosen["strategy"] == expected
    assert row["k_max"] == "auto:8" and row["speedup_vs_k1"] == pytest.approx(selfspec_tps / 100.0)
    assert k1.tokens_per_second == 100.0
    if expected == "selfspec":
        assert chosen["k_max"] == "auto:8" and chosen["tau"] is None and chosen["certified"]


def test_tuner_writes_a_lossless_choice(tiny_model_dir, tmp_path):
    import shutil

    from distill.decoding_defaults import read_decoding_defaults as decoding_defaults
    from adaptive.tuner import write_decoding_defaults
    from transformers import GenerationConfig

    model_dir = tmp_path / "m"
    shutil.copytree(tiny_model_dir, model_dir)
    write_decoding_defaults(model_dir, "selfspec", "auto:4", None)
    defaults = decoding_defaults(GenerationConfig.from_pretrained(model_dir))
    assert defaults["strategy"] == "selfspec" and defaults["k_max"] == "auto:4"
