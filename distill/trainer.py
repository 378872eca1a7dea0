"""MTPDistillTrainer: turn a causal LM into a multi-token predictor by online self-distillation (paper §2.3, §7.4).

One training step (per rank, per optimizer step; §2.3):

    k, o   = StepSampler(global_step)                 k ~ U{k_min..k_max}, offset o ~ U{0..P(k)-1}   (§1.4, §1.5)
    layout = build_layout(rows, k, M, S, o)           M MTP problems per row, GT replicated, RoPE = source index (§1.3)
    Ls     = student(layout, block mask)[pred slots]  [R, k, V], with grad; the LM head runs at pred slots only
    y'     = argmax Ls                                the student's greedy k-token proposal
    t_in   = layout inputs, masks <- y'_1..y'_{k-1}   student forcing (§2.2 step 4)
    Lt     = teacher(t_in, causal block mask)[pred]   no grad, dropout off
    loss   = objective(Ls, Lt)                        hard teacher CE by default (distill/objective.py)

The trainer is a plain `transformers.Trainer` otherwise: optimizer, schedule, gradient accumulation, DeepSpeed/FSDP,
checkpointing and `resume_from_checkpoint` all come from it. It adds `<MTP>` to the model if missing, records
`config.mtp_mask_token_id` / `config.mtp_k_max` in saved checkpoints, wraps the model with peft when given a
`peft_config` (keeping the `<MTP>` embedding row trainable; with `lora_mask_only` the adapters act at `<MTP>`
positions only and k=1 stays the base model's, distill/adapters.py), and logs the paper's diagnostics (§2.2 step 8).

What a cluster needs on top (distill/checkpoints.py): checkpoints are written under a hidden name and renamed when
complete, SIGTERM saves a checkpoint at the next step boundary and stops, and a step whose loss is NaN/inf is skipped
(no weight update; counted as `nonfinite_steps`) until `max_nonfinite_steps` in a row end the run with one message.
Under ZeRO-3 the student and the frozen teacher are built whole (the <MTP> row needs every embedding row) and
DeepSpeed partitions both afterwards: the teacher as a ZeRO-3 inference engine (TRL's `prepare_deepspeed`).
"""

from __future__ import annotations

import copy
import os
import shutil
import time
from dataclasses import dataclass, field

import numpy as np
import torch
from transformers import Trainer, TrainerCallback, TrainingArguments
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, rotate_checkpoints

from distill import checkpoints
from distill.attention import dense_block_mask, flex_block_mask
from distill.data import MTPCollator, check_row_lengths, format_and_tokenize, load_examples, train_eval_split
from distill.errors import UserError
from distill.layout import StepSampler, build_layout, prefix_len, raw_tokens_needed
from distill.objective import SUPERVISIONS, metric_names, mtp_objective
from distill.teacher import (
    TEACHER_KINDS,
    Teacher,
    frozen_copy,
    is_peft_model,
    load_teacher,
    resolve_teacher_kind,
    slot_logits,
)
from distill.tokens import add_mtp_token, get_mtp_token_id


