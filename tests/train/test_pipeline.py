"""strategy.pp in one process: how layers are cut into stages, which rank holds which, and that
the stages chained end to end compute the unsplit model (orchestra/train/pipeline.py); every layout
the schedules cannot run is refused naming its key before anything starts."""

from __future__ import annotations

import itertools
import random
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestra.config import (
    PP_SCHEDULES,
    ConfigError,
    FinetuneMethod,
    StrategyName,
    TrainConfig,
    data_parallel_size,
    microbatch_rule,
)
from orchestra.model import build_model
from orchestra.model.config import ModelConfig
from orchestra.train.pipeline import split_decoder, split_layers, stage_ids
from orchestra.train.run import validate_run
from tests.helpers import tiny_config


def brute_force_split(costs: list[int], first: int, last: int, n_stages: int) -> int:
    """The smallest costliest stage over every way of cutting ``costs`` into ``n_stages`` pieces."""
    best = None
    for cuts in itertools.combinations(range(1, len(costs)), n_stages - 1):
        bounds = [0, *cuts, len(costs)]
        stage_costs = [sum(costs[a:b]) for a, b in itertools.pairwise(bounds)]
        stage_costs[0] += first
        stage_costs[-1] += last
        best = max(stage_costs) if best is None else min(best, max(stage_costs))
    assert best is not None
    return best


@pytest.mark.parametrize("seed", range(30))
def test_split_layers_is_optimal_and_contiguous(seed: int) -> None:
    rng = random.Random(seed)
    n = rng.randint(1, 10)
    costs = [rng.randint(1, 100) for _ in range(n)]
    first, last = rng.randint(0, 300), rng.randint(0, 300)
    n_stages = rng.randint(1, n)
    bounds = split_layers(costs, first, last, n_stages)
    assert [b.start for b in bounds] == [0, *(b.stop for b in bounds[:-1])]
    assert bounds[-1].stop == n and all(len(b) >= 1 for b in bounds)
    worst = max(
        sum(costs[i] for i in b) + (first if s == 0 else 0) + (last if s == n_stages - 1 else 0)
        for s, b in enumerate(bounds)
    )
    assert worst == brute_force_split(costs, first, last, n_stages)


def test_split_layers_gives_the_head_stage_fewer_blocks() -> None:
    # Equal blocks, an output projection worth two of them: the last stage takes fewer layers.
    assert split_layers([10] * 8, 0, 20, 2) == [range(0, 5), range(5, 8)]
    with pytest.raises(ValueError, match="cannot split 2 layers into 3 stages"):
        split_layers([1, 1], 0, 0, 3)


@pytest.mark.parametrize(
    ("pp", "spr", "schedule"),
    [
        (2, 1, "1F1B"),
        (4, 1, "GPipe"),
        (2, 2, "Interleaved1F1B"),
        (3, 3, "LoopedBFS"),
        (2, 2, "ZBVZeroBubble"),
    ],
)
def test_every_stage_is_held_by_exactly_one_rank(pp: int, spr: int, schedule: str) -> None:
    held = [s for rank in range(pp) for s in stage_ids(rank, pp, spr, schedule)]
    assert sorted(held) == list(range(pp * spr))


def test_v_schedules_fold_the_stages() -> None:
    assert [stage_ids(r, 4, 2, "DualPipeV") for r in range(4)] == [[0, 7], [1, 6], [2, 5], [3, 4]]
    assert stage_ids(1, 4, 2, "Interleaved1F1B") == [1, 5]


@pytest.mark.parametrize(
    ("schedule", "n", "pp", "spr", "refused"),
    [
        ("1F1B", 2, 2, 1, False),
        ("1F1B", 1, 2, 1, True),
        ("GPipe", 1, 4, 1, False),
        # torch's own examples: pp 4 with 10 micro-batches (2 rounds) or 3 (1 round) run.
        ("Interleaved1F1B", 10, 4, 2, False),
        ("Interleaved1F1B", 3, 4, 2, False),
        ("Interleaved1F1B", 9, 4, 2, True),
        ("InterleavedZeroBubble", 6, 2, 2, False),
        ("DualPipeV", 3, 2, 2, True),
        ("DualPipeV", 4, 2, 2, False),
    ],
)
def test_microbatch_rule(schedule: str, n: int, pp: int, spr: int, refused: bool) -> None:
    assert (microbatch_rule(schedule, n, pp, spr) is not None) == refused


SHAPES = {
    "llama": ModelConfig(name="t", dim=32, n_layers=5, n_heads=4, n_kv_heads=2, ffn_dim=64, max_seq_len=32),
    # Gemma-style: windowed and global layers alternate, sandwich norms, capped logits.
    "gemma": ModelConfig(
        name="t",
        dim=32,
        n_layers=6,
        n_heads=4,
        n_kv_heads=1,
        ffn_dim=64,
        max_seq_len=32,
        sliding_window=4,
        global_every=2,
        sandwich_norm=True,
        final_softcap=30.0,
        qk_norm=True,
    ),
}


