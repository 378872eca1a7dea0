"""Calibrated per-position confidence for ConfAdapt (paper §4.2), fitted on the model's own rollouts.

    mtp calibrate --model DIR [--dataset PATH|hub] [--n 32] [--k-max K] [--method temperature|isotonic]

Why. ConfAdapt accepts the longest run of span positions whose confidence c_j >= tau (§4.2), with c_j the raw top-1
softmax probability of the j-th prediction of one forward. The masks' raw probabilities are not calibrated: a
distilled model can be over-confident at far positions and under-confident at near ones, so one tau means a different
error rate at every j. A calibrator maps each position's logits to P(the token is what greedy decoding would write),
so tau reads as that probability at every position. It is saved beside the model (CALIBRATION_FILE) and ConfAdapt
takes it as its scorer.

Labels for free (self-speculative verification, the paper's future-work item iii). In SelfSpeculative(k_max) mode a
forward feeds [a, d_1..d_n] + masks; the logits at a, d_1..d_n are the model's greedy predictions g_1..g_{n+1}, and the
drafts d_i are the previous forward's mask argmaxes. So draft d_i was predicted by mask i of the previous forward (span
position j = i + 1; its confidence comes from those mask logits) and its label is correct = (d_i == g_i): the model's
own greedy token given the committed prefix plus the earlier span tokens, the student-forced label the training
objective uses (§2.2). The run itself is exactly greedy decoding, so it doubles as the k=1 reference of an evaluation:
the labels cost no extra forward.

Position 1 is the ordinary next-token prediction, by definition the greedy token: it gets no label and keeps the
paper's raw confidence, so ConfAdapt's gate on c_1 keeps its meaning. Positions j >= 2 are calibrated.

Methods (one fit per position j; a position with fewer than MIN_POSITION_SAMPLES samples, or only one class, uses the
fit pooled over all j >= 2; positions beyond the fitted k_max reuse the last fitted one):
* "temperature": c_j = max softmax(z / T_j), T_j minimising the binary log loss of `correct` under c_{T_j} (temperature
  scaling, Guo et al. 2017, here per position and on the top-1 event). Monotone in the logits: the token is unchanged.
* "isotonic": a monotone piecewise-linear map raw c_j -> P(correct) (scikit-learn's IsotonicRegression), stored as
  its breakpoints.

Refits never need the [V]-sized logits again: every sample keeps log c_T on TEMPERATURE_GRID (41 temperatures from
1/16 to 16, exact there), and between grid points log c_T is a cubic spline in log T (measured on SmolLM2 logits:
|error in c| < 1e-3). The fitted T_j is then exact in `Calibrator.__call__`, which recomputes from the logits.

Metrics: ECE (L1, equal-width bins, weighted by bin size), MCE (largest bin gap), Brier score, AUROC (how well the
confidence ranks correct above wrong drafts; unchanged by a monotone map such as one temperature per position).
"""

from __future__ import annotations

import json
import math
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from adaptive.strategies import MAX_K, SelfSpeculative, top1_probability
from distill.errors import UserError
from distill.files import replace_atomically

CALIBRATION_FILE = "mtp_calibration.json"  # saved in the model directory
FILE_FORMAT, FILE_VERSION = "mtp-calibration", 1
METHODS = ("temperature", "isotonic")
# log c_T is stored at these temperatures for every sample: 2^(e/5), 1/16 .. 16, with 1 on the grid.
TEMPERATURE_GRID = tuple(2.0 ** (e / 5) for e in range(-20, 21))
# The temperature fit searches this finer log-spaced grid (steps of 0.7%) through the spline.
FIT_TEMPERATURES = np.exp(np.linspace(math.log(TEMPERATURE_GRID[0]), math.log(TEMPERATURE_GRID[-1]), 801))
VOCAB_BLOCK = 256  # logits processed per block when computing the grid (measured fastest on CPU)
MIN_POSITION_SAMPLES = 50  # fewer samples at one position: use the pooled fit there
N_BINS = 15  # reliability bins (the usual choice since Guo et al. 2017)
DEFAULT_N = 32  # prompts `mtp calibrate` decodes


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


def _spline_weights(temperatures) -> np.ndarray:
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
        log_conf = self.log_conf_grid.astype(np.float64) @ _spline_weights(t)[0]
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

    Returns (samples, results); the results are exactly greedy decoding (self-speculative is lossless), so callers can
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


