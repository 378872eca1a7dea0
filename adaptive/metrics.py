"""Acceptance metrics under the names serving people read (vLLM's speculative-decoding statistics), in one place.

Every report the decoder feeds (`mtp generate --json`, `mtp evaluate`, the lm-eval results config) computes them
here, from the per-step record of each `GenerationResult` (`accepted_per_step`, `masks_per_step`).

The mapping onto vLLM (vllm/v1/spec_decode/metrics.py: `SpecDecodingStats`, `SpecDecodingLogging.log`):

* one forward pass of the MTP decoder is one vLLM decoding step of one request: `num_drafts` = forward passes.
  Every forward commits one token of its own (the prediction at the last real token, vLLM's "bonus" token) plus the
  draft positions it keeps, so accepted drafts per forward = tokens committed − 1.
* `num_accepted_tokens` = Σ (tokens committed − 1); `mean_acceptance_length` = 1 + num_accepted_tokens / num_drafts,
  which is exactly tokens per forward (kept under that name too: the paper's "Eff. k").
* `num_accepted_tokens_per_pos[i]` = forwards that kept at least i + 1 drafts; the per-position acceptance rate is it
  divided by num_drafts (vLLM's definition: the fraction of steps whose draft survived up to position i + 1).
* `acceptance_histogram[n]` = forwards that kept exactly n drafts (n = 0 … longest), the distribution behind the mean.
* `num_draft_tokens` = draft positions offered for acceptance: the masks appended (ConfAdapt, Static) or, in the
  self-speculative mode, the drafts the forward verified (the previous forward's masks when that forward accepted all
  of its own drafts, else none); `draft_acceptance_rate` = num_accepted_tokens / num_draft_tokens.
* `tokens_per_second`: generated tokens over the wall-clock seconds the caller measured around the decoder calls.

The last forward of a row may commit fewer tokens than it read (the token budget or a stop ends the row); it counts
as it was committed.

Calibration metrics (`mtp calibrate`, adaptive/calibration.py): ECE (L1, equal-width bins, weighted by bin size), MCE
(largest bin gap), Brier score, AUROC (how well the confidence ranks correct above wrong drafts; unchanged by a
monotone map such as one temperature per position).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from distill.errors import UserError

N_BINS = 15  # reliability bins (the usual choice since Guo et al. 2017)


def _drafts_verified(accepted: list[int], masks: list[int]) -> list[int]:
    """Self-speculative mode: drafts each forward verified. The prefill verifies none; a forward proposes its masks
    as the next forward's drafts only when it accepted every draft it verified itself (adaptive/decoder.py)."""
    out, drafts = [], 0
    for kept, appended in zip(accepted, masks):
        out.append(drafts)
        drafts = appended if kept - 1 >= drafts else 0
    return out


def acceptance_metrics(results: Iterable, *, speculative: bool = False, seconds: float | None = None) -> dict:
    """vLLM-named acceptance metrics over all forwards of all `results` (GenerationResult-like: `token_ids`,
    `accepted_per_step`, `masks_per_step`). `speculative`: the results come from the self-speculative mode.
    `seconds`: wall-clock time of the decoder calls (tokens_per_second is None without it)."""
    tokens = forwards = accepted_drafts = draft_tokens = 0
    histogram: list[int] = []
    for r in results:
        accepted = [int(a) for a in r.accepted_per_step]
        masks = [int(m) for m in r.masks_per_step]
        if len(masks) != len(accepted):
            raise ValueError("accepted_per_step and masks_per_step must have one entry per forward pass")
        offered = _drafts_verified(accepted, masks) if speculative else masks
        tokens += len(r.token_ids)
        forwards += len(accepted)
        for kept, n in zip(accepted, offered):
            drafts = max(kept - 1, 0)
            accepted_drafts += drafts
            draft_tokens += n
            if drafts >= len(histogram):
                histogram.extend([0] * (drafts + 1 - len(histogram)))
            histogram[drafts] += 1
    # forwards that kept at least i + 1 drafts = the histogram's tail sums
    per_pos = [sum(histogram[i + 1 :]) for i in range(max(len(histogram) - 1, 0))]
    rate = (lambda x: x / forwards) if forwards else (lambda x: 0.0)
    return {
        "num_drafts": forwards,
        "num_draft_tokens": draft_tokens,
        "num_accepted_tokens": accepted_drafts,
        "num_accepted_tokens_per_pos": per_pos,
        "mean_acceptance_length": 1.0 + accepted_drafts / forwards if forwards else 0.0,
        "acceptance_histogram": histogram,
        "per_position_acceptance_rate": [rate(n) for n in per_pos],
        "draft_acceptance_rate": accepted_drafts / draft_tokens if draft_tokens else None,
        "tokens": tokens,
        "forward_passes": forwards,
        "tokens_per_forward": tokens / forwards if forwards else 0.0,
        "seconds": seconds,
        "tokens_per_second": tokens / seconds if seconds and seconds > 0 and math.isfinite(seconds) else None,
    }


def _as_arrays(confidence, correct) -> tuple[np.ndarray, np.ndarray]:
    c = np.asarray(confidence, dtype=np.float64).reshape(-1)
    y = np.asarray(correct).reshape(-1).astype(bool)
    if c.shape != y.shape:
        raise UserError(f"confidence and correct differ in length ({len(c)} vs {len(y)})")
    if not len(c):
        raise UserError("no samples to score")
    if not np.all(np.isfinite(c)) or c.min() < 0 or c.max() > 1:
        raise UserError("confidences must be finite and in [0, 1]")
    return c, y


def reliability_bins(confidence, correct, n_bins: int = N_BINS) -> dict:
    """Equal-width bins over [0, 1] (bin b holds b/n <= c < (b+1)/n; the last also c = 1): per-bin count, mean
    confidence and accuracy (NaN for empty bins)."""
    c, y = _as_arrays(confidence, correct)
    index = np.minimum((c * n_bins).astype(np.int64), n_bins - 1)
    count = np.bincount(index, minlength=n_bins)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean_conf = np.bincount(index, weights=c, minlength=n_bins) / count
        accuracy = np.bincount(index, weights=y, minlength=n_bins) / count
    return {"edges": np.linspace(0.0, 1.0, n_bins + 1), "count": count, "confidence": mean_conf, "accuracy": accuracy}


def calibration_metrics(confidence, correct, n_bins: int = N_BINS) -> dict:
    """ECE (sum over bins of |accuracy - confidence| weighted by the bin's share), MCE (largest such gap), Brier
    score, AUROC (None with only one class), n, accuracy and mean confidence."""
    from sklearn.metrics import roc_auc_score

    c, y = _as_arrays(confidence, correct)
    bins = reliability_bins(c, y, n_bins)
    used = bins["count"] > 0
    gap = np.abs(bins["accuracy"][used] - bins["confidence"][used])
    hits = int(y.sum())
    return {
        "n": len(c),
        "accuracy": hits / len(c),
        "mean_confidence": float(c.mean()),
        "ece": float((gap * bins["count"][used]).sum() / len(c)),
        "mce": float(gap.max()),
        "brier": float(np.mean((c - y) ** 2)),
        "auroc": float(roc_auc_score(y, c)) if 0 < hits < len(c) else None,
    }
