"""Run under torchrun (2 gloo ranks): one step of context parallelism against the whole rows in one process.

Each rank builds the same model, computes the reference loss and gradients on the full batch by
itself, then its context-parallel share; the share's gradients averaged over the ranks (what
FSDP does) must equal the reference. Writes <out>/rank<r>.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist

from orchestra.config import IGNORE_INDEX, ActivationCheckpointing, ModelConfig
from orchestra.model import build_model
from orchestra.train.context_parallel import ContextParallel
from orchestra.train.strategy import apply_activation_checkpointing, decoder_of


def main(out: Path, checkpointing: str, ignore: str) -> None:
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    cfg = ModelConfig(dim=32, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32, qk_norm=True)
    torch.manual_seed(0)
    model = build_model(cfg, 96)
    tokens = torch.randint(0, 96, (3, 25), generator=torch.Generator().manual_seed(1))
    inputs, labels = tokens[:, :-1].clone(), tokens[:, 1:].clone()
    if ignore == "uneven":  # prompts and padding: the shares hold different numbers of targets
        labels[0, :20] = IGNORE_INDEX  # row 0: targets only near its end
        labels[1, 6:] = IGNORE_INDEX  # row 1: targets only at its start
        labels[2, :] = IGNORE_INDEX  # row 2: none

    reference = model(inputs, labels)
    reference.backward()
    ref_grads = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()

    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (1, world), mesh_dim_names=("data_parallel", "context_parallel"))
    cp = ContextParallel.of(mesh)
    cp.install(decoder_of(model))
    apply_activation_checkpointing(model, ActivationCheckpointing(checkpointing), 1)
    seen: list[int] = []
    hook = decoder_of(model).layers[0].register_forward_hook(lambda m, a, o: seen.append(o.shape[1]))
    T = inputs.shape[1]
    local_inputs, local_labels = cp.shard((inputs, labels))
    with cp.active(T), cp.rope(decoder_of(model), T):
        loss = cp.mean_loss(model(local_inputs, local_labels, per_sequence=True).sum(), local_labels)
    with cp.active(T):
        loss.backward()
    hook.remove()
    mean_loss = loss.detach().clone()
    dist.all_reduce(mean_loss)
    worst = 0.0
    for name, p in model.named_parameters():
        grad = p.grad.clone()
        dist.all_reduce(grad)
        grad /= world
        ref = ref_grads[name.replace("._checkpoint_wrapped_module", "")]
        worst = max(worst, float((grad - ref).abs().max()))
    result = {
        "reference": float(reference),
        "loss": float(mean_loss / world),
        "max_grad_diff": worst,
        "block_tokens": seen[0],
        "positions": cp.positions(T).tolist(),
        "plain_after": bool(torch.allclose(model(inputs, labels), reference, atol=1e-6)),
    }
    (out / f"rank{rank}.json").write_text(json.dumps(result))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(Path(sys.argv[1]), sys.argv[2], sys.argv[3])