# ---------------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------------
def _log_loss_curve(samples: CalibrationSamples, temperatures: np.ndarray) -> np.ndarray:
    """Mean binary log loss of `correct` under c_T, for every T in `temperatures` (chunked: N x len(T) floats)."""
    weights = _spline_weights(temperatures).T  # [G, F]
    total = np.zeros(len(temperatures))
    floor = math.log1p(-1e-7)  # c <= 1 - 1e-7, so a wrong draft at c = 1.0 costs 16 nats, not infinity
    for start in range(0, len(samples), 4096):
        log_c = np.minimum(samples.log_conf_grid[start : start + 4096].astype(np.float64) @ weights, floor)
        y = samples.correct[start : start + 4096, None]
        total -= np.where(y, log_c, np.log(-np.expm1(log_c))).sum(axis=0)
    return total / max(len(samples), 1)


def _fit_temperature(samples: CalibrationSamples) -> dict:
    loss = _log_loss_curve(samples, FIT_TEMPERATURES)
    best = int(np.argmin(loss))
    return {"temperature": float(f"{FIT_TEMPERATURES[best]:.6g}"), "log_loss": float(loss[best])}


def _fit_isotonic(samples: CalibrationSamples) -> dict:
    from sklearn.isotonic import IsotonicRegression

    iso = IsotonicRegression(increasing=True, y_min=0.0, y_max=1.0, out_of_bounds="clip")
    iso.fit(samples.confidence, samples.correct.astype(np.float64))
    return {"x": [float(v) for v in iso.X_thresholds_], "y": [float(v) for v in iso.y_thresholds_]}


def fit(samples: CalibrationSamples, method: str = "temperature", *,
        min_samples: int = MIN_POSITION_SAMPLES) -> Calibrator:
    """Per-position calibrator for positions 2..k_max (pooled fit where a position has too few samples or one class).
    Its `metrics` hold the in-sample before/after numbers; score held-out prompts for an honest estimate."""
    if method not in METHODS:
        raise UserError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
    samples = samples.subset(samples.position >= 2)
    if not len(samples):
        raise UserError("no draft tokens to fit: collect with SelfSpeculative(k_max >= 2) on prompts that generate "
                        "more than one token")
    fit_one = _fit_temperature if method == "temperature" else _fit_isotonic
    pooled = {**fit_one(samples), "n": len(samples)}
    positions = {}
    for j in range(2, samples.k_max + 1):
        at_j = samples.subset(samples.position == j)
        n, hits = len(at_j), int(at_j.correct.sum())
        if n >= min_samples and 0 < hits < n:
            positions[j] = {**fit_one(at_j), "n": n, "source": "position"}
        else:
            positions[j] = {**{k: v for k, v in pooled.items() if k != "n"}, "n": n, "source": "pooled"}
    calibrator = Calibrator(method, positions, pooled=pooled, k_max=samples.k_max, n_samples=len(samples),
                            n_prompts=len(np.unique(samples.prompt)))
    calibrator.metrics = {
        "on": "the fitting samples (in-sample)",
        "before": calibration_metrics(samples.confidence, samples.correct),
        "after": calibration_metrics(calibrator.calibrate_samples(samples), samples.correct),
    }
    return calibrator


# ---------------------------------------------------------------------------------------------------------------------
# The calibrator: a ConfAdapt scorer
# ---------------------------------------------------------------------------------------------------------------------
def _interp(x: torch.Tensor, xp: torch.Tensor, fp: torch.Tensor) -> torch.Tensor:
    """np.interp for tensors: piecewise linear through (xp, fp), constant beyond the ends."""
    if len(xp) == 1:
        return fp[0].expand_as(x).clone()
    idx = torch.searchsorted(xp, x.contiguous(), right=True).clamp(1, len(xp) - 1)
    x0, x1, y0, y1 = xp[idx - 1], xp[idx], fp[idx - 1], fp[idx]
    w = ((x - x0) / (x1 - x0).clamp_min(1e-12)).clamp(0.0, 1.0)
    return y0 + w * (y1 - y0)


