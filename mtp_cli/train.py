"""`mtp train --config recipes/X.yaml [--key value ...]`: distil a causal LM into an MTP model (paper §3).

The recipe and flags become the run's configuration (distill/recipe.py); the run is validated, optionally given the
starting model's own answers as data (`regenerate: true`, adaptive/regenerate.py: generated once, cached by
fingerprint, reused), trained and saved (distill/run.py).
"""

import sys
from pathlib import Path

from distill import run
from distill.recipe import parse_args


def main(argv: list[str] | None = None, callbacks: list | None = None) -> int:
    """`mtp train`; `callbacks` (TrainerCallback instances) is for callers in Python."""
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        script_args, config, model_args = parse_args(argv)
    except SystemExit as exc:  # --help
        return int(exc.code or 0)
    # Everything is validated (recipe, output_dir, data, model, tokenizer, then the trainer loads the model and
    # tokenizes the data) before anything of an earlier run is removed.
    prepared = run.prepare(config)
    if config.regenerate:  # the starting model's own answers to the head rows (cached)
        from adaptive.regenerate import regenerate_for_training

        with config.main_process_first(desc="regenerating the training data"):
            config.dataset_name = regenerate_for_training(config, model_args.model_name_or_path, model_args.dtype,
                                                          world_size=config.world_size,
                                                          trust_remote_code=script_args.trust_remote_code)
        config.question_column, config.answer_column = "question", "answer"
    if script_args.trust_remote_code:
        print(f"note: remote code is enabled (trust_remote_code true): Python code shipped with "
              f"{model_args.model_name_or_path} may run", file=sys.stderr)
    result = run.train(config, model_args, prepared, trust_remote_code=script_args.trust_remote_code,
                       callbacks=callbacks)
    if not result.is_main_process:
        return 0
    if result.preempted:  # SIGTERM: the checkpoint of this step is saved; the run is not finished
        print(f"stopped on SIGTERM at step {result.step}: saved "
              f"{Path(result.output_dir) / f'checkpoint-{result.step}'}; continue with --resume")
    else:
        if result.plot is not None:
            print(f"wrote {result.plot}")
        kind = "LoRA adapter" if model_args.use_peft else "model"
        print(f"saved {kind} + tokenizer to {result.output_dir} (step {result.step})")
    return 0
