"""The decoding defaults a model carries, and the paper's when it carries none (§4.2, §7.7).

`mtp export` and `mtp tune` record them as extra attributes of the model's generation config — `mtp_strategy`,
`mtp_k_max` (an integer, or "auto:N" for the cost-aware controller bounded by N), `mtp_tau` and `mtp_tau_scale`
("raw": the paper's top-1 probability, "calibrated": the confidence of the calibrator saved beside the model) — and
every decoder reads them through `read_decoding_defaults`. Without a record: ConfAdapt at tau 0.9 on the raw top-1
probability, k_max auto bounded by the k_max the model was trained with.

Stop tokens (`stop_token_ids`): every EOS id the model carries — its generation config's (chat models often list
several), its config's and its tokenizer's (ChatML: `<|im_end|>` ends the assistant turn). `mtp export` records them
as the generation config's `eos_token_id`; every decoder stops at them unless given other ids.
"""

from __future__ import annotations

import math

from distill.errors import UserError

STRATEGIES = ("static", "confadapt", "selfspec")
DEFAULT_STRATEGY = "confadapt"  # paper §4.2, §7.7
DEFAULT_K_MAX = 16  # paper §4.2: ConfAdapt attempts k_max = 16 positions
DEFAULT_TAU = 0.9  # paper §4.2 / Fig. 1: tau = 90 %
TAU_SCALES = ("raw", "calibrated")


def check_tau(tau, what: str = "tau") -> float:
    """tau in (0, 1]; UserError otherwise."""
    try:
        tau = float(tau)
    except (TypeError, ValueError):
        raise UserError(f"{what} must be a number in (0, 1], got {tau!r}") from None
    if math.isnan(tau) or not 0.0 < tau <= 1.0:
        raise UserError(f"{what} must be in (0, 1], got {tau:g}")
    return tau


def read_decoding_defaults(generation_config, trained_k_max=None) -> dict:
    """{"strategy", "k_max", "tau", "tau_scale"}: the defaults a generation config records, else the paper's. Without a
    fixed k_max the controller chooses, bounded by the k_max the model was trained with (`config.mtp_k_max`)."""
    tuned = getattr(generation_config, "mtp_k_max", None)
    scale = getattr(generation_config, "mtp_tau_scale", None) or "raw"
    return {
        "strategy": getattr(generation_config, "mtp_strategy", None) or DEFAULT_STRATEGY,
        "k_max": (tuned if isinstance(tuned, str) else int(tuned)) if tuned else
                 f"auto:{int(trained_k_max or DEFAULT_K_MAX)}",
        "tau": float(getattr(generation_config, "mtp_tau", None) or DEFAULT_TAU),
        "tau_scale": scale if scale in TAU_SCALES else "raw",
    }


def wants_calibrated(defaults: dict, *, tau_given: bool, calibrated: bool | None) -> bool:
    """Whether ConfAdapt's tau thresholds the calibrated confidence: `calibrated` when the caller says (True:
    --calibrated, False: --no-calibration); otherwise a typed tau is raw and a recorded tau keeps its recorded scale."""
    if calibrated is not None:
        return bool(calibrated)
    return not tau_given and defaults.get("tau_scale") == "calibrated"


def record_decoding_defaults(generation_config, *, strategy: str, k_max, tau: float | None,
                             tau_scale: str = "raw") -> None:
    """Write the `mtp_*` attributes into `generation_config` in place (tau None: no threshold recorded)."""
    if tau_scale not in TAU_SCALES:
        raise UserError(f"tau scale must be one of {', '.join(TAU_SCALES)}, got {tau_scale!r}")
    # A config derived from config.json is flagged `_from_model_config`, and transformers then drops every extra
    # attribute on reload: this one is a real, user-authored generation config.
    generation_config._from_model_config = False
    generation_config.mtp_strategy = strategy
    generation_config.mtp_k_max = k_max if isinstance(k_max, str) and k_max.startswith("auto") else int(k_max)
    generation_config.mtp_tau = None if tau is None else float(tau)
    generation_config.mtp_tau_scale = None if tau is None else tau_scale


def stop_token_ids(model, tokenizer) -> list[int]:
    """EOS ids of the generation config, then the config's and the tokenizer's, each once, in that order."""
    ids: list[int] = []
    for source in (getattr(getattr(model, "generation_config", None), "eos_token_id", None),
                   getattr(model.config, "eos_token_id", None), tokenizer.eos_token_id):
        for i in source if isinstance(source, (list, tuple)) else [source]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    return ids