class Calibrator:
    """Maps logits [..., k, V] of one forward to calibrated confidences [..., k]; pass it to ConfAdapt as `scorer`.

    Position 1 keeps the raw top-1 probability; position j >= 2 uses its fitted parameters (the last fitted position's
    beyond k_max). Computed in fp32 on the logits' device.
    """

    def __init__(self, method: str, positions: dict[int, dict], *, pooled: dict, k_max: int, n_samples: int,
                 n_prompts: int, metrics: dict | None = None):
        if method not in METHODS:
            raise UserError(f"unknown calibration method {method!r}; choose one of: {', '.join(METHODS)}")
        if not positions:
            raise UserError("a calibrator needs parameters for at least position 2")
        self.method = method
        self.positions = {int(j): dict(p) for j, p in sorted(positions.items())}
        self.pooled = dict(pooled)
        self.k_max = int(k_max)
        self.n_samples, self.n_prompts = int(n_samples), int(n_prompts)
        self.metrics = metrics or {}
        self._tensors: dict[tuple, tuple[torch.Tensor, torch.Tensor]] = {}  # (position, device) -> breakpoints

    def __repr__(self) -> str:
        return f"Calibrator(method={self.method!r}, positions=2..{max(self.positions)}, samples={self.n_samples})"

    def params(self, j: int) -> dict:
        """Parameters used at span position j >= 2."""
        if j in self.positions:
            return self.positions[j]
        lower = [p for p in self.positions if p < j]  # beyond k_max (or a gap): the last fitted position before j
        return self.positions[max(lower) if lower else min(self.positions)]

    def temperature(self, j: int) -> float:
        return 1.0 if j == 1 else float(self.params(j)["temperature"])

    def __call__(self, logits: torch.Tensor) -> torch.Tensor:
        if logits.dim() < 2:
            raise UserError(f"calibrator expects logits [..., k, V], got shape {tuple(logits.shape)}")
        z = logits.float()
        k = z.shape[-2]
        if self.method == "temperature":
            temps = torch.tensor([self.temperature(j) for j in range(1, k + 1)], dtype=torch.float32, device=z.device)
            return torch.softmax(z / temps[:, None], dim=-1).amax(dim=-1)
        raw = torch.softmax(z, dim=-1).amax(dim=-1)
        out = raw.clone()
        for j in range(2, k + 1):
            xp, fp = self._breakpoints(j, z.device)
            out[..., j - 1] = _interp(raw[..., j - 1], xp, fp)
        return out

    def _breakpoints(self, j: int, device) -> tuple[torch.Tensor, torch.Tensor]:
        key = (j, str(device))
        if key not in self._tensors:
            p = self.params(j)
            self._tensors[key] = (torch.tensor(p["x"], dtype=torch.float32, device=device),
                                  torch.tensor(p["y"], dtype=torch.float32, device=device))
        return self._tensors[key]

    def calibrate_samples(self, samples: CalibrationSamples) -> np.ndarray:
        """Calibrated confidence of every stored sample, without the logits (temperature: via the stored grid)."""
        out = samples.confidence.astype(np.float64).copy()
        for j in np.unique(samples.position):
            if j < 2:
                continue
            at_j = samples.position == j
            p = self.params(int(j))
            if self.method == "temperature":
                out[at_j] = samples.subset(at_j).confidence_at(p["temperature"])
            else:
                out[at_j] = np.interp(samples.confidence[at_j], p["x"], p["y"])
        return out

    # ---- JSON --------------------------------------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {
            "format": FILE_FORMAT,
            "version": FILE_VERSION,
            "method": self.method,
            "k_max": self.k_max,
            "samples": self.n_samples,
            "prompts": self.n_prompts,
            "position_1": "raw top-1 probability (the next-token prediction is the greedy token by definition)",
            "positions": {str(j): p for j, p in self.positions.items()},
            "pooled": self.pooled,
            "metrics": self.metrics,
        }

    def save(self, model_dir) -> Path:
        """Atomically write model_dir/CALIBRATION_FILE (or the given .json path); returns the path."""
        path = Path(model_dir).expanduser()
        if path.suffix != ".json":
            if not path.is_dir():
                raise UserError(f"{path} is not a directory; cannot save the calibrator there")
            path = path / CALIBRATION_FILE
        elif not path.parent.is_dir():
            raise UserError(f"{path.parent} is not a directory; cannot save the calibrator there")
        text = json.dumps(self.to_dict(), indent=2, default=_json_default) + "\n"
        return replace_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))

    @classmethod
    def load(cls, path) -> Calibrator:
        """From a calibration JSON file or a model directory holding one; UserError if missing or invalid."""
        path = Path(path).expanduser()
        if path.is_dir():
            path = path / CALIBRATION_FILE
        if not path.is_file():
            raise UserError(f"calibration file {path} does not exist")
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            raise UserError(f"{path}: not a readable calibration file ({exc})") from None
        try:
            return cls.from_dict(data)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise UserError(f"{path}: invalid calibration file ({type(exc).__name__}: {exc})") from None

    @classmethod
    def from_dict(cls, data: dict) -> Calibrator:
        """Validated inverse of `to_dict`; raises ValueError/KeyError/TypeError on anything malformed."""
        if not isinstance(data, dict) or data.get("format") != FILE_FORMAT:
            raise ValueError(f"not an {FILE_FORMAT} file")
        if data.get("version") != FILE_VERSION:
            raise ValueError(f"unsupported version {data.get('version')!r} (this version reads {FILE_VERSION})")
        method = data["method"]
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}")
        positions = {int(j): _check_params(method, p, f"position {j}") for j, p in data["positions"].items()}
        if not positions or min(positions) < 2:
            raise ValueError("positions must be a non-empty map of span positions >= 2")
        return cls(method, positions, pooled=_check_params(method, data["pooled"], "pooled"), k_max=int(data["k_max"]),
                   n_samples=int(data["samples"]), n_prompts=int(data["prompts"]), metrics=data.get("metrics") or {})


