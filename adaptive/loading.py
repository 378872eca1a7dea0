"""Loading an MTP model for decoding, and the decoding defaults it carries (shared by every decode-side command).

`load_mtp_model` resolves an alias, a model directory or a LoRA run's output (a mask-only adapter is attached and gated,
distill/adapters.py) and refuses a model without a trained `<MTP>` unless asked to add an untrained one. `mtp_defaults`
reads the decoding defaults `mtp export` / `mtp tune` recorded in generation_config.json (distill/decoding_defaults.py;
else ConfAdapt at tau 0.9, §4.2, with k_max auto). `load_model_calibrator` finds the confidence calibrator `mtp
calibrate` saved beside a model given by alias or directory, and `confidence_scorer` decides which confidence a tau
thresholds: the raw top-1 probability or that calibrator's.
"""

from __future__ import annotations

import sys
from pathlib import Path

from distill.adapters import attach_mask_adapter, exported_adapter
from distill.decoding_defaults import wants_calibrated
from distill.errors import UserError
from distill.models import DTYPES, load_model, load_tokenizer
from distill.tokens import MTP_TOKEN, add_mtp_token


def load_mtp_model(name_or_path: str, dtype: str = "float32", *, convert: bool = False):
    """(model, tokenizer) in eval mode. A model without <MTP> (config.mtp_mask_token_id) is an error, unless
    `convert`: then an untrained <MTP> is added, with a one-line warning (bench-decode measures such conversions)."""
    from distill.models import check_position_ids, read_config, resolve_model_path

    if dtype not in DTYPES:
        raise UserError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    not_mtp = UserError(f"{name_or_path} is not an MTP model (no config.mtp_mask_token_id); train it with "
                        "`mtp train`, or pass --add-mtp-token to try an untrained conversion")
    path = Path(resolve_model_path(name_or_path))
    if (path / "adapter_config.json").is_file() and not (path / "config.json").is_file():
        # A LoRA run's output (`mtp train` with use_peft): the base gets the same <MTP> row, then the adapter is
        # merged in, exactly as `mtp export` does; a mask-only adapter is attached and gated (distill/adapters.py).
        from distill.export import load_for_export

        model, tokenizer = load_for_export(str(path), mask_adapter="gate")
        model = model.to(DTYPES[dtype])
    else:
        tokenizer = load_tokenizer(name_or_path)
        config_file = path / "config.json"
        if not convert and config_file.is_file() and read_config(path).get("mtp_mask_token_id") is None:
            raise not_mtp  # before loading the weights
        model = load_model(name_or_path, dtype=DTYPES[dtype])
        kept = exported_adapter(path)
        if kept is not None:  # an export that keeps its mask-only adapter beside the base weights
            model = attach_mask_adapter(model, kept)
    check_position_ids(model)
    if MTP_TOKEN not in tokenizer.get_vocab() or getattr(model.config, "mtp_mask_token_id", None) is None:
        if not convert:
            raise not_mtp
        print(f"warning: {name_or_path} has no {MTP_TOKEN} token; added an untrained one (untrained conversion: "
              "spans beyond the first token are not meaningful until it is distilled with `mtp train`)",
              file=sys.stderr)
        add_mtp_token(model, tokenizer)
    model.eval()
    return model, tokenizer


def mtp_defaults(name_or_path: str) -> dict:
    """Decoding defaults recorded by `mtp export` in generation_config.json (config.mtp_k_max written by the trainer
    as a fallback for k_max), else the paper's. Read from the JSON files, so bad flags fail before the model loads."""
    from transformers import AutoConfig, GenerationConfig

    from distill.decoding_defaults import read_decoding_defaults
    from distill.models import resolve_model_path

    path = resolve_model_path(name_or_path)
    try:
        gen = GenerationConfig.from_pretrained(path)
    except (OSError, ValueError):
        gen = None
    try:
        k_max_trained = getattr(AutoConfig.from_pretrained(path), "mtp_k_max", None)
    except (OSError, ValueError):
        k_max_trained = None
    return read_decoding_defaults(gen, k_max_trained)


def load_model_calibrator(name_or_path: str):
    """The calibrator saved beside the model by `mtp calibrate`, or None."""
    from adaptive.calibration import load_calibrator
    from distill.models import resolve_model_path

    return load_calibrator(resolve_model_path(name_or_path))


def confidence_scorer(name_or_path: str, defaults: dict, *, tau_given: bool, calibrated: bool | None = None):
    """ConfAdapt's confidence for this model: None (the paper's raw top-1 probability) or its saved calibrator.

    tau means one thing per run, and the run says which: a tau typed on the command line is the raw top-1 probability
    unless `calibrated` is True (--calibrated); a tau taken from the model's recorded defaults is on the scale recorded
    with it (`mtp_tau_scale`, written by `mtp tune`); `calibrated` False (--no-calibration) is always raw. Asking for
    the calibrated scale where no calibrator was saved is an error, not a silent fall-back to raw."""
    recorded = calibrated is None
    if not wants_calibrated(defaults, tau_given=tau_given, calibrated=calibrated):
        return None
    calibrator = load_model_calibrator(name_or_path)
    if calibrator is None:
        fix = f"run `mtp calibrate --model {name_or_path}`"
        if recorded:
            raise UserError(f"{name_or_path}'s recorded tau {defaults['tau']:g} is on the calibrated scale, but it has "
                            f"no saved calibrator; {fix}, or give --tau (the raw top-1 probability)")
        raise UserError(f"--calibrated: {name_or_path} has no saved calibrator; {fix}")
    return calibrator
