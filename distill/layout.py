"""Pack many multi-token-prediction problems into one training row (paper §1.3–1.6).

At inference an MTP problem is `prefix ⊕ k-1 <MTP> masks` and the model reads k logits (§1.2). Training packs M such
problems into one row of S slots so a single forward pass supervises M·k predictions:

    region r (width W = S // M):  [ P ground-truth tokens | K = k-1 masks ]
    source index of region r:       r·P ... r·P+P-1        (masks stand for r·P+P ... r·P+P+K-1)

The K tokens hidden under region r's masks are replicated as visible ground truth at the start of region r+1, which
restarts at source index (r+1)·P (§1.3, "replication"). Every slot carries the RoPE position of its source token, so a
mask sits exactly where the token it predicts would sit in a real continuation — identical to inference.

Random offset o ∈ {0..P-1} (§1.4; the paper writes it as -o) shifts the region grid left by o slots: region 0 keeps
only P-o ground-truth tokens and the last o slots of the row become a ground-truth tail (never predicted). Over many
steps every prefix length gets an MTP problem. With S % M != 0 the tail also exists at offset 0.

Everything is index arithmetic on one `arange(S)` plus a gather (§7.2: the packing runs on device every step, and is
checked against a slot-by-slot reference in tests/test_layout.py). The attention rule that goes with this layout is
in distill/attention.py.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from distill.errors import UserError


def region_width(seq_len: int, num_regions: int) -> int:
    """W = S // M: slots per MTP region (prefix chunk + masks), constant for every k (§1.3)."""
    if num_regions < 1:
        raise UserError(f"num_regions must be >= 1, got {num_regions}")
    if seq_len < num_regions:
        raise UserError(f"seq_len ({seq_len}) must be at least num_regions ({num_regions})")
    return seq_len // num_regions


def prefix_len(seq_len: int, num_regions: int, k: int) -> int:
    """P = W - (k-1): ground-truth tokens per region (§1.3); a region must keep at least one."""
    if k < 2:
        raise UserError(f"k must be >= 2 (one prediction slot plus at least one <MTP> mask), got {k}")
    width = region_width(seq_len, num_regions)
    prefix = width - (k - 1)
    if prefix < 1:
        raise UserError(
            f"k={k} does not fit: seq_len={seq_len} // num_regions={num_regions} = {width} slots per region leaves "
            f"{prefix} ground-truth tokens (need >= 1); use k <= {width} or fewer regions"
        )
    return prefix


def raw_tokens_needed(seq_len: int, num_regions: int, k_min: int) -> int:
    """Source tokens a row must supply, incl. the last target: M·P + K + 1, largest at the smallest k (§1.3)."""
    prefix = prefix_len(seq_len, num_regions, k_min)
    return num_regions * prefix + (k_min - 1) + 1


class StepSampler:
    """Per-step (k, offset): k ~ U{k_min..k_max}, then offset ~ U{0..P(k)-1} (§1.4, §1.5).

    Each draw depends only on (seed, rank, step), so a resumed run replays the same schedule, and every rank gets its
    own draws (the reference draws per rank). k and offset come from two separate child streams of one SeedSequence:
    the reference seeds both RNGs identically, which correlates the draws (§6.3 item 8); here they are independent,
    and turning offsets off leaves the k sequence unchanged.
    """

    def __init__(
        self,
        seed: int,
        k_min: int,
        k_max: int,
        seq_len: int,
        num_regions: int,
        rank: int = 0,
        random_offsets: bool = True,
    ):
        if seed < 0 or rank < 0:
            raise UserError(f"seed and rank must be >= 0, got seed={seed}, rank={rank}")
        if k_max < k_min:
            raise UserError(f"k_max ({k_max}) must be >= k_min ({k_min})")
        prefix_len(seq_len, num_regions, k_min)  # validates k_min >= 2
        prefix_len(seq_len, num_regions, k_max)  # validates that the largest k still fits
        self.seed, self.rank = int(seed), int(rank)
        self.k_min, self.k_max = int(k_min), int(k_max)
        self.seq_len, self.num_regions = int(seq_len), int(num_regions)
        self.random_offsets = bool(random_offsets)

    def rng(self, step: int, stream: int) -> np.random.Generator:
        """The generator of one (step, stream): 0 draws k, 1 the offset, 2 the prefix_cache problem positions."""
        # spawn_key makes (rank, step, stream) children of the run's seed: statistically independent streams.
        return np.random.default_rng(np.random.SeedSequence(self.seed, spawn_key=(self.rank, step, stream)))

    def __call__(self, step: int) -> tuple[int, int]:
        if step < 0:
            raise UserError(f"step must be >= 0, got {step}")
        k = int(self.rng(step, 0).integers(self.k_min, self.k_max + 1))
        if not self.random_offsets:
            return k, 0
        prefix = prefix_len(self.seq_len, self.num_regions, k)  # P is recomputed for this k before the offset draw
        return k, int(self.rng(step, 1).integers(0, prefix))


