"""One-pass sweep by replay (adaptive/replay.py): packed greedy-prefix confidences equal per-prefix forwards, and
replayed ConfAdapt accept counts equal real rollouts up to the first divergence from greedy."""

from __future__ import annotations

import random

import numpy as np
import pytest
import torch
from conftest import rigged_tiny_model

from adaptive.calibration import Calibrator
from adaptive.decoder import MTPDecoder
from adaptive.strategies import ConfAdapt, Static, top1_probability
from adaptive.replay import greedy_confidences, replay_steps

N_NEW = 24
# The rigged tiny model's confidences are ~1e-3 (random weights): thresholds on that scale give a mix of settings
# that follow greedy to the end and settings that diverge.
TAUS = (0.002, 0.001, 1e-4, 4e-5, 1e-5, 1e-6)
K_MAXES = (2, 4, 8)
NEAR_TIE = 1e-5  # a confidence this close to tau may compare differently in the packed and the KV-cache forward


pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


@pytest.fixture(scope="module")
def rig(tiny_model_dir):
    model, tokenizer = rigged_tiny_model(tiny_model_dir)
    return model, tokenizer, MTPDecoder(model, tokenizer)


@pytest.fixture(scope="module")
def prompts() -> list[list[int]]:
    rng = random.Random(0)
    return [[rng.randrange(100, 40000) for _ in range(n)] for n in (1, 3, 5, 8, 13, 21, 30, 9)]


@pytest.fixture(scope="module")
def greedy(rig, prompts):
    _, _, decoder = rig
    return [r.token_ids for r in decoder.generate(prompts, Static(1), N_NEW)]


def test_replay_steps_rule_on_hand_made_confidences():
    gen = [5, 6, 7, 8, 9]
    conf = np.array([[0.9, 0.95, 0.5], [0.9, 0.2, 0.9], [0.9, 0.9, 0.9], [0.9, 0.9, 0.9], [0.9, 0.9, 0.9]],
                    dtype=np.float32)
    # argmax row c: position 1 is greedy's token gen[c]; positions 2, 3 guess gen[c+1], gen[c+2]
    argmax = np.array([[5, 6, 0], [6, 0, 0], [7, 8, 9], [8, 9, 1], [9, 1, 2]])
    assert replay_steps(conf, argmax, gen, 0.9, 3) == ([2, 3], None)  # c=0: run 2; c=2: run 3 reaches the end
    assert replay_steps(conf, argmax, gen, 0.9, 1) == ([1] * 5, None)  # k_max 1 is k=1
    assert replay_steps(conf, argmax, gen, 0.96, 3) == ([1] * 5, None)  # position 1 below tau: one token a step
    # with 4 generated tokens, the run of 3 at c=2 is cut at the end: position 3's guess (9) is never compared
    assert replay_steps(conf[:4], argmax[:4], gen[:4], 0.9, 3) == ([2, 2], None)
    wrong = argmax.copy()
    wrong[2, 2] = 4  # position 3 at prefix 2 guesses 4 instead of 9: the step at c=2 leaves greedy
    assert replay_steps(conf, wrong, gen, 0.9, 3) == ([2], 2)
    assert replay_steps(conf, wrong, gen, 0.9, 2) == ([2, 2, 1], None)  # k_max 2 never reads position 3
    assert replay_steps(conf[:0], argmax[:0], [], 0.9, 3) == ([], None)


