"""Packing oracle: a packed row computes exactly what its MTP problems compute when run one by one (paper §1.2–1.3).

For every surviving region of a packed batch (real GSM8K text, nonzero offset, a short row that drops a region):
  * student: logits at its k prediction slots == the same problem alone (prefix ⊕ k-1 <MTP>, plain causal, positions
    0..), the inference-time format of §1.2;
  * teacher: with the masks replaced by the student's y'_1..y'_{k-1} (§2.2 step 4), logits at the same slots ==
    scoring prefix ⊕ y'_{1..k-1} alone, i.e. P_T(y'_j | prefix, y'_<j) for j = 1..k.
"""

from __future__ import annotations

import json

import pytest
import torch

from distill.attention import dense_block_mask, flex_block_mask
from distill.layout import build_layout, prefix_len, raw_tokens_needed
from distill.models import load_model, load_tokenizer
from distill.tokens import add_mtp_token, get_mtp_token_id

# fp32. The packed and solo passes multiply matrices of different shapes, so rounding differs: measured max |diff|
# ~3e-7 on the tiny model and ~5e-5 (student) / ~6e-5 (teacher) on SmolLM2's 30 layers, whose logits reach ~33.
# The requirement is 1e-4 absolute; a wrong position, mask or region is off by O(1).
ATOL, RTOL = 1e-4, 0.0


def gsm8k_rows(path, tokenizer, n_tokens: int, count: int = 2) -> torch.LongTensor:
    """The first `count` GSM8K problems (question + answer as plain text) with at least n_tokens tokens."""
    rows = []
    with open(path) as f:
        for line in f:
            ex = json.loads(line)
            ids = tokenizer(ex["question"] + "\n" + ex["answer"], add_special_tokens=False)["input_ids"]
            if len(ids) >= n_tokens:
                rows.append(ids[:n_tokens])
            if len(rows) == count:
                return torch.tensor(rows)
    raise AssertionError("not enough long GSM8K rows")


def pack(source, lengths, k, num_regions, seq_len, offset, mask_id, pad_id):
    layout = build_layout(source, lengths, k=k, num_regions=num_regions, seq_len=seq_len, offset=offset,
                          mask_token_id=mask_id, pad_token_id=pad_id)
    prefix = prefix_len(seq_len, num_regions, k)
    # Independently of the layout's bookkeeping: region r's problem is the source up to its first target r·P+P-o.
    problems = [(b, r * prefix + prefix - offset) for b in range(len(lengths)) for r in range(num_regions)
                if r * prefix + prefix - offset < lengths[b]]
    assert layout.num_predictions == len(problems)
    return layout, problems


def packed_logits(model, input_ids, layout, mask):
    return model(input_ids=input_ids, position_ids=layout.position_ids, attention_mask=mask).logits


def alone_logits(model, problems: list[list[int]], k: int, pad_id: int) -> torch.Tensor:
    """Each problem on its own row, plain causal attention, positions 0.. — the §1.2 inference format. Rows are
    right-padded to one length so they share one forward pass: under a causal mask a token never sees what follows
    it, so the padding cannot change the logits read at the end of each problem."""
    width = max(len(ids) for ids in problems)
    batch = torch.full((len(problems), width), pad_id, dtype=torch.long)
    for i, ids in enumerate(problems):
        batch[i, : len(ids)] = torch.tensor(ids)
    logits = model(input_ids=batch.to(model.device)).logits
    return torch.stack([logits[i, len(ids) - k : len(ids)] for i, ids in enumerate(problems)])


def check_oracle(model, source, lengths, *, k, num_regions, seq_len, offset, mask_id, pad_id):
    """Run the student and teacher passes of §2.2 on the packed batch and compare each problem with its solo run."""
    layout, problems = pack(source, lengths, k, num_regions, seq_len, offset, mask_id, pad_id)
    mask = dense_block_mask(layout.block_ids, len(lengths), torch.float32)
    with torch.no_grad():
        logits = packed_logits(model, layout.input_ids, layout, mask)
        student = logits[layout.pred_slots].view(-1, k, logits.shape[-1])  # [R, k, V], regions in row-major order
        rollout = student.argmax(-1)  # y'_1..y'_k per problem
        teacher_ids = layout.input_ids.clone()
        teacher_ids[layout.mask_slots] = rollout[:, : k - 1].reshape(-1)
        teacher = packed_logits(model, teacher_ids, layout, mask)[layout.pred_slots].view_as(student)

        prefixes = [source[b, :first_target].tolist() for b, first_target in problems]
        solo = alone_logits(model, [p + [mask_id] * (k - 1) for p in prefixes], k, pad_id)
        solo_t = alone_logits(model, [p + y[: k - 1] for p, y in zip(prefixes, rollout.tolist())], k, pad_id)
    torch.testing.assert_close(student, solo, atol=ATOL, rtol=RTOL, msg=lambda m: f"student packed vs alone: {m}")
    torch.testing.assert_close(teacher, solo_t, atol=ATOL, rtol=RTOL, msg=lambda m: f"teacher packed vs alone: {m}")
    return layout, problems, student


@pytest.fixture(scope="module")
def tiny_tokenizer(tiny_model_dir):
    return load_tokenizer(tiny_model_dir)


