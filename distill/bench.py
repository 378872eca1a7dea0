"""`mtp bench-train`: what online self-distillation costs over plain SFT, measured side by side in one run.

Two figures, each a ratio of MTP over SFT on the same model and the same GSM8K rows:

  * step time, full fine-tune: one MTP distillation step (student forward + backward, frozen-copy teacher forward,
    paper §2.3) over one plain SFT step (causal-LM loss on the same source tokens). Goal <= 1.4.
  * peak memory, LoRA: the shared-base MTP run (the teacher is the base with adapters off, no second copy; §7.1) over
    LoRA SFT with the same adapters. Goal <= 1.10.

Both sides go through the same code: a `transformers.Trainer` (plain for SFT, `MTPDistillTrainer` for MTP) built the
usual way, then the same tight loop of `trainer.training_step` + gradient clipping + AdamW step, timed around the
whole step. The timing loop alternates SFT and MTP step by step on the same batch, so a slow-down of the machine hits
both sides alike; warm-up steps are excluded and the median step is reported. SFT batches hold the MTP rows' source
tokens (right-padded to the raw length the packing consumes); MTP batches hold the same rows, packed to seq_len slots.

Memory is measured in a fresh process per side (a second run in the same process would reuse the first one's freed
allocator pages). On CUDA: `torch.cuda.max_memory_allocated` over the measured steps. On CPU: the process's peak
resident set size during the measured steps (Linux VmHWM, reset just before them; elsewhere an RSS sampling thread),
minus the RSS before the model was loaded — so both include weights, optimizer states and activations, like the CUDA
figure does.
"""

import json
import os
import re
import subprocess
import sys
import tempfile
import threading
import time

from distill.errors import UserError

STEP_TIME_GOAL = 1.4
MEMORY_GOAL = 1.10
DEFAULT_DATASET = "data/gsm8k/train.jsonl"


# --------------------------------------------------------------------------------------------------- building blocks


def device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _rows(args, tokenizer, raw_length: int) -> list[list[int]]:
    """(warmup + steps) * batch tokenized rows, in file order; fewer rows than that is an error, not a silent reuse."""
    from distill.data import format_and_tokenize, load_examples
    from distill.run import resolve_dataset

    needed = (args.warmup + args.steps) * args.batch_size
    examples = load_examples(resolve_dataset(args.dataset))
    if len(examples) < needed:
        raise UserError(f"{args.dataset} has {len(examples)} rows; the benchmark needs {needed}")
    examples = examples.select(range(needed))
    return format_and_tokenize(examples, tokenizer, fmt="auto", max_length=raw_length)["input_ids"]


def _common_args(args, output_dir: str) -> dict:
    """TrainingArguments shared by both sides: same optimizer, lr, clipping and precision."""
    cuda = device().type == "cuda"
    return dict(
        output_dir=output_dir, per_device_train_batch_size=args.batch_size, learning_rate=1e-5, weight_decay=0.1,
        adam_beta1=0.9, adam_beta2=0.95, max_grad_norm=1.0, optim="adamw_torch", use_cpu=not cuda,
        bf16=bool(getattr(args, "bf16", False)),
        report_to="none", save_strategy="no", disable_tqdm=True, seed=0,
    )