def _check_params(method: str, p: dict, where: str) -> dict:
    if not isinstance(p, dict):
        raise TypeError(f"{where}: expected an object")
    if method == "temperature":
        t = float(p["temperature"])
        if not TEMPERATURE_GRID[0] <= t <= TEMPERATURE_GRID[-1]:
            raise ValueError(f"{where}: temperature {t} outside [{TEMPERATURE_GRID[0]:g}, {TEMPERATURE_GRID[-1]:g}]")
    else:
        x, y = np.asarray(p["x"], dtype=np.float64), np.asarray(p["y"], dtype=np.float64)
        if x.ndim != 1 or x.shape != y.shape or not len(x):
            raise ValueError(f"{where}: x and y must be equal-length non-empty lists")
        if not (np.all(np.isfinite(x)) and np.all(np.diff(x) >= 0) and np.all(np.diff(y) >= 0)
                and y.min() >= 0 and y.max() <= 1):
            raise ValueError(f"{where}: breakpoints must be finite and increasing, with y in [0, 1]")
    return dict(p)


def load_calibrator(model_dir) -> Calibrator | None:
    """The calibrator saved beside a model, or None when the directory has none (a corrupt file is a UserError)."""
    if model_dir is None:
        return None
    path = Path(model_dir).expanduser() / CALIBRATION_FILE
    return Calibrator.load(path) if path.is_file() else None


def _json_default(value):
    if isinstance(value, np.generic):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


# ---------------------------------------------------------------------------------------------------------------------
# Metrics and the reliability diagram
# ---------------------------------------------------------------------------------------------------------------------
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


