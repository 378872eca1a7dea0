"""MTPDistillTrainer on the tiny random Llama: steps run and log, checkpoints carry the MTP config and resume, the
teacher sees the student's own rollout (checked against unpacked single-problem runs), LoRA keeps the base intact."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import distill.trainer as trainer_module
from distill.data import MTPCollator, load_examples
from distill.errors import UserError
from distill.models import load_model, load_tokenizer
from distill.teacher import slot_logits
from distill.trainer import MTPDistillConfig, MTPDistillTrainer

SMALL = dict(seq_len=48, num_regions=3, k_min=2, k_max=6, per_device_train_batch_size=2, logging_steps=1,
             learning_rate=1e-3, warmup_steps=0, save_strategy="no", report_to="none", seed=0)


@pytest.fixture(scope="module")
def examples(gsm8k_path):
    return load_examples(str(gsm8k_path)).select(range(16))


def make_args(tmp_path, **overrides) -> MTPDistillConfig:
    return MTPDistillConfig(output_dir=str(tmp_path / "out"), **{**SMALL, "max_steps": 3, **overrides})


def make_trainer(tiny_model_dir, tmp_path, examples, **kwargs):
    peft_config = kwargs.pop("peft_config", None)
    args = make_args(tmp_path, **kwargs)
    model, tok = load_model(tiny_model_dir), load_tokenizer(tiny_model_dir)
    return MTPDistillTrainer(model, args, train_dataset=examples, processing_class=tok, peft_config=peft_config)


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry]


def test_full_finetune_steps_log_and_save(tiny_model_dir, tmp_path, examples):
    trainer = make_trainer(tiny_model_dir, tmp_path, examples, eval_fraction=0.0, save_strategy="steps",
                           save_steps=3)
    assert trainer.teacher.kind == "frozen-copy"
    teacher_before = {n: p.clone() for n, p in trainer.teacher.model.named_parameters()}
    student_before = trainer.model.lm_head.weight.clone()
    trainer.train()
    assert trainer.state.global_step == 3
    losses = logged(trainer, "loss")
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    for key in ("agree_pos1", "agree_pos2", "agree_pos>=2", "confidence", "entropy", "teacher_nll",
                "supervised_tokens", "supervised_tokens_per_s", "k"):
        assert logged(trainer, key), key
    assert all(2 <= k <= 6 for k in logged(trainer, "k"))
    # The frozen teacher stays at the initial weights while the student moves.
    assert all(torch.equal(p, teacher_before[n]) for n, p in trainer.teacher.model.named_parameters())
    assert not torch.equal(trainer.model.lm_head.weight, student_before)

    checkpoint = Path(trainer.args.output_dir) / "checkpoint-3"
    config = json.loads((checkpoint / "config.json").read_text())
    tok = load_tokenizer(str(checkpoint))
    assert config["mtp_mask_token_id"] == tok.convert_tokens_to_ids("<MTP>") and config["mtp_k_max"] == 6
    assert any(checkpoint.glob("*.safetensors"))


def test_resume_continues_the_global_step_and_matches_an_uninterrupted_run(tiny_model_dir, tmp_path, examples):
    straight = make_trainer(tiny_model_dir, tmp_path / "a", examples, max_steps=4)
    straight.train()

    first = make_trainer(tiny_model_dir, tmp_path / "b", examples, max_steps=2, save_strategy="steps", save_steps=2)
    first.train()
    resumed = make_trainer(tiny_model_dir, tmp_path / "b", examples, max_steps=4)
    resumed.train(resume_from_checkpoint=True)
    assert resumed.state.global_step == 4
    assert [e["step"] for e in resumed.state.log_history if "loss" in e] == [1, 2, 3, 4]
    # Same (k, offset) schedule (a function of the global step), same data order, same optimizer state.
    assert logged(resumed, "k") == logged(straight, "k") and logged(resumed, "loss") == logged(straight, "loss")
    for (name, p), q in zip(straight.model.named_parameters(), resumed.model.parameters()):
        torch.testing.assert_close(p, q, rtol=0, atol=1e-6, msg=name)


def test_teacher_sees_the_student_rollout_oracle(tiny_model_dir, tmp_path, examples, monkeypatch):
    """Each packed problem equals the problem run alone: student on prefix + masks, teacher on prefix + y'_<k."""
    trainer = make_trainer(tiny_model_dir, tmp_path, examples)
    k, offset = 4, 2
    trainer.sampler = lambda step: (k, offset)
    captured = {}

    def spy(student_logits, teacher_logits, **kw):
        captured.update(student=student_logits.detach(), teacher=teacher_logits)
        return original(student_logits, teacher_logits, **kw)

    original = trainer_module.mtp_objective
    monkeypatch.setattr(trainer_module, "mtp_objective", spy)
    batch = MTPCollator(trainer.pad_token_id, trainer.args.raw_length)([trainer.train_dataset[i] for i in range(2)])
    assert bool((batch["lengths"] == trainer.args.raw_length).all())  # long rows: every region survives
    trainer.model.train()
    trainer.compute_loss(trainer.model, batch)

    width, regions = 48 // 3, 3
    prefix = width - (k - 1)
    row = batch["input_ids"][0]
    mask_id = trainer.mask_token_id
    rollout = captured["student"].argmax(-1)
    for r in range(regions):  # problems of row 0 come first, in region order
        visible = row[: r * prefix + prefix - offset]
        student_in = torch.cat([visible, torch.full((k - 1,), mask_id)])[None]
        teacher_in = torch.cat([visible, rollout[r, : k - 1]])[None]
        last = torch.zeros_like(student_in, dtype=torch.bool)
        last[0, -k:] = True
        pos = torch.arange(student_in.shape[1])[None]
        with torch.no_grad():
            student_ref = slot_logits(trainer.model, student_in, pos, None, last)
            teacher_ref = slot_logits(trainer.teacher.model, teacher_in, pos, None, last)
        torch.testing.assert_close(captured["student"][r], student_ref, rtol=0, atol=1e-4)
        torch.testing.assert_close(captured["teacher"][r], teacher_ref, rtol=0, atol=1e-4)


