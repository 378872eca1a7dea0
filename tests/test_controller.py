"""The cost-aware span controller (`k_max="auto"`, adaptive/controller.py): the decision rule on synthetic cost tables
and acceptance, the online estimate and its probes, the cost table and its cache, and the decoder oracles with the
number of masks chosen per step (self-speculative stays exactly greedy; ConfAdapt's every step is the rule applied to
a from-scratch forward)."""

from __future__ import annotations

import json
import random

import pytest

from adaptive.controller import (COST_QUERY_LENGTHS, PROBE_INTERVALS, PROBE_MASKS, ForwardCost, SpanController,
                                 best_mask_count, cost_key)
from adaptive.decoder import MTPDecoder
from adaptive.strategies import ConfAdapt, SelfSpeculative, make_strategy, parse_k_max
from distill.errors import UserError
from tests.test_decoder import N_NEW, RIG_TAU, check_against_from_scratch, hf_greedy

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py; `rig` comes from there too

CPU_COST = {1: 1.0, 2: 1.15, 3: 1.3, 4: 1.45, 5: 1.6}  # two CPU cores: every query token costs ~15 %


def cpu_cost(q: int, b: int = 1) -> float:
    return CPU_COST.get(q, 1.0 + 0.15 * (q - 1))


def gpu_cost(q: int, b: int = 1) -> float:
    return 1.0 + 0.001 * q  # batch 1 on a GPU: a query token is nearly free


# ---------------------------------------------------------------------------------------------------- the rule


def test_rule_chooses_no_mask_when_cost_is_steep_and_confidence_low():
    assert best_mask_count([0.05, 0.01, 0.0], cpu_cost, pending=1) == 0


def test_rule_chooses_every_mask_when_cost_is_flat_and_confidence_high():
    assert best_mask_count([0.95, 0.9, 0.85, 0.8, 0.75, 0.7, 0.65], gpu_cost, pending=1) == 7


def test_rule_balances_gain_against_cost():
    # P(run >= j) = 0.9, 0.5, 0.1 on the CPU table (a query token costs 0.15 of a plain step): net gains
    # 0.9-0.15=0.75, 1.4-0.3=1.1, 1.5-0.45=1.05 -> 2 masks
    assert best_mask_count([0.9, 0.5, 0.1], cpu_cost, pending=1) == 2
    # a query token costing 1/11 of a plain step: 0.2-0.09 > 0.25-0.18 -> 1 mask; 0.01 < 0.09 -> none
    linear = lambda q: 10.0 + q  # noqa: E731
    assert best_mask_count([0.2, 0.05], linear, pending=1) == 1
    assert best_mask_count([0.01], linear, pending=1) == 0


def test_rule_counts_what_self_speculative_drafts_cost_twice():
    reach = [0.3, 0.1]
    assert best_mask_count(reach, cpu_cost, pending=1) == 1
    assert best_mask_count(reach, cpu_cost, pending=1, verify_cost=lambda n: cpu_cost(1 + n) - cpu_cost(1)) == 0
    assert best_mask_count(reach, cpu_cost, pending=1, take=0.0) == 0


def test_rule_ignores_gains_within_measurement_noise():
    flat = lambda q: 1.0  # noqa: E731
    assert best_mask_count([0.001], flat, pending=1) == 0  # 0.1 % more tokens: not worth a query token
    assert best_mask_count([0.5], flat, pending=1) == 1


# ---------------------------------------------------------------------------------------------------- the estimate


def test_controller_drops_masks_that_are_never_kept_and_probes_with_backoff():
    c = SpanController(7, lambda q, b: cpu_cost(q), speculative=False)
    assert c.choose(pending=100, rows=1) == 0  # the prefill: no masks on the prior alone
    first = c.choose(pending=1, rows=1)  # the first decoding step: a mask costs 0.15 of a plain step
    assert first == 2  # the prior (each link 1/2): 0.5 - 0.15, 0.75 - 0.3, 0.875 - 0.45
    c.observe([(0, first)])
    chosen = []
    for _ in range(400):
        n = c.choose(pending=1, rows=1)
        chosen.append(n)
        c.observe([(0, n)])
    assert chosen[-1] == 0 and chosen.count(0) > 380
    probes = [i for i, n in enumerate(chosen) if n > 0 and i > 10]
    assert all(chosen[i] == PROBE_MASKS for i in probes)
    gaps = [b - a for a, b in zip(probes, probes[1:])]
    assert gaps == sorted(gaps) and gaps[-1] == PROBE_INTERVALS[-1]  # the interval doubles up to its cap


