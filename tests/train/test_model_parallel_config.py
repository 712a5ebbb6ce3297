"""strategy.tp and strategy.cp: every layout that cannot split evenly, and every task or method it does not split, is one
clear error naming the key before anything runs; the data-parallel size sets accumulation and sharding."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from orchestra.config import ConfigError, FinetuneMethod, StrategyName, TrainConfig, data_parallel_size
from orchestra.train.run import validate_run
from tests.helpers import tiny_config


def tp_config(tmp_path: Path, tp: int = 2, devices: int = 4, **model: object) -> TrainConfig:
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "run", devices=devices, micro_batch_size=2)
    return replace(
        cfg,
        model=replace(cfg.model, **model),
        strategy=replace(cfg.strategy, name=StrategyName.fsdp, tp=tp),
    )


def assert_refused(cfg: TrainConfig, change: dict[str, object], key: str, words: str) -> None:
    """``cfg`` with ``change`` (strategy keys, the global batch, devices, else model keys) fails on ``key``."""
    change = dict(change)
    strategy = {k: change.pop(k) for k in ("tp", "cp", "hybrid_shard") if k in change}
    if "strategy" in change:
        strategy["name"] = StrategyName(change.pop("strategy"))
    trainer = {"global_batch_size": change.pop("global")} if "global" in change else {}
    if "devices" in change:
        trainer["devices"] = change.pop("devices")
    cfg = replace(
        cfg,
        strategy=replace(cfg.strategy, **strategy),  # type: ignore[arg-type]
        trainer=replace(cfg.trainer, **trainer),  # type: ignore[arg-type]
        model=replace(cfg.model, **change),  # type: ignore[arg-type]
    )
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as err:
        validate_run(cfg)
    assert words in str(err.value)


def test_data_parallel_size_and_accumulation(tmp_path: Path) -> None:
    from orchestra.train.strategy import build_strategy

    cfg = tp_config(tmp_path, tp=2, devices=4)
    validate_run(cfg)
    assert data_parallel_size(cfg) == 2
    # global 8 = micro 2 x 2 data-parallel ranks x 2 accumulation steps (not 8 / (2 x 4) = 1)
    strategy = build_strategy(cfg, "32-true")
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (2, 2)
    assert type(strategy).__name__ == "TensorParallelStrategy"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"strategy": "ddp"}, "strategy.tp", "strategy=fsdp"),
        ({"hybrid_shard": True}, "strategy.hybrid_shard", "HSDP"),
        ({"tp": 0}, "strategy.tp", ">= 1"),
        ({"tp": 3, "devices": 4}, "strategy.tp", "does not divide the world size"),
        ({"n_kv_heads": 1}, "strategy.tp", "model.n_kv_heads=1"),
        ({"n_heads": 2, "n_kv_heads": 1, "tp": 4, "devices": 4}, "strategy.tp", "model.n_heads=2"),
        ({"ffn_dim": 130, "n_kv_heads": 4, "tp": 4, "devices": 4}, "strategy.tp", "model.ffn_dim=130"),
        ({"max_seq_len": 63}, "strategy.tp", "model.max_seq_len=63"),
        ({"global": 6}, "trainer.global_batch_size", "data-parallel ranks"),
    ],
)
def test_layouts_that_do_not_split_are_refused(
    tmp_path: Path, change: dict[str, object], key: str, words: str
) -> None:
    assert_refused(tp_config(tmp_path, tp=2), change, key, words)


def test_tasks_and_methods_it_does_not_split_are_refused(tmp_path: Path) -> None:
    cfg = tp_config(tmp_path)
    lora = replace(cfg, finetune=replace(cfg.finetune, method=FinetuneMethod.lora, init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"strategy\.tp.*finetune\.method=lora"):
        validate_run(replace(lora, task=replace(lora.task, name="sft")))
    full = replace(cfg, finetune=replace(cfg.finetune, method=FinetuneMethod.full, init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"strategy\.tp.*task=classification"):
        validate_run(replace(full, task=replace(full.task, name="classification")))
    with pytest.raises(ConfigError, match=r"eval\.tasks"):
        validate_run(replace(cfg, eval=replace(cfg.eval, tasks=["perplexity"])))


def test_fine_tuning_rows_must_split(tmp_path: Path) -> None:
    cfg = tp_config(tmp_path)
    full = replace(
        cfg,
        finetune=replace(cfg.finetune, method=FinetuneMethod.full, init_from=str(tmp_path), seq_len=33),
        task=replace(cfg.task, name="sft"),
    )
    with pytest.raises(ConfigError, match=r"finetune\.seq_len=33"):
        validate_run(full)


def cp_config(tmp_path: Path, cp: int = 2, devices: int = 4) -> TrainConfig:
    cfg = tp_config(tmp_path, tp=1, devices=devices)
    return replace(cfg, strategy=replace(cfg.strategy, cp=cp))


def test_context_parallel_data_parallel_size(tmp_path: Path) -> None:
    from orchestra.train.strategy import build_strategy

    cfg = cp_config(tmp_path, cp=2, devices=4)
    validate_run(cfg)
    assert data_parallel_size(cfg) == 2
    strategy = build_strategy(cfg, "32-true")
    # Lightning's (data, tensor) mesh is built first; the context dim is cut out of its data dim.
    assert (strategy._data_parallel_size, strategy._tensor_parallel_size) == (4, 1)
    assert type(strategy).__name__ == "ContextParallelStrategy"


@pytest.mark.parametrize(
    ("change", "key", "words"),
    [
        ({"strategy": "ddp"}, "strategy.cp", "strategy=fsdp"),
        ({"tp": 2}, "strategy.cp", "not supported yet"),
        ({"cp": 0}, "strategy.cp", ">= 1"),
        ({"cp": 3, "devices": 4}, "strategy.cp", "does not divide the world size"),
        ({"max_seq_len": 66}, "strategy.cp", "model.max_seq_len=66 does not split into 2 x 2"),
        ({"sliding_window": 16}, "strategy.cp", "model.sliding_window"),
        ({"attn_softcap": 50.0}, "strategy.cp", "model.attn_softcap"),
        ({"attention": "flex"}, "model.attention", "strategy.cp"),
        ({"global": 6}, "trainer.global_batch_size", "strategy.cp"),
    ],
)
def test_context_parallel_layouts_that_do_not_split_are_refused(
    tmp_path: Path, change: dict[str, object], key: str, words: str
) -> None:
    assert_refused(cp_config(tmp_path, cp=2), change, key, words)


def test_context_parallel_tasks_and_methods_it_does_not_split_are_refused(tmp_path: Path) -> None:
    from orchestra.model.config import RopeScaling, RopeType

    cfg = cp_config(tmp_path)
    full = replace(cfg, finetune=replace(cfg.finetune, method=FinetuneMethod.full, init_from=str(tmp_path)))
    with pytest.raises(ConfigError, match=r"strategy\.cp.*task=classification"):
        validate_run(replace(full, task=replace(full.task, name="classification")))
    with pytest.raises(ConfigError, match=r"task\.pack"):
        validate_run(replace(full, task=replace(full.task, name="sft", pack=True)))
    validate_run(replace(full, task=replace(full.task, name="sft", pack=False)))
    with pytest.raises(ConfigError, match=r"eval\.tasks"):
        validate_run(replace(cfg, eval=replace(cfg.eval, tasks=["perplexity"])))
    dynamic = RopeScaling(type=RopeType.dynamic, factor=2.0, original_max_seq_len=32)
    with pytest.raises(ConfigError, match=r"strategy\.cp.*rope\.type=dynamic"):
        validate_run(replace(cfg, model=replace(cfg.model, rope=dynamic)))


def test_async_checkpoint_is_for_sharded_checkpoints(tmp_path: Path) -> None:
    cfg = tp_config(tmp_path, tp=1, devices=2)
    validate_run(replace(cfg, strategy=replace(cfg.strategy, async_checkpoint=True)))
    ddp = replace(cfg, strategy=replace(cfg.strategy, name=StrategyName.ddp, async_checkpoint=True))
    with pytest.raises(ConfigError, match=r"strategy\.async_checkpoint: applies to strategy=fsdp"):
        validate_run(ddp)
