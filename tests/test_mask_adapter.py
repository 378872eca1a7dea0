"""Mask-only adapters (distill/adapters.py): LoRA gated to <MTP> positions keeps every real token's computation the
base model's bit for bit, trains the masks, survives save -> load -> export -> load, and plain decoding of the
distilled model is the base model's greedy decoding token for token."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from distill.data import load_examples
from distill.errors import UserError
from distill.models import load_model, load_tokenizer
from distill.teacher import slot_logits
from distill.trainer import MTPDistillConfig, MTPDistillTrainer

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SMALL = dict(seq_len=48, num_regions=3, k_min=2, k_max=6, per_device_train_batch_size=2, logging_steps=1,
             learning_rate=1e-2, warmup_steps=0, report_to="none", seed=0, supervision="gt")


def _lora():
    from peft import LoraConfig

    return LoraConfig(r=4, lora_alpha=8, target_modules="all-linear")


@pytest.fixture(scope="module")
def trained(tiny_model_dir, gsm8k_path, tmp_path_factory):
    """A 4-step mask-only LoRA run on the tiny model, saved (checkpoint-4) and kept in memory."""
    out = tmp_path_factory.mktemp("mask-only") / "run"
    args = MTPDistillConfig(output_dir=str(out), max_steps=4, save_strategy="steps", save_steps=4,
                            lora_mask_only=True, **SMALL)
    examples = load_examples(str(gsm8k_path)).select(range(16))
    trainer = MTPDistillTrainer(load_model(tiny_model_dir), args, train_dataset=examples,
                                processing_class=load_tokenizer(tiny_model_dir), peft_config=_lora())
    trainer.train()
    trainer.model.eval()
    return trainer, out / "checkpoint-4"


def _probe(mtp: int) -> torch.Tensor:
    """A decoding step's shape: real tokens, then masks (causal attention: no real token sees a mask)."""
    return torch.tensor([[1, 504, 2018, 28, 3555, 2, mtp, mtp, mtp]])


def _logits(model, ids):
    pos = torch.arange(ids.shape[1])[None]
    with torch.no_grad():
        return slot_logits(model, ids, pos, None, torch.ones_like(ids, dtype=torch.bool))


def test_real_tokens_run_the_base_weights_masks_are_trained(trained, tiny_model_dir):
    trainer, _ = trained
    mtp = trainer.mask_token_id
    ids = _probe(mtp)
    real = ids[0] != mtp
    base = _logits(load_model(tiny_model_dir).eval(), ids)
    student = _logits(trainer.model, ids)
    assert torch.equal(student[real], base[real])  # bit for bit: the gated update is exactly zero there
    assert (student[~real] - base[~real]).abs().max() > 1e-3  # the masks did learn
    # Without the gate the same adapter would move the real positions too: the gate is what keeps them.
    from distill.adapters import mask_gate_of

    gate = mask_gate_of(trainer.model)
    gate.remove()
    try:
        ungated = _logits(trainer.model, ids)
    finally:
        from distill.adapters import gate_model

        gate_model(trainer.model, mtp)
    assert not torch.allclose(ungated[real], base[real], atol=1e-4)


def test_checkpoint_records_the_gate_and_loads_gated(trained, tiny_model_dir):
    from adaptive.loading import load_mtp_model

    trainer, checkpoint = trained
    record = json.loads((checkpoint / "mtp_adapter.json").read_text())
    assert record["mask_token_id"] == trainer.mask_token_id
    model, _ = load_mtp_model(str(checkpoint))
    from distill.adapters import GatedLoRALinear

    # Decoding runs the light gated layers, not peft's: one per adapted linear (all-linear: 7 per block).
    assert sum(isinstance(m, GatedLoRALinear) for m in model.modules()) == 7 * model.config.num_hidden_layers
    ids = _probe(trainer.mask_token_id)
    torch.testing.assert_close(_logits(model, ids), _logits(trainer.model, ids), rtol=0, atol=1e-5)
    q_proj = lambda: model.model.layers[0].self_attn.q_proj  # noqa: E731
    assert isinstance(q_proj(), GatedLoRALinear)  # a forward with <MTP> runs the gated layers ...
    _logits(model, ids[:, :3])
    assert type(q_proj()) is torch.nn.Linear  # ... one without runs the base model's own layers