def test_controller_keeps_masks_that_are_kept():
    c = SpanController(7, lambda q, b: cpu_cost(q))
    n = c.choose(pending=1, rows=4)
    for _ in range(30):
        c.observe([(n, n)] * 4)  # every row keeps every mask position
        n = c.choose(pending=n + 1, rows=4)
    assert n == 7
    reach = c.reach()
    assert reach[0] > 0.95 and reach == sorted(reach, reverse=True)


def test_controller_finds_the_useful_span_length():
    # Rows keep exactly 2 mask positions: P(run>=1)=P(run>=2)=1, P(run>=3)=0 -> the third mask is never worth it.
    c = SpanController(7, lambda q, b: cpu_cost(q))
    n = c.choose(pending=50, rows=1)
    for _ in range(40):
        c.observe([(min(2, n), n)])
        n = c.choose(pending=1 + min(2, n), rows=1)
    assert n == 2


def test_a_probe_that_finds_accepted_masks_resets_the_interval():
    c = SpanController(3, lambda q, b: cpu_cost(q))
    for _ in range(60):
        c.observe([(0, c.choose(pending=1, rows=1))])
    assert c.probe > 0
    while not c.probing:
        c.choose(pending=1, rows=1)
    c.observe([(PROBE_MASKS, PROBE_MASKS)])
    assert c.probe == 0


def test_the_prefill_does_not_buy_drafts_whose_verification_costs_more_than_they_bring():
    """A long prefill makes a mask look free next to its own cost, but self-speculative drafts are verified by the
    next, short forward: at a CPU batch-16 cost table (a plain step 115 ms, 4 query tokens 278 ms) even drafts that
    are nearly always right are not worth it, while ConfAdapt, which keeps confident positions without verifying,
    buys such masks."""
    b16 = {1: 115.0, 2: 205.0, 3: 253.0, 4: 278.0}

    def cost(q, b):
        return b16[q] if q in b16 else 1000.0 + 10.0 * q  # a ~100-token prefill: 10 ms per query token

    seen = {"hits": [10.0] * 3, "trials": [10.0] * 3, "probe": 0}  # positions nearly always kept: reach .95 .91 .87
    for speculative, masks in ((True, 0), (False, 3)):
        c = SpanController(3, cost, speculative=speculative)
        c.restore(seen)
        assert c.choose(pending=100, rows=16, drafts=[0] * 16) == masks


def test_the_prior_alone_buys_no_masks_at_the_prefill_and_a_mask_costs_no_less_there():
    """Before any observation the prefill runs without masks (its masks cost more than the table can tell), and the
    first decoding step reads them; with observations the prefill does take masks, but judged at no less than what
    they add to a plain step, however cheap a long query makes them look."""
    def cost(q, b):
        return 1.0 + 0.5 * (q - 1) if q <= 8 else 10.0 + 0.01 * q  # steep short queries, a flat long one

    c = SpanController(3, cost)
    assert c.choose(pending=200, rows=16) == 0
    assert c.choose(pending=1, rows=16) == 0  # 0.5 - 0.5: not worth it on the prior
    sure = {"hits": [0.9, 0.9, 0.9], "trials": [1.0, 1.0, 1.0], "probe": 0}
    for observed, masks in ((sure, 1), ({"hits": [0.4] * 3, "trials": [1.0] * 3, "probe": 0}, 0)):
        c = SpanController(3, cost)
        c.restore(observed)  # reach 0.70, 0.49, 0.34 -> 1 mask (net 0.20; 2 masks 0.19); reach 0.45, ... -> none
        assert c.choose(pending=200, rows=16) == masks


def test_no_probes_where_even_perfect_drafts_could_not_pay():
    """Self-speculative at a steep batch-16 table: drafts that are always right gain 3 tokens for 2 x 163 ms of a
    115 ms step, 0.17 tokens net, below PROBE_WORTH: the controller never probes. ConfAdapt (no verification)
    probes; on a flat table self-speculative probes too."""
    b16 = {1: 115.0, 2: 205.0, 3: 253.0, 4: 278.0, 5: 324.0, 6: 357.0, 7: 401.0}

    def probes(speculative, cost):
        c = SpanController(3, lambda q, b: cost(q), speculative=speculative)
        c.observe([(0, 3)] * 16)
        count = 0
        for _ in range(300):
            n = c.choose(pending=1, rows=16, drafts=[0] * 16)
            count += c.probing and n > 0
            c.observe([(0, n)] * 16)
        return count

    assert probes(True, b16.__getitem__) == 0
    assert probes(False, b16.__getitem__) > 0
    assert probes(True, lambda q: 1.0 + 0.01 * q) > 0


