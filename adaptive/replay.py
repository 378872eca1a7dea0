"""One-pass replay of ConfAdapt from greedy rollouts: the whole (tau, k_max) grid for about one greedy pass.

The tuner (adaptive/tuner.py; `mtp tune --sweep replay`, the default) evaluates its grid through here. A grid value
the replay cannot simulate (`replayable` is false: a per-step choice of the number of masks) is decoded for real, and
so is every question from the point where a setting leaves greedy:

  * Until ConfAdapt first accepts a token that differs from greedy, its trajectory *is* the greedy one, so its
    accept count at every step follows from the confidences of the k_max positions read at the greedy prefix it has
    reached. Those come from packed forwards over the k=1 rollout (prompt + generated tokens y_1..y_T) in the
    training layout (distill/layout.py with one ground-truth token per region): after the ground-truth slot of every
    prefix (the prompt's last token, then y_1 .. y_{T-1}) sit `<MTP>` masks at the RoPE positions of the tokens they
    predict, with the block-causal attention of distill/attention.py (tests/test_packing_oracle.py: packed ==
    per-prefix forwards within 1e-4). Under causal attention the first j masks' logits do not depend on how many
    masks follow, so one replay with the largest k_max serves every k_max. Two passes per question: one mask per
    prefix first (positions 1 and 2); the prefixes where both reach the grid's smallest tau and position 2 is
    greedy's token (elsewhere every setting stops or leaves greedy there) are packed again with all k_max - 1 masks.
    The packing is chunked by regions so at most REPLAY_MAX_SLOTS logits are read per forward (bounded memory). The
    confidence is the one the real ConfAdapt thresholds: the model's saved calibrator (adaptive/calibration.py
    load_calibrator), else raw top-1.
  * Per setting and question: accept n = the longest run of confidence >= tau (at least one, cut at the end of the
    greedy output, as the decoder cuts at a stop token or the token budget); if positions 2..n all hold greedy's
    tokens, the step is replayed and the next one starts n tokens later; otherwise the setting diverges there.
    A question that never diverges gets its exact per-step accept counts and k=1's output; a question where the
    setting diverges after c tokens is decoded for real with that setting from prompt + those c greedy tokens on
    (its first forward is the diverging step; the budget is what is left of --max-new-tokens); with cot8's stop
    strings, which the decoder matches across the whole generation, it is decoded from the start instead.
  * Float near-ties aside (a confidence within ~1e-5 of tau, or two logits within rounding of each other, can go
    either way between the packed forward and the decoder's KV-cache forward), replay equals real rollouts
    (tests/test_tuner_replay.py). With cot8's stop strings the step that completes a stop string may count a token
    differently from the decoder; the chat format (the default) stops on stop tokens only.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from adaptive.prompts import length_sorted_batches

# Packed replay: logits read per forward (position 1 + masks of each region in the chunk), so memory per forward is
# bounded by about REPLAY_MAX_SLOTS x vocabulary floats (SmolLM2: 1024 x 49152 x 4 B = 200 MB).
REPLAY_MAX_SLOTS = 1024


def replayable(k_max) -> bool:
    """Can the greedy replay simulate this grid point? Only a fixed number of positions read per forward."""
    return isinstance(k_max, int) and not isinstance(k_max, bool)



def _packed_positions(model, seq: list[int], L: int, regions: Sequence[int], masks: int, mask_token_id: int, scorer,
                      max_slots: int) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and argmax [len(regions), 1 + masks] of the given greedy prefixes (region c: the first L + c tokens
    of `seq`), `masks` `<MTP>` masks each, from packed block-causal forwards (see `greedy_confidences`)."""
    import torch

    from distill.attention import dense_block_mask

    width = 1 + masks
    confidence = np.zeros((len(regions), width), dtype=np.float32)
    argmax = np.zeros((len(regions), width), dtype=np.int64)
    device = model.device
    per_forward = max(1, max_slots // width)
    for r0 in range(0, len(regions), per_forward):
        chunk = list(regions[r0 : r0 + per_forward])
        wanted = {L - 1 + c: c for c in chunk}  # source index of each region's last ground-truth token -> region
        ids, pos, blocks, read = [], [], [], []
        for s in range(L + chunk[-1]):  # ground truth up to the last prefix of this chunk
            ids.append(seq[s])
            pos.append(s)
            blocks.append(-1)
            if s in wanted:
                read.append(len(ids) - 1)
                for j in range(1, masks + 1):
                    ids.append(mask_token_id)
                    pos.append(s + j)
                    blocks.append(wanted[s])
                    read.append(len(ids) - 1)
        mask = dense_block_mask(torch.tensor(blocks, device=device), 1, model.dtype)
        keep = torch.tensor(read, device=device)
        with torch.inference_mode():
            logits = model(input_ids=torch.tensor([ids], device=device),
                           position_ids=torch.tensor([pos], device=device), attention_mask=mask, logits_to_keep=keep,
                           use_cache=False).logits[0]
            if logits.shape[0] != len(read):  # a model that ignores logits_to_keep returns every slot
                logits = logits[keep]
            logits = logits.view(len(chunk), width, -1)
            confidence[r0 : r0 + len(chunk)] = scorer(logits).float().cpu().numpy()
            argmax[r0 : r0 + len(chunk)] = logits.argmax(dim=-1).cpu().numpy()
    return confidence, argmax


def greedy_confidences(model, prompt_ids: Sequence[int], generated: Sequence[int], k_max: int, mask_token_id: int,
                       scorer=None, max_slots: int = REPLAY_MAX_SLOTS,
                       min_tau: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Confidence and argmax of the k_max positions ConfAdapt reads at every greedy prefix, from packed forwards.

    prompt_ids + generated is the k=1 rollout (T = len(generated)). Row c (c = 0 .. T-1) is the forward ConfAdapt
    would run with c generated tokens committed: position 1 is the next-token prediction at the last committed token,
    positions 2..k_max the `<MTP>` masks after it. Layout (distill/layout.py with one ground-truth token per region,
    after a plain prompt prefix): ground-truth slots carry the rollout's tokens at their own positions; after the slot
    of source index L-1+c sit the masks of region c at positions L+c, L+c+1, ...; distill/attention.py's block-causal
    rule lets ground truth see ground truth causally and each mask the ground truth up to its prefix plus the earlier
    masks of its own region. Chunked by regions so at most `max_slots` logits are read per forward.

    `min_tau` (the smallest tau of the grid) skips work that cannot matter: a first pass reads positions 1 and 2 of
    every prefix (one mask each); only prefixes where both reach min_tau and position 2 holds greedy's token (else
    every grid setting stops or leaves greedy there) get the second pass with all k_max - 1 masks. Positions not
    read are reported as confidence 0 and argmax -1. Causal attention makes both passes' numbers those of the full
    k_max forward.
    Returns (confidence [T, k_max] float32 from `scorer` (raw top-1 when None), argmax ids [T, k_max] int64).
    """
    from adaptive.strategies import top1_probability

    scorer = scorer or top1_probability
    prompt_ids, generated = [int(t) for t in prompt_ids], [int(t) for t in generated]
    L, T = len(prompt_ids), len(generated)
    if L < 1 or k_max < 1:
        raise ValueError("greedy_confidences needs a non-empty prompt and k_max >= 1")
    seq = prompt_ids + generated
    if T == 0:
        return np.zeros((0, k_max), dtype=np.float32), np.zeros((0, k_max), dtype=np.int64)
    if min_tau is None or k_max <= 2:
        return _packed_positions(model, seq, L, range(T), k_max - 1, mask_token_id, scorer, max_slots)
    confidence = np.zeros((T, k_max), dtype=np.float32)
    argmax = np.full((T, k_max), -1, dtype=np.int64)
    confidence[:, :2], argmax[:, :2] = _packed_positions(model, seq, L, range(T), 1, mask_token_id, scorer, max_slots)
    gen = np.asarray(generated + [-1])  # position 2 at the last prefix is past the end: nothing more to read
    threshold = np.float32(min_tau)
    alive = np.flatnonzero((confidence[:, 0] >= threshold) & (confidence[:, 1] >= threshold)
                           & (argmax[:, 1] == gen[1:]))
    if alive.size:
        confidence[alive], argmax[alive] = _packed_positions(model, seq, L, alive.tolist(), k_max - 1, mask_token_id,
                                                             scorer, max_slots)
    return confidence, argmax


def replay_steps(confidence: np.ndarray, argmax: np.ndarray, generated: Sequence[int], tau: float,
                 k_max: int) -> tuple[list[int], int | None]:
    """ConfAdapt(tau, k_max) on the greedy trajectory: (accept count of every step, None) when it never leaves it,
    else (the steps before the first step that accepts a non-greedy token, the number of tokens committed then).

    confidence / argmax: [T, >= k_max] from `greedy_confidences`. A step at c accepts n = the longest run of
    confidence >= tau among the first k_max positions (at least one), cut at the end of the greedy output (the
    decoder cuts at the stop token or the token budget, so what would follow does not matter)."""
    gen = np.asarray(list(generated), dtype=np.int64)
    T = gen.size
    if T == 0:
        return [], None
    hits = np.asarray(confidence)[:, :k_max] >= np.float32(tau)  # float32, as ConfAdapt compares in torch
    run = np.maximum(np.cumprod(hits, axis=1).sum(axis=1), 1)
    tokens = np.asarray(argmax)[:, :k_max]
    steps, c = [], 0
    while c < T:
        n = min(int(run[c]), T - c)
        if n > 1 and not np.array_equal(tokens[c, 1:n], gen[c + 1 : c + n]):
            return steps, c
        steps.append(n)
        c += n
    return steps, None


def continue_rollouts(decoder, starts: Sequence[tuple[Sequence[int], Sequence[int]]], strategy, *,
                      max_new_tokens: int, batch_size: int = 16) -> list[tuple[list[int], list[int], str]]:
    """Decode `strategy` from given points of its trajectory: starts = [(prompt ids, tokens already generated)].

    For a setting that follows greedy for c tokens and then leaves it, the real rollout is exactly the greedy tokens
    so far (their steps are replayed) followed by what the decoder produces from prompt + those c tokens: its first
    forward is the step that diverges. Each row's budget is max_new_tokens - c; rows decoded together run to the
    largest budget and are cut afterwards as the decoder cuts (the step that crosses the budget keeps what fits).
    Returns, per start: (all generated tokens, the steps after the start, the text cut at the first stop token).
    No stop strings (a stop string begun before the start would not be seen); callers decode from the start then.
    """
    stops = set(decoder.stop_token_ids)
    out: list = [None] * len(starts)
    for chunk in length_sorted_batches(starts, batch_size, length=lambda start: len(start[0]) + len(start[1])):
        budgets = [max_new_tokens - len(starts[j][1]) for j in chunk]
        if min(budgets) < 1:
            raise ValueError("a start already holds max_new_tokens tokens")
        results = decoder.generate([list(starts[j][0]) + list(starts[j][1]) for j in chunk], strategy,
                                   max(budgets))
        for j, budget, result in zip(chunk, budgets, results):
            tokens, steps = [], []
            for count in result.accepted_per_step:
                take = min(count, budget - len(tokens))
                if take <= 0:
                    break
                tokens += result.token_ids[len(tokens) : len(tokens) + take]
                steps.append(take)
            generated = list(starts[j][1]) + tokens
            end = next((t for t, tok in enumerate(generated) if tok in stops), len(generated))
            out[j] = (generated, steps, decoder.tokenizer.decode(generated[:end], skip_special_tokens=False))
    return out
