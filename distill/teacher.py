"""The frozen next-token teacher of online self-distillation (paper §2, §7.1).

The paper's teacher is a frozen copy of the initial checkpoint (θ_T^0 = θ_S^0). Three ways to get one:

  * "shared-base": the student's own base weights with its LoRA adapters switched off (peft `disable_adapter()`), as
    TRL's SDFT does for `teacher_model_kind="base"`. No second copy of the model is held. Because LoRA never touches
    the base weights, this *is* the initial checkpoint for the whole run. Default for LoRA students.
  * "frozen-copy": a deep copy of the initial student, frozen. Default for full fine-tuning.
  * any other model name/path with the same tokenizer (e.g. a bigger sibling); its vocabulary is checked.

A teacher pass runs under `torch.no_grad()` with dropout off. For "shared-base" the teacher module *is* the student,
so it must not be left in eval mode: `eval_mode` records every submodule's training flag and restores it afterwards
(calling `.eval()` on a shared PEFT model would silently turn the student's dropout off too; TRL PR #5862 review).

`slot_logits` applies the LM head only at the requested slots: a [B, S, V] logit tensor is never built for either model
(§7.4 memory note; V is 49k-152k). It passes a boolean `logits_to_keep` mask to the model's own forward, whose decoder
body produces all hidden states and which gathers the kept slots (row-major) *before* `lm_head`. Going through the
model's forward rather than calling `model.model` and `model.lm_head` by hand keeps PEFT, DDP and DeepSpeed hooks intact.
"""

from __future__ import annotations

import copy
from contextlib import contextmanager

import torch

from distill.errors import UserError
from distill.tokens import MTP_TOKEN

TEACHER_KINDS = ("auto", "shared-base", "frozen-copy")


def is_peft_model(model) -> bool:
    try:
        from peft import PeftModel
    except ImportError:  # peft is a dependency, but a plain model never needs it
        return False
    return isinstance(model, PeftModel)


def resolve_teacher_kind(teacher: str, *, uses_peft: bool) -> str:
    """"auto" -> "shared-base" for a LoRA student, "frozen-copy" otherwise; anything else is a model name/path."""
    if teacher == "auto":
        return "shared-base" if uses_peft else "frozen-copy"
    if teacher == "shared-base" and not uses_peft:
        raise UserError("teacher 'shared-base' needs a LoRA student (give a peft/LoRA config); "
                        "use 'frozen-copy' for full fine-tuning")
    return teacher


@contextmanager
def eval_mode(module: torch.nn.Module):
    """Dropout off inside, every submodule's original training flag restored on exit."""
    flags = [(m, m.training) for m in module.modules()]
    module.train(False)
    try:
        yield module
    finally:
        for m, training in flags:
            m.training = training


def slot_logits(model, input_ids, position_ids, attention_mask, slots: torch.BoolTensor) -> torch.Tensor:
    """Logits [slots.sum(), V] at the True entries of `slots` [B, S], in row-major order."""
    out = model(input_ids=input_ids, position_ids=position_ids, attention_mask=attention_mask,
                logits_to_keep=slots, use_cache=False)
    logits = out.logits
    if logits.dim() == 3:  # a model that ignores a boolean logits_to_keep returns [B, S, V]
        logits = logits[slots]
    return logits


def frozen_copy(model) -> torch.nn.Module:
    """A deep copy of `model` with gradients off and dropout off (θ_T = θ_S^0)."""
    teacher = copy.deepcopy(model)
    teacher.requires_grad_(False)
    return teacher.eval()


def _real_vocab(tokenizer) -> dict[str, int]:
    vocab = dict(tokenizer.get_vocab())
    vocab.pop(MTP_TOKEN, None)
    return vocab


def check_vocab(teacher_model, student_model, student_tokenizer, teacher_tokenizer=None, name: str = "teacher") -> None:
    """UserError unless the teacher scores exactly the student's tokens (the student may add <MTP> and padding rows)."""
    real = _real_vocab(student_tokenizer)
    if teacher_tokenizer is not None and _real_vocab(teacher_tokenizer) != real:
        raise UserError(f"vocab mismatch: teacher {name} has a different tokenizer ({len(teacher_tokenizer)} tokens) "
                        f"than the student ({len(student_tokenizer)} tokens incl. {MTP_TOKEN}); "
                        "the teacher must share the student's tokenizer")
    teacher_rows = teacher_model.get_output_embeddings().weight.shape[0]
    student_rows = student_model.get_output_embeddings().weight.shape[0]
    needed = max(real.values()) + 1
    if not needed <= teacher_rows <= student_rows:
        raise UserError(f"vocab mismatch: teacher {name} has {teacher_rows} output rows, the student {student_rows}, "
                        f"and the tokenizer needs {needed}")


def load_teacher(name_or_path: str, student_model, student_tokenizer, *, dtype=None, attn_implementation=None):
    """Another model as the teacher (same tokenizer), frozen."""
    from distill.models import load_model, load_tokenizer

    model = load_model(name_or_path, dtype=dtype or student_model.dtype, attn_implementation=attn_implementation)
    try:
        tokenizer = load_tokenizer(name_or_path)
    except UserError:  # a weights-only directory: the embedding size check below still applies
        tokenizer = None
    check_vocab(model, student_model, student_tokenizer, tokenizer, name=name_or_path)
    model.requires_grad_(False)
    return model.eval()


class Teacher:
    """Callable giving teacher logits at given slots. `kind` is "shared-base", "frozen-copy" or "model"."""

    def __init__(self, kind: str, model, *, replace_token_id: int = 0, vocab_size: int | None = None):
        if kind == "shared-base" and not is_peft_model(model):
            raise UserError("teacher 'shared-base' needs a peft (LoRA) student model")
        self.kind = kind
        self.model = model  # for "shared-base": the student's PeftModel itself (not a copy)
        # Give vocab_size when `model` is wrapped (DeepSpeed engine) or sharded (ZeRO-3 weights have no shape).
        self.vocab_size = vocab_size or model.get_output_embeddings().weight.shape[0]
        # A student token the teacher cannot embed (only possible with a smaller-vocab "model" teacher, e.g. the
        # student proposing <MTP>) is shown to the teacher as this id instead of crashing the lookup.
        self.replace_token_id = replace_token_id

    @torch.no_grad()
    def __call__(self, input_ids, position_ids, attention_mask, slots) -> torch.Tensor:
        input_ids = input_ids.masked_fill(input_ids >= self.vocab_size, self.replace_token_id)
        with eval_mode(self.model):
            if self.kind == "shared-base":
                with self.model.disable_adapter():
                    return slot_logits(self.model, input_ids, position_ids, attention_mask, slots)
            return slot_logits(self.model, input_ids, position_ids, attention_mask, slots)
