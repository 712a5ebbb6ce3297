"""Batched generation for evaluation: mixed prompt lengths in one batch give each prompt's own result."""

from __future__ import annotations

import pytest
import torch

from orchestra.eval.scoring import generate_batched
from orchestra.model import build_model, generate
from orchestra.model.config import KernelBackend, ModelConfig
from orchestra.model.peft import PromptTunedModel

V = 89


def _alone(model: torch.nn.Module, prompt: list[int], n: int, stops: set[int]) -> list[int]:
    """Greedy continuation of one prompt on its own, cut at the first stop id."""
    new = generate(model, torch.tensor(prompt), n, temperature=0.0)[len(prompt) :].tolist()  # type: ignore[arg-type]
    return new[: next((j for j, t in enumerate(new) if t in stops), len(new))]


@pytest.mark.parametrize("soft_prompt", [False, True], ids=["padded", "soft_prompt_groups_by_length"])
def test_mixed_lengths_equal_one_at_a_time(soft_prompt: bool) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=48, kernels=KernelBackend.torch
    )
    model: torch.nn.Module = build_model(cfg, V).eval()
    if soft_prompt:
        model = PromptTunedModel(model, num_virtual_tokens=4).eval()  # type: ignore[arg-type]
    gen = torch.Generator().manual_seed(3)
    lengths = [7, 1, 12, 7, 3, 30, 12, 5, 2]
    prompts = [torch.randint(0, V, (n,), generator=gen).tolist() for n in lengths]
    greedy = [_alone(model, p, 10, set()) for p in prompts]
    stops = {greedy[2][4], greedy[5][1]}  # two rows stop early, on different ids
    want = [_alone(model, p, 10, stops) for p in prompts]
    for batch_size in (1, 4, 16):
        got = generate_batched(model, prompts, 10, sorted(stops), batch_size=batch_size)
        assert got == want, f"batch_size={batch_size}"
    assert len(want[2]) < 10 and len(want[5]) < 10


def test_prompt_longer_than_room_keeps_its_newest_tokens() -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64, max_seq_len=16)
    model = build_model(cfg, V).eval()
    long, short = list(range(1, 30)), [5, 6]
    got = generate_batched(model, [long, short], 4, [], batch_size=2)
    assert got == [_alone(model, long[-12:], 4, set()), _alone(model, short, 4, set())]
    with pytest.raises(ValueError, match=r"max_new_tokens must be in \[1, 15\]"):
        generate_batched(model, [short], 16, [])
    with pytest.raises(ValueError, match="prompt 1 has no tokens"):
        generate_batched(model, [short, []], 4, [])
