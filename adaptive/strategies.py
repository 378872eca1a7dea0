"""How many of the k_max tokens read in one forward pass are accepted (paper §4.1, §4.2, §6.1 item iii).

Every forward of the MTP decoder reads k_max next-token distributions: the one at the last real token (ordinary
next-token prediction) followed by one per `<MTP>` mask. A strategy turns those into a span length:

* `Static(k)`: always accept all k (paper §4.1, "Static k").
* `ConfAdapt(tau, k_max)`: accept the longest contiguous prefix whose confidence is >= tau, at least one token
  (paper §4.2, the paper's default readout).
* `SelfSpeculative(k_max)`: the mask predictions are only *drafts*; the next forward checks them against the model's
  own next-token predictions and keeps the matching prefix, so the output equals greedy decoding exactly (the paper's
  future-work item iii, §6.1). The verification itself lives in the decoder because it is tied to the KV protocol;
  this file only states the rule (`SelfSpeculative.verify`).

`k_max="auto"` (ConfAdapt and SelfSpeculative): the number of masks appended becomes a per-step choice, bounded by
k_max − 1 (`auto` = `auto:16`, `auto:N` another bound), made by the cost-aware controller of adaptive/controller.py
from the measured forward cost and the observed acceptance; with a fixed k_max every forward appends k_max − 1 masks.

Confidence is pluggable: a scorer maps logits [..., V] to a confidence [...]; the default is the top-1 softmax
probability at temperature 1 (§4.2). A fitted calibrator can be passed in its place.
"""

from __future__ import annotations

import math
from typing import Callable

import torch

from distill.errors import UserError

# One forward reads k_max positions; the paper goes up to 16. 64 bounds the per-step query length (2*k_max - 1).
MAX_K = 64
# The paper's k_max for ConfAdapt (§4.2, §7.7); used when `make_strategy` is not given one.
DEFAULT_K_MAX = 16

Scorer = Callable[[torch.Tensor], torch.Tensor]


def top1_probability(logits: torch.Tensor) -> torch.Tensor:
    """Default confidence (§4.2): max softmax probability, computed in fp32 so bf16 logits compare fairly to tau."""
    return torch.softmax(logits.float(), dim=-1).amax(dim=-1)


