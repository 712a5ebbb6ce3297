"""Task losses and metrics that are not plain next-token cross-entropy.

Classification metrics come from torchmetrics (a Lightning dependency, tested against
scikit-learn in tests/train/test_metrics.py). The preference losses (DPO, KTO, ORPO, SimPO and the
reward model's Bradley-Terry loss) are written out here: each is a few lines of its paper's
equation over per-sequence log-probabilities, and the one library that has them (TRL) ties them to
its own trainers; tests/train/test_preference_losses.py checks them against TRL's where it installs
and against hand computations.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def dpo_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Direct Preference Optimization (Rafailov et al. 2023, eq. 7), mean over the batch.

    Inputs are summed log-probabilities of each response [B]. The implicit reward of a response
    is beta * (log pi(y|x) - log pi_ref(y|x)); the loss is -log sigmoid(reward_chosen -
    reward_rejected). Returns (loss, chosen rewards [B], rejected rewards [B]), rewards detached.
    """
    chosen = beta * (policy_chosen - reference_chosen)
    rejected = beta * (policy_rejected - reference_rejected)
    loss = -F.logsigmoid(chosen - rejected).mean()
    return loss, chosen.detach(), rejected.detach()


def kto_loss(
    policy_chosen: torch.Tensor,
    policy_rejected: torch.Tensor,
    reference_chosen: torch.Tensor,
    reference_rejected: torch.Tensor,
    kl: torch.Tensor,
    beta: float,
    desirable_weight: float = 1.0,
    undesirable_weight: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Kahneman-Tversky Optimization (Ethayarajh et al. 2024, eq. 8), mean over every response.

    Inputs are summed log-probabilities [B] of the desirable (chosen) and undesirable (rejected)
    responses. ``kl`` is the reference point z0: the batch's estimate of KL(policy || reference)
    from mismatched (prompt, response) pairs, taken without gradient and clamped at 0. A desirable
    response's loss is 1 - sigmoid(beta * (log-ratio - z0)), an undesirable one's 1 - sigmoid(beta *
    (z0 - log-ratio)), each weighted. Returns (loss, chosen rewards, rejected rewards), detached.
    """
    z0 = kl.detach().clamp(min=0)
    chosen = policy_chosen - reference_chosen
    rejected = policy_rejected - reference_rejected
    losses = torch.cat(
        [
            desirable_weight * (1 - torch.sigmoid(beta * (chosen - z0))),
            undesirable_weight * (1 - torch.sigmoid(beta * (z0 - rejected))),
        ]
    )
    return losses.mean(), beta * chosen.detach(), beta * rejected.detach()


def log1mexp(x: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(x)) for x < 0, stable at both ends (Maechler 2012: switch at -log 2)."""
    return torch.where(x < -math.log(2), torch.log1p(-torch.exp(x)), torch.log(-torch.expm1(x)))


def orpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    chosen_nll: torch.Tensor,
    beta: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Odds-Ratio Preference Optimization (Hong et al. 2024, eqs. 6-7): SFT loss plus an odds-ratio term.

    Inputs are each response's mean per-token log-probability [B] (so odds = p / (1 - p) of a
    length-normalised likelihood) and the chosen responses' next-token loss; ``beta`` is the
    paper's lambda. No reference model. Returns (loss, chosen rewards, rejected rewards) with
    rewards beta * mean log-probability, detached.
    """
    chosen, rejected = chosen_mean_logps.float(), rejected_mean_logps.float()
    log_odds = (chosen - rejected) - (log1mexp(chosen) - log1mexp(rejected))
    loss = chosen_nll - beta * F.logsigmoid(log_odds).mean()
    return loss, beta * chosen.detach(), beta * rejected.detach()


def simpo_loss(
    chosen_mean_logps: torch.Tensor,
    rejected_mean_logps: torch.Tensor,
    beta: float,
    gamma: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Simple Preference Optimization (Meng et al. 2024, eq. 6), mean over the batch.

    The reward is the length-normalised log-likelihood beta * mean log p(y|x) (no reference
    model); the loss is -log sigmoid(reward_chosen - reward_rejected - gamma), gamma the target
    margin. Returns (loss, chosen rewards, rejected rewards), rewards detached.
    """
    chosen, rejected = beta * chosen_mean_logps, beta * rejected_mean_logps
    loss = -F.logsigmoid(chosen - rejected - gamma).mean()
    return loss, chosen.detach(), rejected.detach()


