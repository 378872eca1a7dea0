"""distill/objective.py against values computed by hand (plain `math`, no torch softmax) on tiny logit tensors."""

from __future__ import annotations

import math

import pytest
import torch

from distill.objective import metric_names, mtp_objective

# One MTP problem (R=1), k=2 positions, vocabulary of 3.
S = [[2.0, 1.0, 0.0], [0.0, 0.5, 1.5]]
T = [[0.0, 3.0, 0.0], [1.0, 0.0, 2.0]]


def softmax(row):
    z = sum(math.exp(x) for x in row)
    return [math.exp(x) / z for x in row]


def logits(rows):
    return torch.tensor([rows], dtype=torch.float64, requires_grad=True)


def entropy(row):
    return -sum(p * math.log(p) for p in softmax(row))


def test_hard_teacher_is_ce_to_teacher_argmax():
    loss, metrics = mtp_objective(logits(S), torch.tensor([T], dtype=torch.float64))
    # teacher argmax: position 1 -> token 1, position 2 -> token 2
    expected = -(math.log(softmax(S[0])[1]) + math.log(softmax(S[1])[2])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    # student argmax is (0, 2): disagrees at position 1, agrees at position 2
    assert metrics["agree_pos1"] == 0.0 and metrics["agree_pos2"] == 1.0
    assert metrics["agree"] == 0.5 and metrics["agree_pos>=2"] == 1.0
    assert metrics["confidence_pos1"] == pytest.approx(softmax(S[0])[0])
    assert metrics["confidence_pos2"] == pytest.approx(softmax(S[1])[2])
    assert metrics["entropy"] == pytest.approx((entropy(S[0]) + entropy(S[1])) / 2)
    assert metrics["teacher_entropy"] == pytest.approx((entropy(T[0]) + entropy(T[1])) / 2)
    # teacher NLL of the student's own rollout y' = (0, 2)
    assert metrics["teacher_nll_pos1"] == pytest.approx(-math.log(softmax(T[0])[0]))
    assert metrics["teacher_nll_pos2"] == pytest.approx(-math.log(softmax(T[1])[2]))
    assert metrics["supervised_tokens"] == 2.0
    assert set(metrics) <= set(metric_names(2))


def test_hard_teacher_gradient_is_softmax_minus_onehot():
    student = logits(S)
    loss, _ = mtp_objective(student, torch.tensor([T], dtype=torch.float64))
    loss.backward()
    for j, target in enumerate([1, 2]):
        expected = [(p - (v == target)) / 2 for v, p in enumerate(softmax(S[j]))]
        assert student.grad[0, j].tolist() == pytest.approx(expected, rel=1e-9)


def test_soft_teacher_is_kl_teacher_to_student():
    loss, _ = mtp_objective(logits(S), torch.tensor([T], dtype=torch.float64), supervision="soft")
    kl = 0.0
    for s_row, t_row in zip(S, T):
        ps, pt = softmax(s_row), softmax(t_row)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    assert loss.item() == pytest.approx(kl / 2, rel=1e-9)
    same, _ = mtp_objective(logits(S), torch.tensor([S], dtype=torch.float64), supervision="soft")
    assert abs(same.item()) < 1e-12  # KL(T||S) = 0 when the teacher is the student (§2.1 item 5)


def test_ground_truth_supervision_needs_no_teacher():
    gt = torch.tensor([[1, 1]])
    loss, metrics = mtp_objective(logits(S), None, gt_targets=gt, supervision="gt")
    expected = -(math.log(softmax(S[0])[1]) + math.log(softmax(S[1])[1])) / 2
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert "agree" not in metrics and "teacher_nll" not in metrics
    assert metrics["gt_acc"] == 0.0  # student argmax (0, 2) vs ground truth (1, 1)
    _, metrics = mtp_objective(logits(S), None, gt_targets=torch.tensor([[0, 1]]), supervision="gt")
    assert metrics["gt_acc"] == 0.5 and metrics["gt_acc_pos>=2"] == 0.0  # position 2 (the mask) is the miss
    _, metrics = mtp_objective(logits(S), None, gt_targets=torch.tensor([[1, 2]]), supervision="gt")
    assert metrics["gt_acc"] == 0.5 and metrics["gt_acc_pos>=2"] == 1.0


def test_sequence_weighted_paper_equation_soft():
    # eq. mtpo2 with the soft readout: -P_T(y'|x) log P_S(y'|x), P_T by the chain rule, one term per problem.
    loss, _ = mtp_objective(logits(S), torch.tensor([T], dtype=torch.float64), supervision="soft",
                            sequence_weighted=True)
    rollout = [0, 2]  # student argmax
    weight = softmax(T[0])[rollout[0]] * softmax(T[1])[rollout[1]]  # P_T(y'|x), chain rule
    log_ps = math.log(softmax(S[0])[rollout[0]]) + math.log(softmax(S[1])[rollout[1]])
    assert loss.item() == pytest.approx(-weight * log_ps, rel=1e-9)


def test_sequence_weighted_paper_equation_hard_is_an_indicator_and_a_mean_over_problems():
    # Two problems with different k would scale differently under a per-token mean; here R=2, k=2 by hand:
    # problem 1 is S/T above: the student's span (0, 2) is not the teacher's greedy chain (1, 2): weight 0.
    # problem 2: the teacher's argmax chain equals the student's span (1, 0): weight 1.
    s2 = [[0.0, 2.0, 1.0], [3.0, 0.0, 1.0]]
    t2 = [[0.0, 1.0, 0.5], [2.0, 1.0, 0.0]]
    student = torch.tensor([S, s2], dtype=torch.float64, requires_grad=True)
    teacher = torch.tensor([T, t2], dtype=torch.float64)
    loss, _ = mtp_objective(student, teacher, supervision="hard", sequence_weighted=True)
    log_ps2 = math.log(softmax(s2[0])[1]) + math.log(softmax(s2[1])[0])
    assert loss.item() == pytest.approx(-(0.0 + 1.0 * log_ps2) / 2, rel=1e-9)


def test_sequence_weight_is_a_constant():
    teacher = torch.tensor([T], dtype=torch.float64, requires_grad=True)
    student = logits(S)
    mtp_objective(student, teacher, supervision="soft", sequence_weighted=True)[0].backward()
    assert teacher.grad is None and student.grad is not None


def test_prefix_ntp_and_entropy_terms_are_added():
    prefix_logits = torch.tensor([[0.0, 1.0, 2.0], [3.0, 0.0, 0.0], [1.0, 1.0, 1.0]], dtype=torch.float64)
    prefix_targets = torch.tensor([2, 1, 0])
    base, _ = mtp_objective(logits(S), torch.tensor([T], dtype=torch.float64))
    loss, metrics = mtp_objective(logits(S), torch.tensor([T], dtype=torch.float64), prefix_logits=prefix_logits,
                                  prefix_targets=prefix_targets, prefix_ntp_weight=0.5, student_entropy_beta=2.0)
    prefix_ce = -sum(math.log(softmax(row)[t]) for row, t in zip(prefix_logits.tolist(), [2, 1, 0])) / 3
    entropy_term = 2.0 * (entropy(S[0]) + entropy(S[1])) / 2
    assert loss.item() == pytest.approx(base.item() + 0.5 * prefix_ce + entropy_term, rel=1e-9)
    assert metrics["prefix_ce"] == pytest.approx(prefix_ce)
    assert metrics["main_loss"] == pytest.approx(base.item())


def test_mean_over_all_supervised_tokens():
    """Two problems: the loss is the mean over the R*k = 4 tokens, not a mean of per-problem means or positions."""
    s = torch.tensor([S, [[0.0, 0.0, 4.0], [1.0, 2.0, 3.0]]], dtype=torch.float64)
    t = torch.tensor([T, [[5.0, 0.0, 0.0], [0.0, 0.0, 1.0]]], dtype=torch.float64)
    loss, metrics = mtp_objective(s, t)
    targets = [[1, 2], [0, 2]]
    expected = -sum(math.log(softmax(s[r, j].tolist())[targets[r][j]]) for r in range(2) for j in range(2)) / 4
    assert loss.item() == pytest.approx(expected, rel=1e-9)
    assert metrics["supervised_tokens"] == 4.0
    assert metrics["agree_pos1"] == 0.0 and metrics["agree_pos2"] == 1.0


def test_smaller_teacher_vocabulary_gives_extra_student_tokens_zero_probability():
    """A teacher without the student's <MTP>/padding rows: KL uses p_T = 0 there (no NaN from -inf * 0)."""
    student = torch.tensor([[[2.0, 1.0, 0.0, 5.0], [0.0, 0.5, 1.5, -1.0]]], dtype=torch.float64)
    loss, _ = mtp_objective(student, torch.tensor([T], dtype=torch.float64), supervision="soft")
    kl = 0.0
    for s_row, t_row in zip(student[0].tolist(), T):
        ps, pt = softmax(s_row), softmax(t_row)
        kl += sum(q * (math.log(q) - math.log(p)) for p, q in zip(ps, pt))
    assert loss.item() == pytest.approx(kl / 2, rel=1e-9)


def test_empty_micro_batch_gives_zero_loss_with_a_graph():
    student = torch.zeros(0, 3, 5, requires_grad=True)
    loss, metrics = mtp_objective(student, torch.zeros(0, 3, 5))
    loss.backward()
    assert loss.item() == 0.0 and metrics == {"supervised_tokens": 0.0, "main_loss": 0.0}


def test_bad_arguments():
    with pytest.raises(ValueError):
        mtp_objective(logits(S), None)  # hard needs a teacher
    with pytest.raises(ValueError):
        mtp_objective(logits(S), None, supervision="gt")  # gt needs targets
    with pytest.raises(ValueError):
        mtp_objective(logits(S), torch.tensor([T]), supervision="nope")