@dataclass
class PackedLayout:
    """One packed micro-batch. All rows share k, the offset, and therefore block_ids / the attention mask."""

    input_ids: torch.LongTensor  # [B,S] source tokens at GT slots, <MTP> at mask slots
    position_ids: torch.LongTensor  # [B,S] source index of every slot (RoPE position)
    block_ids: torch.LongTensor  # [S] -1 at GT slots, r at the mask slots of region r
    pred_slots: torch.BoolTensor  # [B,S] last GT slot + K masks of every surviving region
    mask_slots: torch.BoolTensor  # [B,S] the K masks of every surviving region
    prefix_slots: torch.BoolTensor  # [B,S] GT slots that do not predict and whose target is a real token
    labels: torch.LongTensor  # [B,S] source[src+1], pad where that is past the row's length
    k: int
    offset: int
    num_regions: int

    @property
    def num_predictions(self) -> int:
        """R, the number of surviving regions in the batch: logits at pred_slots reshape to [R, k, V]."""
        return int(self.pred_slots.sum().item()) // self.k


def build_layout(
    source_ids: torch.LongTensor,
    lengths: torch.LongTensor,
    *,
    k: int,
    num_regions: int,
    seq_len: int,
    offset: int,
    mask_token_id: int,
    pad_token_id: int,
) -> PackedLayout:
    """Pack right-padded rows `source_ids` [B,N] (real tokens: the first `lengths[b]`) into the §1.3 layout."""
    if source_ids.dim() != 2 or lengths.dim() != 1 or lengths.shape[0] != source_ids.shape[0]:
        raise UserError(
            f"source_ids must be [B,N] and lengths [B]; got {tuple(source_ids.shape)} and {tuple(lengths.shape)}"
        )
    prefix = prefix_len(seq_len, num_regions, k)
    width, masks = prefix + k - 1, k - 1
    if not 0 <= offset < prefix:
        raise UserError(f"offset must be in [0, P-1] = [0, {prefix - 1}] for k={k}, got {offset}")
    batch, n_source = source_ids.shape
    needed = num_regions * prefix + masks + 1
    if n_source < needed:
        raise UserError(
            f"rows have {n_source} tokens but the layout (seq_len={seq_len}, num_regions={num_regions}, k={k}) "
            f"reads {needed}; right-pad the source to raw_tokens_needed(seq_len, num_regions, k_min)"
        )
    if batch and (int(lengths.min()) < 0 or int(lengths.max()) > n_source):
        raise UserError(f"lengths must lie in [0, {n_source}], got {lengths.tolist()}")
    device = source_ids.device
    lengths = lengths.to(device)

    # Slot p sits at grid coordinate q = p + o: region r = q // W, offset inside the region u = q % W (§1.4).
    q = torch.arange(seq_len, device=device) + offset
    region, u = q // width, q % width
    in_region = region < num_regions
    is_mask = in_region & (u >= prefix)
    is_first_pred = in_region & (u == prefix - 1)  # the last GT slot of a chunk predicts the first token
    # Region r starts at source r·P; the tail continues with region M's chunk, source M·P onwards.
    src = torch.where(in_region, region * prefix + u, num_regions * prefix + (q - num_regions * width)) - offset
    block_ids = torch.where(is_mask, region, torch.full_like(region, -1))

    # Gather source tokens; slots past the stored row (only tail slots can be) read as padding.
    stored = src < n_source
    gathered = source_ids.gather(1, src.clamp(max=n_source - 1).expand(batch, -1))
    input_ids = torch.where(stored, gathered, pad_token_id)
    input_ids = torch.where(is_mask, mask_token_id, input_ids)

    target_src = src + 1
    real_target = target_src[None, :] < lengths[:, None]  # [B,S]
    targets = source_ids.gather(1, target_src.clamp(max=n_source - 1).expand(batch, -1))
    labels = torch.where(real_target, targets, pad_token_id)

    # §1.6: a region survives iff its first target (source r·P+P-o) is a real token; later regions stay in the input
    # but are never supervised.
    first_target = region * prefix + prefix - offset
    survives = in_region[None, :] & (first_target[None, :] < lengths[:, None])  # [B,S]
    pred_slots = survives & (is_mask | is_first_pred)[None, :]
    mask_slots = survives & is_mask[None, :]
    prefix_slots = (~is_mask & ~is_first_pred)[None, :] & real_target

    return PackedLayout(
        input_ids=input_ids.long(),
        position_ids=src.expand(batch, -1).clone(),
        block_ids=block_ids,
        pred_slots=pred_slots,
        mask_slots=mask_slots,
        prefix_slots=prefix_slots,
        labels=labels.long(),
        k=k,
        offset=offset,
        num_regions=num_regions,
    )
