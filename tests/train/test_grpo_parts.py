"""GRPO's parts before its task: group advantages, the clipped objective with the k3 KL, verifiable rewards.

References: numpy for the group statistics, the paper's formulas evaluated by hand for the loss
and its gradients, and plain Python for what each reward accepts.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from orchestra.config import ConfigError
from orchestra.train.metrics import group_advantages, grpo_loss
from orchestra.train.rewards import arithmetic, exact_match, regex_match, reward_function


def test_group_advantages_equal_numpy() -> None:
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5, 3.0, -1.0, 2.0, 0.0])
    ours = group_advantages(rewards, 4)
    groups = rewards.numpy().reshape(3, 4)
    expected = (groups - groups.mean(1, keepdims=True)) / (groups.std(1, ddof=1, keepdims=True) + 1e-4)
    np.testing.assert_allclose(ours.numpy(), expected.reshape(-1), rtol=1e-6, atol=1e-7)
    assert ours[4:8].abs().max() == 0  # a group that scored alike teaches nothing
    with pytest.raises(ValueError, match="groups of 5"):
        group_advantages(rewards, 5)
    with pytest.raises(ValueError, match="groups of 1"):
        group_advantages(rewards, 1)


def test_on_policy_grpo_is_the_advantage_weighted_likelihood() -> None:
    """One update per sample (ratio 1), no KL: loss = -mean(A) and d loss / d logp = -A / |o| per token."""
    logps = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    mask = torch.tensor([[1, 1, 1], [1, 1, 0]])
    advantages = torch.tensor([0.8, -1.2])
    loss, kl, clipped = grpo_loss(logps, logps.detach(), None, advantages, mask, beta=0.04)
    assert loss.item() == pytest.approx(-(0.8 - 1.2) / 2)
    loss.backward()
    assert logps.grad is not None
    expected = torch.tensor([[-0.8 / 3] * 3, [1.2 / 2, 1.2 / 2, 0.0]]) / 2
    torch.testing.assert_close(logps.grad, expected)
    assert kl.item() == 0.0 and clipped.item() == 0.0


def test_clipping_and_the_k3_kl_by_hand() -> None:
    old = torch.zeros(1, 4)
    # ratios e^0.4 ~ 1.49 (clipped for A > 0), e^-0.7 ~ 0.50 (kept: the min takes it), 1.1 and 1.0.
    logps = torch.tensor([[0.4, -0.7, math.log(1.1), 0.0]], requires_grad=True)
    reference = torch.tensor([[0.0, 0.0, 0.5, -0.2]])
    beta, a = 0.1, 2.0
    loss, kl, clipped = grpo_loss(logps, old, reference, torch.tensor([a]), torch.ones(1, 4), beta, 0.2)
    ratios = [math.exp(0.4), math.exp(-0.7), 1.1, 1.0]
    surrogate = [min(r * a, min(max(r, 0.8), 1.2) * a) for r in ratios]
    k3 = [
        math.exp(r - lp) - (r - lp) - 1
        for r, lp in zip([0.0, 0.0, 0.5, -0.2], logps[0].tolist(), strict=True)
    ]
    assert loss.item() == pytest.approx(
        sum(-s + beta * k for s, k in zip(surrogate, k3, strict=True)) / 4, rel=1e-6
    )
    assert kl.item() == pytest.approx(sum(k3) / 4, rel=1e-6) and all(k >= 0 for k in k3)
    assert clipped.item() == pytest.approx(2 / 4)  # 1.49 above 1.2, 0.50 below 0.8
    loss.backward()
    assert logps.grad is not None
    # The clipped token's surrogate has no gradient: only its KL term moves it.
    kl_grad = beta * (1 - math.exp(0.0 - 0.4)) / 4
    assert logps.grad[0, 0].item() == pytest.approx(kl_grad, rel=1e-5)
    assert logps.grad[0, 1].item() < 0  # the kept low ratio is pushed up by the positive advantage


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("42", "42", 1.0),
        ("  42 \n", "42", 1.0),
        ("forty-two", "42", 0.0),
        ("a  b", "a b", 1.0),
        ("A b", "a b", 0.0),
    ],
)
def test_exact_match(completion: str, answer: str, expected: float) -> None:
    assert exact_match(completion, answer) == expected


@pytest.mark.parametrize(
    ("completion", "answer", "expected"),
    [
        ("42", "42", 1.0),
        ("The sum is 1,024.", "1024", 1.0),
        ("-7 is it", "-7", 1.0),
        ("about 41 or 42", "42", 0.0),  # the first integer is the answer given
        ("no number", "3", 0.0),
        ("12", "twelve", 0.0),  # a non-integer reference never matches
    ],
)
def test_arithmetic_checker(completion: str, answer: str, expected: float) -> None:
    assert arithmetic(completion, answer) == expected


def test_regex_reward_with_and_without_a_group() -> None:
    assert regex_match("Answer: 12", "12", r"Answer:\s*(\d+)") == 1.0
    assert regex_match("Answer: 13", "12", r"Answer:\s*(\d+)") == 0.0
    assert regex_match("done.", "", r"\.$") == 1.0
    assert regex_match("done", "", r"\.$") == 0.0


def test_reward_function_names_and_refusals() -> None:
    assert reward_function("arithmetic") is arithmetic
    assert reward_function("regex", r"(\d+)")("x 5", "5") == 1.0
    assert reward_function("tests.train.test_grpo_parts:always_half")("x", "y") == 0.5
    with pytest.raises(ConfigError, match=r"^task.reward: regex needs a pattern"):
        reward_function("regex")
    with pytest.raises(ConfigError, match=r"^task.reward_pattern: '\(' is not a regular expression"):
        reward_function("regex", "(")
    with pytest.raises(
        ConfigError, match=r"^task.reward: 'nope' is not one of exact_match, arithmetic, regex, none"
    ):
        reward_function("nope")
    with pytest.raises(ConfigError, match=r"^task.reward: cannot import 'no_such_module:f'"):
        reward_function("no_such_module:f")


def always_half(completion: str, answer: str) -> float:
    """A user reward, imported by name in the test above."""
    return 0.5