def _trainable_mtp_row(model, mtp_id: int) -> dict:
    """trainable_token_indices that keep the <MTP> row trainable under LoRA (what the MTP trainer does, §7.1); set
    explicitly so the SFT side carries exactly the same adapters."""
    names = {module: name.split(".")[-1] for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    rows = {names[embed]: [mtp_id]}
    if head is not None and head.weight is not embed.weight:
        rows[names[head]] = [mtp_id]
    return rows


def _lora_config(args, model, mtp_id: int):
    from peft import LoraConfig

    return LoraConfig(task_type="CAUSAL_LM", r=args.lora_r, lora_alpha=2 * args.lora_r, lora_dropout=0.0,
                      target_modules="all-linear", trainable_token_indices=_trainable_mtp_row(model, mtp_id))


def _build(side: str, args, output_dir: str):
    """(trainer, tokenizer) for one side: "sft" / "mtp" full fine-tune, "sft-lora" / "mtp-lora"."""
    from transformers import Trainer, TrainingArguments

    from distill.models import load_model, load_tokenizer
    from distill.tokens import add_mtp_token
    from distill.trainer import MTPDistillConfig, MTPDistillTrainer

    import torch

    tokenizer = load_tokenizer(args.model)
    model = load_model(args.model, dtype=torch.float32)
    mtp_id = add_mtp_token(model, tokenizer)  # both sides: the same vocabulary, the same matrices
    lora = side.endswith("-lora")
    peft_config = _lora_config(args, model, mtp_id) if lora else None
    common = _common_args(args, output_dir)
    if side.startswith("mtp"):
        config = MTPDistillConfig(**common, seq_len=args.seq_len, num_regions=args.num_regions, k_min=args.k_min,
                                  k_max=args.k_max, supervision="hard",
                                  teacher="shared-base" if lora else "frozen-copy")
        trainer = MTPDistillTrainer(model=model, args=config, processing_class=tokenizer, peft_config=peft_config)
    else:
        if lora:
            from peft import get_peft_model

            model = get_peft_model(model, peft_config)
        trainer = Trainer(model=model, args=TrainingArguments(**common), processing_class=tokenizer)
    trainer.create_optimizer()
    # training_step divides the loss by this; the Trainer's own loop sets it per step (no accumulation here).
    trainer.current_gradient_accumulation_steps = 1
    return trainer, tokenizer


def _batches(side: str, rows: list[list[int]], args, pad_id: int, raw_length: int):
    """Per step: MTP -> {"input_ids", "lengths"} (the MTP collator); SFT -> causal-LM inputs of the same tokens."""
    import torch

    from distill.data import MTPCollator

    collate = MTPCollator(pad_id, raw_length)
    out = []
    for start in range(0, len(rows), args.batch_size):
        batch = collate([{"input_ids": r} for r in rows[start : start + args.batch_size]])
        if side.startswith("sft"):
            positions = torch.arange(raw_length).unsqueeze(0)
            real = positions < batch["lengths"].unsqueeze(1)
            batch = {"input_ids": batch["input_ids"], "attention_mask": real.long(),
                     "labels": batch["input_ids"].masked_fill(~real, -100)}
        out.append(batch)
    return out


def _step(trainer, batch) -> float:
    """One optimizer step, wall-clock seconds (the same code for both sides)."""
    import torch

    start = time.perf_counter()
    trainer.training_step(trainer.model, batch)
    torch.nn.utils.clip_grad_norm_([p for p in trainer.model.parameters() if p.requires_grad], trainer.args.max_grad_norm)
    trainer.optimizer.step()
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.state.global_step += 1  # the MTP trainer draws (k, offset) from the step number (§1.4, §1.5)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - start


def packed_raw_length(args) -> int:
    from distill.layout import prefix_len, raw_tokens_needed

    prefix_len(args.seq_len, args.num_regions, args.k_max)  # UserError when k_max does not fit a region
    return raw_tokens_needed(args.seq_len, args.num_regions, args.k_min)


# --------------------------------------------------------------------------------------------------------- step time


def measure_step_time(args) -> dict:
    """Full fine-tune: SFT and MTP steps alternated on the same batches; medians of the measured steps."""
    import statistics

    from tqdm.auto import tqdm

    raw_length = packed_raw_length(args)
    with tempfile.TemporaryDirectory() as tmp:
        sft, tokenizer = _build("sft", args, tmp)
        mtp, _ = _build("mtp", args, tmp)
        rows = _rows(args, tokenizer, raw_length)
        batches = {side: _batches(side, rows, args, tokenizer.pad_token_id, raw_length) for side in ("sft", "mtp")}
        times = {"sft": [], "mtp": []}
        for i in tqdm(range(args.warmup + args.steps), desc="step time (SFT, MTP alternated)", file=sys.stderr):
            for side, trainer in (("sft", sft), ("mtp", mtp)):
                times[side].append(_step(trainer, batches[side][i]))
    measured = {side: t[args.warmup :] for side, t in times.items()}
    sft_s, mtp_s = statistics.median(measured["sft"]), statistics.median(measured["mtp"])
    ratio = mtp_s / sft_s
    return {"sft_median_s": sft_s, "mtp_median_s": mtp_s, "ratio": ratio, "goal": STEP_TIME_GOAL,
            "meets_goal": ratio <= STEP_TIME_GOAL,
            "ratio_of_means": statistics.fmean(measured["mtp"]) / statistics.fmean(measured["sft"]),
            # On a shared machine other processes only ever add time: the fastest step is the least disturbed one.
            "ratio_of_minimums": min(measured["mtp"]) / min(measured["sft"]),
            "sft_steps_s": measured["sft"], "mtp_steps_s": measured["mtp"],
            "warmup_steps_s": {side: t[: args.warmup] for side, t in times.items()},
            "sft_tokens_per_row": raw_length, "mtp_slots_per_row": args.seq_len}


# ------------------------------------------------------------------------------------------------------------ memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as fh:
        return int(re.search(rf"^{field}:\s+(\d+) kB", fh.read(), re.M).group(1))


class PeakRSS:
    """Peak resident set size inside a `with` block, in bytes: Linux VmHWM (reset on entry), else a sampling thread."""

    def __init__(self, interval_s: float = 0.001):
        self.interval_s = interval_s
        self.peak = 0
        self.hwm = os.access("/proc/self/clear_refs", os.W_OK) and os.path.exists("/proc/self/status")
        self.method = "process peak RSS (Linux VmHWM)" if self.hwm else "process RSS sampled every 1 ms (psutil)"

    def __enter__(self):
        if self.hwm:
            with open("/proc/self/clear_refs", "w") as fh:
                fh.write("5")  # "5" resets the peak RSS counter to the current RSS (Linux >= 4.0)
            return self
        import psutil

        process, self._stop = psutil.Process(), threading.Event()

        def sample():
            while not self._stop.is_set():
                self.peak = max(self.peak, process.memory_info().rss)
                time.sleep(self.interval_s)

        self._thread = threading.Thread(target=sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        if self.hwm:
            self.peak = _status_kib("VmHWM") * 1024
        else:
            self._stop.set()
            self._thread.join()


def _current_rss() -> int:
    import psutil

    return psutil.Process().memory_info().rss


def memory_worker(args) -> dict:
    """One LoRA side in this (fresh) process: peak memory of its measured steps above the pre-load baseline."""
    import datasets  # noqa: F401  every library is imported before the baseline: imports are not the run's memory
    import peft  # noqa: F401
    import torch
    import transformers  # noqa: F401

    import distill.trainer  # noqa: F401

    cuda = device().type == "cuda"
    raw_length = packed_raw_length(args)
    baseline = torch.cuda.memory_allocated() if cuda else _current_rss()
    with tempfile.TemporaryDirectory() as tmp:
        trainer, tokenizer = _build(args.worker, args, tmp)
        rows = _rows(args, tokenizer, raw_length)
        batches = _batches(args.worker, rows, args, tokenizer.pad_token_id, raw_length)
        for batch in batches[: args.warmup]:  # allocates the AdamW states: they count, the step does not
            _step(trainer, batch)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
            for batch in batches[args.warmup :]:
                _step(trainer, batch)
            peak, method = torch.cuda.max_memory_allocated(), "torch.cuda.max_memory_allocated"
        else:
            with PeakRSS() as meter:
                for batch in batches[args.warmup :]:
                    _step(trainer, batch)
            peak, method = meter.peak, meter.method
    return {"side": args.worker, "peak_bytes": peak - baseline, "method": method}


def measure_memory(args, argv: list[str]) -> dict:
    """Run each LoRA side in its own process (`--worker`), return both peaks and their ratio."""
    from tqdm.auto import tqdm

    results = {}
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false"}
    for side in tqdm(("sft-lora", "mtp-lora"), desc="peak memory (LoRA, one process each)", file=sys.stderr):
        cmd = [sys.executable, "-m", "mtp_cli", "bench-train", *argv, "--worker", side, "--json"]
        proc = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        if proc.returncode != 0:
            tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
            raise UserError(f"memory run {side} failed: {tail}")
        results[side] = json.loads(proc.stdout.strip().splitlines()[-1])
    sft, mtp = results["sft-lora"]["peak_bytes"], results["mtp-lora"]["peak_bytes"]
    ratio = mtp / sft
    return {"sft_lora_mib": sft / 2**20, "mtp_lora_mib": mtp / 2**20, "ratio": ratio, "goal": MEMORY_GOAL,
            "meets_goal": ratio <= MEMORY_GOAL, "method": results["mtp-lora"]["method"]
            + ("" if results["mtp-lora"]["method"].startswith("torch.cuda") else ", above the RSS before model load")}


def measure(args, argv: list[str]) -> dict:
    report = {"config": {"model": args.model, "device": str(device()), "batch_size": args.batch_size,
                         "seq_len": args.seq_len, "num_regions": args.num_regions, "k_min": args.k_min,
                         "k_max": args.k_max, "steps": args.steps, "warmup": args.warmup, "lora_r": args.lora_r,
                         "dataset": args.dataset, "bf16": args.bf16}}
    if not args.skip_time:
        report["step_time"] = measure_step_time(args)
    if not args.skip_memory:
        report["memory"] = measure_memory(args, [a for a in argv if a != "--json"])
    return report
