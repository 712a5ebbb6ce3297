"""DeepSpeed ZeRO 1/2/3 with the generated config on 2 CPU processes, then export through transformers."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestra.config import ConfigError, ModelConfig, StrategyName, TrainConfig, TrainerConfig
from orchestra.model import Transformer, build_model
from orchestra.train.optim import build_optimizer
from orchestra.train.strategy import deepspeed_config

WORKER = Path(__file__).with_name("deepspeed_worker.py")


def reference_run(lora: bool = False) -> tuple[list[float], Transformer]:
    """The same 5 steps in one process with plain torch: accumulation over the global batch."""
    cfg = TrainConfig(
        model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)
    )
    cfg.optim.lr = 3e-3
    torch.manual_seed(0)
    model = build_model(cfg.model, 256)
    if lora:
        from orchestra.model.peft import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=["all-linear"]))
    opt = build_optimizer(model, cfg.optim)
    data = torch.randint(0, 256, (5 * 8, 33), generator=torch.Generator().manual_seed(1))
    losses = []
    for step in range(5):
        total = 0.0
        for micro in data[step * 8 : (step + 1) * 8].split(2):
            loss = model(micro[:, :-1], micro[:, 1:]) / 4
            loss.backward()
            total += loss.item()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad()
        losses.append(total)
    return losses, model


def reference_losses() -> list[float]:
    return reference_run()[0]


def test_generated_config_derives_every_batch_knob() -> None:
    cfg = TrainConfig(
        trainer=TrainerConfig(micro_batch_size=4, global_batch_size=64, grad_clip=0.5, devices=4)
    )
    cfg.strategy.name = StrategyName.deepspeed_zero3_offload
    ds = deepspeed_config(cfg, "bf16-mixed")
    assert (
        ds["train_batch_size"],
        ds["train_micro_batch_size_per_gpu"],
        ds["gradient_accumulation_steps"],
    ) == (64, 4, 4)
    assert ds["gradient_clipping"] == 0.5 and ds["bf16"] == {"enabled": True}
    assert ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    cfg.trainer.global_batch_size = 24
    with pytest.raises(ConfigError, match=r"trainer\.global_batch_size"):
        deepspeed_config(cfg, "bf16-mixed")


def assert_resume_world_size_rules(ckpt: Path, stage: str) -> None:
    """The 2-rank ZeRO checkpoint resumes at 2 ranks under DeepSpeed; elsewhere one error naming the way out."""
    from orchestra.train.checkpoint.io import check_deepspeed_world_size, deepspeed_world_size
    from orchestra.train.checkpoint.meta import CheckpointError

    before = sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*"))
    assert deepspeed_world_size(ckpt) == 2
    check_deepspeed_world_size(ckpt, stage, 2)
    for world in (1, 4):
        with pytest.raises(
            CheckpointError, match=rf"written by 2 data-parallel ranks and this run has {world}"
        ) as err:
            check_deepspeed_world_size(ckpt, stage, world)
        assert f"orchestra-export ckpt={ckpt}" in str(err.value)
    with pytest.raises(CheckpointError, match=r"only strategy=deepspeed_zero\* resumes .*strategy=fsdp"):
        check_deepspeed_world_size(ckpt, "fsdp", 2)
    assert sorted((p.relative_to(ckpt), p.stat().st_mtime_ns) for p in ckpt.rglob("*")) == before


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["deepspeed_zero1", "deepspeed_zero2", "deepspeed_zero3"])
def test_zero_trains_saves_and_exports(stage: str, tmp_path: Path, trained_run: Path) -> None:
    from orchestra.train.checkpoint import load_checkpoint_file
    from orchestra.train.export import export_hf

    # Reuse a real tokenizer so the exported folder is complete.
    tokenizer_json = load_checkpoint_file(trained_run / "checkpoints" / "last.ckpt")["orchestra"][
        "tokenizer_json"
    ]
    (tmp_path / "tokenizer.json").write_text(tokenizer_json)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            stage,
            str(tmp_path),
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]

    losses = json.loads((tmp_path / "losses.json").read_text())
    assert losses == pytest.approx(reference_losses(), rel=1e-4)
    assert json.loads((tmp_path / "config.json").read_text())["zero_optimization"]["stage"] == int(stage[-1])

    from transformers import AutoModelForCausalLM

    from orchestra.train.checkpoint import checkpoint_step

    assert checkpoint_step(tmp_path / "ckpt") == 5  # resume=auto can rank DeepSpeed directories too
    assert_resume_world_size_rules(tmp_path / "ckpt", stage)
    folder = export_hf(tmp_path / "ckpt", tmp_path / "hf")
    probe = torch.load(tmp_path / "logits.pt", weights_only=True)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    with torch.no_grad():
        assert torch.allclose(hf(probe["probe"]).logits, probe["logits"], atol=1e-5, rtol=0)


@pytest.mark.slow
@pytest.mark.parametrize("stage", ["deepspeed_zero2", "deepspeed_zero3"])
def test_lora_under_zero_matches_one_process_and_keeps_the_base_frozen(stage: str, tmp_path: Path) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DS_ACCELERATOR": "cpu"}
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node=2",
            str(WORKER),
            stage,
            str(tmp_path),
            "lora",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=900,
    )
    assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
    ref_losses, ref_model = reference_run(lora=True)
    assert json.loads((tmp_path / "losses.json").read_text()) == pytest.approx(ref_losses, rel=1e-4)
    state = torch.load(tmp_path / "state.pt", weights_only=True)
    torch.manual_seed(0)
    initial = dict(build_model(ref_model.cfg, 256).named_parameters())
    lora_names = [n for n in state if "lora_" in n]
    assert lora_names and any(state[n].abs().max() > 0 for n in lora_names if "lora_B" in n)
    for name, tensor in state.items():
        if "lora_" in name:
            torch.testing.assert_close(tensor, dict(ref_model.named_parameters())[name], rtol=1e-3, atol=1e-5)
        else:  # frozen base weights leave ZeRO untouched, bit for bit
            assert torch.equal(tensor, initial[name.replace(".base.", ".")].detach()), name