def test_packed_confidences_equal_per_prefix_forwards(rig, prompts, greedy):
    """Every row of the packed replay is the forward ConfAdapt runs at that greedy prefix: prefix ⊕ (k-1) masks,
    plain causal, positions 0.. (the packing oracle's statement, here for one region per generated token)."""
    model, _, decoder = rig
    mask = decoder.mask_token_id
    k = 5
    for p, gen in list(zip(prompts, greedy))[:4]:
        conf, argmax = greedy_confidences(model, p, gen, k, mask, max_slots=3 * k)  # chunked: 8 forwards
        whole, whole_argmax = greedy_confidences(model, p, gen, k, mask)
        np.testing.assert_allclose(conf, whole, atol=1e-6, rtol=0)
        assert (argmax == whole_argmax).all()
        with torch.no_grad():
            for c in range(len(gen)):
                logits = model(input_ids=torch.tensor([p + gen[:c] + [mask] * (k - 1)])).logits[0, -k:]
                np.testing.assert_allclose(conf[c], top1_probability(logits).numpy(), atol=1e-6, rtol=0)
                top2 = logits.topk(2, dim=-1).values
                clear = (top2[:, 0] - top2[:, 1]) > 1e-4
                assert (argmax[c][clear.numpy()] == logits.argmax(-1).numpy()[clear.numpy()]).all()
                assert argmax[c, 0] == gen[c] or not clear[0]  # position 1 is greedy's own next token


def test_two_pass_replay_reads_only_what_the_grid_needs(rig, prompts, greedy):
    """min_tau: a cheap pass with one mask per prefix, full depth only where the grid can accept past position 2;
    every grid setting replays exactly as from the full forward, and fewer slots are read."""
    model, _, decoder = rig
    for tau_min in (min(TAUS), 1e-4):
        grid = [t for t in TAUS if t >= tau_min]
        for p, gen in zip(prompts, greedy):
            full = greedy_confidences(model, p, gen, max(K_MAXES), decoder.mask_token_id)
            lean = greedy_confidences(model, p, gen, max(K_MAXES), decoder.mask_token_id, min_tau=tau_min)
            for tau in grid:
                for k_max in K_MAXES:
                    assert replay_steps(*lean, gen, tau, k_max) == replay_steps(*full, gen, tau, k_max), (tau, k_max)
            skipped = lean[1][:, 2:] == -1
            np.testing.assert_allclose(lean[0][~skipped.any(1)], full[0][~skipped.any(1)], atol=1e-6, rtol=0)
    assert skipped.any()  # at tau_min 1e-4 some prefixes are not read past position 2


def _compare(real, greedy_tokens, conf, argmax, tau, k_max):
    """'equal', 'diverged' (equal until the divergence) or 'near-tie'; AssertionError for a real mismatch."""
    steps, at = replay_steps(conf, argmax, greedy_tokens, tau, k_max)
    if at is None and real.accepted_per_step == steps and real.token_ids == greedy_tokens:
        return "equal"
    if at is not None and real.accepted_per_step[: len(steps)] == steps and real.token_ids[:at] == greedy_tokens[:at] \
            and real.token_ids != greedy_tokens:
        return "diverged"
    # The first step where replay and rollout part: allowed only if a confidence there is within NEAR_TIE of tau.
    c = 0
    for i, n in enumerate(real.accepted_per_step):
        if i >= len(steps) or steps[i] != n:
            break
        c += n
    window = conf[c, :k_max] if c < len(conf) else np.array([])
    assert np.any(np.abs(window - tau) < NEAR_TIE), (
        f"tau={tau} k_max={k_max}: replay {steps} (diverges at {at}) vs real {real.accepted_per_step}; confidences "
        f"at c={c}: {window}")
    return "near-tie"


@pytest.mark.parametrize("calibrated", [False, True])
def test_replay_equals_real_rollouts_until_divergence(rig, prompts, greedy, calibrated):
    model, _, decoder = rig
    scorer = None
    if calibrated:  # the real ConfAdapt and the replay must threshold the same calibrated confidence
        scorer = Calibrator("temperature", {2: {"temperature": 0.5}, 3: {"temperature": 0.7}},
                            pooled={"temperature": 0.8}, k_max=3, n_samples=1, n_prompts=1)
    traces = [greedy_confidences(model, p, gen, max(K_MAXES), decoder.mask_token_id, scorer)
              for p, gen in zip(prompts, greedy)]
    outcomes = {"equal": 0, "diverged": 0, "near-tie": 0}
    accepted_more_than_one = 0
    for k_max in K_MAXES:
        for tau in TAUS:
            real = decoder.generate(prompts, ConfAdapt(tau, k_max, scorer=scorer), N_NEW)
            for r, gen, (conf, argmax) in zip(real, greedy, traces):
                outcomes[_compare(r, gen, conf, argmax, tau, k_max)] += 1
                accepted_more_than_one += any(n > 1 for n in r.accepted_per_step)
    print(f"calibrated={calibrated}: {outcomes}")
    total = len(K_MAXES) * len(TAUS) * len(prompts)
    # The grid exercises both branches, and spans longer than one token are accepted (the replay is not trivial).
    assert outcomes["equal"] >= total // 4 and outcomes["diverged"] >= total // 8
    assert accepted_more_than_one >= total // 4
    assert outcomes["near-tie"] <= total // 20