@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize(
    ("pp", "spr", "schedule"), [(2, 1, "1F1B"), (3, 1, "GPipe"), (2, 2, "ZBVZeroBubble")]
)
@pytest.mark.parametrize("packed", [False, True])
def test_stages_chained_compute_the_unsplit_model(
    shape: str, pp: int, spr: int, schedule: str, packed: bool
) -> None:
    cfg = SHAPES[shape]
    torch.manual_seed(0)
    reference = build_model(cfg, 97).eval()
    tokens = torch.randint(0, 97, (3, 16))
    segments = torch.tensor([[1] * 6 + [2] * 10, [1] * 16, [1] * 9 + [2] * 5 + [0] * 2]) if packed else None
    expected = reference(tokens, segment_ids=segments) if packed else reference(tokens)

    ranks = []
    for rank in range(pp):
        decoder = build_model(cfg, 97).eval()
        decoder.load_state_dict(reference.state_dict())
        ranks.append((decoder, split_decoder(decoder, rank, pp, spr, schedule)))
    # Each rank's state dict holds its tensors under the unsplit names, and together exactly the model's.
    keys = [set(d.state_dict()) for d, _ in ranks]
    assert set().union(*keys) == set(reference.state_dict())
    params = [name for d, _ in ranks for name, _ in d.named_parameters()]
    assert sorted(params) == sorted(name for name, _ in reference.named_parameters())  # each once
    by_stage = {d.pipeline.stages[i]: s for d, stages in ranks for i, s in enumerate(stages)}
    h: torch.Tensor = tokens
    for index in range(pp * spr):
        h = by_stage[index](h, segments)
    torch.testing.assert_close(h, expected, rtol=1e-5, atol=1e-5)


def pp_config(tmp_path: Path, pp: int = 2, devices: int = 4, **strategy: object) -> TrainConfig:
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "run", devices=devices, micro_batch_size=1)
    return replace(
        cfg,
        model=replace(cfg.model, n_layers=4),
        strategy=replace(cfg.strategy, name=StrategyName.fsdp, pp=pp, **strategy),  # type: ignore[arg-type]
    )


def test_pipeline_data_parallel_size_and_strategy(tmp_path: Path) -> None:
    from orchestra.train.strategy import build_strategy

    cfg = pp_config(tmp_path, pp=2, devices=4)
    validate_run(cfg)
    assert data_parallel_size(cfg) == 2
    strategy = build_strategy(cfg, "32-true")
    # Lightning's (data, tensor) mesh first; the pipeline dim is cut out of its data dim.
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    assert type(strategy).__name__ == "PipelineParallelStrategy"


@pytest.mark.parametrize(
    ("strategy", "model", "trainer", "key", "words"),
    [
        ({"name": StrategyName.ddp}, {}, {}, "strategy.pp", "strategy=fsdp"),
        ({"tp": 2}, {}, {}, "strategy.tp", "not supported yet"),
        ({"cp": 2}, {}, {}, "strategy.cp", "not supported yet"),
        ({"hybrid_shard": True}, {}, {}, "strategy.hybrid_shard", "HSDP"),
        ({"pp": 0}, {}, {}, "strategy.pp", ">= 1"),
        ({"pp": 3}, {}, {}, "strategy.pp", "does not divide the world size"),
        ({"pp_schedule": "Zigzag"}, {}, {}, "strategy.pp_schedule", "is not one of"),
        ({"pp_stages_per_rank": 2}, {}, {}, "strategy.pp_stages_per_rank", "one stage per rank"),
        ({"pp_schedule": "Interleaved1F1B"}, {}, {}, "strategy.pp_stages_per_rank", "2 or more"),
        ({"pp_schedule": "DualPipeV", "pp_stages_per_rank": 3}, {}, {}, "strategy.pp_stages_per_rank", "two"),
        ({"pp_schedule": "LoopedBFS", "pp_stages_per_rank": 3}, {}, {}, "strategy.pp", "model.n_layers=4"),
        ({}, {"tie_embeddings": True}, {}, "model.tie_embeddings", "first and the last"),
        # global 2 / (micro 1 x 2 data ranks) = 1 micro-batch per step, fewer than 2 stages.
        ({}, {}, {"global_batch_size": 2}, "trainer.global_batch_size", "1F1B needs at least"),
    ],
)
def test_pipeline_layouts_that_cannot_run_are_refused(
    tmp_path: Path,
    strategy: dict[str, object],
    model: dict[str, object],
    trainer: dict[str, object],
    key: str,
    words: str,
) -> None:
    cfg = pp_config(tmp_path)
    cfg = replace(
        cfg,
        strategy=replace(cfg.strategy, **strategy),  # type: ignore[arg-type]
        model=replace(cfg.model, **model),  # type: ignore[arg-type]
        trainer=replace(cfg.trainer, **trainer),  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate_run(cfg)
    assert words in str(err.value)


def test_pipeline_tasks_and_methods_it_does_not_split_are_refused(tmp_path: Path) -> None:
    cfg = pp_config(tmp_path)
    full = replace(cfg, finetune=replace(cfg.finetune, method=FinetuneMethod.full, init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"strategy\.pp.*task=classification"):
        validate_run(replace(full, task=replace(full.task, name="classification")))
    with pytest.raises(ConfigError, match=r"task\.pack"):
        validate_run(replace(full, task=replace(full.task, name="sft", pack=False)))
    validate_run(replace(full, task=replace(full.task, name="sft", pack=True)))
    lora = replace(full, finetune=replace(full.finetune, method=FinetuneMethod.lora))
    with pytest.raises(ConfigError, match=r"strategy\.pp.*finetune\.method=lora"):
        validate_run(lora)
    with pytest.raises(ConfigError, match=r"finetune\.layer_lr_decay"):
        validate_run(replace(full, finetune=replace(full.finetune, layer_lr_decay=0.9)))
    with pytest.raises(ConfigError, match=r"eval\.tasks"):
        validate_run(replace(cfg, eval=replace(cfg.eval, tasks=["perplexity"])))


def test_every_schedule_name_is_torchs() -> None:
    from torch.distributed.pipelining.schedules import get_schedule_class

    for name in PP_SCHEDULES:
        assert get_schedule_class(name).__name__.lower().endswith(name.lower())