def _check_k(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_K:
        raise UserError(f"{what} must be an integer in [1, {MAX_K}], got {value!r}")
    return value


def parse_k_max(value) -> tuple[int, bool]:
    """k_max as given on a command line or in a config: an integer, "auto" (bound DEFAULT_K_MAX) or "auto:N".
    Returns (bound, auto)."""
    if isinstance(value, str):
        text = value.strip().lower()
        if text == "auto" or text.startswith("auto:"):
            bound = text[5:] or str(DEFAULT_K_MAX)
            try:
                return _check_k(int(bound), "the bound of k_max auto:N"), True
            except ValueError:
                raise UserError(f"k_max must be an integer, auto or auto:N, got {value!r}") from None
        try:
            value = int(text)
        except ValueError:
            raise UserError(f"k_max must be an integer, auto or auto:N, got {value!r}") from None
    return _check_k(value, "k_max"), False


def _k_max_label(k_max: int, auto: bool) -> str:
    return f"auto:{k_max}" if auto else str(k_max)


def _check_tau(tau) -> float:
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise UserError(f"tau must be a number in (0, 1], got {tau!r}") from None
    if math.isnan(tau) or not 0.0 < tau <= 1.0:
        raise UserError(f"tau must be in (0, 1], got {tau}")
    return tau


class Static:
    """Accept exactly k tokens per forward (k_max = k)."""

    name = "static"
    auto = False

    def __init__(self, k: int):
        self.k_max = _check_k(k, "k")

    @property
    def label(self) -> str:
        return f"static(k={self.k_max})"

    def __repr__(self) -> str:
        return f"Static(k={self.k_max})"

    def accept_counts(self, logits: torch.Tensor) -> torch.LongTensor:
        """logits [B, k_max, V] -> number of tokens to accept per row [B]."""
        return torch.full((logits.shape[0],), self.k_max, dtype=torch.long, device=logits.device)


class ConfAdapt:
    """Accept the longest contiguous run of confidence >= tau starting at position 1; always at least one (§4.2).

    Example (§4.2): confidences [0.95, 0.92, 0.85, 0.97], tau = 0.9 -> 2 tokens (the 0.97 after a miss does not count).
    """

    name = "confadapt"

    def __init__(self, tau: float, k_max: int | str, scorer: Scorer | None = None):
        self.tau = _check_tau(tau)
        self.k_max, self.auto = parse_k_max(k_max)
        if scorer is not None and not callable(scorer):
            raise UserError(f"scorer must be callable(logits) -> confidence, got {type(scorer).__name__}")
        self.scorer = scorer or top1_probability

    @property
    def label(self) -> str:
        calibrated = "" if self.scorer is top1_probability else ",calibrated"
        return f"confadapt(tau={self.tau:g},k_max={_k_max_label(self.k_max, self.auto)}{calibrated})"

    def __repr__(self) -> str:
        return f"ConfAdapt(tau={self.tau:g}, k_max={_k_max_label(self.k_max, self.auto)!r})"

    def accept_counts_from_confidence(self, confidence: torch.Tensor) -> torch.LongTensor:
        """confidence [B, n] (n <= k_max positions read) -> n = max{m >= 1 : c_j >= tau for all j <= m} (n = 1 if c_1 < tau)."""
        run = (confidence >= self.tau).long().cumprod(dim=-1).sum(dim=-1)
        return run.clamp(min=1)

    def accept_counts(self, logits: torch.Tensor) -> torch.LongTensor:
        """logits [B, n, V] (the n <= k_max positions read this forward) -> number of tokens to accept per row [B]."""
        confidence = self.scorer(logits)
        if confidence.shape != logits.shape[:-1]:
            raise UserError(f"scorer returned shape {tuple(confidence.shape)}, expected {tuple(logits.shape[:-1])}")
        return self.accept_counts_from_confidence(confidence)


class SelfSpeculative:
    """Lossless: mask predictions are drafts, verified by the next forward's own next-token predictions.

    With pending tokens [a, d_1..d_n] fed in one forward, the logit at a gives g_1 and the logit at d_i gives g_{i+1}
    (plain greedy predictions, each conditioned on a correct prefix as long as the drafts before it matched).
    The longest prefix with d_i == g_i is kept, plus the bonus token g_{j+1}: exactly what greedy decoding would emit.
    """

    name = "selfspec"

    def __init__(self, k_max: int | str):
        self.k_max, self.auto = parse_k_max(k_max)

    @property
    def label(self) -> str:
        return f"selfspec(k_max={_k_max_label(self.k_max, self.auto)})"

    def __repr__(self) -> str:
        return f"SelfSpeculative(k_max={_k_max_label(self.k_max, self.auto)!r})"

    @staticmethod
    def verify(drafts: list[int], greedy: list[int]) -> int:
        """Number j of drafts kept: longest prefix with drafts[i] == greedy[i]; greedy[j] is then the bonus token."""
        j = 0
        while j < len(drafts) and drafts[j] == greedy[j]:
            j += 1
        return j


STRATEGIES = ("static", "confadapt", "selfspec")
DEFAULT_STRATEGY, DEFAULT_TAU = "confadapt", 0.9  # paper §4.2, §7.7


def decoding_defaults(generation_config, trained_k_max=None) -> dict:
    """{"strategy", "k_max", "tau"}: the decoding defaults a generation config records (`mtp_strategy`, `mtp_k_max`,
    `mtp_tau`, written by `mtp export` and `mtp tune`), else the paper's. Without a fixed k_max the controller
    chooses, bounded by the k_max the model was trained with (`config.mtp_k_max`): "auto:N"."""
    tuned = getattr(generation_config, "mtp_k_max", None)
    return {
        "strategy": getattr(generation_config, "mtp_strategy", None) or DEFAULT_STRATEGY,
        "k_max": (tuned if isinstance(tuned, str) else int(tuned)) if tuned else
                 f"auto:{int(trained_k_max or DEFAULT_K_MAX)}",
        "tau": float(getattr(generation_config, "mtp_tau", None) or DEFAULT_TAU),
    }


def make_strategy(name: str, *, k: int | None = None, tau: float | None = None, k_max: int | None = None,
                  scorer: Scorer | None = None):
    """Build a strategy from command-line style values (`scorer`: ConfAdapt's confidence, e.g. a fitted calibrator).

    static: k (k_max accepted as a synonym). confadapt: tau (required) and k_max (k as a synonym; default 16).
    selfspec: k_max (k as a synonym; default 16). confadapt and selfspec also take k_max "auto" / "auto:N". A value a strategy does not use (tau for static) is ignored;
    two values that contradict each other (k=3, k_max=4 for static) are an error.
    """
    key = str(name).strip().lower()
    if key not in STRATEGIES:
        raise UserError(f"unknown strategy {name!r}; choose one of: {', '.join(STRATEGIES)}")
    if k is not None:
        _check_k(k, "k")
    if k_max is not None and parse_k_max(k_max)[1]:
        if key == "static":
            raise UserError("k_max auto chooses the masks per step: it is for confadapt and selfspec, not static")
        if k is not None:
            raise UserError(f"strategy {key}: k={k} and k_max={k_max} disagree")
    elif k_max is not None:
        k_max = parse_k_max(k_max)[0]
    if k is not None and k_max is not None and k != k_max:
        raise UserError(f"strategy {key} reads one span length per forward: k={k} and k_max={k_max} disagree")
    span = k if k is not None else k_max
    if key == "static":
        if span is None:
            raise UserError("strategy static needs k (tokens per forward)")
        return Static(span)
    if key == "confadapt":
        if tau is None:
            raise UserError("strategy confadapt needs tau (confidence threshold in (0, 1])")
        return ConfAdapt(tau, span if span is not None else DEFAULT_K_MAX, scorer=scorer)
    return SelfSpeculative(span if span is not None else DEFAULT_K_MAX)


def build_strategy(defaults: dict, name: str | None, *, k: int | None, tau: float | None, k_max: int | None,
                   scorer=None):
    """Command-line values override the model's defaults; make_strategy validates them (UserError). `scorer`:
    ConfAdapt's confidence (a fitted calibrator), ignored by the other strategies."""
    name = name or defaults["strategy"]
    if name == "static":
        if k is None and k_max is None:
            if defaults["strategy"] != "static":
                raise UserError("--strategy static needs --k (tokens per forward pass)")
            k = defaults["k_max"]
        return make_strategy(name, k=k, k_max=k_max)
    if k is None and k_max is None:
        k_max = defaults["k_max"]
    tau = defaults["tau"] if tau is None else tau
    if name == "confadapt":
        return make_strategy(name, k=k, k_max=k_max, tau=tau, scorer=scorer)
    return make_strategy(name, k=k, k_max=k_max)
