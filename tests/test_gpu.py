"""Checks that need a CUDA device (run by launch/gpu_check.sh; marked `gpu`, skipped where there is none):

* the FlexAttention training path equals the dense-mask path, loss and gradients, on the tiny model and on the
  default model in bf16 (the trainer picks FlexAttention on CUDA, distill/trainer.py `_attention_mask`);
* the decode oracles on CUDA: Static(1) and the self-speculative mode equal plain HF greedy decoding token for token
  (tiny model, and the default model in fp32), batched, and `generate(custom_generate=...)` equals both.
"""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device (launch/gpu_check.sh)")]

# bf16 has 8 bits of mantissa: the two attention kernels round differently, so the two paths agree to about 1e-2
# relative; a wrong mask (a position seeing a mask of another region) changes the loss by O(1) and the gradients'
# direction entirely.
BF16_LOSS_RTOL = 2e-2
BF16_GRAD_COSINE = 0.99


def _packed_batch(tokenizer, mask_id: int, gsm8k_path):
    from distill.layout import build_layout, raw_tokens_needed
    from tests.test_packing_oracle import gsm8k_rows

    seq_len, num_regions, k, offset = 96, 4, 6, 3
    n = raw_tokens_needed(seq_len, num_regions, k)
    source = gsm8k_rows(gsm8k_path, tokenizer, n).cuda()
    lengths = torch.tensor([n, n - 20], device="cuda")
    return build_layout(source, lengths, k=k, num_regions=num_regions, seq_len=seq_len, offset=offset,
                        mask_token_id=mask_id, pad_token_id=tokenizer.pad_token_id)


def _loss_and_grads(model, layout, mask, targets):
    model.zero_grad(set_to_none=True)
    logits = model(input_ids=layout.input_ids, position_ids=layout.position_ids, attention_mask=mask).logits
    loss = F.cross_entropy(logits[layout.pred_slots].float(), targets)
    loss.backward()
    grads = torch.cat([p.grad.float().reshape(-1) for p in model.parameters() if p.grad is not None])
    return loss.detach().float(), grads


@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_flex_equals_dense_loss_and_grads_bf16(which, tiny_model_dir, smollm2_dir, gsm8k_path):
    from distill.attention import dense_block_mask, flex_block_mask
    from distill.models import load_model, load_tokenizer
    from distill.tokens import add_mtp_token

    path = tiny_model_dir if which == "tiny" else smollm2_dir
    tokenizer = load_tokenizer(path)
    model = load_model(path, dtype=torch.bfloat16, attn_implementation="flex_attention")
    mask_id = add_mtp_token(model, tokenizer)  # on the CPU (its seeded initialisation), then to the device
    model = model.cuda().train()
    layout = _packed_batch(tokenizer, mask_id, gsm8k_path)
    batch = layout.input_ids.shape[0]
    with torch.no_grad():  # hard targets, as the student-forced teacher gives them
        targets = model(input_ids=layout.input_ids, position_ids=layout.position_ids,
                        attention_mask=flex_block_mask(layout.block_ids, batch, "cuda")).logits
        targets = targets[layout.pred_slots].argmax(-1)
    flex_loss, flex_grads = _loss_and_grads(model, layout, flex_block_mask(layout.block_ids, batch, "cuda"), targets)
    model.set_attn_implementation("sdpa")
    dense = dense_block_mask(layout.block_ids, batch, torch.bfloat16)
    dense_loss, dense_grads = _loss_and_grads(model, layout, dense, targets)
    assert torch.isfinite(flex_loss) and torch.isfinite(dense_loss)
    assert abs(float(flex_loss - dense_loss)) <= BF16_LOSS_RTOL * float(dense_loss.abs())
    cosine = F.cosine_similarity(flex_grads, dense_grads, dim=0)
    assert float(cosine) >= BF16_GRAD_COSINE


def _prompts(n: int = 8) -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 40000) for _ in range(length)] for length in (1, 3, 8, 17, 26, 40, 5, 12)[:n]]


@pytest.mark.parametrize("which", ["tiny", pytest.param("smollm2", marks=pytest.mark.slow)])
def test_decode_oracles_cuda(which, tiny_model_dir, smollm2_dir):
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import SelfSpeculative, Static
    from distill.models import load_model, load_tokenizer
    from distill.tokens import add_mtp_token
    from tests.conftest import rigged_tiny_model
    from tests.test_decoder import hf_greedy

    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32: the oracle is exact equality
    if which == "tiny":
        model, tokenizer = rigged_tiny_model(tiny_model_dir)
    else:
        tokenizer = load_tokenizer(smollm2_dir)
        model = load_model(smollm2_dir).eval()
        add_mtp_token(model, tokenizer)
    model = model.cuda()
    decoder = MTPDecoder(model, tokenizer)
    prompts = _prompts()
    reference = hf_greedy(model, prompts, 24, decoder.stop_token_ids)
    for strategy in (Static(1), SelfSpeculative(4)):
        results = decoder.generate(prompts, strategy, 24)
        assert [r.token_ids for r in results] == reference, strategy.label


def test_custom_generate_cuda(tiny_model_dir, tmp_path):
    """`generate(custom_generate=...)` on CUDA: self-speculative and static k=1 equal `generate(do_sample=False)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from adaptive import hf_generate
    from distill.export import export_model
    from tests.conftest import rigged_tiny_model

    torch.backends.cuda.matmul.allow_tf32 = False
    rigged, tokenizer = rigged_tiny_model(tiny_model_dir)
    source = tmp_path / "rigged"
    rigged.save_pretrained(source)
    tokenizer.save_pretrained(source)
    out = export_model(source, tmp_path / "exported", k_max=4)
    model = AutoModelForCausalLM.from_pretrained(out).cuda().eval()
    tok = AutoTokenizer.from_pretrained(out, padding_side="left")
    batch = tok.apply_chat_template([[{"role": "user", "content": p}] for p in ("Hi", "Natalia sold 48 clips.")],
                                    add_generation_prompt=True, padding=True, return_tensors="pt",
                                    return_dict=True).to("cuda")
    greedy = model.generate(**batch, do_sample=False, max_new_tokens=16)
    for kwargs in ({"mtp_strategy": "selfspec", "mtp_k_max": 4}, {"mtp_strategy": "static", "mtp_k": 1}):
        assert torch.equal(model.generate(**batch, custom_generate=str(out), trust_remote_code=True,
                                          max_new_tokens=16, **kwargs), greedy)
        assert torch.equal(model.generate(**batch, custom_generate=hf_generate.generate, max_new_tokens=16,
                                          **kwargs), greedy)
