"""Span-length rules (paper §4.2) and strategy construction, checked against brute-force references."""

from __future__ import annotations

import math
import random

import pytest
import torch

from adaptive.strategies import (
    DEFAULT_K_MAX,
    MAX_K,
    ConfAdapt,
    SelfSpeculative,
    Static,
    make_strategy,
    top1_probability,
)
from distill.errors import UserError


def brute_force_confadapt(confidence: list[float], tau: float) -> int:
    """n = max{m >= 1 : c_j >= tau for all j <= m}, n = 1 if c_1 < tau (paper §4.2), written as a plain loop."""
    n = 0
    for c in confidence:
        if c < tau:
            break
        n += 1
    return max(n, 1)


def logits_with_confidence(confidence: list[float], vocab: int = 8) -> torch.Tensor:
    """Logits [len, V] whose top-1 softmax probability is exactly the given confidence (rest spread evenly)."""
    rows = []
    for c in confidence:
        rest = (1.0 - c) / (vocab - 1)
        probs = torch.full((vocab,), rest, dtype=torch.float64)
        probs[0] = c
        rows.append(probs.log())
    return torch.stack(rows)


def test_confadapt_paper_example():
    # §4.2: confidences [0.95, 0.92, 0.85, 0.97], tau = 0.9 -> accept 2 (the 0.97 after the miss does not count).
    strategy = ConfAdapt(0.9, 4)
    assert strategy.accept_counts_from_confidence(torch.tensor([[0.95, 0.92, 0.85, 0.97]])).tolist() == [2]
    # The same through the default scorer (top-1 softmax probability) on logits built to have those confidences.
    logits = logits_with_confidence([0.95, 0.92, 0.85, 0.97]).unsqueeze(0)
    assert strategy.accept_counts(logits).tolist() == [2]


@pytest.mark.parametrize(
    "confidence, tau, expected",
    [
        ([0.5, 0.99, 0.99], 0.9, 1),  # first position below tau: still one token
        ([0.99, 0.99, 0.99], 0.9, 3),  # all confident: the whole window
        ([0.9, 0.9, 0.1], 0.9, 2),  # c == tau is accepted (the code rejects on c < tau)
        ([1.0, 1.0, 0.999], 1.0, 2),  # tau = 1 accepts only certain positions
        ([0.2], 0.9, 1),  # k_max = 1 is plain next-token decoding
    ],
)
def test_confadapt_edge_cases(confidence, tau, expected):
    strategy = ConfAdapt(tau, len(confidence))
    assert strategy.accept_counts_from_confidence(torch.tensor([confidence])).tolist() == [expected]


def test_confadapt_matches_brute_force_on_random_batches():
    rng = random.Random(0)
    for _ in range(200):
        k_max = rng.randint(1, 16)
        tau = rng.choice([0.3, 0.5, 0.9, 1.0, rng.random() or 0.5])
        # Values on a coarse grid so that exact ties with tau happen often.
        conf = [[rng.choice([0.25, 0.3, 0.5, 0.75, 0.9, 1.0]) for _ in range(k_max)] for _ in range(5)]
        got = ConfAdapt(tau, k_max).accept_counts_from_confidence(torch.tensor(conf, dtype=torch.float64)).tolist()
        assert got == [brute_force_confadapt(row, tau) for row in conf]


def test_default_scorer_is_top1_softmax_probability():
    logits = torch.randn(3, 5, 11, generator=torch.Generator().manual_seed(0))
    expected = torch.tensor([[max(torch.softmax(logits[b, j], -1).tolist()) for j in range(5)] for b in range(3)])
    assert torch.allclose(top1_probability(logits), expected, atol=1e-7)
    # bf16 logits are scored in fp32 (a bf16 softmax would put every confidence on a coarse grid)
    assert top1_probability(logits.bfloat16()).dtype == torch.float32
    assert ConfAdapt(0.5, 5).scorer is top1_probability


