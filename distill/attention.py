"""The block-causal attention rule that makes a packed row equal M separate MTP problems (paper §1.3).

Every slot has a block id b (distill/layout.py): -1 for ground-truth (GT) slots, r for the mask slots of region r.
For query q and key j:
  * b(q) == -1: allowed iff b(j) == -1 and j <= q — GT tokens read GT causally and skip every mask span, so the
    last GT slot of a chunk (the first prediction) is computed exactly as in ordinary next-token prediction;
  * b(q) == r:  allowed iff j <= q and (b(j) == -1 or b(j) == r) — a mask sees all upstream GT and the earlier masks
    of its own span, i.e. exactly "prefix + earlier masks" as at inference (§1.2).
With position ids = source indices, each prediction therefore sees the same tokens at the same positions as its
problem run alone (checked against that oracle in tests/test_packing_oracle.py).

Bidirectional ablation ("BDA", §1.3, student only): additionally every slot of span r — its masks and the last GT
slot just before them — attends to every slot of span r. The first prediction then looks ahead into its own masks,
and because GT slots downstream attend to that slot, later regions see it too; the paper keeps the causal rule.

Two encodings of one rule: a dense additive float mask for HF eager/sdpa (transformers 5.23 reads a boolean 4-D mask
wrongly with eager attention), and a FlexAttention BlockMask (CUDA fast path, §7.3).
"""

from __future__ import annotations

import torch


def _span_ids(block_ids: torch.LongTensor) -> torch.LongTensor:
    """Span id per slot for the bidirectional ablation: r on region r's masks and on the GT slot just before them."""
    span = block_ids.clone()
    starts = torch.zeros_like(block_ids, dtype=torch.bool)
    starts[:-1] = (block_ids[:-1] == -1) & (block_ids[1:] >= 0)
    span[:-1] = torch.where(starts[:-1], block_ids[1:], span[:-1])
    return span


def _allowed(bq, bk, q_idx, kv_idx, span_q=None, span_k=None):
    """The §1.3 rule on broadcastable tensors; shared by the dense mask and the FlexAttention mask_mod."""
    causal = kv_idx <= q_idx
    gt_query = (bq == -1) & (bk == -1)
    mask_query = (bq != -1) & ((bk == -1) | (bk == bq))
    allowed = causal & (gt_query | mask_query)
    if span_q is not None:
        allowed = allowed | ((span_q >= 0) & (span_q == span_k))
    return allowed


def allowed_pairs(block_ids: torch.LongTensor, bidirectional: bool = False) -> torch.BoolTensor:
    """[S,S] boolean: entry (q, j) is True iff query slot q may attend to key slot j."""
    idx = torch.arange(block_ids.shape[0], device=block_ids.device)
    bq, bk = block_ids[:, None], block_ids[None, :]
    if bidirectional:
        span = _span_ids(block_ids)
        return _allowed(bq, bk, idx[:, None], idx[None, :], span[:, None], span[None, :])
    return _allowed(bq, bk, idx[:, None], idx[None, :])


def dense_block_mask(
    block_ids: torch.LongTensor, batch_size: int, dtype: torch.dtype, bidirectional: bool = False
) -> torch.Tensor:
    """Additive float mask [B,1,S,S] (0 allowed, finfo(dtype).min elsewhere) for `model(attention_mask=...)`."""
    allowed = allowed_pairs(block_ids, bidirectional)
    mask = torch.zeros(allowed.shape, dtype=dtype, device=block_ids.device)
    mask.masked_fill_(~allowed, torch.finfo(dtype).min)
    # Materialised (not an expanded view): attention kernels and callers may need a plain contiguous tensor, and
    # B·S² floats is small next to the activations (32·160² fp32 = 3.3 MB).
    return mask[None, None].expand(batch_size, 1, -1, -1).contiguous()


def flex_block_mask(block_ids: torch.LongTensor, batch_size: int, device, bidirectional: bool = False):
    """FlexAttention BlockMask of the same rule, built on `device` (CUDA fast path; masks are cached by callers per
    (k, offset), §7.3)."""
    from torch.nn.attention.flex_attention import create_block_mask

    seq_len = block_ids.shape[0]
    block_ids = block_ids.to(device)
    span = _span_ids(block_ids) if bidirectional else None

    def mask_mod(b, h, q_idx, kv_idx):
        bq, bk = block_ids[q_idx], block_ids[kv_idx]
        if span is None:
            return _allowed(bq, bk, q_idx, kv_idx)
        return _allowed(bq, bk, q_idx, kv_idx, span[q_idx], span[kv_idx])

    # H=None: one mask broadcast over heads (the rule is the same for every layer and head).
    return create_block_mask(mask_mod, B=batch_size, H=None, Q_LEN=seq_len, KV_LEN=seq_len, device=device)
