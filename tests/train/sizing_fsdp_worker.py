"""One rank of the two-process CPU job that tests/train/test_sizing.py measures sharded memory with.

Each rank builds the same small decoder, shards it as orchestra/train/strategy.py does (FSDP2's
fully_shard on every block, then on the root; fp32 parameters, fp32 gradient reduction), takes
one AdamW step so the optimizer states exist, accumulates one micro-batch of gradients, and then
runs the next micro-batch and the step under torch's FSDPMemTracker. A second, unsharded copy
is split with the product's own tensor parallelism to count what one tensor-parallel rank holds.
The numbers go to <out>/rank<r>.json; the test compares them with the plan.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist


def _snapshot(snap: dict[torch.device, dict[Any, int]]) -> dict[str, int]:
    """The CPU entry of a tracker snapshot, keyed by category name ("Sharded Param", ...)."""
    entry = snap.get(torch.device("cpu"), {})
    return {str(getattr(key, "value", key)): value for key, value in entry.items()}


def run(
    rank: int, init_file: str, out_dir: str, model: dict[str, Any], vocab: int, seq: int, micro: int
) -> None:
    """Measure one rank; ``model`` holds ModelConfig fields (the shape), the rest the batch."""
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    try:
        from torch.distributed._tools.fsdp2_mem_tracker import FSDPMemTracker
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard
        from torch.distributed.tensor import DTensor

        from orchestra.config import KernelBackend, ModelConfig
        from orchestra.model.build import build_model
        from orchestra.train.strategy import apply_tensor_parallel

        cfg = ModelConfig(
            name="fsdp", max_seq_len=seq, vocab_size=vocab, kernels=KernelBackend.torch, **model
        )
        torch.manual_seed(0)
        net = build_model(cfg, vocab, device="cpu")
        mesh = init_device_mesh("cpu", (2,))
        policy = MixedPrecisionPolicy(param_dtype=None, reduce_dtype=torch.float32)
        for block in net.layers:
            fully_shard(block, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        fully_shard(net, mesh=mesh, reshard_after_forward=True, mp_policy=policy)
        opt = torch.optim.AdamW(net.parameters(), lr=1e-3, foreach=True)
        gen = torch.Generator().manual_seed(rank)

        def batch() -> tuple[torch.Tensor, torch.Tensor]:
            return (
                torch.randint(0, vocab, (micro, seq), generator=gen),
                torch.randint(0, vocab, (micro, seq), generator=gen),
            )

        net(*batch()).backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        net(*batch()).backward()  # the first micro-batch of a step: its gradients stay
        tracker = FSDPMemTracker(net, opt)
        with tracker:
            net(*batch()).backward()
            opt.step()
            after_step = _snapshot(tracker.get_tracker_snapshot())
            opt.zero_grad(set_to_none=True)
        peak = _snapshot(tracker.get_tracker_snapshot("peak"))

        split = ModelConfig(
            name="tp",
            max_seq_len=seq,
            vocab_size=vocab,
            kernels=KernelBackend.torch,
            **{**model, "qkv_bias": True, "o_bias": True, "mlp_bias": True},
        )
        tp_net = build_model(split, vocab, device="cpu")
        apply_tensor_parallel(tp_net, init_device_mesh("cpu", (2,), mesh_dim_names=("tensor_parallel",)))
        tp_local = sum((p.to_local() if isinstance(p, DTensor) else p).numel() for p in tp_net.parameters())
        Path(out_dir, f"rank{rank}.json").write_text(
            json.dumps({"after_step": after_step, "peak": peak, "tp_local_parameters": tp_local})
        )
    finally:
        dist.destroy_process_group()
