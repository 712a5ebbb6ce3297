"""One rank of the DeepSpeed test: our model under the project's generated ZeRO config.

Launched by torchrun from test_deepspeed.py. Lightning's DeepSpeedStrategy refuses CPU, so this
drives ``deepspeed.initialize`` directly with exactly the config ``deepspeed_config`` generates,
trains a few steps on a fixed token stream, saves a checkpoint in the layout Lightning's strategy
writes (tag "checkpoint", Orchestra metadata in the client state) and records losses and logits.
With a third argument ``lora`` the model carries LoRA on every linear layer (base frozen) and the
rank-0 output is the full gathered state after training instead of a checkpoint.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch


def main(stage: str, out_dir: str, method: str = "full") -> None:
    import deepspeed
    import torch.distributed as dist

    from orchestra.config import ModelConfig, StrategyName, TrainConfig, TrainerConfig, to_plain
    from orchestra.model import build_model
    from orchestra.train.optim import build_optimizer
    from orchestra.train.strategy import deepspeed_config

    deepspeed.init_distributed(dist_backend="gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = TrainConfig(
        model=ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32),
        trainer=TrainerConfig(micro_batch_size=2, global_batch_size=8, grad_clip=1.0, devices=world),
    )
    cfg.strategy.name = StrategyName(stage)
    cfg.optim.lr = 3e-3
    torch.manual_seed(0)
    model = build_model(cfg.model, 256)
    if method == "lora":
        from orchestra.model.peft import LoraConfig, apply_lora

        apply_lora(model, LoraConfig(rank=4, alpha=8.0, target_modules=["all-linear"]))
    ds_config = deepspeed_config(cfg, "32-true", world_size=world)
    engine, *_ = deepspeed.initialize(
        model=model, optimizer=build_optimizer(model, cfg.optim), config=ds_config
    )

    data = torch.randint(0, 256, (5 * 8, 33), generator=torch.Generator().manual_seed(1))
    accumulation = ds_config["gradient_accumulation_steps"]
    per_rank = 8 // world
    losses = []
    for step in range(5):
        batch = data[step * 8 + rank * per_rank : step * 8 + (rank + 1) * per_rank]
        step_loss = torch.zeros(())
        for micro in batch.split(cfg.trainer.micro_batch_size):
            loss = engine(micro[:, :-1], micro[:, 1:])
            engine.backward(loss)
            engine.step()
            step_loss += loss.detach() / accumulation
        dist.all_reduce(step_loss)
        losses.append(step_loss.item() / world)

    if method == "lora":
        # ZeRO-3 partitions every parameter, frozen ones too: gather them to compare with the reference.
        params = list(engine.module.parameters())
        with deepspeed.zero.GatheredParameters(params):
            state = {n: p.detach().clone() for n, p in engine.module.named_parameters()}
        if rank == 0:
            torch.save(state, Path(out_dir) / "state.pt")
            Path(out_dir, "losses.json").write_text(json.dumps(losses))
        dist.barrier()
        return
    meta = {
        "format": 1,
        "model_config": to_plain(cfg.model),
        "vocab_size": 256,
        "tokenizer_json": Path(out_dir, "tokenizer.json").read_text(),
    }
    engine.save_checkpoint(
        str(Path(out_dir) / "ckpt"), tag="checkpoint", client_state={"orchestra": meta, "global_step": 5}
    )
    probe = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = engine(probe)  # ZeRO-3 gathers partitioned weights: every rank takes part
    if rank == 0:
        torch.save({"probe": probe, "logits": logits}, Path(out_dir) / "logits.pt")
        Path(out_dir, "losses.json").write_text(json.dumps(losses))
        Path(out_dir, "config.json").write_text(json.dumps(ds_config))
    dist.barrier()


if __name__ == "__main__":
    main(*sys.argv[1:])