def test_a_self_speculative_probe_is_judged_at_the_step_that_verifies_it():
    """The probe's masks become drafts; nothing is observed until the next forward verifies them. The probe stays
    open until then, and a failed verification backs the interval off (before, the verifying step came too late
    and the interval never grew)."""
    c = SpanController(3, lambda q, b: cpu_cost(q), speculative=True)
    c.observe([(0, 3)])
    while not c.probing:
        n = c.choose(pending=1, rows=1, drafts=[0])
        c.observe([(0, 0)]) if n == 0 else None
    c.observe([])  # the probe step itself: no drafts were verified in it
    assert c.probing and c.probe == 0
    assert c.choose(pending=1 + n, rows=1, drafts=[n]) == 0  # the verifying forward
    c.observe([(0, n)])  # its drafts were all rejected
    assert not c.probing and c.probe == 1


def test_a_probe_takes_the_cheapest_query():
    table = {1: 56.0, 2: 96.0, 3: 116.0, 4: 85.0, 5: 74.0, 6: 79.0, 7: 100.0, 8: 79.0}  # 2 CPU cores, batch 1, ms
    c = SpanController(7, lambda q, b: table[q])
    chosen = []
    for _ in range(200):
        n = c.choose(pending=1, rows=1)
        chosen.append((n, c.probing))
        c.observe([(0, n)])
    probes = [n for n, probing in chosen if probing]
    assert probes and set(probes) == {4}  # 1 + 4 = 5 query tokens: the cheapest query that reads a mask


# ---------------------------------------------------------------------------------------------------- k_max values


def test_k_max_auto_parsing_and_errors():
    assert parse_k_max("auto") == (16, True)
    assert parse_k_max("auto:4") == (4, True)
    assert parse_k_max("8") == (8, False) and parse_k_max(8) == (8, False)
    assert ConfAdapt(0.9, "auto:8").label == "confadapt(tau=0.9,k_max=auto:8,raw)"
    assert SelfSpeculative("auto").label == "selfspec(k_max=auto:16)"
    assert make_strategy("confadapt", tau=0.9, k_max="auto").auto
    for bad in ("auto:0", "auto:x", "sixteen", "auto:65"):
        with pytest.raises(UserError, match="k_max|bound"):
            parse_k_max(bad)
    with pytest.raises(UserError, match="not static"):
        make_strategy("static", k_max="auto")


# ---------------------------------------------------------------------------------------------------- cost table


def test_cost_table_is_measured_once_cached_and_keyed(rig, tmp_path):
    model, _ = rig
    lines = []
    cache = tmp_path / "costs.json"
    cost = ForwardCost(model, model.config.mtp_mask_token_id, cache_file=cache, log=lines.append)
    c1, c8 = cost(1, 2), cost(8, 2)
    assert 0 < c1 <= c8 and cost(100, 2) >= cost(64, 2)  # non-decreasing, extrapolated beyond the table
    stored = json.loads(cache.read_text())
    assert list(stored) == [cost_key(model)] and len(stored[cost_key(model)]["2"]) == len(COST_QUERY_LENGTHS)
    assert set(stored[cost_key(model)]) == {"2"}  # b = 2 is a power of two: one table
    cost(1, 3)  # between the powers of two 2 and 4: the table for 4 is measured too
    assert set(json.loads(cache.read_text())[cost_key(model)]) == {"2", "4"}
    assert lines == []  # an empty cache is not worth a line

    # a second decoder reads the table instead of measuring (a table of 1-second forwards proves it)
    stored[cost_key(model)]["2"] = [1.0 + q for q in COST_QUERY_LENGTHS]
    cache.write_text(json.dumps(stored))
    again = ForwardCost(model, model.config.mtp_mask_token_id, cache_file=cache, log=lines.append)
    assert again(3, 2) == 4.0 and again(7, 2) == 8.0  # linear between the measured lengths 6 and 8

    # a cache measured for another machine or model is ignored, re-measured, and said so in one line
    foreign = {"other-model|torch.float32|sdpa|cpu16|torch9": {"2": [1.0] * len(COST_QUERY_LENGTHS)}}
    cache.write_text(json.dumps(foreign))
    fresh = ForwardCost(model, model.config.mtp_mask_token_id, cache_file=cache, log=lines.append)
    assert fresh(1, 2) < 1.0 and len(lines) == 1 and "no table for this model and machine" in lines[0]
    assert set(json.loads(cache.read_text())) == {cost_key(model), *foreign}


