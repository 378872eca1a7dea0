"""One argument parser for every `mtp` command, and the argument checks they share.

`Parser` turns argparse's usage dump into the project's error contract: one `error: ...` line on stderr and exit status
2 (raised as `UserError`, printed by `mtp_cli.main`). The checks raise the same error with the flag's name in it.
"""

from __future__ import annotations

import argparse
import math

from distill.errors import UserError


class Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UserError(message)


def check_fraction(value, what: str, *, closed: bool = False) -> float:
    """value in (0, 1), or (0, 1] with `closed`; UserError otherwise."""
    value = float(value)
    if math.isnan(value) or not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise UserError(f"{what} must be in (0, 1{']' if closed else ')'}, got {value:g}")
    return value


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