def bradley_terry_loss(chosen_scores: torch.Tensor, rejected_scores: torch.Tensor) -> torch.Tensor:
    """A reward model's pairwise loss (Bradley-Terry, as in Ouyang et al. 2022): -log sigmoid(r_c - r_r), mean."""
    return -F.logsigmoid(chosen_scores.float() - rejected_scores.float()).mean()


def classification_metrics(
    preds: torch.Tensor, target: torch.Tensor, label_names: list[str]
) -> tuple[dict[str, float], list[list[int]]]:
    """Accuracy, per-class and macro precision / recall / F1, and the confusion matrix.

    ``preds`` and ``target`` are class indices [N]. Returns (scalar metrics keyed like
    ``accuracy``, ``f1_macro``, ``precision/<label>``, ...; confusion matrix rows = true class,
    columns = predicted class). A class never predicted has precision 0 (sklearn's
    zero_division=0 convention).
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    n = len(label_names)
    preds, target = preds.long().cpu(), target.long().cpu()
    metrics = {"accuracy": float(multiclass_accuracy(preds, target, n, average="micro"))}
    for name, fn in (
        ("precision", multiclass_precision),
        ("recall", multiclass_recall),
        ("f1", multiclass_f1_score),
    ):
        per_class = fn(preds, target, n, average="none")
        for label, value in zip(label_names, per_class.tolist(), strict=True):
            metrics[f"{name}/{label}"] = float(value)
        metrics[f"{name}_macro"] = float(per_class.mean())
    confusion = multiclass_confusion_matrix(preds, target, n).tolist()
    return metrics, confusion


def group_advantages(rewards: torch.Tensor, group_size: int, eps: float = 1e-4) -> torch.Tensor:
    """GRPO's advantages (Shao et al. 2024, sec. 4.1.2): each reward minus its group's mean, over the group's std.

    ``rewards`` [P * G] holds G samples of each of P prompts, the samples of a prompt adjacent. The
    std is the unbiased one (as TRL's GRPO); a group whose samples all scored alike gets advantage 0.
    """
    if group_size < 2 or rewards.numel() % group_size:
        raise ValueError(
            f"rewards: {rewards.numel()} samples do not split into groups of {group_size} (>= 2)"
        )
    groups = rewards.float().view(-1, group_size)
    centred = groups - groups.mean(dim=1, keepdim=True)
    return (centred / (groups.std(dim=1, keepdim=True) + eps)).view(-1)


def grpo_loss(
    logps: torch.Tensor,
    old_logps: torch.Tensor,
    reference_logps: torch.Tensor | None,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    beta: float,
    clip_eps: float = 0.2,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """GRPO's objective (Shao et al. 2024, eq. 3), negated for descent, per token then per sequence.

    Inputs are per-token log-probabilities [N, T] of the sampled completions under the policy
    being trained, under the policy that sampled them (``old_logps``, no gradient) and under the
    reference; ``advantages`` [N]; ``mask`` [N, T] marks completion tokens. The surrogate is PPO's
    clipped min(ratio * A, clip(ratio, 1 - eps, 1 + eps) * A); the KL penalty is the unbiased k3
    estimator exp(ref - logp) - (ref - logp) - 1 (Schulman 2020), weighted by ``beta`` (skipped
    with no reference). Each sequence averages its tokens, the batch averages its sequences.
    Returns (loss, mean KL per token, share of tokens whose ratio was clipped), the last two detached.
    """
    mask = mask.to(logps.dtype)
    ratio = torch.exp(logps - old_logps.detach())
    a = advantages.detach().to(logps.dtype).unsqueeze(1)
    surrogate = torch.minimum(ratio * a, ratio.clamp(1 - clip_eps, 1 + clip_eps) * a)
    per_token = -surrogate
    kl = torch.zeros_like(logps)
    if reference_logps is not None:
        delta = reference_logps.detach() - logps
        kl = torch.exp(delta) - delta - 1
        per_token = per_token + beta * kl
    tokens = mask.sum(1).clamp(min=1)
    loss = ((per_token * mask).sum(1) / tokens).mean()
    n = mask.sum().clamp(min=1)
    clipped = ((ratio - ratio.clamp(1 - clip_eps, 1 + clip_eps)).abs() > 0).to(logps.dtype)
    return loss, ((kl * mask).sum() / n).detach(), ((clipped * mask).sum() / n).detach()
