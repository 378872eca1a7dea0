"""distill/layout.py against a slot-by-slot reference built straight from the paper's description (§1.3–1.6)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import example, given, settings
from hypothesis import strategies as st

from distill.errors import UserError
from distill.layout import (
    PackedLayout,
    StepSampler,
    build_layout,
    prefix_len,
    raw_tokens_needed,
    region_width,
)

MASK, PAD = 999, 0


# ---------------------------------------------------------------------------------------------------------------------
# Reference: walk the row slot by slot the way the paper draws it (Fig. 2/3), with plain Python loops.
# ---------------------------------------------------------------------------------------------------------------------
def reference_slots(seq_len: int, num_regions: int, k: int, offset: int) -> list[dict]:
    """Region by region: a chunk of visible source tokens, then k-1 masks standing for the next k-1 tokens; the next
    region restarts at the first hidden token (replication). Region 0's chunk loses `offset` tokens; whatever is left
    of the row continues the source as plain ground truth."""
    width = seq_len // num_regions
    masks = k - 1
    prefix = width - masks
    slots, next_src = [], 0
    for r in range(num_regions):
        chunk = prefix - offset if r == 0 else prefix
        for i in range(chunk):
            slots.append({"src": next_src + i, "mask": False, "region": r, "last_gt": i == chunk - 1})
        next_src += chunk
        for j in range(masks):  # mask j stands for source token next_src + j (and takes its position)
            slots.append({"src": next_src + j, "mask": True, "region": r, "last_gt": False})
    while len(slots) < seq_len:
        slots.append({"src": next_src, "mask": False, "region": None, "last_gt": False})
        next_src += 1
    assert len(slots) == seq_len
    return slots


def reference_layout(source: list[list[int]], lengths: list[int], k, num_regions, seq_len, offset) -> dict:
    slots = reference_slots(seq_len, num_regions, k, offset)
    out = {key: [] for key in ("input_ids", "position_ids", "pred", "mask", "prefix", "labels")}
    out["block_ids"] = [s["region"] if s["mask"] else -1 for s in slots]
    for row, length in zip(source, lengths):
        # A region survives iff the token right after its last visible GT token is real (not padding).
        survivors = set()
        for s in slots:
            if s["last_gt"] and s["src"] + 1 < length:
                survivors.add(s["region"])
        ids, pos, pred, mask, prefix, labels = [], [], [], [], [], []
        for s in slots:
            src = s["src"]
            if s["mask"]:
                ids.append(MASK)
            else:
                ids.append(row[src] if src < len(row) else PAD)
            pos.append(src)
            alive = s["region"] in survivors
            pred.append(alive and (s["mask"] or s["last_gt"]))
            mask.append(alive and s["mask"])
            real_target = src + 1 < length
            prefix.append(not s["mask"] and not s["last_gt"] and real_target)
            labels.append(row[src + 1] if real_target else PAD)
        for key, val in zip(("input_ids", "position_ids", "pred", "mask", "prefix", "labels"),
                            (ids, pos, pred, mask, prefix, labels)):
            out[key].append(val)
    out["survivors"] = [
        sorted({s["region"] for s in slots if s["last_gt"] and s["src"] + 1 < length}) for length in lengths
    ]
    return out


def assert_matches_reference(layout: PackedLayout, source, lengths, k, num_regions, seq_len, offset):
    ref = reference_layout(source.tolist(), lengths.tolist(), k, num_regions, seq_len, offset)
    assert layout.block_ids.tolist() == ref["block_ids"]
    assert layout.input_ids.tolist() == ref["input_ids"]
    assert layout.position_ids.tolist() == ref["position_ids"]
    assert layout.pred_slots.tolist() == ref["pred"]
    assert layout.mask_slots.tolist() == ref["mask"]
    assert layout.prefix_slots.tolist() == ref["prefix"]
    assert layout.labels.tolist() == ref["labels"]
    assert layout.num_predictions == sum(len(s) for s in ref["survivors"])
    assert (layout.k, layout.offset, layout.num_regions) == (k, offset, num_regions)


def random_rows(rng: np.random.Generator, lengths: list[int], n_source: int) -> torch.LongTensor:
    rows = torch.full((len(lengths), n_source), PAD, dtype=torch.long)
    for b, length in enumerate(lengths):
        rows[b, :length] = torch.as_tensor(rng.integers(1, 500, size=length))
    return rows


@st.composite
def layouts(draw):
    """Random (S, M, k, offset, lengths): S not divisible by M, offsets > 0, rows short enough to drop regions."""
    num_regions = draw(st.integers(1, 6))
    width = draw(st.integers(2, 16))
    seq_len = num_regions * width + draw(st.integers(0, num_regions - 1))
    k = draw(st.sampled_from([2, width, draw(st.integers(2, width))]))  # k_min, k_max and anything between
    prefix = width - (k - 1)
    offset = draw(st.integers(0, prefix - 1))
    n_source = num_regions * prefix + k + draw(st.integers(0, 6))
    lengths = draw(st.lists(st.integers(0, n_source), min_size=1, max_size=3))
    seed = draw(st.integers(0, 2**31))
    return seq_len, num_regions, k, offset, n_source, lengths, seed


@settings(max_examples=400, deadline=None)
@given(layouts())
@example((18, 3, 3, 0, 15, [15, 9], 0))  # paper Fig. 3, offset 0
@example((18, 3, 3, 2, 15, [15, 9], 0))  # paper Fig. 3, offset -2
@example((51, 4, 2, 0, 46, [46, 40], 1))  # S % M = 3 > K + 1: the tail reads past the stored row
def test_build_layout_matches_reference(case):
    seq_len, num_regions, k, offset, n_source, lengths, seed = case
    source = random_rows(np.random.default_rng(seed), lengths, n_source)
    lengths_t = torch.tensor(lengths)
    layout = build_layout(source, lengths_t, k=k, num_regions=num_regions, seq_len=seq_len, offset=offset,
                          mask_token_id=MASK, pad_token_id=PAD)
    assert_matches_reference(layout, source, lengths_t, k, num_regions, seq_len, offset)


def test_paper_worked_example():
    """Paper Fig. 2/3: S=18, P=4, k=3 (W=6, M=3), offsets 0 and 2 (the paper's -2); source token i is 100+i."""
    source = torch.arange(100, 120)[None]
    full = torch.tensor([20])
    l0 = build_layout(source, full, k=3, num_regions=3, seq_len=18, offset=0, mask_token_id=MASK, pad_token_id=PAD)
    m = MASK
    assert l0.position_ids[0].tolist() == [0, 1, 2, 3, 4, 5, 4, 5, 6, 7, 8, 9, 8, 9, 10, 11, 12, 13]
    assert l0.input_ids[0].tolist() == [100, 101, 102, 103, m, m, 104, 105, 106, 107, m, m, 108, 109, 110, 111, m, m]
    assert l0.block_ids.tolist() == [-1] * 4 + [0, 0] + [-1] * 4 + [1, 1] + [-1] * 4 + [2, 2]
    assert l0.pred_slots[0].nonzero().flatten().tolist() == [3, 4, 5, 9, 10, 11, 15, 16, 17]
    assert l0.labels[0][l0.pred_slots[0]].tolist() == [104, 105, 106, 108, 109, 110, 112, 113, 114]
    assert l0.prefix_slots[0].nonzero().flatten().tolist() == [0, 1, 2, 6, 7, 8, 12, 13, 14]
    assert l0.num_predictions == 3

    l2 = build_layout(source, full, k=3, num_regions=3, seq_len=18, offset=2, mask_token_id=MASK, pad_token_id=PAD)
    # Grid shifted left by 2: region 0 keeps 2 GT tokens, the last 2 slots are a GT tail (source 10, 11).
    assert l2.position_ids[0].tolist() == [0, 1, 2, 3, 2, 3, 4, 5, 6, 7, 6, 7, 8, 9, 10, 11, 10, 11]
    assert l2.input_ids[0].tolist() == [100, 101, m, m, 102, 103, 104, 105, m, m, 106, 107, 108, 109, m, m, 110, 111]
    assert l2.block_ids.tolist() == [-1, -1, 0, 0] + [-1] * 4 + [1, 1] + [-1] * 4 + [2, 2, -1, -1]
    assert l2.pred_slots[0].nonzero().flatten().tolist() == [1, 2, 3, 7, 8, 9, 13, 14, 15]
    assert l2.labels[0][l2.pred_slots[0]].tolist() == [102, 103, 104, 106, 107, 108, 110, 111, 112]
    assert l2.prefix_slots[0].nonzero().flatten().tolist() == [0, 4, 5, 6, 10, 11, 12, 16, 17]


def test_short_row_drops_regions_at_exact_boundary():
    """§1.6: region r survives iff its first target r·P+P-o is a real token; the cut is by length, not by an EOS id."""
    seq_len, num_regions, k, offset = 40, 4, 3, 3  # W=10, P=8; first targets 5, 13, 21, 29
    source = torch.arange(1, 41)[None].repeat(3, 1)
    lengths = torch.tensor([21, 22, 5])
    layout = build_layout(source, lengths, k=k, num_regions=num_regions, seq_len=seq_len, offset=offset,
                          mask_token_id=MASK, pad_token_id=PAD)
    per_row = (layout.pred_slots.sum(1) // k).tolist()
    assert per_row == [2, 3, 0]
    assert layout.num_predictions == 5
    # Dropped regions keep their masks in the input.
    assert (layout.input_ids == MASK).sum(1).tolist() == [num_regions * (k - 1)] * 3
    # Prefix slots never carry a padded target.
    assert (layout.labels[layout.prefix_slots] != PAD).all()


def test_prediction_groups_are_contiguous_problems():
    """Row-major boolean indexing of pred_slots yields [R, k] groups: one region each, consecutive positions."""
    rng = np.random.default_rng(0)
    seq_len, num_regions, k, offset = 61, 5, 4, 5
    n_source = raw_tokens_needed(seq_len, num_regions, 2)
    source = random_rows(rng, [n_source, 30], n_source)
    layout = build_layout(source, torch.tensor([n_source, 30]), k=k, num_regions=num_regions, seq_len=seq_len,
                          offset=offset, mask_token_id=MASK, pad_token_id=PAD)
    pos = layout.position_ids[layout.pred_slots].view(-1, k)
    ids = layout.input_ids[layout.pred_slots].view(-1, k)
    assert pos.shape[0] == layout.num_predictions
    assert (pos[:, 1:] - pos[:, :-1] == 1).all()
    assert (ids[:, 0] != MASK).all() and (ids[:, 1:] == MASK).all()


def test_teacher_input_puts_student_tokens_in_the_right_masks():
    """Contract: t_in[mask_slots] = y[:, :k-1].reshape(-1) puts y'_1..y'_{k-1} into the K masks of the matching region."""
    rng = np.random.default_rng(1)
    seq_len, num_regions, k, offset = 57, 4, 5, 2
    n_source = num_regions * prefix_len(seq_len, num_regions, k) + k + 3
    lengths = [n_source, 25, 40]
    source = random_rows(rng, lengths, n_source)
    layout = build_layout(source, torch.tensor(lengths), k=k, num_regions=num_regions, seq_len=seq_len,
                          offset=offset, mask_token_id=MASK, pad_token_id=PAD)
    ref = reference_layout(source.tolist(), lengths, k, num_regions, seq_len, offset)
    y = torch.arange(layout.num_predictions * k).view(-1, k) + 10_000  # distinct fake student tokens
    t_in = layout.input_ids.clone()
    t_in[layout.mask_slots] = y[:, : k - 1].reshape(-1)

    slots = reference_slots(seq_len, num_regions, k, offset)
    problem = 0
    for b in range(len(lengths)):
        for r in ref["survivors"][b]:
            region_masks = [p for p, s in enumerate(slots) if s["mask"] and s["region"] == r]
            assert t_in[b, region_masks].tolist() == y[problem, : k - 1].tolist()
            problem += 1
        dropped = [p for p, s in enumerate(slots) if s["mask"] and s["region"] not in ref["survivors"][b]]
        assert (t_in[b, dropped] == MASK).all()
        gt = [p for p, s in enumerate(slots) if not s["mask"]]
        assert torch.equal(t_in[b, gt], layout.input_ids[b, gt])
    assert problem == layout.num_predictions


def test_sizes():
    assert region_width(160, 5) == 32
    assert prefix_len(160, 5, 2) == 31 and prefix_len(160, 5, 16) == 17
    assert raw_tokens_needed(160, 5, 2) == 157  # M·P + K = 156 (paper), +1 for the last target
    assert raw_tokens_needed(18, 3, 3) == 3 * 4 + 2 + 1


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(k=1), "k must be >= 2"),
        (dict(k=12), "does not fit"),  # W = 10 -> P = -1
        (dict(k=11), "does not fit"),  # P = 0
        (dict(offset=8), "offset must be in"),  # P = 8 for k = 3
        (dict(offset=-1), "offset must be in"),
        (dict(num_regions=0), "num_regions"),
        (dict(n_source=30), "right-pad the source"),  # needs 4·8 + 2 + 1 = 35
        (dict(lengths=[41]), "lengths must lie"),
    ],
)
def test_build_layout_rejects_bad_input(kwargs, match):
    args = dict(k=3, num_regions=4, seq_len=40, offset=0, n_source=40, lengths=[40])
    args.update(kwargs)
    source = torch.ones(1, args.pop("n_source"), dtype=torch.long)
    lengths = torch.tensor(args.pop("lengths"))
    with pytest.raises(UserError, match=match):
        build_layout(source, lengths, mask_token_id=MASK, pad_token_id=PAD, **args)


