"""The `mtp` command layer: one thin module per command (parse, call the library, print); `main.py` dispatches.

Nothing in `distill/` or `adaptive/` imports from here.
"""