def _base_state(model):
    """Base weights of a (peft) model under their plain names."""
    state = {}
    for name, tensor in model.state_dict().items():
        if "lora_" in name or "trainable_tokens" in name:
            continue
        state[name.replace("base_model.model.", "").replace(".base_layer", "").replace(".token_adapter", "")] = tensor.detach().clone()
    return state


def test_lora_shared_base_keeps_the_base_bit_identical(tiny_model_dir, tmp_path, examples):
    from peft import LoraConfig

    base = load_model(tiny_model_dir).eval()
    before = _base_state(base)
    lora = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.1, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    trainer = make_trainer(tiny_model_dir, tmp_path, examples, peft_config=lora, learning_rate=1e-2,
                           save_strategy="steps", save_steps=3)
    assert trainer.teacher.kind == "shared-base"
    mtp = trainer.mask_token_id
    assert trainer.model.peft_config["default"].trainable_token_indices == {"embed_tokens": [mtp], "lm_head": [mtp]}
    mtp_row = trainer.model.get_input_embeddings()(torch.tensor([mtp])).detach().clone()
    trainer.train()

    after = _base_state(trainer.model)
    assert after.keys() == before.keys()
    assert all(torch.equal(after[n], before[n]) for n in before)
    # The adapters and the <MTP> row did train.
    assert not torch.equal(trainer.model.get_input_embeddings()(torch.tensor([mtp])), mtp_row)
    # Teacher = the untouched base, on an input that contains <MTP> too.
    ids = torch.tensor([[1, 504, 2018, mtp, mtp, 28, 3555, 2]])
    pos = torch.arange(ids.shape[1])[None]
    slots = torch.ones_like(ids, dtype=torch.bool)
    with torch.no_grad():
        reference = slot_logits(base, ids, pos, None, slots)
        student = slot_logits(trainer.model.eval(), ids, pos, None, slots)
    torch.testing.assert_close(trainer.teacher(ids, pos, None, slots), reference, rtol=0, atol=0)
    assert not torch.allclose(student, reference, atol=1e-3)

    checkpoint = Path(trainer.args.output_dir) / "checkpoint-3"
    assert (checkpoint / "adapter_config.json").is_file()
    from transformers import AutoTokenizer

    assert "<MTP>" in AutoTokenizer.from_pretrained(checkpoint).get_vocab()


