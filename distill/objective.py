"""The online self-distillation loss at the prediction slots (paper §2).

Inputs are logits already gathered at the prediction slots and reshaped per MTP problem: `student_logits[r, j]` is the
student's distribution for token j+1 of problem r (j = 0 is the last ground-truth slot, i.e. plain next-token
prediction; j >= 1 are the <MTP> slots), `teacher_logits[r, j]` is the frozen teacher's distribution at the same slot
under *student forcing*: its input holds the ground-truth prefix followed by the student's own argmax tokens
y'_1..y'_j (§2.2 step 4), so it scores exactly the continuation the student proposed.

Supervision (§2.2 table):
  * "hard" (main method): CE(student_j, argmax teacher_j)                 - what the reference code trains with;
  * "soft":               KL(T || S) = CE(student_j, softmax teacher_j) - H(teacher_j);
  * "gt":                 CE(student_j, ground truth)                     - offline MTP, no teacher pass.
`sequence_weighted=True` replaces the per-token term with the paper's equation as written (§2.1, eq. mtpo2): per
problem, -P_T(y'|x) * log P_S(y'|x), with log P_S(y'|x) = sum_j log p_S(y'_j | x) and the weight P_T(y'|x) a constant
read out the way `supervision` says: "soft" the chain-rule probability prod_j p_T(y'_j | x, y'_<j); "hard" (the
teacher's readout is its argmax, a delta distribution) the indicator that the student's span equals the teacher's
greedy chain. The loss is the mean over problems: each problem counts once whatever its k.
Optional extras: `prefix_ntp_weight` * NTP cross-entropy on the ground truth at the prefix slots ("Prefix Loss"
ablation) and `student_entropy_beta` * H(student) (the β entropy penalty of `pt_ce_plus_ent_loss`).
Every other term is a plain mean over its supervised tokens (§2.2 step 7: no per-position or per-k weights).

Everything here is a pure function of tensors, so each value can be checked by hand.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

SUPERVISIONS = ("hard", "soft", "gt")
# Metrics also reported per position j = 1..k as f"{name}_pos{j}".
PER_POSITION = ("agree", "confidence", "teacher_nll")


def metric_names(k_max: int) -> list[str]:
    """Every metric key `mtp_objective` can return for k <= k_max (a fixed list, so ranks can reduce them together)."""
    names = ["main_loss", "supervised_tokens", "confidence", "entropy", "gt_acc", "gt_acc_pos>=2", "agree",
             "agree_pos>=2", "teacher_nll", "teacher_entropy", "prefix_ce", "prefix_tokens"]
    return names + [f"{name}_pos{j}" for name in PER_POSITION for j in range(1, k_max + 1)]


def _entropy(logp: torch.Tensor) -> torch.Tensor:
    return -(logp.exp() * logp).sum(-1)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """bf16/fp16 logits are scored in fp32 (log-softmax over a 50k-150k vocabulary); fp64 stays fp64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _align_vocab(teacher_logits: torch.Tensor, vocab: int) -> torch.Tensor:
    """A teacher without the student's extra rows (<MTP>, matrix padding) gives those tokens zero probability."""
    extra = vocab - teacher_logits.shape[-1]
    if extra == 0:
        return teacher_logits
    if extra < 0:
        raise ValueError(f"teacher vocabulary ({teacher_logits.shape[-1]}) is larger than the student's ({vocab})")
    return F.pad(teacher_logits, (0, extra), value=torch.finfo(teacher_logits.dtype).min)


