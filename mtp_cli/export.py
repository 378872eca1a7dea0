"""`mtp export --model DIR --output DIR`: a plain safetensors HF directory with <MTP> and the MTP decoding defaults.

What is written and how (LoRA merged, a mask-only adapter kept beside the base weights, the generation config's
`mtp_*` defaults, the atomic directory swap) is distill/export.py's.
"""

from distill.decoding_defaults import DEFAULT_K_MAX, DEFAULT_TAU, STRATEGIES
from distill.export import export_model
from distill.models import DTYPES
from mtp_cli.args import Parser


def main(argv: list[str]) -> int:
    parser = Parser(prog="mtp export", description="Merge LoRA (if any) and save a plain safetensors HF directory "
                     "with <MTP> and the MTP decoding defaults in its generation config.")
    parser.add_argument("--model", required=True, help="full checkpoint dir, alias, or LoRA adapter dir")
    parser.add_argument("--output", required=True, help="output directory (created atomically)")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--k-max", type=int, default=None,
                        help=f"default span length (default: the model's config.mtp_k_max, else {DEFAULT_K_MAX})")
    parser.add_argument("--tau", type=float, default=DEFAULT_TAU, help="default ConfAdapt threshold")
    parser.add_argument("--strategy", default="confadapt", choices=STRATEGIES, help="default decoding strategy")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty existing output directory")
    parser.add_argument("--merge-adapter", action="store_true",
                        help="merge a mask-only adapter into the weights (default: kept beside them, so k=1 stays "
                             "the base model's)")
    args = parser.parse_args(argv)
    out = export_model(args.model, args.output, dtype=args.dtype, k_max=args.k_max, tau=args.tau,
                       strategy=args.strategy, overwrite=args.overwrite, merge_adapter=args.merge_adapter)
    print(f"exported {args.model} -> {out}")
    return 0
