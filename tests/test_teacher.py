"""distill/teacher.py: slot-only LM head, the three teacher kinds, vocab checks, and the student's dropout state."""

from __future__ import annotations

import pytest
import torch

from distill.errors import UserError
from distill.models import load_model, load_tokenizer
from distill.teacher import Teacher, check_vocab, eval_mode, frozen_copy, load_teacher, resolve_teacher_kind, slot_logits


def _inputs(vocab: int, batch: int = 2, seq: int = 12, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    pos = torch.arange(seq).expand(batch, -1)
    slots = torch.zeros(batch, seq, dtype=torch.bool)
    slots[0, [3, 4, 11]] = True
    slots[1, [0, 7]] = True
    return ids, pos, slots


def _with_dropout(model, p: float = 0.5):
    for layer in model.model.layers:
        layer.self_attn.attention_dropout = p
    return model.train()


def _lora(model, dropout: float = 0.5):
    from peft import LoraConfig, get_peft_model

    return get_peft_model(model, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout,
                                            target_modules=["q_proj", "v_proj"], init_lora_weights=False))


def test_slot_logits_equal_full_logits_at_the_slots(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    ids, pos, slots = _inputs(model.config.vocab_size)
    with torch.no_grad():
        full = model(input_ids=ids, position_ids=pos).logits
        kept = slot_logits(model, ids, pos, None, slots)
    assert kept.shape == (5, model.config.vocab_size)
    torch.testing.assert_close(kept, full[slots], rtol=0, atol=1e-5)


def test_eval_mode_restores_every_flag(tiny_model_dir):
    model = load_model(tiny_model_dir).train()
    model.model.layers[1].eval()  # a mixed state must come back exactly as it was
    before = [m.training for m in model.modules()]
    with eval_mode(model):
        assert not any(m.training for m in model.modules())
    assert [m.training for m in model.modules()] == before


def test_resolve_teacher_kind():
    assert resolve_teacher_kind("auto", uses_peft=True) == "shared-base"
    assert resolve_teacher_kind("auto", uses_peft=False) == "frozen-copy"
    assert resolve_teacher_kind("some/model", uses_peft=False) == "some/model"
    with pytest.raises(UserError, match="LoRA"):
        resolve_teacher_kind("shared-base", uses_peft=False)
    with pytest.raises(UserError):
        Teacher("shared-base", object())


def test_frozen_copy_is_independent_and_frozen(tiny_model_dir):
    student = _with_dropout(load_model(tiny_model_dir))
    teacher = Teacher("frozen-copy", frozen_copy(student))
    assert not any(p.requires_grad for p in teacher.model.parameters())
    ids, pos, slots = _inputs(student.config.vocab_size)
    first = teacher(ids, pos, None, slots)
    assert torch.equal(first, teacher(ids, pos, None, slots))  # dropout off in the teacher
    with torch.no_grad():
        student.lm_head.weight.add_(1.0)
    assert torch.equal(first, teacher(ids, pos, None, slots))  # a deep copy: the student's update does not leak
    assert all(m.training for m in student.modules())


def test_shared_base_teacher_is_the_base_without_adapters_and_keeps_student_dropout(tiny_model_dir):
    base = load_model(tiny_model_dir).eval()
    student = _lora(_with_dropout(load_model(tiny_model_dir)))  # non-zero LoRA init: adapters change the output
    student.train()
    teacher = Teacher("shared-base", student)
    ids, pos, slots = _inputs(base.config.vocab_size)
    ids[0, 2] = base.config.mtp_mask_token_id
    t1, t2 = teacher(ids, pos, None, slots), teacher(ids, pos, None, slots)
    with torch.no_grad():
        reference = slot_logits(base, ids, pos, None, slots)
    assert torch.equal(t1, t2)
    torch.testing.assert_close(t1, reference, rtol=0, atol=0)
    # The student itself is still in training mode, adapters on, dropout active.
    assert all(m.training for m in student.modules())
    with torch.no_grad():
        s1, s2 = (slot_logits(student, ids, pos, None, slots) for _ in range(2))
    assert not torch.equal(s1, s2)  # dropout is live
    assert not torch.allclose(student.eval()(input_ids=ids, position_ids=pos).logits[slots], reference, atol=1e-4)


def test_teacher_replaces_tokens_outside_its_vocabulary(tiny_model_dir):
    model = load_model(tiny_model_dir).eval()
    teacher = Teacher("model", model, replace_token_id=0, vocab_size=100)
    ids, pos, slots = _inputs(100)
    high = ids.clone()
    high[0, 1] = 5000
    fixed = ids.clone()
    fixed[0, 1] = 0
    torch.testing.assert_close(teacher(high, pos, None, slots), teacher(fixed, pos, None, slots), rtol=0, atol=0)


def _save_tiny(path, vocab_size, tokenizer):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=2, num_key_value_heads=1, tie_word_embeddings=False)
    LlamaForCausalLM(config).save_pretrained(path)
    tokenizer.save_pretrained(path)
    return str(path)


