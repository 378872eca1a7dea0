"""`mtp bench-train`: what online self-distillation costs over plain SFT, measured side by side in one run.

The measurement and its method are distill/bench.py's; this module parses, checks and prints the report. The memory
figure runs each side in a fresh `mtp bench-train --worker SIDE` process.
"""

import argparse
import contextlib
import json
import os
import sys

from distill import bench
from distill.bench import DEFAULT_DATASET, device, measure, memory_worker, packed_raw_length
from distill.errors import UserError
from mtp_cli.args import Parser


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog="mtp bench-train", description=bench.__doc__.split("\n\n")[0])
    p.add_argument("--model", default="smollm2-135m", help="alias, local HF directory or hub id (default: %(default)s)")
    p.add_argument("--dataset", default=DEFAULT_DATASET, help="rows to train on (default: GSM8K train)")
    p.add_argument("--steps", type=int, default=10, help="measured steps per side (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="unmeasured steps first (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=4, help="rows per step (default: %(default)s)")
    # CPU-sized packing as in recipes/smollm2-cpu-full.yaml; the paper's is --seq-len 160 --num-regions 5 --k-max 16.
    p.add_argument("--seq-len", type=int, default=96, help="packed MTP row length S (default: %(default)s)")
    p.add_argument("--num-regions", type=int, default=3, help="MTP problems per row M (default: %(default)s)")
    p.add_argument("--k-min", type=int, default=2, help="(default: %(default)s)")
    p.add_argument("--k-max", type=int, default=8, help="(default: %(default)s)")
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank of the memory comparison (default: %(default)s)")
    p.add_argument("--skip-time", action="store_true", help="only the LoRA memory comparison")
    p.add_argument("--skip-memory", action="store_true", help="only the full fine-tune step-time comparison")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
    p.add_argument("--bf16", action="store_true", help="bf16 mixed precision on both sides (CUDA; default fp32)")
    p.add_argument("--worker", choices=["sft-lora", "mtp-lora"], help=argparse.SUPPRESS)  # one memory side
    return p


def _check(args) -> None:
    for name in ("steps", "batch_size", "lora_r"):
        if getattr(args, name) < 1:
            raise UserError(f"--{name.replace('_', '-')} must be >= 1")
    if args.warmup < 1:
        # The first step allocates the AdamW states and builds caches; it must not count in time or memory.
        raise UserError("--warmup must be >= 1")
    if args.skip_time and args.skip_memory:
        raise UserError("nothing to measure: --skip-time and --skip-memory together")
    if args.bf16 and device().type != "cuda":
        raise UserError("--bf16 needs a CUDA device (the CPU comparison runs in fp32)")
    packed_raw_length(args)  # k_max must fit a region




def _table(report: dict) -> str:
    c = report["config"]
    lines = [
        f"mtp bench-train  model={c['model']}  device={c['device']}  batch={c['batch_size']}  seq_len={c['seq_len']}  "
        f"M={c['num_regions']}  k={c['k_min']}..{c['k_max']}  steps={c['steps']} (+{c['warmup']} warm-up)",
        "",
        f"{'':34}{'SFT':>10}{'MTP':>10}{'MTP/SFT':>10}{'goal':>9}",
    ]
    if "step_time" in report:
        t = report["step_time"]
        lines.append(f"{'step time, full fine-tune (s)':34}{t['sft_median_s']:>10.3f}{t['mtp_median_s']:>10.3f}"
                     f"{t['ratio']:>10.2f}{'<= ' + str(t['goal']):>9}")
    if "memory" in report:
        m = report["memory"]
        lines.append(f"{'peak memory, LoRA (MiB)':34}{m['sft_lora_mib']:>10.0f}{m['mtp_lora_mib']:>10.0f}"
                     f"{m['ratio']:>10.2f}{'<= ' + str(m['goal']):>9}")
    lines.append("")
    if "step_time" in report:
        lines.append("step time: median of the measured steps, SFT and MTP alternated on the same batches; "
                     "MTP = frozen-copy teacher")
    if "memory" in report:
        lines.append(f"memory: {report['memory']['method']}; MTP = shared-base teacher (adapters off)")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        args = _parser().parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    _check(args)
    os.environ.setdefault("WANDB_MODE", "disabled")
    report_to = sys.stdout
    # Libraries print banners and warnings on stdout while they load; only the report may go there (--json pipes).
    with contextlib.redirect_stdout(sys.stderr):
        report = memory_worker(args) if args.worker else measure(args, argv)
    if args.worker:  # one line for the parent process
        text = json.dumps(report)
    else:
        text = json.dumps(report, indent=2) if args.json else _table(report)
    print(text, file=report_to)
    return 0