# ---------------------------------------------------------------------------------------------------------------------
# StepSampler (§1.4, §1.5, §6.3 item 8)
# ---------------------------------------------------------------------------------------------------------------------
def draws(sampler: StepSampler, steps: int) -> np.ndarray:
    return np.array([sampler(step) for step in range(steps)])


def test_step_sampler_reproducible_and_rank_dependent():
    a = draws(StepSampler(7, 2, 16, 160, 5), 200)
    b = draws(StepSampler(7, 2, 16, 160, 5), 200)
    assert (a == b).all()
    assert StepSampler(7, 2, 16, 160, 5)(123) == tuple(a[123])  # a step's draw does not depend on earlier calls
    assert (a != draws(StepSampler(7, 2, 16, 160, 5, rank=1), 200)).any()
    assert (a != draws(StepSampler(8, 2, 16, 160, 5), 200)).any()


def test_step_sampler_covers_the_whole_range_uniformly():
    seq_len, num_regions, k_min, k_max = 40, 4, 2, 5  # W = 10: P(k) = 9, 8, 7, 6
    d = draws(StepSampler(0, k_min, k_max, seq_len, num_regions), 4000)
    ks, offsets = d[:, 0], d[:, 1]
    counts = np.bincount(ks, minlength=k_max + 1)[k_min:]
    assert (counts > 0.8 * 1000).all() and (counts < 1.2 * 1000).all()
    for k in range(k_min, k_max + 1):
        seen = set(offsets[ks == k].tolist())
        assert seen == set(range(prefix_len(seq_len, num_regions, k)))  # every offset 0..P(k)-1, nothing outside


