"""The project's own statistics against independent, well-kept implementations (test-only dependencies).

The library keeps its own small implementations; these tests hold them to the reference libraries on random and
edge-case inputs:

* scikit-learn `sklearn.calibration.calibration_curve(strategy="uniform")`: the per-bin accuracy and mean confidence
  of `reliability_bins` (sklearn returns only the non-empty bins, in order).
* numpy `np.histogram(bins=n_bins, range=(0, 1))`: the per-bin counts (half-open bins, the last one closed: the same
  definition as `reliability_bins`).
* torchmetrics `BinaryCalibrationError` (preds = confidence, target = correct): norm="l1" is `calibration_metrics`'
  ECE, norm="max" its MCE.
* MAPIE `mapie.risk_control.control_fwer(..., fwer_method="fixed_sequence")`: `fixed_sequence`, the fixed-sequence
  test of Learn then Test (§4.1); MAPIE's multi-start `FWERFixedSequenceTesting(n_starts=m)` on m equal-length
  sequences laid end to end: `select`'s certification, one fixed sequence per k_max at level delta / m.
* scipy `scipy.stats.binomtest(alternative="less")`: `binomial_pvalue`, the exact one-sided binomial test.

Bin edges. `reliability_bins` closes its bins on the left, b/n <= c < (b+1)/n with the last bin also holding c = 1, as
np.histogram and torchmetrics do (torch.bucketize(right=True)). sklearn closes them on the right, b/n < c <= (b+1)/n
with the first also holding c = 0 (np.searchsorted with side="left"), so a confidence on an inner edge lands one bin
lower there. The two are compared directly where no confidence lies on an edge, and everywhere through the reflection
c -> 1 - c, which maps sklearn's right-closed bins onto the left-closed ones (bin b of c is sklearn's bin n - 1 - b
of 1 - c; the edges in these tests are dyadic, so 1 - c is exact on them).

Each library also places a rounding-level tie with a non-dyadic edge by its own floating-point edges:
`reliability_bins` by floor(c * n_bins), sklearn and numpy by np.linspace edges (0.30000000000000004 for 3/10),
torchmetrics by torch.linspace edges. Ties at bin edges are therefore drawn only at n_bins that are powers of two,
where every edge is exact; `reliability_bins`' own reading at the default 15 bins (and at 10), c = b/n in bin b, is
checked on its own. torchmetrics gives c = 1 a bin of its own (n_bins + 1 boundaries, bucketize right=True) where
`reliability_bins`, numpy and sklearn close the last bin at 1, so the torchmetrics comparisons draw confidences below 1
(c = 1 is compared with sklearn and numpy).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from mapie.risk_control import control_fwer
from mapie.risk_control.fwer_control import FWERFixedSequenceTesting
from scipy.stats import binomtest
from sklearn.calibration import calibration_curve
from torchmetrics.classification import BinaryCalibrationError

from adaptive.ltt import binomial_pvalue, fixed_sequence, select
from adaptive.metrics import calibration_metrics, reliability_bins

DYADIC_BINS = (1, 2, 4, 8, 16, 32)
BINS = DYADIC_BINS + (10, 15)


# ---------------------------------------------------------------------------------------------------------------------
# Calibration inputs


def _labels(rng, confidence) -> np.ndarray:
    """Correctness drawn a little below the confidence (an over-confident model), so the bins have gaps."""
    return rng.random(len(confidence)) < confidence ** 1.5


def random_cases(seed: int, *, below_one: bool):
    """(confidence, correct, n_bins) triples: continuous draws, skewed draws and draws on dyadic bin edges."""
    rng = np.random.default_rng(seed)
    for i in range(60):
        n_bins = BINS[i % len(BINS)]
        n = int(rng.integers(1, 300))
        kind = i % 3
        if kind == 0:
            c = rng.uniform(0.0, 1.0, n)
        elif kind == 1:
            c = rng.beta(5.0, 1.0, n)
        else:  # a third exactly on left edges b/n_bins (exact for dyadic n_bins), the rest continuous
            n_bins = DYADIC_BINS[i % len(DYADIC_BINS)]
            c = rng.uniform(0.0, 1.0, n)
            on_edge = rng.random(n) < 0.3
            c[on_edge] = rng.integers(0, n_bins + (0 if below_one else 1), int(on_edge.sum())) / n_bins
        if below_one:
            c = np.minimum(c, np.nextafter(1.0, 0.0))
        yield c, _labels(rng, c), n_bins


def edge_cases(*, below_one: bool):
    """Named (confidence, correct, n_bins): one class only, one bin populated, values on edges, tiny inputs."""
    rng = np.random.default_rng(1)
    c = rng.uniform(0.05, 0.95, 200)
    one_bin = rng.uniform(0.5, 0.5625, 50)  # inside bin 8 of 16
    top = 1.0 if not below_one else 0.96875
    cases = {
        "all correct": (c, np.ones(200, bool), 15),
        "all wrong": (c, np.zeros(200, bool), 15),
        "one bin populated": (one_bin, _labels(rng, one_bin), 16),
        "one bin, all on its left edge": (np.full(9, 0.5), np.arange(9) % 3 == 0, 4),
        "every left edge, 8 bins": (np.repeat(np.arange(8) / 8, 5), np.arange(40) % 2 == 0, 8),
        "every left edge, 32 bins": (np.arange(32) / 32, np.arange(32) % 3 != 0, 32),
        "zeros": (np.zeros(7), np.array([0, 0, 1, 0, 0, 0, 0], bool), 15),
        "top": (np.full(5, top), np.array([1, 1, 1, 0, 1], bool), 15),
        "single sample": (np.array([0.7]), np.array([True]), 15),
        "one bin in all": (c, _labels(rng, c), 1),
    }
    return [pytest.param(*case, id=name) for name, case in cases.items()]


# ---------------------------------------------------------------------------------------------------------------------
# reliability_bins against scikit-learn and numpy


def _check_against_sklearn(c, y, n_bins):
    bins = reliability_bins(c, y, n_bins)
    used = bins["count"] > 0
    accuracy, confidence = bins["accuracy"][used], bins["confidence"][used]
    assert np.isnan(bins["accuracy"][~used]).all() and np.isnan(bins["confidence"][~used]).all()
    prob_true, prob_pred = calibration_curve(y, 1.0 - c, n_bins=n_bins, strategy="uniform")  # reflected
    np.testing.assert_allclose(accuracy, prob_true[::-1], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(confidence, 1.0 - prob_pred[::-1], rtol=1e-12, atol=1e-12)
    if not np.isin(c, np.linspace(0.0, 1.0, n_bins + 1)).any():  # no ties: the bins agree as they are
        prob_true, prob_pred = calibration_curve(y, c, n_bins=n_bins, strategy="uniform")
        np.testing.assert_allclose(accuracy, prob_true, rtol=1e-12, atol=1e-12)
        np.testing.assert_allclose(confidence, prob_pred, rtol=1e-12, atol=1e-12)
    counts, edges = np.histogram(c, bins=n_bins, range=(0.0, 1.0))
    np.testing.assert_array_equal(bins["count"], counts)
    np.testing.assert_array_equal(bins["edges"], edges)


def test_reliability_bins_match_sklearn_on_random_inputs():
    for c, y, n_bins in random_cases(0, below_one=False):
        _check_against_sklearn(c, y, n_bins)


@pytest.mark.parametrize("c, y, n_bins", edge_cases(below_one=False))
def test_reliability_bins_match_sklearn_on_edge_cases(c, y, n_bins):
    _check_against_sklearn(c, y, n_bins)


def test_reliability_bins_left_edges_at_decimal_bin_counts():
    """c = b/n (the float nearest) is in bin b at the default 15 bins and at 10 (sklearn puts 0.3 in bin 2 of 10)."""
    for n_bins in (10, 15):
        c = np.arange(n_bins + 1) / n_bins
        bins = reliability_bins(c, np.ones(len(c), bool), n_bins)
        np.testing.assert_array_equal(bins["count"], [1] * (n_bins - 1) + [2])  # the last bin also holds c = 1
        np.testing.assert_array_equal(bins["confidence"][:-1], c[:-2])


# ---------------------------------------------------------------------------------------------------------------------
# ECE and MCE against torchmetrics


def _check_against_torchmetrics(c, y, n_bins):
    m = calibration_metrics(c, y, n_bins)
    preds, target = torch.tensor(c, dtype=torch.float64), torch.tensor(y, dtype=torch.long)
    for norm, key in (("l1", "ece"), ("max", "mce")):
        metric = BinaryCalibrationError(n_bins=n_bins, norm=norm)
        metric.update(preds, target)
        assert m[key] == pytest.approx(float(metric.compute()), rel=1e-12, abs=1e-12), (norm, n_bins)


def test_ece_and_mce_match_torchmetrics_on_random_inputs():
    for c, y, n_bins in random_cases(2, below_one=True):
        _check_against_torchmetrics(c, y, n_bins)


@pytest.mark.parametrize("c, y, n_bins", edge_cases(below_one=True))
def test_ece_and_mce_match_torchmetrics_on_edge_cases(c, y, n_bins):
    _check_against_torchmetrics(c, y, n_bins)


# ---------------------------------------------------------------------------------------------------------------------
# Learn then Test against MAPIE and scipy


def _pvalue_sequence(rng, length: int, level: float) -> np.ndarray:
    """p-values that often start below the level (long certified runs), with exact ties at the level."""
    p = np.where(rng.random(length) < 0.7, rng.uniform(0.0, level, length), rng.uniform(0.0, 1.0, length))
    p[rng.random(length) < 0.1] = level
    return p


def test_fixed_sequence_matches_mapie():
    rng = np.random.default_rng(3)
    for _ in range(2000):
        level = float(rng.choice([0.05, 0.1, 1.0, rng.uniform(1e-4, 1.0)]))
        p = _pvalue_sequence(rng, int(rng.integers(1, 25)), level)
        ours = np.flatnonzero(fixed_sequence(p.tolist(), level))
        np.testing.assert_array_equal(ours, control_fwer(p, level, fwer_method="fixed_sequence"))


def test_fixed_sequences_at_bonferroni_level_match_mapie_multi_start():
    """m sequences, each tested at delta / m until its first failure, reject what MAPIE's m-start fixed sequence
    rejects on the sequences laid end to end (a start that runs off its segment only repeats the next start's run)."""
    rng = np.random.default_rng(4)
    for _ in range(1000):
        m, length = int(rng.integers(1, 5)), int(rng.integers(1, 15))
        delta = float(rng.uniform(0.01, 0.3))
        p = _pvalue_sequence(rng, m * length, delta / m)
        ours = np.concatenate([fixed_sequence(p[s * length:(s + 1) * length].tolist(), delta / m) for s in range(m)])
        np.testing.assert_array_equal(np.flatnonzero(ours),
                                      FWERFixedSequenceTesting(n_starts=m).run(p, delta))


def test_binomial_pvalue_is_scipy_one_sided_binomial_test():
    rng = np.random.default_rng(5)
    cases = [(0, 1, 0.5), (1, 1, 0.5), (0, 203, 0.02), (3, 203, 0.02), (200, 200, 0.05), (0, 59, 0.05)]
    for _ in range(300):
        n = int(rng.integers(1, 600))
        cases.append((int(rng.integers(0, n + 1)), n, float(rng.uniform(0.001, 0.999))))
    for losses, n, target in cases:
        expected = binomtest(losses, n, target, alternative="less").pvalue
        assert binomial_pvalue(losses, n, target) == pytest.approx(expected, rel=1e-10, abs=1e-300), (losses, n)


@pytest.mark.parametrize("objective", ["agreement", "drop"])
def test_select_certifies_what_mapie_multi_start_rejects(objective):
    """select's `certified` flags: binomtest p-values per setting, MAPIE's m-start fixed sequence over the k_max
    sequences (taus from conservative to aggressive), family-wise level delta."""
    rng = np.random.default_rng(6 if objective == "agreement" else 7)
    taus = (0.995, 0.99, 0.95, 0.9, 0.8, 0.7, 0.6)
    for _ in range(150):
        k_maxes = sorted(int(k) for k in rng.choice([4, 8, 16], size=int(rng.integers(1, 4)), replace=False))
        n, delta = int(rng.integers(40, 300)), float(rng.choice([0.05, 0.1, 0.2]))
        target = float(rng.choice([0.9, 0.95, 0.98])) if objective == "agreement" else float(rng.choice([0.02, 0.05]))
        risk = 1.0 - target if objective == "agreement" else target
        reference = rng.random(n) < 0.6
        settings, pvalues = [], []
        for k in k_maxes:
            for i, tau in enumerate(taus):  # the loss rate grows as tau falls, around the risk
                flip = rng.random(n) < risk * (0.05 + 0.35 * i) * (k / 8)
                setting = {"tau": tau, "k_max": k, "tokens_per_forward_mean": 1.0 + i + k / 4}
                if objective == "agreement":
                    setting["agrees"] = ~flip
                    losses = int(flip.sum())
                else:
                    setting["correct"] = reference & ~flip
                    losses = int((reference & flip).sum())
                settings.append(setting)
                pvalues.append(binomtest(losses, n, risk, alternative="less").pvalue)
        out = select(None if objective == "agreement" else reference, settings, target=target, delta=delta,
                     objective=objective)
        certified = [(r["k_max"], r["tau"]) for r in out["settings"] if r["certified"]]
        rejected = FWERFixedSequenceTesting(n_starts=len(k_maxes)).run(np.array(pvalues), delta)
        assert sorted(certified) == sorted((settings[i]["k_max"], settings[i]["tau"]) for i in rejected)