def tiny_batch(tokenizer, gsm8k_path, seq_len, num_regions, short):
    n_source = raw_tokens_needed(seq_len, num_regions, 2)
    source = gsm8k_rows(gsm8k_path, tokenizer, n_source)
    source[1, short:] = tokenizer.pad_token_id
    return source, torch.tensor([n_source, short])


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
@pytest.mark.parametrize("k, offset", [(2, 13), (5, 7), (16, 0)])  # k_min, a middle k, k_max = W (P = 1)
def test_packed_equals_alone_tiny(tiny_model_dir, tiny_tokenizer, gsm8k_path, attn_implementation, k, offset):
    seq_len, num_regions = 66, 4  # W = 16, plus a 2-slot tail (S % M != 0)
    model = load_model(tiny_model_dir, attn_implementation=attn_implementation).eval()
    mask_id = get_mtp_token_id(model)
    # Row 1 ends exactly at the first target of the last region: that region is dropped, the others survive.
    short = num_regions * prefix_len(seq_len, num_regions, k) - offset
    source, lengths = tiny_batch(tiny_tokenizer, gsm8k_path, seq_len, num_regions, short=short)
    layout, problems, _ = check_oracle(model, source, lengths, k=k, num_regions=num_regions, seq_len=seq_len,
                                       offset=offset, mask_id=mask_id, pad_id=tiny_tokenizer.pad_token_id)
    per_row = [sum(b == row for b, _ in problems) for row in range(2)]
    assert per_row == [num_regions, num_regions - 1]


def test_bidirectional_ablation_changes_what_the_rule_says(tiny_model_dir, tiny_tokenizer, gsm8k_path):
    """BDA (§1.3) lets the last GT slot of a chunk look ahead into its own masks, so it changes the first prediction
    as well as the mask predictions; every slot before the first span is untouched. (A "first prediction unchanged"
    property would hold only if the GT slot were left out of the span, which is not the ablation described.)"""
    seq_len, num_regions, k, offset = 66, 4, 5, 7
    model = load_model(tiny_model_dir, attn_implementation="sdpa").eval()
    source, lengths = tiny_batch(tiny_tokenizer, gsm8k_path, seq_len, num_regions, short=35)
    layout, _ = pack(source, lengths, k, num_regions, seq_len, offset, get_mtp_token_id(model),
                     tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        causal = packed_logits(model, layout.input_ids, layout, dense_block_mask(layout.block_ids, 2, torch.float32))
        bda = packed_logits(model, layout.input_ids, layout,
                            dense_block_mask(layout.block_ids, 2, torch.float32, bidirectional=True))
    first_span = int(layout.pred_slots[0].nonzero()[0])
    assert (causal[:, :first_span] - bda[:, :first_span]).abs().max() <= ATOL
    diff = (causal - bda).abs().amax(-1)  # [B,S]
    groups = diff[layout.pred_slots].view(-1, k)
    assert (groups[:, 0] > 1e-3).all()  # first prediction of every region looks ahead
    assert (groups[:, 1:] > 1e-3).all()  # every mask slot (the last one via deeper layers)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="FlexAttention through transformers needs torch.compile; "
                    "on CPU that compile takes about a minute")
def test_packed_equals_alone_flex_cuda(tiny_model_dir, tiny_tokenizer, gsm8k_path):
    seq_len, num_regions, k, offset = 66, 4, 5, 7
    model = load_model(tiny_model_dir, attn_implementation="flex_attention").cuda().eval()
    source, lengths = tiny_batch(tiny_tokenizer, gsm8k_path, seq_len, num_regions, short=35)
    source, lengths = source.cuda(), lengths.cuda()
    layout, _ = pack(source, lengths, k, num_regions, seq_len, offset, get_mtp_token_id(model),
                     tiny_tokenizer.pad_token_id)
    mask = flex_block_mask(layout.block_ids, 2, "cuda")
    with torch.no_grad():
        flex = packed_logits(model, layout.input_ids, layout, mask)
        model.set_attn_implementation("sdpa")
        dense = packed_logits(model, layout.input_ids, layout, dense_block_mask(layout.block_ids, 2, torch.float32))
    assert (flex[layout.pred_slots] - dense[layout.pred_slots]).abs().max() <= ATOL


@pytest.mark.slow
def test_packed_equals_alone_smollm2(smollm2_dir, gsm8k_path):
    seq_len, num_regions, k, offset = 64, 4, 8, 4  # W = 16, P = 9, first targets 5, 14, 23, 32
    tokenizer = load_tokenizer(smollm2_dir)
    model = load_model(smollm2_dir, attn_implementation="sdpa").eval()
    mask_id = add_mtp_token(model, tokenizer)
    n_source = raw_tokens_needed(seq_len, num_regions, k)
    source = gsm8k_rows(gsm8k_path, tokenizer, n_source)
    source[1, 30:] = tokenizer.pad_token_id  # row 1 keeps 30 tokens: region 3 (first target 32) is dropped
    lengths = torch.tensor([n_source, 30])
    _, problems, _ = check_oracle(model, source, lengths, k=k, num_regions=num_regions, seq_len=seq_len,
                                  offset=offset, mask_id=mask_id, pad_id=tokenizer.pad_token_id)
    assert len(problems) == 7