def test_siblings_share_one_a_product_and_stay_exact(trained):
    """q/k/v and gate/up stack their A matrices (one product per input); a member called on another input computes
    its own; on a CPU the rank-r products stay float32 when the model is cast to bfloat16."""
    from adaptive.loading import load_mtp_model
    from distill.adapters import GatedLoRALinear, mask_gate_of

    trainer, checkpoint = trained
    model, _ = load_mtp_model(str(checkpoint))
    ids = _probe(trainer.mask_token_id)
    torch.testing.assert_close(_logits(model, ids), _logits(trainer.model, ids), rtol=0, atol=1e-5)
    mtp = trainer.mask_token_id  # masks in different columns per row, a plain token after a mask, no mask in row 2
    mixed = torch.tensor([[1, 504, mtp, 2018, 28, mtp], [1, 504, 2018, 28, mtp, mtp], [1, 504, 2018, 28, 3555, 2]])
    torch.testing.assert_close(_logits(model, mixed), _logits(trainer.model, mixed), rtol=0, atol=1e-5)
    attn = model.model.layers[0].self_attn  # the gated layers are in place after a forward with masks
    q, k, v, o = attn.q_proj, attn.k_proj, attn.v_proj, attn.o_proj
    assert q.shared is k.shared is v.shared and o.shared is not q.shared
    layers = [m for m in model.modules() if isinstance(m, GatedLoRALinear)]
    assert len({id(m.shared) for m in layers}) == 4 * model.config.num_hidden_layers  # qkv, o, gate/up, down
    # Each member equals its own LoRA (peft's weights, gated), whichever input its siblings saw last.
    gate = mask_gate_of(model)
    x = torch.randn(1, ids.shape[1], attn.q_proj.weight.shape[1])
    gate.read(ids)
    assert gate.tail < ids.shape[1]  # the probe's masks come after some plain tokens, which get no products
    peft_layers = dict(trainer.model.named_modules())
    for name, layer in (("q_proj", q), ("v_proj", v), ("k_proj", k)):
        other = torch.randn_like(x)
        q(other)  # the shared product now belongs to another input
        peft = peft_layers[f"base_model.model.model.layers.0.self_attn.{name}"]
        lora_a, lora_b = peft.lora_A["default"].weight, peft.lora_B["default"].weight
        is_mask = (ids == trainer.mask_token_id).unsqueeze(-1)
        want = layer.base(x) + (x * is_mask) @ lora_a.T @ lora_b.T * peft.scaling["default"]
        torch.testing.assert_close(layer(x), want, rtol=1e-5, atol=1e-5)
    model.to(torch.bfloat16)
    assert all(m.lora_b.dtype == torch.float32 and m.shared.a.dtype == torch.float32 for m in layers)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
    assert _logits(model, ids).dtype == torch.bfloat16


def test_plain_decoding_is_the_base_models_greedy(trained, tiny_model_dir):
    """Oracle: static k=1 and self-speculative of the distilled model = HF greedy of the base, token for token;
    ConfAdapt's first token of every span is the base model's next token."""
    from adaptive.loading import load_mtp_model
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import ConfAdapt, SelfSpeculative, Static

    _, checkpoint = trained
    model, tok = load_mtp_model(str(checkpoint))
    base = load_model(tiny_model_dir).eval()
    prompts = [tok("Natalia sold clips to 48 of her friends")["input_ids"], tok("What is 7 times 8?")["input_ids"]]
    decoder = MTPDecoder(model, tok, stop_token_ids=[])
    new = 24
    for ids in prompts:
        with torch.no_grad():
            greedy = base.generate(torch.tensor([ids]), max_new_tokens=new, do_sample=False, min_new_tokens=new,
                                   pad_token_id=0)[0, len(ids):].tolist()
        assert decoder.generate([ids], Static(1), new)[0].token_ids == greedy
        assert decoder.generate([ids], SelfSpeculative(4), new)[0].token_ids == greedy
    result = decoder.generate([prompts[0]], ConfAdapt(1e-6, 4), 8)[0]
    first = result.token_ids[0]
    with torch.no_grad():
        assert first == int(base(torch.tensor([prompts[0]])).logits[0, -1].argmax())