def test_pluggable_scorer_replaces_softmax():
    # A calibrator-style scorer: any callable logits[..., V] -> confidence[...]. This one reads the first logit.
    strategy = ConfAdapt(0.5, 4, scorer=lambda logits: logits[..., 0])
    logits = torch.zeros(2, 4, 3)
    logits[0, :, 0] = torch.tensor([0.9, 0.6, 0.4, 0.9])
    logits[1, :, 0] = torch.tensor([0.1, 0.9, 0.9, 0.9])
    assert strategy.accept_counts(logits).tolist() == [2, 1]
    with pytest.raises(UserError, match="scorer returned shape"):
        ConfAdapt(0.5, 4, scorer=lambda logits: logits[..., 0, 0]).accept_counts(logits)
    with pytest.raises(UserError, match="callable"):
        ConfAdapt(0.5, 4, scorer="calibrator.json")


def test_static_accepts_exactly_k():
    strategy = Static(3)
    assert strategy.k_max == 3 and strategy.name == "static"
    assert strategy.accept_counts(torch.zeros(4, 3, 7)).tolist() == [3, 3, 3, 3]


@pytest.mark.parametrize(
    "drafts, greedy, expected",
    [
        ([], [5], 0),  # no drafts: only the bonus token
        ([5, 6, 7], [5, 6, 7, 8], 3),  # all drafts accepted, bonus 8
        ([5, 9, 7], [5, 6, 7, 8], 1),  # first mismatch at d_2: later matches do not count
        ([4, 6], [5, 6, 7], 0),
    ],
)
def test_selfspec_verify_rule(drafts, greedy, expected):
    assert SelfSpeculative.verify(drafts, greedy) == expected


def test_make_strategy_builds_each_kind():
    s = make_strategy("static", k=3)
    assert isinstance(s, Static) and s.k_max == 3
    assert make_strategy("static", k_max=2).k_max == 2  # k_max is a synonym for static
    c = make_strategy("ConfAdapt", tau=0.9)
    assert isinstance(c, ConfAdapt) and c.tau == 0.9 and c.k_max == DEFAULT_K_MAX and c.name == "confadapt"
    assert make_strategy("confadapt", tau=1.0, k=5).k_max == 5
    p = make_strategy("selfspec", k_max=4, tau=0.9)  # tau is meaningless for selfspec and ignored
    assert isinstance(p, SelfSpeculative) and p.k_max == 4 and p.name == "selfspec"
    assert make_strategy("selfspec").k_max == DEFAULT_K_MAX
    assert make_strategy("static", k=MAX_K).k_max == MAX_K
    assert "tau=0.9" in c.label and "k=3" in s.label


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"name": "confadapt", "tau": 0.0}, "tau must be in"),
        ({"name": "confadapt", "tau": -0.1}, "tau must be in"),
        ({"name": "confadapt", "tau": 1.5}, "tau must be in"),
        ({"name": "confadapt", "tau": math.nan}, "tau must be in"),
        ({"name": "confadapt", "tau": "high"}, "tau must be a number"),
        ({"name": "confadapt"}, "needs tau"),
        ({"name": "static", "k": 0}, "k must be an integer"),
        ({"name": "static", "k": -2}, "k must be an integer"),
        ({"name": "static", "k": 2.5}, "k must be an integer"),
        ({"name": "static", "k": True}, "k must be an integer"),
        ({"name": "static"}, "needs k"),
        ({"name": "static", "k": 3, "k_max": 4}, "disagree"),
        ({"name": "selfspec", "k_max": 0}, "k_max must be an integer"),
        ({"name": "selfspec", "k_max": MAX_K + 1}, "k_max must be an integer"),
        ({"name": "confadapt", "tau": 0.9, "k_max": 65}, "k_max must be an integer"),
        ({"name": "beam"}, "unknown strategy"),
    ],
)
def test_make_strategy_rejects_bad_values(kwargs, message):
    name = kwargs.pop("name")
    with pytest.raises(UserError, match=message):
        make_strategy(name, **kwargs)


def test_constructors_validate_too():
    with pytest.raises(UserError):
        Static(0)
    with pytest.raises(UserError):
        ConfAdapt(0.0, 4)
    with pytest.raises(UserError):
        SelfSpeculative(MAX_K + 1)
