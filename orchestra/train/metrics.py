"""Task losses and metrics that are not plain next-token cross-entropy.

Classification metrics come from torchmetrics (a Lightning dependency, tested against
scikit-learn in tests/train/test_metrics.py); the DPO loss is written out here because it is four
lines of the paper's equation 7 and no dependency we already have provides it.
"""

from __future__ import annotations

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
