"""One argument parser for every `mtp` command, and the argument checks they share.

`Parser` turns argparse's usage dump into the project's error contract: one `error: ...` line on stderr and exit status
2 (raised as `UserError`, printed by `mtp_cli.main`). The checks raise the same error with the flag's name in it;
`check_fraction` lives in distill/errors.py, beside `UserError`, because the libraries check fractions too.
"""

from __future__ import annotations

import argparse

from distill.errors import UserError, check_fraction

__all__ = ["Parser", "add_tau_scale_flags", "at_least", "check_fraction", "number_list"]


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def at_least(flag: str, value, low) -> None:
    """UserError unless value is None or >= low."""
    if value is not None and value < low:
        raise UserError(f"{flag} must be >= {low}, got {value}")


def number_list(text: str, flag: str, cast) -> list:
    """Comma-separated numbers of type `cast`, each once."""
    values = []
    for item in str(text).split(","):
        item = item.strip()
        try:
            values.append(cast(item))
        except ValueError:
            raise UserError(f"{flag}: {item!r} is not a{'n integer' if cast is int else ' number'}") from None
    if len(set(values)) != len(values):
        raise UserError(f"{flag} lists a value twice: {text}")
    return values


def add_tau_scale_flags(parser) -> None:
    """--calibrated / --no-calibration: the scale of a tau (distill/decoding_defaults.py, adaptive/loading.py)."""
    group = parser.add_mutually_exclusive_group()
    group.add_argument("--calibrated", dest="calibrated", action="store_true", default=None,
                       help="confadapt: a tau given here thresholds the confidence of the calibrator `mtp calibrate` "
                            "saved beside the model (default: a typed tau is the raw top-1 probability; the model's "
                            "recorded tau keeps the scale recorded with it)")
    group.add_argument("--no-calibration", dest="calibrated", action="store_false",
                       help="confadapt: the raw top-1 probability, even for a tau the model recorded as calibrated")

