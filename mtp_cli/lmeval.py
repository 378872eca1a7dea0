"""lm-eval's own command line with the `mtp` model registered (the adapter is adaptive/lmeval.py, paper §3.3).

    python -m mtp_cli.lmeval --model mtp \
        --model_args pretrained=DIR,strategy=confadapt,tau=0.9,k_max=16,max_gen_toks=256,batch_size=16 \
        --tasks path/to/task.yaml [--limit 100] [--output_path results/]

Every argument is lm-eval's (`lm-eval run ...`); a `UserError` from the adapter (a bad model argument, a task that
asks for sampling) becomes one `error: ...` line on stderr and exit status 2.
"""

from __future__ import annotations

import importlib
import sys

from distill.errors import UserError


def main(argv: list[str] | None = None) -> int:
    """lm-eval's command line (`lm-eval run ...` arguments) with the "mtp" model registered."""
    from lm_eval.__main__ import cli_evaluate

    importlib.import_module("adaptive.lmeval")  # registers --model mtp with lm-eval
    argv = list(sys.argv[1:] if argv is None else argv)
    sys.argv = ["python -m mtp_cli.lmeval", *argv]  # lm-eval parses sys.argv itself
    try:
        cli_evaluate()
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
