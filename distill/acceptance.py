"""Watch the quantity that matters while training: how many tokens ConfAdapt commits per forward pass on held-out
prompts, and whether the answers are still the starting model's.

`AcceptanceCallback` (a `transformers.TrainerCallback`; the trainer adds it when `acceptance_eval_steps` > 0):
  * at train start it decodes a fixed handful of held-out prompts (`acceptance_prompts`, `acceptance_max_new_tokens`
    each) with static k=1 (greedy): the reference. It is saved as `acceptance_reference.json` in output_dir, so
    a resumed run compares against the *starting* model's answers, not the checkpoint's, and cached under
    `cache_root()/acceptance/` keyed by the starting model's files, tokenizer, prompts and settings, so later runs
    from the same model (a recipe search, the demo) do not pay for it again;
  * every `acceptance_eval_steps` optimizer steps it decodes the same prompts with ConfAdapt at the raw top-1
    probability (`acceptance_tau`, `acceptance_k_max`; no calibrator) and logs through the Trainer's log, so the
    console, trainer_state.json's log_history and every `report_to` integration (wandb) receive
      accept_tokens_per_forward   generated tokens / forward passes (the prefill counts as one),
      accept_mean_length          vLLM's mean acceptance length, 1 + accepted drafts / steps, over the steps whose
                                  span was not cut by the token budget or a stop token (each row's last step),
      accept_agreement            share of prompts whose text equals the reference's,
      accept_prefix_agreement     mean share of the reference's tokens reproduced before the first difference,
      accept_seconds              what the measurement cost;
  * bounded: a due measurement is postponed while the measurements' time so far plus the last one's cost would
    exceed `acceptance_budget` (default 5%) of the training wall time; the next due step tries again. The one-off
    reference is not counted (it is cached) but reported at the end with the measurements' share.

Prompts: the questions of the eval split the trainer carves (`eval_fraction` > 0, the same seeded split), else the
last rows of the repository's GSM8K train file, the tail that `mtp tune`, `mtp calibrate` and `mtp demo` hold out.
They are formatted as training formats a question (chat template user turn + assistant header, or the plain format).
Every rank decodes the same prompts (a ZeRO-3 forward needs all ranks); only the main process prints and saves.
"""

from __future__ import annotations

import hashlib
import json
import time
from pathlib import Path

from transformers import Trainer, TrainerCallback

from distill.errors import UserError
from distill.files import write_text_atomically
from distill.models import GSM8K_TRAIN

REFERENCE_FILE = "acceptance_reference.json"
METRICS = ("accept_tokens_per_forward", "accept_mean_length", "accept_agreement", "accept_prefix_agreement")


def held_out_prompts(args, n: int) -> tuple[list[str], str]:
    """(questions, where they come from): the eval split's first n questions, else the GSM8K train tail."""
    from adaptive.prompts import held_out_tail
    from distill.data import load_examples, load_questions, train_eval_split

    if args.eval_fraction > 0 and args.dataset_name:
        ds = load_examples(args.dataset_name, args.dataset_split, question_column=args.question_column,
                           answer_column=args.answer_column)
        _, evaluation = train_eval_split(ds, args.eval_fraction, args.seed)
        questions = list(evaluation["query"][:n])
        return questions, f"the eval split of {args.dataset_name}"
    if not GSM8K_TRAIN.is_file():
        raise UserError(f"acceptance_eval_steps needs held-out prompts: set eval_fraction > 0, or restore {GSM8K_TRAIN}")
    questions, _ = held_out_tail(load_questions(str(GSM8K_TRAIN)), n)
    return questions, f"the last {n} rows of {GSM8K_TRAIN.name} (held out by tune/demo)"


def acceptance_length(accepted_per_step: list[list[int]]) -> float:
    """1 + accepted drafts / steps over every row's steps but its last (which the budget or a stop may cut)."""
    steps = [n for row in accepted_per_step for n in row[:-1]]
    if not steps:
        steps = [n for row in accepted_per_step for n in row]
    return 1.0 + sum(n - 1 for n in steps) / len(steps) if steps else 0.0