def test_export_keeps_the_adapter_beside_the_base(trained, tiny_model_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    from adaptive.loading import load_mtp_model
    from distill.export import export_model

    trainer, checkpoint = trained
    mtp = trainer.mask_token_id
    ids = _probe(mtp)
    real = ids[0] != mtp
    out = export_model(str(checkpoint), tmp_path / "export")
    assert (out / "mtp_adapter" / "adapter_model.safetensors").is_file()
    assert (out / "mtp_adapter" / "mtp_adapter.json").is_file()
    # Plain transformers loads the base itself (with the trained <MTP> row, which only masks read).
    plain = AutoModelForCausalLM.from_pretrained(out).eval()
    base = load_model(tiny_model_dir).eval()
    assert torch.equal(_logits(plain, ids)[real], _logits(base, ids)[real])
    # This package's loader re-attaches the adapter: the same logits as the training output, masks included.
    reloaded, _ = load_mtp_model(str(out))
    torch.testing.assert_close(_logits(reloaded, ids), _logits(trainer.model, ids), rtol=0, atol=1e-5)
    # --merge-adapter: one set of weights, no adapter directory, every position adapted.
    merged = export_model(str(checkpoint), tmp_path / "merged", merge_adapter=True)
    assert not (merged / "mtp_adapter").exists()
    merged_logits = _logits(AutoModelForCausalLM.from_pretrained(merged).eval(), ids)
    assert not torch.allclose(merged_logits[real], _logits(base, ids)[real], atol=1e-4)


def test_forward_cost_key_names_the_adapter(trained, tiny_model_dir):
    from adaptive.controller import cost_key

    trainer, _ = trained
    assert "mask-lora" in cost_key(trainer.model.get_base_model())
    assert "mask-lora" not in cost_key(load_model(tiny_model_dir))


def test_mask_only_needs_lora_and_refuses_prefix_ntp(tiny_model_dir, gsm8k_path, tmp_path):
    examples = load_examples(str(gsm8k_path)).select(range(4))
    with pytest.raises(UserError, match="prefix_ntp_weight"):
        MTPDistillConfig(output_dir=str(tmp_path / "a"), max_steps=1, lora_mask_only=True, prefix_ntp_weight=1.0,
                         **SMALL)
    args = MTPDistillConfig(output_dir=str(tmp_path / "b"), max_steps=1, lora_mask_only=True, **SMALL)
    with pytest.raises(UserError, match="LoRA"):
        MTPDistillTrainer(load_model(tiny_model_dir), args, train_dataset=examples,
                          processing_class=load_tokenizer(tiny_model_dir))


def test_gate_refuses_inputs_embeds(trained):
    trainer, _ = trained
    model = trainer.model.get_base_model()
    embeds = model.get_input_embeddings()(_probe(trainer.mask_token_id))
    with pytest.raises(UserError, match="input_ids"):
        model(inputs_embeds=embeds)


def test_hf_generate_attaches_the_exported_adapter(trained, tmp_path):
    """`generate(custom_generate=...)` on a plain `from_pretrained` of the export decodes with the adapter (ConfAdapt
    equals this package's decoder on the same export), and plain greedy stays the base model's."""
    from transformers import AutoModelForCausalLM

    import adaptive.hf_generate as hf_generate
    from adaptive.loading import load_mtp_model
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import ConfAdapt
    from distill.adapters import mask_gate_of
    from distill.export import export_model

    _, checkpoint = trained
    out = export_model(str(checkpoint), tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(out).eval()
    tok = load_tokenizer(str(out))
    ids = tok("What is 7 times 8?")["input_ids"]
    batch = torch.tensor([ids])
    greedy = model.generate(batch, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert mask_gate_of(model) is None
    mtp = model.generate(batch, attention_mask=torch.ones_like(batch), custom_generate=hf_generate,
                         mtp_strategy="confadapt", mtp_tau=1e-6, mtp_k_max=4, max_new_tokens=12,
                         mtp_calibration=False)
    assert mask_gate_of(model) is not None
    reference, rtok = load_mtp_model(str(out))
    expected = MTPDecoder(reference, rtok, stop_token_ids=[tok.eos_token_id]).generate([ids], ConfAdapt(1e-6, 4), 12)
    assert mtp[0, len(ids):].tolist()[: len(expected[0].token_ids)] == expected[0].token_ids
    again = model.generate(batch, max_new_tokens=12, min_new_tokens=12, do_sample=False, pad_token_id=0)
    assert torch.equal(again, greedy)  # no mask in plain greedy: the adapter is off


def test_prefix_cache_equals_a_plain_forward_per_problem(tiny_model_dir, gsm8k_path, tmp_path):
    """Oracle for prefix_cache: every problem's k logits equal one plain causal forward of its own prefix followed
    by k-1 masks (position 1 from the base, the masks through the gated adapter), and its targets are the next k
    tokens; problems lie after the prompt."""
    from distill.data import MTPCollator, format_and_tokenize

    tok = load_tokenizer(tiny_model_dir)
    args = MTPDistillConfig(output_dir=str(tmp_path / "out"), max_steps=1, lora_mask_only=True, prefix_cache=True,
                            **{**SMALL, "num_regions": 5, "seq_len": 192})
    examples = load_examples(str(gsm8k_path)).select(range(3))
    trainer = MTPDistillTrainer(load_model(tiny_model_dir), args, train_dataset=examples, processing_class=tok,
                                peft_config=_lora())
    with torch.no_grad():  # a non-zero adapter, so a wrong gate or attention rule shows
        for name, param in trainer.model.named_parameters():
            if "lora_B" in name:
                param.normal_(0, 0.5)
    trainer.model.eval()
    rows = format_and_tokenize(examples, tok, fmt="chat", max_length=192, prompt_length=True)
    assert all(0 < r["prompt_length"] < len(r["input_ids"]) for r in rows)
    batch = MTPCollator(tok.pad_token_id, 192)([rows[i] for i in range(3)])
    k = 3
    with torch.no_grad():
        logits, targets = trainer._cached_prefix_logits(trainer.model, batch, k, step=0, mode="train")
        assert logits.shape[:2] == (targets.shape[0], k) and targets.shape[0] > 5
        mtp = trainer.mask_token_id
        found = 0
        for b in range(3):
            ids = batch["input_ids"][b, : batch["lengths"][b]]
            start = int(batch["prompt_lengths"][b]) - 1
            for p in range(start, len(ids) - k):
                plain = torch.cat([ids[: p + 1], torch.full((k - 1,), mtp)])[None]
                ref = trainer.model(input_ids=plain).logits[0, p:]
                match = [i for i in range(targets.shape[0]) if torch.equal(targets[i], ids[p + 1 : p + 1 + k])
                         and torch.allclose(logits[i], ref, atol=1e-4, rtol=0)]
                found += bool(match)
        assert found == targets.shape[0]  # every problem is one of these, with exactly these logits


def test_prefix_cache_run_trains_the_masks_only(tiny_model_dir, gsm8k_path, tmp_path):
    tok = load_tokenizer(tiny_model_dir)
    args = MTPDistillConfig(output_dir=str(tmp_path / "out"), max_steps=3, save_strategy="no", lora_mask_only=True,
                            prefix_cache=True, **{**SMALL, "num_regions": 8, "seq_len": 192})
    trainer = MTPDistillTrainer(load_model(tiny_model_dir), args,
                                train_dataset=load_examples(str(gsm8k_path)).select(range(8)),
                                processing_class=tok, peft_config=_lora())
    trainer.train()
    losses = [e["loss"] for e in trainer.state.log_history if "loss" in e]
    assert len(losses) == 3 and all(torch.isfinite(torch.tensor(losses)))
    supervised = [e["supervised_tokens"] for e in trainer.state.log_history if "supervised_tokens" in e]
    assert min(supervised) >= 2 * 8 * 2  # two rows x 8 problems x k >= 2
    mtp = trainer.mask_token_id
    ids = _probe(mtp)
    real = ids[0] != mtp
    base = _logits(load_model(tiny_model_dir).eval(), ids)
    student = _logits(trainer.model.eval(), ids)
    assert torch.equal(student[real], base[real])
    assert (student[~real] - base[~real]).abs().max() > 1e-3


@pytest.mark.parametrize("overrides, match", [
    (dict(prefix_cache=True), "prefix_cache needs lora_mask_only"),
    (dict(prefix_cache=True, lora_mask_only=True, supervision="hard"), "prefix_cache needs lora_mask_only"),
])
def test_prefix_cache_needs_mask_only_gt(tmp_path, overrides, match):
    with pytest.raises(UserError, match=match):
        MTPDistillConfig(output_dir=str(tmp_path / "x"), max_steps=1, **{**SMALL, **overrides})


def test_vllm_serves_a_mask_only_export_with_a_merged_draft(trained, tmp_path):
    import os
    import subprocess
    import sys

    from distill.export import export_model

    _, checkpoint = trained
    target = export_model(str(checkpoint), tmp_path / "export")
    draft = export_model(str(checkpoint), tmp_path / "merged", merge_adapter=True)
    script = Path(__file__).resolve().parents[1] / "launch" / "vllm_serve.sh"
    env = {**os.environ, "PYTHON": sys.executable}
    alone = subprocess.run(["bash", str(script), "--print-config", str(target)], capture_output=True, text=True,
                           env=env)
    assert alone.returncode == 2 and "--merge-adapter" in alone.stderr and alone.stdout == ""
    paired = subprocess.run(["bash", str(script), "--print-config", str(target), "3"], capture_output=True, text=True,
                            env={**env, "DRAFT": str(draft)})
    assert paired.returncode == 0, paired.stderr
    assert json.loads(paired.stdout)["model"] == str(draft)