# ---------------------------------------------------------------------------------------------------- decoder oracles


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(1)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 3, 7, 12, 20, 33, 5, 9)]


def test_selfspec_auto_equals_greedy_with_masks_chosen_per_step(rig, prompts):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, forward_cost=lambda q, b: cpu_cost(q))
    reference = hf_greedy(model, prompts, N_NEW, decoder.stop_token_ids)
    results = decoder.generate(prompts, SelfSpeculative("auto:6"), max_new_tokens=N_NEW)
    assert [r.token_ids for r in results] == reference
    masks = {m for r in results for m in r.masks_per_step}
    assert len(masks) > 1 and max(masks) <= 5


def test_confadapt_auto_every_step_is_the_rule_on_a_from_scratch_forward(rig, prompts):
    model, tokenizer = rig
    decoder = MTPDecoder(model, tokenizer, forward_cost=lambda q, b: cpu_cost(q))
    traces = []
    strategy = ConfAdapt(RIG_TAU, "auto:6")
    results = decoder.generate(prompts, strategy, max_new_tokens=N_NEW, on_step=traces.append)
    assert check_against_from_scratch(model, traces) > 0
    masks = [m for r in results for m in r.masks_per_step]
    assert len(set(masks)) > 1 and max(masks) <= 5
    for r in results:  # a row commits at most one more token than the masks its step read
        assert all(1 <= a <= m + 1 for a, m in zip(r.accepted_per_step, r.masks_per_step))
    fixed = ConfAdapt(RIG_TAU, 6)
    for trace in traces:  # the accept rule on each step's positions (the last K + 1 logits read)
        for b, logits in enumerate(trace.logits):
            expected = int(fixed.accept_counts(logits[None])[0])
            row = results[trace.rows[b]]
            if trace.step < len(row.accepted_per_step) - 1:  # the last step may be cut by the budget or a stop
                assert row.accepted_per_step[trace.step] == expected


def test_rule_uses_a_cheaper_longer_query():
    """Measured on 2 CPU cores at batch 1 (SmolLM2-135M, ms): the BLAS kernel for 5 query rows beats the one for 2.
    The rule appends masks up to the cheap length instead of stopping at the first, dearer one."""
    from adaptive.controller import best_mask_count

    table = {1: 56.0, 2: 96.0, 3: 116.0, 4: 85.0, 5: 74.0}
    reach = [0.5, 0.3, 0.2, 0.1]
    assert best_mask_count(reach, table.__getitem__, 1) == 4
    assert best_mask_count([0.05] * 4, table.__getitem__, 1) == 0  # nothing is worth 74 / 56 = 1.32x


def test_decoder_carries_the_estimate_to_its_next_call(rig):
    """A generate call starts from what the decoder's earlier calls learned for that strategy, not from the prior."""
    from adaptive.decoder import MTPDecoder
    from adaptive.strategies import SelfSpeculative

    model, tok = rig
    cheap = lambda q, b: 1.0 + 0.01 * q  # noqa: E731  masks nearly free: the prior buys every one
    decoder = MTPDecoder(model, tok, stop_token_ids=[], forward_cost=cheap)
    prompt = [tok("What is 7 times 8?")["input_ids"]]
    strategy = SelfSpeculative("auto:4")
    first = decoder.generate(prompt, strategy, 16)[0]
    assert first.masks_per_step[:2] == [0, 3]  # no masks at the prefill on the prior alone, then every one
    assert sum(decoder._span_memory[strategy.label]["trials"]) > 0
    # As if earlier calls had found that no draft is ever kept: the next call starts without masks.
    decoder._span_memory[strategy.label] = {"hits": [0.0] * 3, "trials": [1000.0] * 3, "probe": 3}
    second = decoder.generate(prompt, strategy, 16)[0]
    assert max(second.masks_per_step) == 0
    assert second.token_ids == first.token_ids  # lossless either way
