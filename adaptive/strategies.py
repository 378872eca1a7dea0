"""How many of the k_max tokens read in one forward pass are accepted (paper §4.1, §4.2, §6.1 item iii).

Every forward of the MTP decoder reads k_max next-token distributions: the one at the last real token (ordinary
next-token prediction) followed by one per `<MTP>` mask. A strategy turns those into a span length:

* `Static(k)`: always accept all k (paper §4.1, "Static k").
* `ConfAdapt(tau, k_max)`: accept the longest contiguous prefix whose confidence is >= tau, at least one token
  (paper §4.2, the paper's default readout).
* `SelfSpeculative(k_max)`: the mask predictions are only *drafts*; the next forward checks them against the model's
  own next-token predictions and keeps the matching prefix, so the output equals greedy decoding exactly (the paper's
  future-work item iii, §6.1). The strategy decides which drafts are kept (`SelfSpeculative.verify`); the decoder
  commits that decision to the KV cache (rejected drafts become attention-mask holes).

`Strategy` is what the decode loop of adaptive/decoder.py asks of all three: its k_max, whether k_max is auto,
whether it feeds drafts to be verified, and, given one forward's logits, what each row accepts (`Accepted`). The loop
itself has no per-strategy branches.

`k_max="auto"` (ConfAdapt and SelfSpeculative): the number of masks appended becomes a per-step choice, bounded by
k_max − 1 (`auto` = `auto:16`, `auto:N` another bound), made by the cost-aware controller of adaptive/controller.py
from the measured forward cost and the observed acceptance; with a fixed k_max every forward appends k_max − 1 masks.

Confidence is pluggable: a scorer maps logits [..., V] to a confidence [...]; the default is the top-1 softmax
probability at temperature 1 (§4.2). A fitted calibrator can be passed in its place.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Protocol

import torch

from distill.decoding_defaults import DEFAULT_K_MAX, STRATEGIES, check_tau
from distill.errors import UserError

# One forward reads k_max positions; the paper goes up to 16. 64 bounds the per-step query length (2*k_max - 1).
MAX_K = 64

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


@dataclass
class Accepted:
    """What one row takes from one forward: a strategy's decision, which the decoder commits (KV, text, controller)."""

    tokens: list[int]  # appended to the row's text, before the decoder's budget and stop cuts
    committed: int  # pending tokens whose KV this forward keeps: all of them but rejected drafts
    pending: list[int]  # fed the next forward (the tokens just accepted, or [bonus] + new drafts)
    drafts: int  # how many trailing tokens of `pending` are unverified drafts
    run: int  # the span controller's observation (adaptive/controller.py): positions kept ...
    read: int  # ... out of this many mask positions read (ConfAdapt) or drafts verified (self-speculative)


class Strategy(Protocol):
    """What the decode loop (adaptive/decoder.py) asks of a decoding strategy; Static, ConfAdapt and SelfSpeculative
    implement it. One forward feeds each row's pending tokens and `masks` <MTP> masks and reads, per row, the logits
    at its last 1 + drafts + masks query tokens: the last verified token, every draft fed (self-speculative only) and
    every mask."""

    name: str  # "static" | "confadapt" | "selfspec": the command-line name
    k_max: int  # positions read per forward at most: the next-token position and up to k_max − 1 masks (§4.1)
    auto: bool  # k_max auto: the span controller chooses each forward's masks, 0 … k_max − 1 (§4.2, §5.7)
    speculative: bool  # the masks' argmaxes are drafts the next forward verifies (self-speculative, §6.1 item iii)

    @property
    def label(self) -> str:
        """Name and settings, e.g. "confadapt(tau=0.9,k_max=auto:16)": report column and span-controller memory key."""

    def accept(self, logits: torch.Tensor, pending: list[list[int]], drafts: list[int],
               masks: int) -> list[Accepted]:
        """One forward's decision per row. `logits` [B, n, V]: row b's read positions are its last
        1 + drafts[b] + masks (rows with fewer drafts are left-padded); `pending[b]`: the tokens row b fed, of which
        the last `drafts[b]` are drafts. Static keeps k (§4.1), ConfAdapt the longest confident run (§4.2),
        SelfSpeculative the verified drafts plus the bonus token (§6.1 item iii)."""


