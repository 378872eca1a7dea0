"""Calibration samples: one per verified draft token of a self-speculative run, with its confidence and its label.

Labels for free (self-speculative verification, the paper's future-work item iii). In SelfSpeculative(k_max) mode a
forward feeds [a, d_1..d_n] + masks; the logits at a, d_1..d_n are the model's greedy predictions g_1..g_{n+1}, and the
drafts d_i are the previous forward's mask argmaxes. So draft d_i was predicted by mask i of the previous forward (span
position j = i + 1; its confidence comes from those mask logits) and its label is correct = (d_i == g_i): the model's
own greedy token given the committed prefix plus the earlier span tokens, the student-forced label the training
objective uses (§2.2). The run itself is lossless (the model's own greedy tokens, up to floating-point near-ties), so it
doubles as the k=1 reference of an evaluation: the labels cost no extra forward.

Position 1 is the ordinary next-token prediction, by definition the greedy token: it gets no label and keeps the paper's
raw confidence, so ConfAdapt's gate on c_1 keeps its meaning. The collector's samples are the drafts at positions j >=
2.

Refits never need the [V]-sized logits again: every sample keeps log c_T on TEMPERATURE_GRID (41 temperatures from
1/16 to 16, exact there), and between grid points log c_T is a cubic spline in log T (measured on SmolLM2 logits:
|error in c| < 1e-3). The fitting itself is adaptive/calibration.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from adaptive.strategies import MAX_K, SelfSpeculative, top1_probability
from distill.errors import UserError

# log c_T is stored at these temperatures for every sample: 2^(e/5), 1/16 .. 16, with 1 on the grid.
TEMPERATURE_GRID = tuple(2.0 ** (e / 5) for e in range(-20, 21))
VOCAB_BLOCK = 256  # logits processed per block when computing the grid (measured fastest on CPU)


# ---------------------------------------------------------------------------------------------------------------------
# Samples
# ---------------------------------------------------------------------------------------------------------------------
def confidence_statistics(logits: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    """logits [N, V] -> (raw top-1 probability [N], log c_T at TEMPERATURE_GRID [N, G]), in fp32 on the logits' device.

    With gaps g = z - max(z) <= 0, c_T = 1 / sum_v exp(g_v / T), so log c_T = -log sum exp(g / T): no overflow at any T.
    """
    z = logits.float()
    gaps = z - z.amax(dim=-1, keepdim=True)
    inverse = torch.tensor([1.0 / t for t in TEMPERATURE_GRID], dtype=torch.float32, device=z.device)[:, None]
    sums = torch.zeros(len(z), len(TEMPERATURE_GRID), dtype=torch.float32, device=z.device)
    for start in range(0, z.shape[-1], VOCAB_BLOCK):  # all temperatures per vocabulary block: stays in cache
        scaled = gaps[:, None, start : start + VOCAB_BLOCK] * inverse  # [N, G, block]
        # Clamped at -80: exp underflowing into subnormals is ~20x slower on CPUs, and a term below e^-80 changes a
        # sum that is >= 1 by less than V * 2e-35.
        sums += scaled.clamp_(min=-80.0).exp_().sum(dim=-1)
    return top1_probability(z).double().cpu().numpy(), sums.log().neg().cpu().numpy()


def spline_weights(temperatures) -> np.ndarray:
    """[len(temperatures), G]: row t holds the weights that interpolate log c_T from its grid values (a cubic spline
    in log T is linear in the values it interpolates, so one matrix serves every sample)."""
    from scipy.interpolate import CubicSpline

    grid = np.log(np.asarray(TEMPERATURE_GRID))
    x = np.clip(np.log(np.atleast_1d(np.asarray(temperatures, dtype=np.float64))), grid[0], grid[-1])
    return CubicSpline(grid, np.eye(len(grid)), axis=0)(x)


@dataclass
class CalibrationSamples:
    """One entry per verified draft token (numpy arrays of equal length)."""

    position: np.ndarray  # int, 1-based position j in the span (j >= 2: mask predictions; j = 1 is the NTP token)
    confidence: np.ndarray  # float, raw top-1 softmax probability at temperature 1
    correct: np.ndarray  # bool, draft == the model's own greedy token given prefix + earlier span tokens
    log_conf_grid: np.ndarray  # float32 [N, len(TEMPERATURE_GRID)]: log c_T of the same logits at each grid T
    prompt: np.ndarray  # int, which prompt the draft came from (distinct prompts numbered in the order first decoded)
    k_max: int = 0  # span length of the collection run

    def __post_init__(self):
        self.position = np.asarray(self.position, dtype=np.int64).reshape(-1)
        self.confidence = np.asarray(self.confidence, dtype=np.float64).reshape(-1)
        self.correct = np.asarray(self.correct, dtype=bool).reshape(-1)
        self.log_conf_grid = np.asarray(self.log_conf_grid, dtype=np.float32).reshape(-1, len(TEMPERATURE_GRID))
        self.prompt = np.asarray(self.prompt, dtype=np.int64).reshape(-1)
        n = len(self.position)
        if any(len(a) != n for a in (self.confidence, self.correct, self.log_conf_grid, self.prompt)):
            raise UserError("calibration samples: position, confidence, correct, log_conf_grid and prompt differ in "
                            "length")
        self.k_max = int(max(self.k_max, self.position.max(initial=0)))

    def __len__(self) -> int:
        return len(self.position)

    @classmethod
    def from_logits(cls, logits: torch.Tensor, position, correct, prompt=None, k_max: int = 0) -> CalibrationSamples:
        """Samples from the logits [N, V] that predicted N tokens, their span positions and labels."""
        confidence, log_conf = confidence_statistics(logits)
        prompt = np.zeros(len(confidence), dtype=np.int64) if prompt is None else prompt
        return cls(position, confidence, correct, log_conf, prompt, k_max)

    @classmethod
    def empty(cls, k_max: int = 0) -> CalibrationSamples:
        return cls(np.zeros(0), np.zeros(0), np.zeros(0), np.zeros((0, len(TEMPERATURE_GRID))), np.zeros(0), k_max)

    def subset(self, index) -> CalibrationSamples:
        """The samples selected by a boolean mask or an index array."""
        return CalibrationSamples(self.position[index], self.confidence[index], self.correct[index],
                                  self.log_conf_grid[index], self.prompt[index], self.k_max)

    def confidence_at(self, temperature: float) -> np.ndarray:
        """c_T of every sample: exact at grid temperatures, a cubic spline in log T between them."""
        t = float(temperature)
        if not TEMPERATURE_GRID[0] <= t <= TEMPERATURE_GRID[-1]:
            raise UserError(f"temperature {t:g} is outside the stored grid [{TEMPERATURE_GRID[0]:g}, "
                            f"{TEMPERATURE_GRID[-1]:g}]")
        log_conf = self.log_conf_grid.astype(np.float64) @ spline_weights(t)[0]
        return np.exp(np.minimum(log_conf, 0.0))


def split_by_prompt(samples: CalibrationSamples, fraction: float = 0.5, seed: int = 0
                    ) -> tuple[CalibrationSamples, CalibrationSamples]:
    """(fit, held_out): whole prompts on each side, a seeded random `fraction` of the prompts for fitting. Drafts of
    one generation are strongly correlated, so splitting samples instead of prompts would overstate held-out quality."""
    prompts = np.unique(samples.prompt)
    if len(prompts) < 2:
        raise UserError(f"need drafts from at least 2 prompts to hold some out, got {len(prompts)}")
    n_fit = min(max(1, round(fraction * len(prompts))), len(prompts) - 1)
    fit_prompts = np.random.default_rng(seed).permutation(prompts)[:n_fit]
    in_fit = np.isin(samples.prompt, fit_prompts)
    return samples.subset(in_fit), samples.subset(~in_fit)


# ---------------------------------------------------------------------------------------------------------------------
# Collection during a self-speculative run
# ---------------------------------------------------------------------------------------------------------------------
class ConfidenceCollector:
    """`decoder.generate(..., SelfSpeculative(k_max), on_step=collector)` with `collector = ConfidenceCollector(k_max)`,
    then `collector.samples()`.

    Keeps, per row, the mask logits of its last forward. When the next forward feeds drafts, they are those masks'
    argmaxes: the confidence statistics come from the stored mask logits, the labels from this forward's greedy
    predictions at [a, d_1..d_{n-1}]. Only drafts that are actually verified become samples.
    """

    def __init__(self, k_max: int):
        if isinstance(k_max, bool) or not isinstance(k_max, int) or not 2 <= k_max <= MAX_K:
            raise UserError(f"calibration needs k_max in [2, {MAX_K}] (position 1 is always the greedy token), "
                            f"got {k_max!r}")
        self.k_max = k_max
        self._masks: dict[int, torch.Tensor] = {}  # batch row -> mask logits [k_max - 1, V] of its last forward
        self._row_prompt: dict[int, int] = {}  # batch row -> prompt number
        self._prompt_numbers: dict[tuple[int, ...], int] = {}  # prompt token ids -> prompt number
        self._parts: list[CalibrationSamples] = []

    def __call__(self, trace) -> None:
        K = self.k_max - 1
        if trace.step == 0:  # a new `generate` call: batch row indices start over
            self._masks.clear()
            self._row_prompt.clear()
        sources, drafts, greedy, positions, prompts = [], [], [], [], []
        for b, row in enumerate(trace.rows):
            logits, query = trace.logits[b], trace.query_ids[b]
            n_drafts = logits.shape[0] - self.k_max  # logits at [a, d_1..d_n, masks]
            if n_drafts < 0:
                raise UserError(f"ConfidenceCollector(k_max={self.k_max}) saw a forward reading {logits.shape[0]} "
                                "positions; decode with SelfSpeculative of the same k_max")
            pending = query[: len(query) - K]
            if trace.step == 0:  # prefill: the pending tokens are the whole prompt
                self._row_prompt[row] = self._prompt_numbers.setdefault(tuple(pending),
                                                                        len(self._prompt_numbers))
            if n_drafts:
                fed = pending[len(pending) - n_drafts :]
                source = self._masks.get(row)
                if source is None or source[:n_drafts].argmax(dim=-1).tolist() != fed:
                    raise UserError("the drafts fed are not the previous forward's mask argmaxes; ConfidenceCollector "
                                    f"needs a SelfSpeculative(k_max={self.k_max}) run")
                sources.append(source[:n_drafts])
                drafts += fed
                greedy += logits[:n_drafts].argmax(dim=-1).tolist()  # g_1..g_n
                positions += range(2, 2 + n_drafts)  # d_i came from mask i: span position i + 1
                prompts += [self._row_prompt.get(row, -1)] * n_drafts
            self._masks[row] = logits[logits.shape[0] - K :]
        if sources:
            correct = np.asarray(drafts) == np.asarray(greedy)
            self._parts.append(CalibrationSamples.from_logits(torch.cat(sources), positions, correct, prompts,
                                                              self.k_max))

    def samples(self) -> CalibrationSamples:
        if not self._parts:
            return CalibrationSamples.empty(self.k_max)
        return CalibrationSamples(*(np.concatenate([getattr(p, f) for p in self._parts])
                                    for f in ("position", "confidence", "correct", "log_conf_grid", "prompt")),
                                  k_max=self.k_max)


def collect(decoder, prompts: list[str] | list[list[int]], k_max: int, *, max_new_tokens: int = 256,
            chat_template: bool = True, batch_size: int = 16, progress: bool = False, on_step=None
            ) -> tuple[CalibrationSamples, list]:
    """Decode `prompts` with SelfSpeculative(k_max) while collecting (position, confidence, correct) samples.

    Returns (samples, results); the results are the model's greedy decoding (self-speculative is lossless, up to
    floating-point near-ties), so callers can
    reuse them as the k=1 reference. Text prompts go through `generate_text` (chat template unless told otherwise);
    token-id lists are decoded as they are. `on_step`: another hook, also called with every step's trace.
    """
    collector = ConfidenceCollector(k_max)
    strategy = SelfSpeculative(k_max)

    def hook(trace):
        collector(trace)
        if on_step is not None:
            on_step(trace)

    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    if all(isinstance(p, str) for p in prompts):
        results = decoder.generate_text(prompts, strategy, max_new_tokens=max_new_tokens,
                                        chat_template=chat_template, batch_size=batch_size, progress=progress,
                                        on_step=hook)
    elif all(isinstance(p, (list, tuple)) for p in prompts):
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
        results = []
        with tqdm(total=len(prompts), desc=f"collect {strategy.name}", unit="prompt", disable=not progress) as bar:
            for start in range(0, len(prompts), batch_size):
                chunk = prompts[start : start + batch_size]
                results += decoder.generate(chunk, strategy, max_new_tokens=max_new_tokens, on_step=hook)
                bar.update(len(chunk))
    else:
        raise UserError("prompts must be all strings or all token-id lists")
    return collector.samples(), results