def test_named_teacher_with_the_same_tokenizer(tiny_model_dir, smollm2_dir, tmp_path):
    student = load_model(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    # The plain base tokenizer (no <MTP>) and 49152 rows: compatible with the student's 49216-row matrix.
    base_tok = load_tokenizer(smollm2_dir)
    teacher = load_teacher(_save_tiny(tmp_path / "ok", len(base_tok), base_tok), student, tok)
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())


def test_vocab_mismatch_is_a_user_error(tiny_model_dir, smollm2_dir, tmp_path):
    student = load_model(tiny_model_dir)
    tok = load_tokenizer(tiny_model_dir)
    base_tok = load_tokenizer(smollm2_dir)
    with pytest.raises(UserError, match="vocab mismatch"):
        load_teacher(_save_tiny(tmp_path / "small", 1000, base_tok), student, tok)
    other_tok = load_tokenizer(smollm2_dir)
    other_tok.add_tokens(["<extra-token>"])
    with pytest.raises(UserError, match="vocab mismatch.*different tokenizer"):
        load_teacher(_save_tiny(tmp_path / "other", len(other_tok), other_tok), student, tok)


def test_vocab_larger_than_student_is_rejected(tiny_model_dir):
    student = load_model(tiny_model_dir)
    teacher = load_model(tiny_model_dir)
    teacher.resize_token_embeddings(student.config.vocab_size + 64)
    with pytest.raises(UserError, match="vocab mismatch"):
        check_vocab(teacher, student, load_tokenizer(tiny_model_dir))


@pytest.mark.slow
def test_shared_base_lora_teacher_on_smollm2_stays_the_base(smollm2_dir, gsm8k_path, tmp_path):
    """A few LoRA steps on the real model: base weights bit-identical, teacher logits == the untouched base's."""
    from peft import LoraConfig

    from distill.data import load_examples
    from distill.tokens import add_mtp_token
    from distill.trainer import MTPDistillConfig, MTPDistillTrainer

    reference_tok = load_tokenizer(smollm2_dir)
    reference = load_model(smollm2_dir).eval()
    mtp = add_mtp_token(reference, reference_tok)  # deterministic: the same <MTP> row the trainer adds
    real = len(reference_tok)  # rows past it are matrix padding, initialised independently by each resize

    args = MTPDistillConfig(output_dir=str(tmp_path / "out"), seq_len=64, num_regions=2, k_min=2, k_max=8,
                            per_device_train_batch_size=2, max_steps=3, learning_rate=1e-3, warmup_steps=0,
                            logging_steps=1, save_strategy="no", report_to="none")
    lora = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.1, target_modules=["q_proj", "v_proj"])
    trainer = MTPDistillTrainer(load_model(smollm2_dir), args, processing_class=load_tokenizer(smollm2_dir),
                                train_dataset=load_examples(str(gsm8k_path)).select(range(6)), peft_config=lora)
    assert trainer.teacher.kind == "shared-base" and trainer.mask_token_id == mtp
    # Tied embeddings: the <MTP> row is trained once, peft ties the head to it.
    assert trainer.model.peft_config["default"].trainable_token_indices == {"embed_tokens": [mtp]}

    def base_weights():
        return {n.replace(".base_layer", "").replace(".token_adapter", ""): p.detach().clone()
                for n, p in trainer.model.get_base_model().named_parameters()
                if "lora_" not in n and "trainable_tokens" not in n}

    before = base_weights()
    assert set(before) == {n for n, _ in reference.named_parameters()}
    trainer.train()
    assert trainer.state.global_step == 3
    after = base_weights()
    assert all(torch.equal(after[n], before[n]) for n in before)
    assert not torch.equal(trainer.model.get_input_embeddings()(torch.tensor([mtp])),
                           reference.get_input_embeddings()(torch.tensor([mtp])))  # the student's <MTP> row trained

    text = reference_tok.apply_chat_template([{"role": "user", "content": "What is 12 + 7?"}], tokenize=False,
                                             add_generation_prompt=True)
    ids = torch.tensor([reference_tok(text, add_special_tokens=False)["input_ids"] + [mtp, mtp]])
    pos = torch.arange(ids.shape[1])[None]
    slots = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        expected = slot_logits(reference, ids, pos, None, slots)[:, :real]
    torch.testing.assert_close(trainer.teacher(ids, pos, None, slots)[:, :real], expected, rtol=0, atol=0)
