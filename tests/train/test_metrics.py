"""Task metrics against independent references: scikit-learn, and the DPO loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

from orchestra.train.metrics import classification_metrics, dpo_loss


def test_classification_metrics_equal_sklearn() -> None:
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    gen = torch.Generator().manual_seed(0)
    target = torch.randint(0, 4, (200,), generator=gen)
    preds = torch.where(
        torch.rand(200, generator=gen) < 0.6, target, torch.randint(0, 4, (200,), generator=gen)
    )
    preds[preds == 3] = 2  # class 3 is never predicted: precision 0 by convention, not NaN
    labels = ["comedy", "history", "tragedy", "poem"]
    metrics, confusion = classification_metrics(preds, target, labels)

    y, p = target.numpy(), preds.numpy()
    assert metrics["accuracy"] == pytest.approx(sklearn_metrics.accuracy_score(y, p))
    for name, fn in (
        ("precision", sklearn_metrics.precision_score),
        ("recall", sklearn_metrics.recall_score),
        ("f1", sklearn_metrics.f1_score),
    ):
        per_class = fn(y, p, labels=range(4), average=None, zero_division=0)
        for label, value in zip(labels, per_class, strict=True):
            assert metrics[f"{name}/{label}"] == pytest.approx(value, abs=1e-6), (name, label)
        macro = fn(y, p, labels=range(4), average="macro", zero_division=0)
        assert metrics[f"{name}_macro"] == pytest.approx(macro, abs=1e-6), name
    assert confusion == sklearn_metrics.confusion_matrix(y, p, labels=range(4)).tolist()
    assert metrics["precision/poem"] == 0.0


def test_dpo_loss_equals_hand_computation() -> None:
    policy_chosen = torch.tensor([-10.0, -4.0])
    policy_rejected = torch.tensor([-12.0, -3.0])
    ref_chosen = torch.tensor([-11.0, -5.0])
    ref_rejected = torch.tensor([-11.0, -2.0])
    beta = 0.5
    loss, chosen, rejected = dpo_loss(policy_chosen, policy_rejected, ref_chosen, ref_rejected, beta)
    # pair 1: rewards 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5, margin 1.0
    # pair 2: rewards 0.5 * 1 = 0.5 and 0.5 * -1 = -0.5, margin 1.0
    expected = -math.log(1.0 / (1.0 + math.exp(-1.0)))
    assert chosen.tolist() == [0.5, 0.5] and rejected.tolist() == [-0.5, -0.5]
    assert loss.item() == pytest.approx(expected, rel=1e-6)
    # Equal policy and reference: zero rewards, loss log 2 whatever beta.
    same = torch.tensor([-3.0, -7.0])
    loss0, _, _ = dpo_loss(same, same + 1, same, same + 1, 0.1)
    assert loss0.item() == pytest.approx(math.log(2.0), rel=1e-6)


def test_dpo_loss_gradient_pushes_chosen_up() -> None:
    policy = torch.tensor([-5.0, -5.0], requires_grad=True)
    loss, _, _ = dpo_loss(policy[:1], policy[1:], torch.tensor([-5.0]), torch.tensor([-5.0]), 1.0)
    loss.backward()
    assert policy.grad is not None
    assert policy.grad[0] < 0 < policy.grad[1]  # descending raises log p(chosen), lowers log p(rejected)
    assert policy.grad[0].item() == pytest.approx(-0.5)  # -beta * (1 - sigmoid(0))
