"""distill/attention.py against the §1.3 rule evaluated pair by pair, and its dense / FlexAttention encodings."""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

from distill.attention import allowed_pairs, dense_block_mask, flex_block_mask
from distill.layout import build_layout, raw_tokens_needed


def packed_block_ids(seq_len, num_regions, k, offset):
    """block_ids and the spans (prediction groups: last GT slot + masks) of a full-length row."""
    n_source = raw_tokens_needed(seq_len, num_regions, k)
    layout = build_layout(torch.ones(1, n_source, dtype=torch.long), torch.tensor([n_source]), k=k,
                          num_regions=num_regions, seq_len=seq_len, offset=offset, mask_token_id=2, pad_token_id=0)
    spans = layout.pred_slots[0].nonzero().flatten().view(-1, k).tolist()
    return layout.block_ids, spans


def reference_allowed(block_ids: list[int], spans: list[list[int]], bidirectional: bool) -> list[list[bool]]:
    """§1.3 verbatim, one (query, key) pair at a time."""
    span_of = {p: r for r, span in enumerate(spans) for p in span}
    n = len(block_ids)
    out = [[False] * n for _ in range(n)]
    for q in range(n):
        for j in range(n):
            if block_ids[q] == -1:
                ok = block_ids[j] == -1 and j <= q
            else:
                ok = j <= q and (block_ids[j] == -1 or block_ids[j] == block_ids[q])
            if bidirectional and q in span_of and span_of.get(j) == span_of[q]:
                ok = True
            out[q][j] = ok
    return out


@st.composite
def grids(draw):
    num_regions = draw(st.integers(1, 5))
    width = draw(st.integers(2, 12))
    seq_len = num_regions * width + draw(st.integers(0, num_regions - 1))
    k = draw(st.integers(2, width))
    offset = draw(st.integers(0, width - k))
    return seq_len, num_regions, k, offset


@settings(max_examples=150, deadline=None)
@given(grids(), st.booleans())
def test_allowed_pairs_matches_rule(grid, bidirectional):
    block_ids, spans = packed_block_ids(*grid)
    expected = reference_allowed(block_ids.tolist(), spans, bidirectional)
    assert allowed_pairs(block_ids, bidirectional).tolist() == expected


def test_worked_example_offset_2():
    """Paper Fig. 3 (S=18, P=4, k=3, offset -2): GT skips mask spans, masks see upstream GT and their own span."""
    block_ids, _ = packed_block_ids(18, 3, 3, 2)  # [-1,-1,0,0,-1,-1,-1,-1,1,1,-1,-1,-1,-1,2,2,-1,-1]
    allowed = allowed_pairs(block_ids)
    row = lambda q: allowed[q].nonzero().flatten().tolist()  # noqa: E731
    assert row(1) == [0, 1]  # first prediction of region 0: plain causal over GT
    assert row(3) == [0, 1, 2, 3]  # last mask of region 0
    assert row(4) == [0, 1, 4]  # GT after region 0 skips its masks
    assert row(9) == [0, 1, 4, 5, 6, 7, 8, 9]  # mask of region 1 never sees region 0's masks
    assert row(17) == [0, 1, 4, 5, 6, 7, 10, 11, 12, 13, 16, 17]  # tail GT sees only GT
    bda = allowed_pairs(block_ids, bidirectional=True)
    assert bda[7].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7, 8, 9]  # last GT looks ahead into its span
    assert bda[8].nonzero().flatten().tolist() == [0, 1, 4, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("offset", [0, 5])
def test_bidirectional_adds_exactly_the_lookahead_inside_spans(offset):
    block_ids, spans = packed_block_ids(83, 4, 6, offset)
    causal, bda = allowed_pairs(block_ids), allowed_pairs(block_ids, bidirectional=True)
    added = bda & ~causal
    expected = torch.zeros_like(added)
    for span in spans:
        for q in span:
            for j in span:
                expected[q, j] = j > q
    assert torch.equal(added, expected)
    assert not (causal & ~bda).any()
    assert causal.diagonal().all()  # every query keeps at least itself: no all -inf softmax rows


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("bidirectional", [False, True])
def test_dense_block_mask_is_additive_float(dtype, bidirectional):
    block_ids, _ = packed_block_ids(37, 3, 4, 2)
    mask = dense_block_mask(block_ids, batch_size=3, dtype=dtype, bidirectional=bidirectional)
    assert mask.shape == (3, 1, 37, 37) and mask.dtype == dtype
    allowed = allowed_pairs(block_ids, bidirectional)
    for b in range(3):
        assert (mask[b, 0][allowed] == 0).all()
        assert (mask[b, 0][~allowed] == torch.finfo(dtype).min).all()


@pytest.mark.parametrize("bidirectional", [False, True])
def test_flex_block_mask_encodes_the_same_rule(bidirectional):
    """The BlockMask's mask_mod equals allowed_pairs everywhere, its block sparsity is right, and FlexAttention with it
    (unfused eager path, available on CPU) equals SDPA with the dense mask."""
    seq_len, num_regions, k, offset = 300, 5, 16, 7  # several 128-blocks: full, partial and empty ones
    block_ids, _ = packed_block_ids(seq_len, num_regions, k, offset)
    allowed = allowed_pairs(block_ids, bidirectional)
    block_mask = flex_block_mask(block_ids, batch_size=2, device="cpu", bidirectional=bidirectional)
    assert block_mask.shape == (2, 1, seq_len, seq_len)

    idx = torch.arange(seq_len)
    zero = torch.zeros((), dtype=torch.long)
    evaluated = block_mask.mask_mod(zero, zero, idx[:, None], idx[None, :])
    assert torch.equal(evaluated, allowed)

    blocks = block_mask.to_dense()[0, 0].bool()  # [Q blocks, KV blocks]: a block is computed iff any pair in it is
    size = block_mask.BLOCK_SIZE[0]
    n = -(-seq_len // size)
    padded = F.pad(allowed, (0, n * size - seq_len, 0, n * size - seq_len))
    assert torch.equal(blocks, padded.view(n, size, n, size).any(dim=(1, 3)))

    from torch.nn.attention.flex_attention import flex_attention

    gen = torch.Generator().manual_seed(0)
    q, key, v = (torch.randn(2, 4, seq_len, 16, generator=gen) for _ in range(3))
    with warnings.catch_warnings():  # "called without torch.compile()": the unfused path is the point here
        warnings.simplefilter("ignore", UserWarning)
        out = flex_attention(q, key, v, block_mask=block_mask)
    dense = dense_block_mask(block_ids, 2, torch.float32, bidirectional)
    ref = F.scaled_dot_product_attention(q, key, v, attn_mask=dense)
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
