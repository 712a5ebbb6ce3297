"""The preference losses against TRL's own (SimPO, ORPO) and against hand computations (KTO, Bradley-Terry).

TRL's losses are methods of its trainers; they are called here on a stand-in ``self`` holding the
hyperparameters they read, so the reference is TRL's code itself, not a transcription of it.
"""

from __future__ import annotations

import math
import warnings
from types import SimpleNamespace

import pytest
import torch

from orchestra.model import ModelConfig, build_model
from orchestra.train.metrics import bradley_terry_loss, kto_loss, log1mexp, orpo_loss, simpo_loss
from orchestra.train.tasks.preference import PreferenceModule

with warnings.catch_warnings():
    warnings.simplefilter("ignore")
    trl_cpo = pytest.importorskip("trl.experimental.cpo.cpo_trainer")
    trl_orpo = pytest.importorskip("trl.experimental.orpo.orpo_trainer")


def _logps(seed: int, n: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean per-token log-probabilities of n chosen and n rejected responses, in (-6, -0.01)."""
    g = torch.Generator().manual_seed(seed)
    return -torch.rand(n, generator=g) * 6 - 0.01, -torch.rand(n, generator=g) * 6 - 0.01


@pytest.mark.parametrize(
    ("beta", "gamma", "seed"), [(2.0, 1.0, 0), (2.5, 0.5, 1), (0.1, 0.0, 2), (10.0, 1.6, 3)]
)
def test_simpo_equals_trl(beta: float, gamma: float, seed: int) -> None:
    chosen, rejected = _logps(seed)
    trainer = SimpleNamespace(
        alpha=0.0,
        beta=beta,
        loss_type="simpo",
        simpo_gamma=gamma,
        label_smoothing=0.0,
        accelerator=SimpleNamespace(device=torch.device("cpu")),
    )
    losses, trl_chosen, trl_rejected = trl_cpo.CPOTrainer.cpo_loss(trainer, chosen, rejected)
    loss, ours_chosen, ours_rejected = simpo_loss(chosen, rejected, beta, gamma)
    torch.testing.assert_close(loss, losses.mean())
    torch.testing.assert_close(ours_chosen, trl_chosen)
    torch.testing.assert_close(ours_rejected, trl_rejected)


@pytest.mark.parametrize(("beta", "seed"), [(0.1, 0), (0.25, 1), (1.0, 2)])
def test_orpo_equals_trl(beta: float, seed: int) -> None:
    chosen, rejected = _logps(seed)
    nll = torch.tensor(1.7)
    trainer = SimpleNamespace(beta=beta, accelerator=SimpleNamespace(device=torch.device("cpu")))
    losses, trl_chosen, trl_rejected, _, _ = trl_orpo.ORPOTrainer.odds_ratio_loss(trainer, chosen, rejected)
    loss, ours_chosen, ours_rejected = orpo_loss(chosen, rejected, nll, beta)
    torch.testing.assert_close(loss, nll - losses.mean())  # TRL: policy_nll_loss - losses.mean()
    torch.testing.assert_close(ours_chosen, trl_chosen)
    torch.testing.assert_close(ours_rejected, trl_rejected)


def test_log1mexp_is_stable_where_the_naive_form_is_not() -> None:
    x = torch.tensor([-1e-9, -1e-4, -0.5, -math.log(2), -0.7, -5.0, -40.0, -200.0], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), trl_orpo.log1mexp(x))
    exact = torch.tensor([math.log(-math.expm1(v)) for v in x.tolist()], dtype=torch.float64)
    torch.testing.assert_close(log1mexp(x), exact)
    assert torch.isfinite(log1mexp(torch.tensor([-1e-30, -800.0]))).all()


def test_kto_equals_the_paper_by_hand() -> None:
    policy_chosen, policy_rejected = torch.tensor([-4.0, -9.0]), torch.tensor([-6.0, -2.0])
    ref_chosen, ref_rejected = torch.tensor([-5.0, -8.0]), torch.tensor([-5.0, -3.0])
    beta, kl = 0.5, torch.tensor(0.2)
    loss, chosen, rejected = kto_loss(
        policy_chosen, policy_rejected, ref_chosen, ref_rejected, kl, beta, 1.5, 0.75
    )

    def sigmoid(v: float) -> float:
        return 1 / (1 + math.exp(-v))

    # log-ratios: chosen (1, -1), rejected (-1, 1); z0 = 0.2.
    desirable = [1.5 * (1 - sigmoid(beta * (r - 0.2))) for r in (1.0, -1.0)]
    undesirable = [0.75 * (1 - sigmoid(beta * (0.2 - r))) for r in (-1.0, 1.0)]
    assert loss.item() == pytest.approx(sum(desirable + undesirable) / 4, rel=1e-6)
    assert chosen.tolist() == [0.5, -0.5] and rejected.tolist() == [-0.5, 0.5]


def test_kto_reference_point_is_clamped_and_carries_no_gradient() -> None:
    policy = torch.tensor([-3.0, -4.0], requires_grad=True)
    kl = torch.tensor(-0.7, requires_grad=True)  # a negative estimate: z0 = 0
    loss, _, _ = kto_loss(policy[:1], policy[1:], torch.tensor([-3.0]), torch.tensor([-4.0]), kl, 1.0)
    assert loss.item() == pytest.approx(0.5)  # every log-ratio 0 and z0 0: 1 - sigmoid(0)
    loss.backward()
    assert kl.grad is None
    assert policy.grad is not None and policy.grad[0] < 0 < policy.grad[1]


def test_bradley_terry_by_hand() -> None:
    chosen, rejected = torch.tensor([2.0, -1.0, 0.5]), torch.tensor([0.0, 1.0, 0.5])
    expected = (
        sum(-math.log(1 / (1 + math.exp(-(c - r)))) for c, r in ((2.0, 0.0), (-1.0, 1.0), (0.5, 0.5))) / 3
    )
    assert bradley_terry_loss(chosen, rejected).item() == pytest.approx(expected, rel=1e-6)
    big = bradley_terry_loss(torch.tensor([-200.0]), torch.tensor([200.0]))
    assert big.item() == pytest.approx(400.0)  # no overflow: logsigmoid, not log(sigmoid)


def test_sequence_logps_equal_trls_batch_logps() -> None:
    """Our per-row summed and mean log-probabilities from the fused loss = TRL's from the logits."""
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, max_seq_len=32, vocab_size=64)
    model = build_model(cfg, 64).eval()
    tokens = torch.randint(0, 64, (4, 12))
    labels = torch.randint(0, 64, (4, 12))
    labels[:, :5] = -100  # prompts
    labels[1, 9:] = -100  # padding
    labels[3, :8] = -100
    with torch.no_grad():
        logps, counts = PreferenceModule.sequence_logps(model, {"tokens": tokens, "labels": labels})
        logits = model(tokens)
    # TRL shifts labels left by one inside; give it the unshifted form (one column in front).
    unshifted = torch.cat([torch.full((4, 1), -100), labels], dim=1)
    padded_logits = torch.cat([logits, logits[:, -1:]], dim=1)
    trl_sum = trl_cpo.CPOTrainer.get_batch_logps(padded_logits, unshifted, average_log_prob=False)
    trl_mean = trl_cpo.CPOTrainer.get_batch_logps(padded_logits, unshifted, average_log_prob=True)
    torch.testing.assert_close(logps, trl_sum, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logps / counts, trl_mean, rtol=1e-5, atol=1e-5)
    assert counts.tolist() == [7, 4, 7, 4]
