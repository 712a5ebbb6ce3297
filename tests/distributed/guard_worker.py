"""One rank of the distributed loss-guard test: rank 1 alone sees a NaN loss at one step.

Launched by torchrun (2 processes, gloo). Every rank must skip that step (its weights after it
equal the weights before it, on every rank), and training must go on in lockstep.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import torch
from torch.distributed.tensor import DTensor

from orchestra.config import StrategyConfig, StrategyName
from orchestra.train.module import CausalLMModule
from orchestra.train.run import train
from tests.helpers import tiny_config

BAD_STEP = 3


def digest(module: CausalLMModule) -> str:
    """A hash of this rank's parameter values (its shards under FSDP)."""
    h = hashlib.sha256()
    for name, p in sorted(module.named_parameters()):
        local = p.detach().to_local() if isinstance(p, DTensor) else p.detach()
        h.update(name.encode())
        h.update(local.contiguous().numpy().tobytes())
    return h.hexdigest()


def main() -> None:
    corpus, cache, out, strategy = sys.argv[1:5]
    rank = int(os.environ["RANK"])
    original = CausalLMModule.task_loss
    fired = []

    def task_loss(self: CausalLMModule, batch: Any) -> torch.Tensor:
        loss = original(self, batch)
        if self.training and rank == 1 and self.global_step == BAD_STEP:
            fired.append(self.global_step)
            return loss * math.nan
        return loss

    digests: dict[int, str] = {}

    def on_train_batch_end(self: CausalLMModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        digests[int(self.global_step)] = digest(self)

    CausalLMModule.task_loss = task_loss  # type: ignore[method-assign]
    CausalLMModule.on_train_batch_end = on_train_batch_end  # type: ignore[attr-defined]
    cfg = tiny_config(
        Path(corpus),
        Path(cache),
        Path(out),
        max_steps=6,
        micro_batch_size=2,
        global_batch_size=8,
        devices=2,
        accelerator="cpu",
        guard="skip",
        collective_timeout_s=120.0,
    )
    cfg = dataclasses.replace(cfg, strategy=StrategyConfig(name=StrategyName(strategy)))
    result = train(cfg)
    report = {
        "rank": rank,
        "fired": len(fired),
        "unchanged_by_bad_step": digests[BAD_STEP] == digests[BAD_STEP + 1],
        "changed_by_next_step": digests[BAD_STEP + 1] != digests[BAD_STEP + 2],
        "final": digests[6],
        "steps": result.summary.get("steps") if result.summary else None,
    }
    print("GUARD-REPORT " + json.dumps(report), flush=True)


if __name__ == "__main__":
    main()
