"""One exception type for bad user input, and the one check of a fraction that both the libraries and the commands use.

Every command catches `UserError` at the top (mtp_cli/main.py) and prints it as a single `error: ...` line with a
non-zero exit status, instead of a traceback. Raise it for anything the user can fix (missing file, unknown recipe
key, vocab mismatch, k_max too large, tau outside (0, 1], NaN loss, ...).
"""

import math


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""


def check_fraction(value, what: str, *, closed: bool = False) -> float:
    """value in (0, 1), or (0, 1] with `closed`; UserError otherwise."""
    value = float(value)
    if math.isnan(value) or not (0.0 < value < 1.0 or (closed and value == 1.0)):
        raise UserError(f"{what} must be in (0, 1{']' if closed else ')'}, got {value:g}")
    return value
