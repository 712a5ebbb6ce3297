"""parallelize() from outside the model: activation checkpointing and compile change no numbers."""

from __future__ import annotations

import copy

import pytest
import torch

from orchestra.config import ActivationCheckpointing, ModelConfig, StrategyConfig, StrategyName
from orchestra.model import Transformer, build_model
from orchestra.train.strategy import parallelize, recompute_factor

CFG = ModelConfig(dim=64, n_layers=4, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)


def loss_and_grads(
    model: torch.nn.Module, tokens: torch.Tensor
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    loss = model(tokens[:, :-1], tokens[:, 1:])
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}


@pytest.mark.parametrize(("mode", "k", "wrapped"), [("full", 1, 4), ("every_k", 2, 2), ("none", 1, 0)])
def test_activation_checkpointing_is_exact_and_keeps_state_dict_keys(mode: str, k: int, wrapped: int) -> None:
    torch.manual_seed(0)
    plain = build_model(CFG, 128)
    ckpt = copy.deepcopy(plain)
    st = StrategyConfig(activation_checkpointing=ActivationCheckpointing(mode), ac_every_k=k)
    parallelize(ckpt, st, "32-true")
    assert sum("CheckpointWrapper" in type(b).__name__ for b in ckpt.layers) == wrapped
    assert ckpt.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(plain, tokens)
    loss, grads = loss_and_grads(ckpt, tokens)
    assert torch.equal(loss, ref_loss)
    strip = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads.items()}
    for name, grad in ref_grads.items():
        torch.testing.assert_close(strip[name], grad, rtol=0, atol=1e-7)


def test_recompute_factor_counts_recomputed_forwards() -> None:
    assert recompute_factor(StrategyConfig(), 8) == 1.0
    assert recompute_factor(
        StrategyConfig(activation_checkpointing=ActivationCheckpointing.full), 8
    ) == pytest.approx(4 / 3)
    every_2 = StrategyConfig(activation_checkpointing=ActivationCheckpointing.every_k, ac_every_k=2)
    assert recompute_factor(every_2, 8) == pytest.approx((3 + 0.5) / 3)


def test_fsdp_needs_a_mesh() -> None:
    with pytest.raises(RuntimeError, match="device mesh"):
        parallelize(Transformer(CFG, 128), StrategyConfig(name=StrategyName.fsdp), "32-true")


@pytest.mark.slow
def test_compiled_blocks_match_eager() -> None:
    torch.manual_seed(0)
    eager = build_model(CFG, 128)
    compiled = copy.deepcopy(eager)
    parallelize(
        compiled,
        StrategyConfig(compile=True, activation_checkpointing=ActivationCheckpointing.full),
        "32-true",
    )
    assert compiled.state_dict().keys() == eager.state_dict().keys()
    tokens = torch.randint(0, 128, (2, 17), generator=torch.Generator().manual_seed(1))
    ref_loss, ref_grads = loss_and_grads(eager, tokens)
    loss, grads = loss_and_grads(compiled, tokens)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    strip = {n.replace("._checkpoint_wrapped_module", ""): g for n, g in grads.items()}
    for name, grad in ref_grads.items():
        torch.testing.assert_close(strip[name], grad, rtol=1e-4, atol=1e-5)


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without a GPU")
def test_cpu_offload_without_a_gpu_is_one_clear_error() -> None:
    from orchestra.config import ConfigError, TrainConfig
    from orchestra.train.strategy import build_strategy

    cfg = TrainConfig()
    cfg.strategy = StrategyConfig(name=StrategyName.fsdp, cpu_offload=True)
    with pytest.raises(ConfigError, match=r"strategy.cpu_offload: .* this run has no GPU"):
        build_strategy(cfg, "32-true")


def test_compile_options_fullgraph_for_the_plain_blocks_only() -> None:
    """fullgraph=null: one graph for the decoder's own blocks, breaks allowed once LoRA wraps them."""
    from dataclasses import replace

    from orchestra.model.ops import TORCH_OPS
    from orchestra.model.peft.lora import LoraConfig, apply_lora
    from orchestra.train.strategy import compile_options

    model = Transformer(replace(CFG, kernels="torch"), 128)  # type: ignore[arg-type]
    st = StrategyConfig(compile=True)
    assert compile_options(model.layers[0], st) == {"fullgraph": True}
    # The Triton kernels on CUDA: graph breaks allowed.
    triton = Transformer(CFG, 128)
    triton.ops.cuda = replace(TORCH_OPS, name="triton")  # as a CUDA machine's kernels=auto builds it
    assert compile_options(triton.layers[0], st) == {"fullgraph": False}
    apply_lora(model, LoraConfig(rank=2, alpha=4, target_modules="all-linear"))
    assert compile_options(model.layers[0], st) == {"fullgraph": False}
    forced = StrategyConfig(compile=True, compile_fullgraph=True, cuda_graphs=True)
    assert compile_options(model.layers[0], forced) == {"fullgraph": True, "mode": "reduce-overhead"}


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"cuda_graphs": True}, "strategy.cuda_graphs"),
        ({"cuda_graphs": True, "compile": True, "name": StrategyName.ddp}, "strategy.cuda_graphs"),
        ({"compile_fullgraph": True}, "strategy.compile_fullgraph"),
    ],
)
def test_compile_switches_are_refused_where_they_do_not_apply(changes: dict[str, object], key: str) -> None:
    from orchestra.config import ConfigError

    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        StrategyConfig(**changes).validate()  # type: ignore[arg-type]
    StrategyConfig(compile=True, cuda_graphs=True).validate()