def accept_prefixes(counts: list[int], logits: torch.Tensor, pending: list[list[int]], masks: int) -> list[Accepted]:
    """Static and ConfAdapt (§4.1, §4.2): row b accepts the argmaxes of its first counts[b] read positions (the
    next-token position, then the masks), and its pending tokens all keep their KV."""
    preds = logits[:, logits.shape[1] - (masks + 1) :].argmax(dim=-1).tolist()
    return [Accepted(tokens=p[:n], committed=len(fed), pending=p[:n], drafts=0, run=n - 1, read=masks)
            for p, n, fed in zip(preds, counts, pending)]


class Static:
    """Accept exactly k tokens per forward (k_max = k)."""

    name = "static"
    auto = False
    speculative = False

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

    def accept(self, logits: torch.Tensor, pending: list[list[int]], drafts: list[int],
               masks: int) -> list[Accepted]:
        """All k read positions (§4.1, "Static k"); see `Strategy.accept`."""
        return accept_prefixes(self.accept_counts(logits[:, logits.shape[1] - (masks + 1) :]).tolist(), logits,
                               pending, masks)


class ConfAdapt:
    """Accept the longest contiguous run of confidence >= tau starting at position 1; always at least one (§4.2).

    Example (§4.2): confidences [0.95, 0.92, 0.85, 0.97], tau = 0.9 -> 2 tokens (the 0.97 after a miss does not count).
    """

    name = "confadapt"
    speculative = False

    def __init__(self, tau: float, k_max: int | str, scorer: Scorer | None = None):
        self.tau = check_tau(tau)
        self.k_max, self.auto = parse_k_max(k_max)
        if scorer is not None and not callable(scorer):
            raise UserError(f"scorer must be callable(logits) -> confidence, got {type(scorer).__name__}")
        self.scorer = scorer or top1_probability

    @property
    def tau_scale(self) -> str:
        """What tau thresholds: "raw" (the paper's top-1 probability) or "calibrated" (a fitted calibrator's)."""
        return "raw" if self.scorer is top1_probability else "calibrated"

    @property
    def label(self) -> str:
        return f"confadapt(tau={self.tau:g},k_max={_k_max_label(self.k_max, self.auto)},{self.tau_scale})"

    def __repr__(self) -> str:
        return f"ConfAdapt(tau={self.tau:g}, k_max={_k_max_label(self.k_max, self.auto)!r}, {self.tau_scale})"

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

    def accept(self, logits: torch.Tensor, pending: list[list[int]], drafts: list[int],
               masks: int) -> list[Accepted]:
        """The longest run of confidence >= tau over the masks + 1 positions read (§4.2); see `Strategy.accept`.
        Without masks (a plain step of the span controller) the one token is taken without scoring it."""
        if masks == 0:
            return accept_prefixes([1] * logits.shape[0], logits, pending, 0)
        return accept_prefixes(self.accept_counts(logits[:, logits.shape[1] - (masks + 1) :]).tolist(), logits,
                               pending, masks)


class SelfSpeculative:
    """Lossless: mask predictions are drafts, verified by the next forward's own next-token predictions.

    With pending tokens [a, d_1..d_n] fed in one forward, the logit at a gives g_1 and the logit at d_i gives g_{i+1}
    (plain greedy predictions, each conditioned on a correct prefix as long as the drafts before it matched).
    The longest prefix with d_i == g_i is kept, plus the bonus token g_{j+1}: exactly what greedy decoding would emit.
    """

    name = "selfspec"
    speculative = True

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

    def accept(self, logits: torch.Tensor, pending: list[list[int]], drafts: list[int],
               masks: int) -> list[Accepted]:
        """Verification (§6.1 item iii): row b fed [a, d_1..d_n] (n = drafts[b]); its logits at a, d_1..d_n give the
        greedy g_1..g_{n+1}. It accepts d_1..d_j and the bonus g_{j+1}; the n − j rejected drafts lose their KV. If
        every draft was kept, the masks saw the right tokens and their argmaxes are the next drafts; otherwise the
        next forward has none. See `Strategy.accept`."""
        preds = logits.argmax(dim=-1).tolist()
        n_read = logits.shape[1]
        out = []
        for p, fed, nd in zip(preds, pending, drafts):
            greedy = p[n_read - masks - 1 - nd : n_read - masks]  # g_1 .. g_{nd+1}
            offered = fed[len(fed) - nd :]
            j = self.verify(offered, greedy)
            next_drafts = p[n_read - masks :] if j == nd else []
            out.append(Accepted(tokens=offered[:j] + [greedy[j]], committed=len(fed) - (nd - j),
                                pending=[greedy[j]] + next_drafts, drafts=len(next_drafts), run=j, read=nd))
        return out


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