def test_tune_replay_sweep_equals_rollout_sweep(rig, tmp_path):
    """The whole tuner: the replay sweep (greedy replay, real decoding only where a setting diverges) reports the
    same per-question agreement, correctness and tokens/forward as decoding every setting on every question."""
    from adaptive.tuner import tune

    _, _, decoder = rig
    problems = [{"question": q, "answer": a, "index": i} for i, (q, a) in enumerate([
        ("Tom has 3 apples and buys 2 more. How many apples does he have?", "5"),
        ("A book costs $12. How much do 3 books cost?", "36"),
        ("Sara had 10 pens and gave away 4. How many are left?", "6"),
        ("There are 7 days in a week. How many days are in 2 weeks?", "14"),
        ("What is 9 times 9?", "81")])]
    reports = {}
    for mode in ("replay", "rollout"):
        reports[mode] = tune(decoder, problems, target_agreement=0.5, delta=0.5, taus=(1e-3, 1e-5, 1e-6),
                             k_maxes=(2, 4), max_new_tokens=16, batch_size=5, full_sweep=True, sweep_mode=mode,
                             measure=1, report_dir=tmp_path / mode)
    replay, rollout = ({(s["tau"], s["k_max"]): s for s in reports[m]["settings"]} for m in ("replay", "rollout"))
    assert replay.keys() == rollout.keys() and len(replay) == 6
    for key in replay:
        for field in ("agrees", "correct", "tokens_per_forward_mean", "tokens", "forwards"):
            assert replay[key][field] == rollout[key][field], (key, field)
        assert rollout[key]["decoded"] == len(problems)
    assert reports["replay"]["sweep"]["mode"] == "replay" and reports["rollout"]["sweep"]["mode"] == "rollout"
    decoded = sum(s["decoded"] for s in replay.values())
    assert 0 < decoded < sum(s["decoded"] for s in rollout.values())  # some settings diverge, most questions replay
    assert any(s["tokens_per_forward_mean"] > 1 for s in replay.values())
    # Stopped at the first failed test (agreement >= 0.99 cannot be certified on 5 questions), the rest of the grid is
    # screened from the replay alone: it leaves greedy exactly where the full sweep had to decode, and what it bounds
    # holds.
    stopped = tune(decoder, problems, target_agreement=0.99, delta=0.5, taus=(1e-3, 1e-5, 1e-6), k_maxes=(2, 4),
                   max_new_tokens=16, batch_size=5, sweep_mode="replay", measure=1, report_dir=tmp_path / "stopped")
    screened = {(s["tau"], s["k_max"]): s for s in stopped["not_evaluated"]}
    assert len(stopped["settings"]) == 2 and len(screened) == 4
    for key, s in screened.items():
        assert s["left_greedy"] == replay[key]["decoded"]
        assert s["agreement_at_least"] == (len(problems) - s["left_greedy"]) / len(problems)
        assert s["agreement_at_least"] <= sum(map(int, replay[key]["agrees"])) / len(problems)
        if s["left_greedy"] == 0:
            assert s["greedy_prefix_tokens_per_forward"] == replay[key]["tokens_per_forward_mean"]
    assert any(s["left_greedy"] for s in screened.values())