@pytest.mark.parametrize("overrides", [
    dict(supervision="gt"),
    dict(supervision="soft", prefix_ntp_weight=0.5, student_entropy_beta=0.1),
    dict(sequence_weighted=True, bidirectional=True, random_offsets=False),
])
def test_objective_variants_run(tiny_model_dir, tmp_path, examples, overrides):
    trainer = make_trainer(tiny_model_dir, tmp_path, examples, max_steps=1, **overrides)
    if overrides.get("supervision") == "gt":
        assert trainer.teacher is None
    trainer.train()
    assert torch.isfinite(torch.tensor(logged(trainer, "loss"))).all()
    if "prefix_ntp_weight" in overrides:
        assert logged(trainer, "prefix_ce")
    if not overrides.get("random_offsets", True):
        assert logged(trainer, "offset") == [0.0]


def test_evaluation_reports_mtp_metrics(tiny_model_dir, tmp_path, gsm8k_path):
    args = make_args(tmp_path, dataset_name=str(gsm8k_path), max_train_samples=8, eval_fraction=0.01,
                     max_eval_samples=4, per_device_eval_batch_size=2)
    trainer = MTPDistillTrainer(load_model(tiny_model_dir), args, processing_class=load_tokenizer(tiny_model_dir))
    assert len(trainer.train_dataset) == 8 and len(trainer.eval_dataset) == 4
    first, second = trainer.evaluate(), trainer.evaluate()
    # Evaluation draws the same (k, offset) sequence every time, so it is comparable across a run.
    assert (first["eval_loss"], first["eval_k"]) == (second["eval_loss"], second["eval_k"])
    for key in ("eval_loss", "eval_agree_pos1", "eval_teacher_nll", "eval_k", "eval_supervised_tokens"):
        assert key in first, key


def test_non_finite_loss_skips_steps_then_stops_with_their_range(tiny_model_dir, tmp_path, examples):
    trainer = make_trainer(tiny_model_dir, tmp_path, examples, max_nonfinite_steps=2)
    with torch.no_grad():
        trainer.model.lm_head.weight[:, 0] = float("nan")
    before = {n: p.clone() for n, p in trainer.model.named_parameters()}
    with pytest.raises(UserError, match=r"non-finite loss \(NaN/inf\) at 2 optimizer steps in a row \(steps 1\.\.2"):
        trainer.train()
    # Both steps were skipped: no parameter moved (the NaN column compares by position).
    for name, p in trainer.model.named_parameters():
        torch.testing.assert_close(p, before[name], rtol=0, atol=0, equal_nan=True, msg=name)


@pytest.mark.parametrize("overrides, message", [
    (dict(k_max=17), "does not fit"),
    (dict(k_min=1), "k_min"),
    (dict(k_min=5, k_max=4), "k_min"),
    (dict(supervision="medium"), "unknown supervision"),
    (dict(supervision="gt", sequence_weighted=True), "sequence_weighted"),
    (dict(eval_fraction=1.5), "eval_fraction"),
])
def test_bad_config_is_a_user_error(tmp_path, overrides, message):
    with pytest.raises(UserError, match=message):
        MTPDistillConfig(output_dir=str(tmp_path), **{**SMALL, "seq_len": 48, "num_regions": 3, **overrides})


def test_defaults_follow_the_paper(tmp_path):
    args = MTPDistillConfig(output_dir=str(tmp_path))
    assert (args.k_min, args.k_max, args.num_regions, args.seq_len) == (2, 16, 5, 160)
    assert args.supervision == "hard" and args.teacher == "auto" and not args.bidirectional and args.random_offsets
    assert args.learning_rate == 1e-5 and args.lr_scheduler_type == "constant_with_warmup"
    assert args.raw_length == 5 * 31 + 1 + 1  # M·P(k_min) + K + 1 = 157 source tokens per row (§1.3)
    if not torch.cuda.is_available():
        assert args.use_cpu and not args.bf16
