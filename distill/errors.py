"""One exception type for bad user input.

Every command catches `UserError` at the top (mtp_cli/main.py) and prints it as a single `error: ...` line with a
non-zero exit status, instead of a traceback. Raise it for anything the user can fix (missing file, unknown recipe
key, vocab mismatch, k_max too large, tau outside (0, 1], NaN loss, ...).
"""


class UserError(Exception):
    """A problem with the user's input or environment, reported as one line."""
