"""Calibrated per-position confidence for ConfAdapt (paper §4.2): what a calibrator is, how it is fitted and stored.

Why. ConfAdapt accepts the longest run of span positions whose confidence c_j >= tau (§4.2), with c_j the raw top-1
softmax probability of the j-th prediction of one forward. The masks' raw probabilities are not calibrated: a
distilled model can be over-confident at far positions and under-confident at near ones, so one tau means a different
error rate at every j. A calibrator maps each position's logits to P(the token is what greedy decoding would write),
so tau reads as that probability at every position. It is saved beside the model (CALIBRATION_FILE) and ConfAdapt
takes it as its scorer. It is fitted on the model's own rollouts: the samples and their labels are
adaptive/calibration_data.py, the metrics adaptive/metrics.py, the command `mtp calibrate` mtp_cli/calibrate.py.

Position 1 is the ordinary next-token prediction, by definition the greedy token: it keeps the paper's raw
confidence, so ConfAdapt's gate on c_1 keeps its meaning. Positions j >= 2 are calibrated.

Methods (one fit per position j; a position with fewer than MIN_POSITION_SAMPLES samples, or only one class, uses the
fit pooled over all j >= 2; positions beyond the fitted k_max reuse the last fitted one):
* "temperature": c_j = max softmax(z / T_j), T_j minimising the binary log loss of `correct` under c_{T_j} (temperature
  scaling, Guo et al. 2017, here per position and on the top-1 event). Monotone in the logits: the token is unchanged.
* "isotonic": a monotone piecewise-linear map raw c_j -> P(correct) (scikit-learn's IsotonicRegression), stored as
  its breakpoints.

The temperature fit works on the log c_T every sample stores on TEMPERATURE_GRID (a cubic spline in log T between
grid points), searched on the finer FIT_TEMPERATURES; the fitted T_j is then exact in `Calibrator.__call__`, which
recomputes from the logits.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import torch

from adaptive.calibration_data import TEMPERATURE_GRID, CalibrationSamples, spline_weights
from adaptive.metrics import calibration_metrics
from distill.errors import UserError
from distill.files import replace_atomically

CALIBRATION_FILE = "mtp_calibration.json"  # saved in the model directory
FILE_FORMAT, FILE_VERSION = "mtp-calibration", 1
METHODS = ("temperature", "isotonic")
# The temperature fit searches this finer log-spaced grid (steps of 0.7%) through the spline.
FIT_TEMPERATURES = np.exp(np.linspace(math.log(TEMPERATURE_GRID[0]), math.log(TEMPERATURE_GRID[-1]), 801))
MIN_POSITION_SAMPLES = 50  # fewer samples at one position: use the pooled fit there


# ---------------------------------------------------------------------------------------------------------------------
# Fitting
# ---------------------------------------------------------------------------------------------------------------------
def _log_loss_curve(samples: CalibrationSamples, temperatures: np.ndarray) -> np.ndarray:
    """Mean binary log loss of `correct` under c_T, for every T in `temperatures` (chunked: N x len(T) floats)."""
    weights = spline_weights(temperatures).T  # [G, F]
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
