"""bench/finetune.py off the GPU: exact trainable counts, the memory tables, valid run commands."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch


@pytest.fixture(scope="module")
def bench():
    return importlib.import_module("bench.finetune")  # bench/ is a package beside tests/


@pytest.fixture(scope="module")
def debug(bench):
    return bench.presets(["debug"])["debug"]


def test_trainable_counts_match_hand_counts(bench, debug):
    m, vocab = debug, 32000
    kv = m.n_kv_heads * m.head_size
    counts = bench.count_parameters(m, vocab)
    # LoRA r=8 on q_proj (dim -> dim) and v_proj (dim -> kv): r * (in + out) per wrapped linear.
    assert counts["lora"][0] == m.n_layers * 8 * ((m.dim + m.dim) + (m.dim + kv))
    # r=16 on all seven projections of a block (lm_head is never a target).
    shapes = [
        (m.dim, m.dim),
        (m.dim, kv),
        (m.dim, kv),
        (m.dim, m.dim),
        (m.dim, m.ffn_dim),
        (m.dim, m.ffn_dim),
        (m.ffn_dim, m.dim),
    ]
    assert counts["lora-all"][0] == m.n_layers * sum(16 * (i + o) for i, o in shapes)
    # Two bottleneck adapters per block: down (dim*16 + 16) and up (16*dim + dim).
    assert counts["adapter"][0] == m.n_layers * 2 * (m.dim * 16 + 16 + 16 * m.dim + m.dim)
    assert counts["prompt"][0] == 20 * m.dim
    per_layer = m.dim * (2 * m.dim + 2 * kv) + 3 * m.dim * m.ffn_dim + 2 * m.dim
    total = m.n_layers * per_layer + 2 * vocab * m.dim + m.dim  # untied embeddings
    assert counts["full"] == (total, total)
    dora = counts["dora-all"][0] - counts["lora-all"][0]
    assert dora == m.n_layers * (2 * m.dim + 2 * kv + 2 * m.ffn_dim + m.dim)  # one magnitude per output row
    for method in ("lora", "lora-all", "dora-all", "adapter", "prompt"):  # base frozen, new parameters added
        trainable, n = counts[method]
        assert n == total + trainable


def test_state_bytes(bench):
    assert bench.state_bytes(100, 100, "bf16-mixed") == 1600
    assert bench.state_bytes(100, 100, "bf16-mixed", l2sp=True) == 2000
    assert bench.state_bytes(10, 110, "bf16-mixed") == 4 * 100 + 16 * 10
    assert bench.state_bytes(10, 110, "bf16-true") == 2 * 100 + 8 * 10


def test_memory_table_orders_methods(bench):
    table = bench.memory_table(micro_batch=4, names=["debug"])
    rows = [line for line in table.splitlines() if line.startswith("| debug |")]
    assert len(rows) == 2  # one row in the trainable-parameter table, one in the memory table
    cells = [c.strip() for c in rows[1].strip("|").split("|")]
    full, l2sp = float(cells[1]), float(cells[2])
    frozen = len(bench.FROZEN_COLUMNS)
    mixed = [float(c.split(" / ")[0]) for c in cells[3 : 3 + frozen]]
    true = [float(c.split(" / ")[1]) for c in cells[3 : 3 + frozen]]
    assert l2sp > full > max(mixed)
    assert all(t < x for t, x in zip(true, mixed, strict=True))
    column = {label: i for i, (label, _) in enumerate(bench.FROZEN_COLUMNS)}
    lora, qlora = (true[column[f"{k} r=16 all-linear"]] for k in ("lora", "qlora"))
    assert qlora < lora  # the NF4 base
    assert "(s=256)" in cells[3 + frozen]


def test_nf4_bytes_are_what_torchao_stores(bench, debug):
    """NF4_BYTES against the storage of a real NF4Tensor (QLoRA's block sizes)."""
    from torch import nn

    from orchestra.model.peft.nf4 import NF4Linear

    weight = NF4Linear.from_linear(nn.Linear(4096, 256, bias=False)).weight
    inner = weight.__tensor_flatten__()[0]
    stored = sum(getattr(weight, name).untyped_storage().nbytes() for name in inner)
    assert stored / weight.numel() == pytest.approx(bench.NF4_BYTES, rel=0.02)
    assert bench.state_bytes(0, 1000, "bf16-true", nf4=1000) == round(bench.NF4_BYTES * 1000)


def test_run_commands_compose_and_validate(bench, tmp_path):
    for method in bench.METHODS:
        overrides = bench.finetune_overrides(
            method, tmp_path / "base", 100, 4, "bf16-mixed", tmp_path / method
        )
        cfg = bench.compose_check([o for o in overrides if not o.startswith("hydra.")])
        assert cfg.task.name.value == "sft" and cfg.finetune.init_from == str(tmp_path / "base")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the no-CUDA message")
def test_gpu_mode_refuses_cleanly_without_cuda(bench, monkeypatch):
    monkeypatch.setattr(sys, "argv", ["bench/finetune.py", "--steps", "10"])
    with pytest.raises(SystemExit) as exc:
        bench.main()
    assert "--memory" in str(exc.value.code)