def test_step_sampler_streams_are_independent():
    with_offsets = draws(StepSampler(3, 2, 16, 160, 5), 3000)
    without = draws(StepSampler(3, 2, 16, 160, 5, random_offsets=False), 3000)
    assert (with_offsets[:, 0] == without[:, 0]).all()  # turning offsets off leaves the k sequence unchanged
    assert (without[:, 1] == 0).all()
    # No correlation between k and the offset's relative position in [0, P(k)) (the reference's seeding quirk
    # makes both draws come from identically seeded RNGs, §6.3 item 8).
    ks = with_offsets[:, 0].astype(float)
    rel = with_offsets[:, 1] / np.array([prefix_len(160, 5, int(k)) for k in ks])
    assert abs(np.corrcoef(ks, rel)[0, 1]) < 0.06


def test_step_sampler_rejects_bad_config():
    with pytest.raises(UserError, match="k_max"):
        StepSampler(0, 5, 4, 160, 5)
    with pytest.raises(UserError, match="k must be >= 2"):
        StepSampler(0, 1, 4, 160, 5)
    with pytest.raises(UserError, match="does not fit"):
        StepSampler(0, 2, 33, 160, 5)
    with pytest.raises(UserError, match="step"):
        StepSampler(0, 2, 4, 160, 5)(-1)