@dataclass
class MTPDistillConfig(TrainingArguments):
    """Every `transformers.TrainingArguments` flag, plus the MTP layout, objective, teacher and dataset options.

    Defaults follow the paper's main runs (§7.7) where they are method-level (k range, regions, sequence length,
    causal attention, hard teacher, lr 1e-5 with warm-up then constant, AdamW betas/decay of the reference config).
    Run-size knobs (steps, batch size, warm-up length) belong in the recipe.
    """

    # --- layout (§1.3-1.5) ---
    k_min: int = field(default=2, metadata={"help": "Smallest k (tokens predicted per MTP problem) drawn per step (§1.5)."})
    k_max: int = field(default=16, metadata={"help": "Largest k drawn per step; also recorded as config.mtp_k_max (§1.5)."})
    num_regions: int = field(default=5, metadata={"help": "MTP problems M packed per row; paper: seq_len / (2 k_max) (§1.3)."})
    seq_len: int = field(default=160, metadata={"help": "Packed model input length S per row (§1.3)."})
    random_offsets: bool = field(default=True, metadata={"help": "Shift the region grid by a random offset each step (§1.4)."})
    bidirectional: bool = field(
        default=False,
        metadata={"help": "BDA ablation: slots of one MTP span attend to each other (student only; §1.3)."},
    )
    # --- objective (§2) ---
    supervision: str = field(
        default="hard",
        metadata={"help": "hard: CE to the teacher's argmax (main method); soft: KL(teacher||student); "
                          "gt: CE to the ground truth, no teacher pass (§2.2).", "choices": list(SUPERVISIONS)},
    )
    sequence_weighted: bool = field(
        default=False,
        metadata={"help": "Paper equation form (§2.1 eq. mtpo2): -P_T(y'|x) log P_S(y'|x) per MTP problem, averaged "
                          "over problems; with supervision hard P_T(y'|x) is 1 when y' is the teacher's greedy "
                          "chain, else 0."},
    )
    prefix_ntp_weight: float = field(
        default=0.0, metadata={"help": "Weight of the NTP cross-entropy on ground truth at prefix slots (0 = off)."}
    )
    student_entropy_beta: float = field(
        default=0.0, metadata={"help": "Weight β of the student-entropy penalty β·H(S) (0 = off; §2.2)."}
    )
    teacher: str = field(
        default="auto",
        metadata={"help": "auto (shared-base for LoRA, else frozen-copy) | shared-base (LoRA adapters disabled) | "
                          "frozen-copy | a model name/path with the same tokenizer."},
    )
    model_init_kwargs: dict | str | None = field(
        default=None,
        metadata={"help": "Keyword arguments for distill.models.load_model when the model is given by name "
                          "(dtype, attn_implementation, trust_remote_code)."},
    )
    # --- dataset (§1.6, §7.2) ---
    dataset_name: str | None = field(
        default=None,
        metadata={"help": "Hub dataset (openai/gsm8k, meta-math/MetaMathQA) or a local .json/.jsonl/.parquet file."},
    )
    dataset_split: str = field(default="train", metadata={"help": "Split to load from a hub dataset."})
    dataset_format: str = field(
        default="auto",
        metadata={"help": "chat (tokenizer chat template) | plain (BOS + query + blank line + response + EOS) | "
                          "auto (chat when the tokenizer has a template).", "choices": ["auto", "chat", "plain"]},
    )
    question_column: str | None = field(default=None, metadata={"help": "Question column (default: auto-detected)."})
    answer_column: str | None = field(default=None, metadata={"help": "Answer column (default: auto-detected)."})
    eval_fraction: float = field(
        default=0.0, metadata={"help": "Fraction of rows held out for evaluation (seeded; grouped by seed question)."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Keep only this many training rows."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Keep only this many evaluation rows."})
    regenerate: bool = field(
        default=False,
        metadata={"help": "Distil on the starting model's own greedy answers to the dataset's questions instead of "
                          "the dataset's answers (`mtp regenerate`, adaptive/regenerate.py): only the head rows this "
                          "run consumes, never the held-out tail; cached by fingerprint and reused."},
    )
    regenerate_rows: int = field(
        default=0, metadata={"help": "regenerate: head rows to regenerate (0: what max_steps x global batch needs)."}
    )
    regenerate_max_new_tokens: int = field(default=256, metadata={"help": "regenerate: answer length cap (tokens)."})
    regenerate_batch_size: int = field(default=16, metadata={"help": "regenerate: prompts decoded per batch."})
    lora_mask_only: bool = field(
        default=False,
        metadata={"help": "LoRA acts only at <MTP> positions (distill/adapters.py): every real token runs the base "
                          "weights, so k=1 decoding stays the base model's exactly. Needs use_peft (LoRA)."},
    )
    prefix_cache: bool = field(
        default=False,
        metadata={"help": "With lora_mask_only and supervision gt: run each row's real tokens once without gradients "
                          "and train only the <MTP> slots, attending to that key/value cache; num_regions = MTP "
                          "problems per row, drawn among the response's positions; seq_len = real tokens per row."},
    )
    # --- acceptance while training (distill/acceptance.py) ---
    acceptance_eval_steps: int = field(
        default=0,
        metadata={"help": "Every N steps decode a few held-out prompts with ConfAdapt (raw tau) and log tokens/forward, "
                          "mean acceptance length and agreement with the starting model's k=1 (0: off)."},
    )
    acceptance_tau: float = field(default=0.9, metadata={"help": "acceptance: ConfAdapt threshold (raw top-1 p)."})
    acceptance_k_max: int = field(default=4, metadata={"help": "acceptance: ConfAdapt k_max."})
    acceptance_prompts: int = field(default=4, metadata={"help": "acceptance: held-out prompts decoded."})
    acceptance_max_new_tokens: int = field(default=32, metadata={"help": "acceptance: tokens per prompt."})
    acceptance_budget: float = field(
        default=0.05, metadata={"help": "acceptance: most of the training wall time it may take (postpones)."}
    )
    # --- reliability ---
    max_nonfinite_steps: int = field(
        default=5,
        metadata={"help": "Optimizer steps with a NaN/inf loss are skipped (no update); this many in a row end the "
                          "run."},
    )
    overwrite_output_dir: bool = field(
        default=False,
        metadata={"help": "Start afresh in an output_dir that holds an earlier run: its checkpoint-N directories are "
                          "deleted first. Off: such a directory is an error (continue it with --resume)."},
    )

    # --- TrainingArguments defaults changed for this method ---
    learning_rate: float = field(default=1e-5, metadata={"help": "Peak AdamW learning rate (§3.1)."})
    lr_scheduler_type: str = field(
        default="constant_with_warmup", metadata={"help": "Linear warm-up then constant (§3.1)."}
    )
    weight_decay: float = field(default=0.1, metadata={"help": "AdamW weight decay (reference config; §6.3 item 2)."})
    adam_beta2: float = field(default=0.95, metadata={"help": "AdamW beta2 (reference config; §6.3 item 2)."})
    logging_steps: float = field(default=10, metadata={"help": "Log every X update steps."})
    remove_unused_columns: bool = field(
        default=False, metadata={"help": "Keep dataset columns; the MTP collator reads input_ids only."}
    )
    bf16: bool | None = field(
        default=None, metadata={"help": "bf16 mixed precision; default: on when CUDA with bf16 is available."}
    )

    def __post_init__(self):
        cuda = torch.cuda.is_available()
        if not cuda:
            self.use_cpu = True
        if self.bf16 is None:
            self.bf16 = bool(cuda and torch.cuda.is_bf16_supported())
        if isinstance(self.model_init_kwargs, str):  # from the command line: a JSON object
            import json

            self.model_init_kwargs = json.loads(self.model_init_kwargs)
        self._check()
        super().__post_init__()
        if "wandb" in (self.report_to or []):  # wandb never needs a network unless the user asks for one
            os.environ.setdefault("WANDB_MODE", "offline")

    def _check(self) -> None:
        import math

        for name in ("learning_rate", "weight_decay", "adam_beta1", "adam_beta2", "adam_epsilon", "max_grad_norm",
                     "warmup_ratio", "prefix_ntp_weight", "student_entropy_beta", "num_train_epochs"):
            value = getattr(self, name, None)
            if isinstance(value, float) and not math.isfinite(value):
                raise UserError(f"{name} must be a finite number, got {value}")
        if self.learning_rate <= 0:
            raise UserError(f"learning_rate must be > 0, got {self.learning_rate}")
        if self.k_min < 2 or self.k_max < self.k_min:
            raise UserError(f"need 2 <= k_min <= k_max, got k_min={self.k_min}, k_max={self.k_max}")
        prefix_len(self.seq_len, self.num_regions, self.k_max)  # UserError when k_max does not fit a region
        if self.supervision not in SUPERVISIONS:
            raise UserError(f"unknown supervision {self.supervision!r}; choose one of {', '.join(SUPERVISIONS)}")
        if self.sequence_weighted and self.supervision == "gt":
            raise UserError("sequence_weighted needs a teacher; use supervision 'hard' or 'soft'")
        if self.prefix_ntp_weight < 0:
            raise UserError(f"prefix_ntp_weight must be >= 0, got {self.prefix_ntp_weight}")
        if self.prefix_cache and not (self.lora_mask_only and self.supervision == "gt" and not self.bidirectional):
            raise UserError("prefix_cache needs lora_mask_only: true and supervision: gt (the real tokens must run the "
                            "base weights and need no teacher), with causal attention (bidirectional: false)")
        if self.lora_mask_only and self.prefix_ntp_weight:
            raise UserError("prefix_ntp_weight has nothing to train with lora_mask_only: prefix slots run the base "
                            "weights; set it to 0")
        if not 0.0 <= self.eval_fraction < 1.0:
            raise UserError(f"eval_fraction must be in [0, 1), got {self.eval_fraction}")
        if self.max_nonfinite_steps < 1:
            raise UserError(f"max_nonfinite_steps must be >= 1, got {self.max_nonfinite_steps}")
        if self.acceptance_eval_steps < 0:
            raise UserError(f"acceptance_eval_steps must be >= 0 (0: off), got {self.acceptance_eval_steps}")
        if self.acceptance_eval_steps:
            if not 0.0 < self.acceptance_tau <= 1.0:
                raise UserError(f"acceptance_tau must be in (0, 1], got {self.acceptance_tau}")
            if not 0.0 < self.acceptance_budget <= 1.0:
                raise UserError(f"acceptance_budget must be in (0, 1], got {self.acceptance_budget}")
            for name in ("acceptance_k_max", "acceptance_prompts", "acceptance_max_new_tokens"):
                if getattr(self, name) < 1:
                    raise UserError(f"{name} must be >= 1, got {getattr(self, name)}")
            if self.acceptance_k_max > self.k_max:
                raise UserError(f"acceptance_k_max {self.acceptance_k_max} is more than the k_max {self.k_max} "
                                "the model is trained for")
        for name, low in (("regenerate_rows", 0), ("regenerate_max_new_tokens", 1), ("regenerate_batch_size", 1)):
            if getattr(self, name) < low:
                raise UserError(f"{name} must be >= {low}, got {getattr(self, name)}")
        for name in ("max_train_samples", "max_eval_samples"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise UserError(f"{name} must be >= 1, got {value}")

    @property
    def raw_length(self) -> int:
        """Source tokens per row the packing can consume (incl. the last target), at the smallest k (§1.3); with
        prefix_cache, seq_len itself (the real tokens are not replicated)."""
        if self.prefix_cache:
            return self.seq_len
        return raw_tokens_needed(self.seq_len, self.num_regions, self.k_min)


def prepare_datasets(args: MTPDistillConfig, tokenizer):
    """(train, eval or None) tokenized datasets from args.dataset_name, as the recipe describes them."""
    if not args.dataset_name:
        raise UserError("no dataset given (dataset_name)")
    ds = load_examples(args.dataset_name, args.dataset_split, question_column=args.question_column,
                       answer_column=args.answer_column)
    train, evaluation = train_eval_split(ds, args.eval_fraction, args.seed)
    if args.max_train_samples is not None:
        train = train.select(range(min(args.max_train_samples, len(train))))
    if evaluation is not None and args.max_eval_samples is not None:
        evaluation = evaluation.select(range(min(args.max_eval_samples, len(evaluation))))

    def tokenize(ds, split):
        ds = format_and_tokenize(ds, tokenizer, fmt=args.dataset_format, max_length=args.raw_length,
                                 prompt_length=args.prefix_cache)
        check_row_lengths(ds, min_row_tokens(args), what=f"{args.dataset_name} ({split})")
        return ds

    return tokenize(train, "train"), (tokenize(evaluation, "eval") if evaluation is not None else None)


def min_row_tokens(args: MTPDistillConfig) -> int:
    """Tokens a row needs for one MTP problem at every step: region 0's ground truth at k_min and offset 0 plus its
    first target (P(k_min) + 1; §1.6: a region with no real target is never supervised). With prefix_cache: one
    token and its k_min targets."""
    if args.prefix_cache:
        return args.k_min + 1
    return prefix_len(args.seq_len, args.num_regions, args.k_min) + 1


def _mtp_token_peft_config(peft_config, model, mtp_id: int):
    """LoRA never trains embeddings; <MTP> is a new row, so make exactly that row trainable (peft trainable tokens)."""
    if not hasattr(peft_config, "trainable_token_indices") or peft_config.trainable_token_indices is not None:
        return peft_config  # not LoRA, or the user chose the trainable tokens
    names = {module: name.split(".")[-1] for name, module in model.named_modules()}
    embed, head = model.get_input_embeddings(), model.get_output_embeddings()
    if embed.__class__.__name__ == "TrainableTokensWrapper" or names[embed] in (peft_config.modules_to_save or []):
        return peft_config  # the embedding is already trained
    targets = {names[embed]: [mtp_id]}
    # A tied head follows the embedding inside peft; an untied head gets its own <MTP> row.
    if head is not None and head.weight is not embed.weight and names[head] not in (peft_config.modules_to_save or []):
        targets[names[head]] = [mtp_id]
    peft_config = copy.deepcopy(peft_config)
    peft_config.trainable_token_indices = targets
    return peft_config


class MTPDistillTrainer(Trainer):
    """`Trainer` whose loss is the online self-distillation MTP objective (see the module docstring)."""

    def __init__(self, model, args: MTPDistillConfig | None = None, train_dataset=None, eval_dataset=None,
                 processing_class=None, peft_config=None, teacher_model=None, callbacks=None, **kwargs):
        from distill.models import full_weights, is_partitioned

        args = args if args is not None else MTPDistillConfig(output_dir="outputs/mtp")
        if not isinstance(args, MTPDistillConfig):
            raise UserError("args must be an MTPDistillConfig")
        with full_weights():  # ZeRO-3: load and edit whole tensors; DeepSpeed partitions them in train()
            model, tokenizer, teacher_kind, teacher_module = self._build_models(
                model, args, processing_class, peft_config, teacher_model)
        if is_partitioned(model):
            raise UserError("the model was loaded already partitioned by ZeRO-3; pass it by name or path "
                            "(the trainer adds <MTP> and copies the teacher before DeepSpeed partitions them)")

        if train_dataset is None and args.dataset_name:
            train_dataset, prepared_eval = prepare_datasets(args, tokenizer)
            eval_dataset = eval_dataset if eval_dataset is not None else prepared_eval
        train_dataset, eval_dataset = (self._tokenized(d, tokenizer, args) for d in (train_dataset, eval_dataset))
        data_collator = kwargs.pop("data_collator", None) or MTPCollator(tokenizer.pad_token_id, args.raw_length)

        # Preemption (SIGTERM -> checkpoint and stop) and the non-finite-loss guard; see distill/checkpoints.py.
        self.preemption = checkpoints.PreemptionCallback(self._any_rank)
        callbacks = [*(callbacks or []), self.preemption, _NonFiniteGuard(self)]
        self._checkpoint_staging: str | None = None
        self._nonfinite = {"pending": False, "where": None, "in_a_row": 0, "total": 0, "first_step": None}
        super().__init__(model=model, args=args, data_collator=data_collator, train_dataset=train_dataset,
                         eval_dataset=eval_dataset, processing_class=tokenizer, callbacks=callbacks, **kwargs)
        if args.acceptance_eval_steps:  # ConfAdapt on held-out prompts every N steps (distill/acceptance.py)
            from distill.acceptance import make_callback

            self.acceptance = make_callback(self, args)
            self.add_callback(self.acceptance)
        # compute_loss returns a per-micro-batch mean (§2.2 step 7); the Trainer divides it over accumulation steps.
        self.model_accepts_loss_kwargs = False
        self.loss_is_scaled_for_ga = False

        self.pad_token_id = tokenizer.pad_token_id
        self.teacher = None
        if args.supervision != "gt":
            if teacher_kind == "shared-base":
                self.teacher = Teacher("shared-base", self.model, replace_token_id=self.pad_token_id)
            else:
                teacher_rows = teacher_module.get_output_embeddings().weight.shape[0]
                self.teacher = Teacher(teacher_kind, self._prepare_teacher(teacher_module),
                                       replace_token_id=self.pad_token_id,
                                       vocab_size=min(teacher_rows, self._student_rows))
        # prefix_cache draws k here (its problem positions come from stream 2, in _cached_prefix_logits), so the
        # region grid is moot.
        regions, offsets = (1, False) if args.prefix_cache else (args.num_regions, args.random_offsets)
        self.sampler = StepSampler(args.seed, args.k_min, args.k_max, args.seq_len, regions,
                                   rank=args.process_index, random_offsets=offsets)
        # Evaluation draws (k, offset) per eval batch from its own seed, the same sequence at every evaluation.
        self.eval_sampler = StepSampler(args.seed + 1, args.k_min, args.k_max, args.seq_len, regions,
                                        rank=args.process_index, random_offsets=offsets)
        self._eval_batch = 0
        self._flex_masks: dict = {}
        self._metric_names = ["k", "offset"] + metric_names(args.k_max)
        self._metric_index = {name: i for i, name in enumerate(self._metric_names)}
        self._metrics = {mode: torch.zeros(2, len(self._metric_names), dtype=torch.float64) for mode in ("train", "eval")}
        self._window_start: dict[str, float | None] = {"train": None, "eval": None}

    # ------------------------------------------------------------------ setup helpers
    def _build_models(self, model, args, tokenizer, peft_config, teacher_model):
        """(student, tokenizer, teacher kind, teacher module): <MTP> added, teacher built, peft applied."""
        from distill.models import check_position_ids, load_model, load_tokenizer

        if isinstance(model, str):
            tokenizer = tokenizer or load_tokenizer(model)
            model = load_model(model, **(args.model_init_kwargs or {}))
        check_position_ids(model)
        if tokenizer is None:
            raise UserError("pass the tokenizer as processing_class")
        if peft_config is not None and is_peft_model(model):
            raise UserError("the model is already a peft model; pass either a peft model or a peft_config, not both")
        uses_peft = peft_config is not None or is_peft_model(model)

        # <MTP> (paper §1.1) and the recorded decoding defaults; a peft model must already have it.
        if is_peft_model(model):
            self.mask_token_id = get_mtp_token_id(model.config)
        else:
            self.mask_token_id = add_mtp_token(model, tokenizer)
        model.config.mtp_k_max = args.k_max

        # The teacher is built before peft wraps the student: a frozen copy must be the plain initial model.
        self._student_rows = model.get_output_embeddings().weight.shape[0]
        teacher_kind, teacher_module = "shared-base", None
        if teacher_model is not None:
            teacher_kind = "model"
            if isinstance(teacher_model, str):
                teacher_model = load_teacher(teacher_model, model, tokenizer)
            teacher_module = teacher_model.requires_grad_(False).eval()
        elif args.supervision != "gt":
            teacher_kind = resolve_teacher_kind(args.teacher, uses_peft=uses_peft)
            if teacher_kind == "frozen-copy":
                teacher_module = frozen_copy(model)
            elif teacher_kind not in TEACHER_KINDS:
                teacher_module = load_teacher(teacher_kind, model, tokenizer,
                                              attn_implementation=model.config._attn_implementation)
                teacher_kind = "model"
        if peft_config is not None:
            from peft import get_peft_model

            # Mask-only adapters leave the <MTP> embedding row as initialised: a tied head would carry a trained row
            # into every position's logits (the <MTP> logit), and the layer-0 adapters see that row anyway.
            if not args.lora_mask_only:
                peft_config = _mtp_token_peft_config(peft_config, model, self.mask_token_id)
            model = get_peft_model(model, peft_config)
        if args.lora_mask_only:
            if not is_peft_model(model) or getattr(model, "peft_type", None) != "LORA":
                raise UserError("lora_mask_only needs a LoRA student (use_peft: true)")
            from distill.adapters import gate_model

            gate_model(model, self.mask_token_id)
        return model, tokenizer, teacher_kind, teacher_module

    @staticmethod
    def _tokenized(ds, tokenizer, args):
        """Raw query/response rows are formatted and tokenized here (TRL trainers accept raw datasets too)."""
        if ds is None or "input_ids" in ds.column_names:
            return ds
        ds = format_and_tokenize(ds, tokenizer, fmt=args.dataset_format, max_length=args.raw_length,
                                 prompt_length=args.prefix_cache)
        check_row_lengths(ds, min_row_tokens(args), what="the dataset")
        return ds

    def _any_rank(self, flag: bool) -> bool:
        """True on every process when `flag` is True on any (a decision all ranks must take together)."""
        if self.accelerator.num_processes == 1:
            return bool(flag)
        votes = torch.tensor([1.0 if flag else 0.0], device=self.accelerator.device)
        return bool(self.accelerator.reduce(votes, reduction="sum").item() > 0)

    def train(self, *args, **kwargs):
        with self.preemption.listening():  # SIGTERM -> checkpoint at the next step boundary, then stop
            return super().train(*args, **kwargs)

    @property
    def preempted(self) -> bool:
        """Training stopped early on SIGTERM (a checkpoint of the last step was saved)."""
        return self.preemption.stopped_at is not None and self.state.global_step < self.state.max_steps

    def _prepare_teacher(self, teacher):
        if self.is_deepspeed_enabled:
            from trl.models.utils import prepare_deepspeed

            return prepare_deepspeed(teacher, self.accelerator)
        if self.is_fsdp_enabled:
            from trl.models.utils import prepare_fsdp

            return prepare_fsdp(teacher, self.accelerator)
        return self.accelerator.prepare_model(teacher, evaluation_mode=True)

    def _attention_mask(self, layout, batch_size: int, bidirectional: bool):
        """Block mask of §1.3: FlexAttention BlockMask (cached per (k, offset)) or a dense additive float mask."""
        model = self.accelerator.unwrap_model(self.model)
        device = layout.input_ids.device
        if model.config._attn_implementation == "flex_attention" and device.type == "cuda":
            key = (layout.k, layout.offset, batch_size, bidirectional)
            if key not in self._flex_masks:
                self._flex_masks[key] = flex_block_mask(layout.block_ids, batch_size, device, bidirectional)
            return self._flex_masks[key]
        dtype = torch.bfloat16 if self.args.bf16 and device.type == "cuda" else model.dtype
        return dense_block_mask(layout.block_ids.to(device), batch_size, dtype, bidirectional)

    # ------------------------------------------------------------------ the loss
    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        args = self.args
        mode = "train" if model.training else "eval"
        if mode == "train":  # one (k, offset) per optimizer step, shared by its accumulation micro-batches
            k, offset = self.sampler(self.state.global_step)
        else:
            k, offset = self.eval_sampler(self._eval_batch)
            self._eval_batch += 1
        source, lengths = inputs["input_ids"], inputs["lengths"]
        if args.prefix_cache:
            step = self.state.global_step if mode == "train" else self._eval_batch
            student_logits, gt_targets = self._cached_prefix_logits(model, inputs, k, step, mode)
            loss, metrics = mtp_objective(student_logits, None, gt_targets=gt_targets, supervision="gt",
                                          student_entropy_beta=args.student_entropy_beta)
            self._record(mode, {"k": float(k), "offset": 0.0, **metrics})
            return (loss, None) if return_outputs else loss
        layout = build_layout(source, lengths, k=k, num_regions=args.num_regions, seq_len=args.seq_len,
                              offset=offset, mask_token_id=self.mask_token_id, pad_token_id=self.pad_token_id)
        batch = source.shape[0]
        student_mask = self._attention_mask(layout, batch, args.bidirectional)

        # Student forward: logits only at prediction slots (plus prefix slots for the prefix-NTP ablation).
        keep = layout.pred_slots | layout.prefix_slots if args.prefix_ntp_weight else layout.pred_slots
        logits = slot_logits(model, layout.input_ids, layout.position_ids, student_mask, keep)
        is_pred = layout.pred_slots[keep]
        num_problems = layout.num_predictions
        student_logits = logits[is_pred].view(num_problems, k, -1)
        gt_targets = layout.labels[layout.pred_slots].view(num_problems, k)

        teacher_logits = None
        if self.teacher is not None:
            # Student forcing (§2.2 step 4): mask slot j of a problem shows the student's token y'_{j+1}.
            rollout = student_logits.detach().argmax(-1)
            teacher_ids = layout.input_ids.clone()
            teacher_ids[layout.mask_slots] = rollout[:, : k - 1].reshape(-1)
            teacher_mask = self._attention_mask(layout, batch, False) if args.bidirectional else student_mask
            teacher_logits = self.teacher(teacher_ids, layout.position_ids, teacher_mask, layout.pred_slots)
            teacher_logits = teacher_logits.view(num_problems, k, -1)

        loss, metrics = mtp_objective(
            student_logits, teacher_logits, gt_targets=gt_targets, supervision=args.supervision,
            sequence_weighted=args.sequence_weighted, student_entropy_beta=args.student_entropy_beta,
            prefix_logits=logits[~is_pred] if args.prefix_ntp_weight else None,
            prefix_targets=layout.labels[layout.prefix_slots] if args.prefix_ntp_weight else None,
            prefix_ntp_weight=args.prefix_ntp_weight,
        )
        if mode == "train" and not torch.isfinite(loss):
            # Backward still runs (DDP/ZeRO need every rank's backward); _NonFiniteGuard drops this step's update.
            self._nonfinite.update(pending=True, where=(self.state.global_step, k, offset))
        else:
            self._record(mode, {"k": float(k), "offset": float(offset), **metrics})
        return (loss, None) if return_outputs else loss

    def _cached_prefix_logits(self, model, inputs, k: int, step: int, mode: str):
        """prefix_cache (mask-only adapters): ([R, k, V] logits, [R, k] ground-truth targets) of R MTP problems.

        With the adapters gated to <MTP> (distill/adapters.py) a real token's keys/values do not depend on the
        trainable weights, so the packed layout's real slots carry no gradient. Here each row's real tokens run once,
        without gradients, into a key/value cache; then every problem's k-1 masks (RoPE positions p+1..p+k-1 after its
        last real token p) run together as one query that attends to the cache up to p and causally to its own masks:
        the block mask of §1.3 with the prefix shared instead of replicated. Position 1 of a problem is the base
        model's next-token logit at p (no gradient). Problems: `num_regions` per row, drawn without replacement among
        the positions whose k-1 targets lie in the row and, where the prompt length is known, after the prompt (the
        positions decoding predicts from). Rows with fewer positions fill the rest with unsupervised dummies."""
        from transformers import DynamicCache

        args = self.args
        source, lengths = inputs["input_ids"], inputs["lengths"]
        prompts = inputs.get("prompt_lengths")
        batch, device = source.shape[0], source.device
        n = args.num_regions
        masks = k - 1
        rng = (self.sampler if mode == "train" else self.eval_sampler).rng(step, 2)  # resumes draw the same
        ends, valid = torch.zeros(batch, n, dtype=torch.long), torch.zeros(batch, n, dtype=torch.bool)
        for b in range(batch):
            lo = max(int(prompts[b]) - 1, 0) if prompts is not None else 0
            hi = int(lengths[b]) - 1 - k  # the last target, p + k, must be a real token of the row
            if hi < lo:
                continue
            choice = np.sort(rng.choice(hi - lo + 1, size=min(n, hi - lo + 1), replace=False)) + lo
            ends[b, : len(choice)], valid[b, : len(choice)] = torch.from_numpy(choice), True
        ends, valid = ends.to(device), valid.to(device)

        unwrapped = self.accelerator.unwrap_model(model)
        base = unwrapped.get_base_model() if hasattr(unwrapped, "get_base_model") else unwrapped
        real_mask = (torch.arange(source.shape[1], device=device)[None] < lengths[:, None].to(device)).long()
        cache = DynamicCache(config=base.config)
        with torch.no_grad(), unwrapped.disable_adapter():  # no mask here: the gate is zero anyway
            hidden = base.get_decoder()(input_ids=source, attention_mask=real_mask, past_key_values=cache,
                                        use_cache=True).last_hidden_state
            first = base.get_output_embeddings()(hidden.gather(1, ends[..., None].expand(-1, -1, hidden.shape[-1])))

        # The masks: query slot (problem i, mask j) sits at RoPE position ends[i] + j + 1.
        length = source.shape[1]
        j = torch.arange(masks, device=device)
        position_ids = (ends[..., None] + 1 + j).reshape(batch, n * masks)
        query_ids = torch.full_like(position_ids, self.mask_token_id)
        dtype = base.dtype if not (args.bf16 and device.type == "cuda") else torch.bfloat16
        problem = torch.arange(n, device=device).repeat_interleave(masks)
        slot = j.repeat(n)
        sees_cache = torch.arange(length, device=device)[None, None] <= ends.repeat_interleave(masks, 1)[..., None]
        sees_cache &= real_mask.bool()[:, None, :]
        sees_query = (problem[:, None] == problem[None]) & (slot[None] <= slot[:, None])
        allowed = torch.cat([sees_cache, sees_query[None].expand(batch, -1, -1)], dim=-1)
        attention = torch.zeros(allowed.shape, dtype=dtype, device=device).masked_fill(~allowed, torch.finfo(dtype).min)
        out = model(input_ids=query_ids, position_ids=position_ids, attention_mask=attention[:, None],
                    past_key_values=cache, use_cache=False)
        rest = out.logits.view(batch, n, masks, -1)
        logits = torch.cat([first[:, :, None].to(rest.dtype), rest], dim=2)[valid]  # [R, k, V]
        targets = torch.stack([source.gather(1, ends + 1 + t) for t in range(k)], dim=-1)
        return logits, targets[valid]

    def prediction_step(self, model, inputs, prediction_loss_only, ignore_keys=None):
        """Evaluation = the same objective without gradients (there are no labels for the default path)."""
        inputs = self._prepare_inputs(inputs)
        with torch.no_grad(), self.compute_loss_context_manager():
            loss = self.compute_loss(model, inputs)
        return loss.detach(), None, None

    def evaluate(self, *args, **kwargs):
        self._eval_batch = 0
        self._metrics["eval"].zero_()
        return super().evaluate(*args, **kwargs)

    # ------------------------------------------------------------------ logging
    def _record(self, mode: str, metrics: dict[str, float]) -> None:
        if self._window_start[mode] is None:
            self._window_start[mode] = time.perf_counter()
        table = self._metrics[mode]
        for name, value in metrics.items():
            i = self._metric_index[name]
            table[0, i] += value
            table[1, i] += 1

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """Add the window means of the MTP metrics (summed over ranks) to the Trainer's logs."""
        mode = "train" if self.model.training else "eval"
        table = self._metrics[mode]
        if self.accelerator.num_processes > 1:
            table = self.accelerator.reduce(table.to(self.accelerator.device), reduction="sum").cpu()
        sums, counts = table
        if counts.any():
            prefix = "eval_" if mode == "eval" else ""
            extra = {prefix + name: (sums[i] / counts[i]).item()
                     for i, name in enumerate(self._metric_names) if counts[i] > 0}
            if mode == "train" and self._window_start[mode] is not None:
                elapsed = max(time.perf_counter() - self._window_start[mode], 1e-9)
                extra["supervised_tokens_per_s"] = sums[self._metric_index["supervised_tokens"]].item() / elapsed
            logs.update(extra)  # in place: Trainer.evaluate returns this same dict
            self._metrics[mode].zero_()
            self._window_start[mode] = time.perf_counter() if mode == "train" else None
        if mode == "train" and "loss" in logs:
            logs["nonfinite_steps"] = float(self._nonfinite["total"])  # skipped so far (NaN/inf loss)
        super().log(logs, start_time)

    # ------------------------------------------------------------------ checkpoints (distill/checkpoints.py)
    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Trainer._save, plus the record that the adapter acts at <MTP> positions only (distill/adapters.py)."""
        super()._save(output_dir, state_dict)
        if self.args.lora_mask_only and self.args.should_save:
            from distill.adapters import write_marker

            write_marker(output_dir or self.args.output_dir, self.mask_token_id)

    def _get_output_dir(self, trial) -> str:
        return self._checkpoint_staging or super()._get_output_dir(trial)

    def _save_checkpoint(self, model, trial) -> None:
        """Trainer._save_checkpoint into `.partial-checkpoint-N/`, renamed to `checkpoint-N` once every rank is done:
        a kill mid-save never leaves a `checkpoint-N` that resume would pick."""
        run_dir = super()._get_output_dir(trial)
        name = f"{PREFIX_CHECKPOINT_DIR}-{self.state.global_step}"
        staging = checkpoints.staging_dir(run_dir, self.state.global_step)
        if self.args.should_save:
            checkpoints.remove_partial(run_dir)  # what a killed save left behind
        self.accelerator.wait_for_everyone()
        self._checkpoint_staging = staging  # the Trainer writes <staging>/checkpoint-N (see _get_output_dir)
        try:
            super()._save_checkpoint(model, trial)
        except Exception as exc:  # disk full, quota, I/O error: safetensors, torch and json raise different types
            if self.args.should_save:
                shutil.rmtree(staging, ignore_errors=True)
            last = checkpoints.last_checkpoint(run_dir)
            where = (f"the last complete checkpoint is {last} (continue with --resume once the cause is fixed)"
                     if last else "no checkpoint was written")
            reason = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise UserError(f"could not save {name} to {run_dir}: {reason}; {where}") from exc
        finally:
            self._checkpoint_staging = None
        self.accelerator.wait_for_everyone()
        if self.args.should_save:
            staged, final = os.path.join(staging, name), os.path.join(run_dir, name)
            if self.state.best_model_checkpoint == staged:  # recorded under the staging path: point it at the final
                self.state.best_model_checkpoint = final
                self.state.save_to_json(os.path.join(staged, "trainer_state.json"))
            checkpoints.commit(staged, final)
            shutil.rmtree(staging, ignore_errors=True)
            # The Trainer rotated inside the staging directory (one checkpoint: nothing to do); rotate the real one.
            rotate_checkpoints(output_dir=run_dir, save_total_limit=self.args.save_total_limit,
                               best_model_checkpoint=self.state.best_model_checkpoint, use_mtime=True)
        self.accelerator.wait_for_everyone()


class _NonFiniteGuard(TrainerCallback):
    """Skip the optimizer step when any rank's loss was NaN/inf in it; stop after `max_nonfinite_steps` in a row.

    Runs between gradient clipping and `optimizer.step()`. Dropping the gradients (`set_to_none`) makes torch
    optimizers leave every parameter and its moments untouched. DeepSpeed and fp16's GradScaler check the gradients for
    inf/NaN themselves and skip the step (DeepSpeed has already stepped by now), so there the step is only counted.
    """

    def __init__(self, trainer: MTPDistillTrainer):
        self.trainer = trainer

    def on_pre_optimizer_step(self, args, state, control, **kwargs):
        trainer, record = self.trainer, self.trainer._nonfinite
        bad = trainer._any_rank(record["pending"])
        record["pending"] = False
        if not bad:
            record["in_a_row"], record["first_step"] = 0, None
            return
        if not (trainer.is_deepspeed_enabled or trainer.accelerator.scaler is not None):
            trainer.model.zero_grad(set_to_none=True)
        record["total"] += 1
        record["in_a_row"] += 1
        if record["first_step"] is None:
            record["first_step"] = state.global_step + 1  # numbered as in the logs (1 = the first update)
        if record["in_a_row"] >= args.max_nonfinite_steps:
            where = ""
            if record["where"] is not None:
                _, k, offset = record["where"]
                where = f", the last at k={k}, offset={offset}"
            last = checkpoints.last_checkpoint(args.output_dir)
            raise UserError(
                f"non-finite loss (NaN/inf) at {record['in_a_row']} optimizer steps in a row (steps "
                f"{record['first_step']}..{state.global_step + 1}{where}); stopped: lower the learning rate, use bf16 "
                "rather than fp16, or check the model and data"
                + (f"; the last complete checkpoint is {last}" if last else ""))