def reliability_diagram(path, curves: dict, n_bins: int = N_BINS, title: str | None = None) -> Path:
    """PNG: bin accuracy vs bin confidence per curve ({name: (confidence, correct)}) against the diagonal, ECE in the
    legend; confidence histograms (log counts) below. Written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    if not curves:
        raise UserError("reliability_diagram needs at least one curve")
    path = Path(path).expanduser()
    if not path.parent.is_dir():
        raise UserError(f"{path.parent} is not a directory")
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(6.4, 7.2), sharex=True, constrained_layout=True,
                                      gridspec_kw={"height_ratios": [3, 1]})
    top.plot([0, 1], [0, 1], "--", color="gray", lw=1, label="perfectly calibrated")
    colors = plt.cm.tab10(np.arange(len(curves)))
    for color, (name, (conf, correct)) in zip(colors, curves.items()):
        bins = reliability_bins(conf, correct, n_bins)
        m = calibration_metrics(conf, correct, n_bins)
        used = bins["count"] > 0
        top.plot(bins["confidence"][used], bins["accuracy"][used], "o-", color=color, ms=5,
                 label=f"{name} (ECE {m['ece']:.3f}, n={m['n']})")
        bottom.hist(np.asarray(conf, dtype=np.float64), bins=bins["edges"], histtype="step", lw=1.5, color=color)
    top.set_xlim(0, 1)
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy (draft == greedy token)")
    top.legend(fontsize=8, loc="upper left")
    top.grid(alpha=0.3)
    top.set_title(title or "reliability of span-position confidences (j >= 2)")
    bottom.set_yscale("log")
    bottom.set_xlabel("confidence")
    bottom.set_ylabel("drafts")
    bottom.grid(alpha=0.3)
    try:
        return replace_atomically(path, lambda tmp: fig.savefig(tmp, format="png", dpi=120))
    finally:
        plt.close(fig)


# ---------------------------------------------------------------------------------------------------------------------
# mtp calibrate
# ---------------------------------------------------------------------------------------------------------------------
def _metrics_table(rows: dict[str, dict]) -> str:
    head = f"{'held-out':<22} {'n':>6} {'accuracy':>8} {'mean conf':>9} {'ECE':>7} {'MCE':>7} {'Brier':>7} {'AUROC':>7}"
    lines = [head, "-" * len(head)]
    for name, m in rows.items():
        auroc = "-" if m["auroc"] is None else f"{m['auroc']:.3f}"
        lines.append(f"{name:<22} {m['n']:>6} {m['accuracy']:>8.3f} {m['mean_confidence']:>9.3f} {m['ece']:>7.3f} "
                     f"{m['mce']:>7.3f} {m['brier']:>7.3f} {auroc:>7}")
    return "\n".join(lines)


def _position_table(calibrator: Calibrator, held: CalibrationSamples, calibrated: np.ndarray) -> str:
    head = f"{'j':>3} {'n':>6} {'accuracy':>8} {'raw conf':>8} {'calibrated':>10}  parameters (fit on all prompts)"
    lines = [head, "-" * len(head)]
    for j in range(2, calibrator.k_max + 1):
        at_j = held.position == j
        p = calibrator.params(j)
        what = (f"T={p['temperature']:.3f}" if calibrator.method == "temperature"
                else f"{len(p['x'])} breakpoints") + (" (pooled)" if p.get("source") == "pooled" else "")
        if at_j.any():
            lines.append(f"{j:>3} {int(at_j.sum()):>6} {held.correct[at_j].mean():>8.3f} "
                         f"{held.confidence[at_j].mean():>8.3f} {calibrated[at_j].mean():>10.3f}  {what}")
        else:
            lines.append(f"{j:>3} {0:>6} {'-':>8} {'-':>8} {'-':>10}  {what}")
    return "\n".join(lines)


def _held_out_questions(dataset: str, split: str, n: int) -> list[str]:
    from distill.data import load_examples, quiet_datasets

    with quiet_datasets():  # a few dozen questions: datasets' "Generating train split" bars would only be noise
        ds = load_examples(dataset, split)
    if len(ds) < n:
        raise UserError(f"dataset {dataset} has {len(ds)} rows; --n asks for {n}")
    return list(ds["query"][len(ds) - n :])


def main(argv: list[str]) -> int:
    """`mtp calibrate`: decode the last --n questions of the dataset self-speculatively (exactly greedy), label every
    verified draft, fit per-position calibration and save it beside the model.

    Quality is measured honestly: the prompts are split in two halves (by prompt, seeded), a calibrator fitted on one
    half is scored on the other (the printed table, the reliability diagram and the `metrics` of the JSON). The saved
    calibrator is then refit on all prompts (same method, twice the data); its per-position parameters are printed.
    """
    from adaptive.loading import DTYPES, GSM8K_LOCAL
    from mtp_cli.args import Parser as _Parser

    parser = _Parser(prog="mtp calibrate", description="Fit per-position confidence calibration for ConfAdapt on "
                     "self-speculative rollouts (labels: draft == the model's own greedy token); saved beside the "
                     "model, used by mtp generate / tune / evaluate.")
    parser.add_argument("--model", required=True, help="MTP model directory (with a trained <MTP> token)")
    parser.add_argument("--dataset", default=str(GSM8K_LOCAL),
                        help="questions: a local .jsonl/.json/.parquet or a hub name (default: the GSM8K train file; "
                        "its last --n rows are used, rows a training run on its head has not seen)")
    parser.add_argument("--split", default="train", help="split of a hub dataset (default train)")
    parser.add_argument("--n", type=int, default=DEFAULT_N, help=f"questions to decode (default {DEFAULT_N})")
    parser.add_argument("--k-max", type=int, help="span positions per forward (default: the model's k_max)")
    parser.add_argument("--method", choices=METHODS, default="temperature", help="default temperature")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--no-chat-template", action="store_true", help="feed the questions as-is, no chat template")
    parser.add_argument("--output", help=f"directory for {CALIBRATION_FILE} and reliability.png (default: the model "
                        "directory, where mtp generate finds the calibrator)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the fit / held-out split of the prompts")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args(argv)

    # Everything checkable is checked before the model loads.
    for flag, value, low in (("--n", args.n, 2), ("--max-new-tokens", args.max_new_tokens, 2),
                             ("--batch-size", args.batch_size, 1)):
        if value < low:
            raise UserError(f"{flag} must be >= {low}, got {value}")
    if args.k_max is not None and not 2 <= args.k_max <= MAX_K:
        raise UserError(f"--k-max must be in [2, {MAX_K}] (position 1 is always the greedy token), got {args.k_max}")
    model_dir = Path(args.model).expanduser()
    if not model_dir.is_dir():
        raise UserError(f"--model {args.model} is not a model directory")
    _require_trained_mtp(model_dir)
    output = Path(args.output).expanduser() if args.output else model_dir
    from distill.files import check_output_dir

    check_output_dir(output, "--output")  # before the decoding, not after it

    from adaptive.loading import load_mtp_model, mtp_defaults, stop_ids
    from adaptive.decoder import MTPDecoder

    from adaptive.strategies import parse_k_max

    k_max = args.k_max or parse_k_max(mtp_defaults(str(model_dir))["k_max"])[0]  # auto:N -> its bound N
    if not 2 <= k_max <= MAX_K:
        raise UserError(f"the model's k_max is {k_max}; pass --k-max in [2, {MAX_K}]")
    questions = _held_out_questions(args.dataset, args.split, args.n)
    model, tokenizer = load_mtp_model(str(model_dir), args.dtype)
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_ids(model, tokenizer))
    print(f"decoding the last {len(questions)} questions of {args.dataset} self-speculatively (k_max={k_max}, "
          f"exactly greedy) to label every draft", file=sys.stderr)
    samples, results = collect(decoder, questions, k_max, max_new_tokens=args.max_new_tokens,
                               chat_template=not args.no_chat_template, batch_size=args.batch_size, progress=True)
    tokens = sum(len(r.token_ids) for r in results)
    forwards = sum(r.forward_passes for r in results)
    print(f"{len(samples)} verified drafts from {len(questions)} prompts ({tokens} tokens, "
          f"{tokens / max(forwards, 1):.2f} tokens/forward)")
    if len(np.unique(samples.prompt)) < 2:
        raise UserError("fewer than 2 prompts produced verified drafts; use a larger --n or --max-new-tokens")

    fit_half, held = split_by_prompt(samples, 0.5, args.seed)
    half = fit(fit_half, args.method)
    calibrated_held = half.calibrate_samples(held)
    before = calibration_metrics(held.confidence, held.correct)
    after = calibration_metrics(calibrated_held, held.correct)
    calibrator = fit(samples, args.method)
    calibrator.metrics = {
        "on": "held-out prompts: fitted on half of the prompts, scored on the other half; the saved parameters are "
              "then refit on all prompts",
        "fit_prompts": len(np.unique(fit_half.prompt)),
        "held_out_prompts": len(np.unique(held.prompt)),
        "before": before,
        "after": after,
        "in_sample": calibrator.metrics,
        "dataset": str(args.dataset),
        "max_new_tokens": args.max_new_tokens,
    }
    output.mkdir(parents=True, exist_ok=True)
    path = calibrator.save(output)
    png = reliability_diagram(output / "reliability.png", {
        "raw top-1 probability": (held.confidence, held.correct),
        f"{args.method} (fit on the other half)": (calibrated_held, held.correct),
    }, title=f"mtp calibrate: {model_dir.name}, held-out drafts (j >= 2)")

    print(_metrics_table({"raw top-1 probability": before, f"{args.method}": after}))
    print()
    print(_position_table(calibrator, held, calibrated_held))
    print(f"wrote {path} ({args.method}, refit on all {len(samples)} drafts) and {png}")
    if output.resolve() == model_dir.resolve():
        print(f"ConfAdapt now scores confidence with it: mtp generate --model {args.model} ...")
    return 0


def _require_trained_mtp(model_dir: Path) -> None:
    from transformers import AutoConfig

    from distill.models import read_config
    from distill.tokens import MTP_TOKEN

    read_config(model_dir)  # a config that is not a model config is reported as such
    try:
        config = AutoConfig.from_pretrained(model_dir)
    except (OSError, ValueError) as exc:
        raise UserError(f"--model {model_dir}: cannot read its config ({str(exc).splitlines()[0]})") from None
    if getattr(config, "mtp_mask_token_id", None) is None:
        raise UserError(f"--model {model_dir} has no {MTP_TOKEN} token; calibration needs a model distilled with "
                        "`mtp train`")