def prefix_agreement(reference: list[int], tokens: list[int]) -> float:
    """Share of the reference's tokens reproduced before the first difference."""
    if not reference:
        return float(tokens == reference)
    same = 0
    for a, b in zip(reference, tokens):
        if a != b:
            break
        same += 1
    return same / len(reference)


class AcceptanceCallback(TrainerCallback):
    def __init__(self, trainer, prompts: list[str], source: str, *, every: int, tau: float, k_max: int,
                 max_new_tokens: int, budget: float, fmt: str):
        from adaptive.strategies import ConfAdapt

        self.trainer = trainer
        self.prompts, self.source = prompts, source
        self.every, self.max_new_tokens, self.budget = every, max_new_tokens, budget
        self.strategy = ConfAdapt(tau, k_max)  # raw top-1 probability: no calibrator while the model changes
        self.fmt = fmt
        self.reference: list[list[int]] | None = None
        self.reference_text: list[str] = []
        self.spent = 0.0  # seconds the measurements took
        self.reference_seconds = 0.0  # decoding the reference (0 when it came from the cache)
        self.last_cost = 0.0
        self.postponed = 0
        self.history: list[dict] = []

    # ------------------------------------------------------------------------------------------------------------
    def _decoder(self, model):
        from adaptive.decoder import MTPDecoder
        from distill.decoding_defaults import stop_token_ids

        tokenizer = self.trainer.processing_class
        return MTPDecoder(model, tokenizer, stop_token_ids=stop_token_ids(model, tokenizer))

    def _decode(self, model, strategy):
        from adaptive.regenerate import encode_prompt

        tokenizer = self.trainer.processing_class
        ids = [encode_prompt(tokenizer, q, self.fmt) for q in self.prompts]
        return self._decoder(model).generate(ids, strategy, self.max_new_tokens)

    def _cache_file(self, model) -> Path | None:
        """Where the starting model's reference is cached: keyed by the model directory's files (path, size,
        mtime of config.json and the safetensors), the tokenizer, the prompts and the settings. None for a model
        that is not a local directory."""
        from adaptive.regenerate import tokenizer_digest
        from distill.models import cache_root

        folder = Path(str(getattr(model.config, "_name_or_path", "") or ""))
        if not folder.is_dir():
            return None
        files = [folder / "config.json", *sorted(folder.glob("*.safetensors"))]
        stats = [(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files if f.is_file()]
        key = json.dumps({"model": str(folder.resolve()), "files": stats, "dtype": str(next(model.parameters()).dtype),
                          "tokenizer": tokenizer_digest(self.trainer.processing_class), "prompts": self.prompts,
                          "format": self.fmt, "max_new_tokens": self.max_new_tokens}, sort_keys=True)
        return cache_root() / "acceptance" / f"{hashlib.sha256(key.encode()).hexdigest()[:24]}.json"

    def _load_reference(self, path: Path | None) -> bool:
        if path is None or not path.is_file():
            return False
        try:
            saved = json.loads(path.read_text())
        except ValueError:
            return False
        if saved.get("prompts") != self.prompts or saved.get("max_new_tokens") != self.max_new_tokens:
            return False
        self.reference, self.reference_text = saved["token_ids"], saved["text"]
        return True

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        from adaptive.strategies import Static

        self.train_start = time.perf_counter()
        in_run = Path(args.output_dir) / REFERENCE_FILE
        cached = self._cache_file(self.trainer.model)
        # Resumed: the reference saved at step 0 of this run; else the cached one of the same starting model.
        if (state.global_step > 0 and self._load_reference(in_run)) or self._load_reference(cached):
            step = 0
        else:  # the model as it is now (the starting model, unless a run is resumed without its reference)
            t = time.perf_counter()
            results = self._decode(self.trainer.model, Static(1))
            self.reference = [r.token_ids for r in results]
            self.reference_text = [r.text for r in results]
            self.reference_seconds = time.perf_counter() - t
            step = state.global_step
        if self.trainer.is_world_process_zero():
            text = json.dumps({
                "step": step, "source": self.source, "prompts": self.prompts, "max_new_tokens": self.max_new_tokens,
                "token_ids": self.reference, "text": self.reference_text,
            }, ensure_ascii=False) + "\n"
            Path(args.output_dir).mkdir(parents=True, exist_ok=True)
            write_text_atomically(in_run, text)
            if cached is not None and step == 0 and not cached.is_file():
                cached.parent.mkdir(parents=True, exist_ok=True)
                write_text_atomically(cached, text)
        self.train_start = time.perf_counter()  # the budget is a share of the training time after this

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step % self.every or self.reference is None:
            return
        elapsed = time.perf_counter() - self.train_start
        if self.spent + self.last_cost > self.budget * elapsed:
            self.postponed += 1
            return
        should_log = control.should_log  # logging resets it; the step's own training log must still happen
        self.measure(state.global_step)
        control.should_log = should_log

    def measure(self, step: int) -> dict:
        t = time.perf_counter()
        results = self._decode(self.trainer.model, self.strategy)
        tokens = sum(len(r.token_ids) for r in results)
        forwards = sum(r.forward_passes for r in results)
        metrics = {
            "accept_tokens_per_forward": tokens / max(forwards, 1),
            "accept_mean_length": acceptance_length([r.accepted_per_step for r in results]),
            "accept_agreement": sum(r.text == ref for r, ref in zip(results, self.reference_text)) / len(results),
            "accept_prefix_agreement": sum(prefix_agreement(ref, r.token_ids)
                                           for r, ref in zip(results, self.reference)) / len(results),
        }
        self.last_cost = time.perf_counter() - t
        self.spent += self.last_cost
        metrics["accept_seconds"] = self.last_cost
        self.history.append({"step": step, **metrics})
        if self.trainer.is_world_process_zero():
            print(f"acceptance @ step {step} ({self.strategy.label}, {len(results)} held-out prompts): "
                  f"{metrics['accept_tokens_per_forward']:.2f} tokens/forward, mean acceptance length "
                  f"{metrics['accept_mean_length']:.2f}, same answer as the starting k=1 "
                  f"{100 * metrics['accept_agreement']:.0f}% (token prefix {metrics['accept_prefix_agreement']:.2f}); "
                  f"{self.last_cost:.1f} s", flush=True)
        # Trainer.log, not the MTP trainer's override: the latter would flush its training-metric window here.
        Trainer.log(self.trainer, dict(metrics))
        return metrics

    def on_train_end(self, args, state, control, **kwargs):
        if self.trainer.is_world_process_zero():
            elapsed = time.perf_counter() - getattr(self, "train_start", time.perf_counter())
            share = self.spent / elapsed if elapsed > 0 else 0.0
            print(f"acceptance: {len(self.history)} measurements, {self.postponed} postponed by the "
                  f"{100 * self.budget:.0f}% budget; {self.spent:.1f} s = {100 * share:.1f}% of {elapsed:.0f} s "
                  f"of training; the starting model's k=1 reference "
                  + (f"took {self.reference_seconds:.1f} s (cached for the next run from the same model)"
                     if self.reference_seconds else "came from the cache"), flush=True)


def make_callback(trainer, args) -> AcceptanceCallback:
    from distill.data import resolve_format

    prompts, source = held_out_prompts(args, args.acceptance_prompts)
    if not prompts:
        raise UserError("acceptance_eval_steps: no held-out prompts (the eval split is empty)")
    fmt = resolve_format(args.dataset_format, trainer.processing_class)
    return AcceptanceCallback(trainer, prompts, source, every=args.acceptance_eval_steps, tau=args.acceptance_tau,
                              k_max=args.acceptance_k_max, max_new_tokens=args.acceptance_max_new_tokens,
                              budget=args.acceptance_budget, fmt=fmt)