def mtp_objective(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor | None = None,
    *,
    gt_targets: torch.LongTensor | None = None,
    supervision: str = "hard",
    sequence_weighted: bool = False,
    student_entropy_beta: float = 0.0,
    prefix_logits: torch.Tensor | None = None,
    prefix_targets: torch.LongTensor | None = None,
    prefix_ntp_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss and metrics for one micro-batch.

    student_logits [R, k, V] (with grad); teacher_logits [R, k, V_T <= V] (no grad; None for "gt");
    gt_targets [R, k] ground-truth next tokens (required for "gt", else only used for the gt_acc metrics);
    prefix_logits [N, V] / prefix_targets [N] at the prefix slots (used when prefix_ntp_weight > 0).
    """
    if supervision not in SUPERVISIONS:
        raise ValueError(f"unknown supervision {supervision!r}; choose one of {SUPERVISIONS}")
    if supervision == "gt" and gt_targets is None:
        raise ValueError("supervision='gt' needs gt_targets")
    if supervision != "gt" and teacher_logits is None:
        raise ValueError(f"supervision={supervision!r} needs teacher_logits")
    if sequence_weighted and supervision == "gt":
        raise ValueError("sequence_weighted needs a teacher (supervision 'hard' or 'soft')")
    num_problems, k, vocab = student_logits.shape
    supervised = num_problems * k

    s_logp = F.log_softmax(_upcast(student_logits), dim=-1)  # [R, k, V]
    rollout = s_logp.argmax(-1)  # y', the student's greedy k-token proposal (§2.1 step 1)
    s_entropy = _entropy(s_logp)
    t_logp = None
    if teacher_logits is not None:
        t_logp = F.log_softmax(_align_vocab(_upcast(teacher_logits.detach()), vocab), dim=-1)

    # The main term, per token [R, k] (summed later so that an empty micro-batch keeps the graph and gives 0).
    denom = max(supervised, 1)
    if sequence_weighted:
        # eq. mtpo2: -P_T(y'|x) * log P_S(y'|x) per problem, the weight a constant (t_logp carries no gradient).
        s_rollout_logp = s_logp.gather(-1, rollout.unsqueeze(-1)).squeeze(-1)  # [R, k]
        if supervision == "soft":
            weight = t_logp.gather(-1, rollout.unsqueeze(-1)).squeeze(-1).sum(-1, keepdim=True).exp()  # [R, 1]
        else:  # hard readout: P_T(y'|x) = 1 when y' is the teacher's greedy chain, else 0
            weight = (rollout == t_logp.argmax(-1)).all(-1, keepdim=True).to(s_logp.dtype)
        per_token = -weight * s_rollout_logp
        denom = max(num_problems, 1)
    elif supervision == "hard":
        target = t_logp.argmax(-1)
        per_token = -s_logp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    elif supervision == "soft":
        cross = -(t_logp.exp() * s_logp).sum(-1)
        per_token = cross - _entropy(t_logp)
    else:
        per_token = -s_logp.gather(-1, gt_targets.unsqueeze(-1)).squeeze(-1)
    main = per_token.sum() / denom
    loss = main
    if student_entropy_beta:
        loss = loss + student_entropy_beta * s_entropy.sum() / max(supervised, 1)
    prefix_ce = None
    if prefix_ntp_weight:
        if prefix_logits is None or prefix_targets is None:
            raise ValueError("prefix_ntp_weight > 0 needs prefix_logits and prefix_targets")
        p_logp = F.log_softmax(_upcast(prefix_logits), dim=-1)
        prefix_ce = -p_logp.gather(-1, prefix_targets.unsqueeze(-1)).sum() / max(prefix_targets.numel(), 1)
        loss = loss + prefix_ntp_weight * prefix_ce

    metrics = _metrics(s_logp, s_entropy, rollout, t_logp, gt_targets)
    metrics["main_loss"] = main.item()
    if prefix_ce is not None:
        metrics["prefix_ce"] = prefix_ce.item()
        metrics["prefix_tokens"] = float(prefix_targets.numel())
    return loss, metrics


@torch.no_grad()
def _metrics(s_logp, s_entropy, rollout, t_logp, gt_targets) -> dict[str, float]:
    """Diagnostics of §2.2 step 8, per position j = 1..k (only when the micro-batch has a problem)."""
    num_problems, k, _ = s_logp.shape
    metrics: dict[str, float] = {"supervised_tokens": float(num_problems * k)}
    if num_problems == 0:
        return metrics
    confidence = s_logp.max(-1).values.exp()  # student top-1 probability
    per_position = {"confidence": confidence, "entropy": s_entropy}
    if t_logp is not None:
        per_position["agree"] = (rollout == t_logp.argmax(-1)).float()
        # Teacher NLL of the student's own rollout: -log p_T(y'_j | x, y'_<j) ("stud_forced_teach_loss").
        per_position["teacher_nll"] = -t_logp.gather(-1, rollout.unsqueeze(-1)).squeeze(-1)
        metrics["teacher_entropy"] = _entropy(t_logp).mean().item()
    if gt_targets is not None:
        per_position["gt_acc"] = (rollout == gt_targets).float()
    for name, values in per_position.items():
        metrics[name] = values.mean().item()
        means = values.mean(0).tolist()
        if name in PER_POSITION:
            metrics.update({f"{name}_pos{j + 1}": m for j, m in enumerate(means)})
        if name in ("agree", "gt_acc") and k >= 2:  # the mask positions (position 1 is the next-token slot)
            metrics[f"{name}_pos>=2"] = values[:, 1:].mean().item()
    return metrics
