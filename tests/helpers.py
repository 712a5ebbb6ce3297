"""Shared builders for end-to-end tests: a tiny model on a small real corpus."""

from __future__ import annotations

from pathlib import Path

from orchestra.config import (
    DataConfig,
    DataSource,
    EnergyConfig,
    ModelConfig,
    OptimConfig,
    SchedulerConfig,
    TrainConfig,
    TrainerConfig,
)


def tiny_config(corpus_dir: Path, data_cache: Path, run_dir: Path, **trainer: object) -> TrainConfig:
    trainer_cfg = TrainerConfig(
        max_steps=30,
        micro_batch_size=4,
        global_batch_size=8,
        log_every_n_steps=1,
        val_every_n_steps=10,
        val_batches=4,
        ckpt_every_n_steps=10,
        progress_bar=False,
        sample_tokens=8,
    )
    for key, value in trainer.items():
        setattr(trainer_cfg, key, value)
    return TrainConfig(
        model=ModelConfig(
            name="tiny", dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=64
        ),
        data=DataConfig(
            name="tiny-stdlib",
            source=DataSource.files,
            paths=[str(corpus_dir / "*.txt")],
            cache_dir=str(data_cache),
            vocab_size=512,
            tokenize_workers=1,
            loader_workers=0,
        ),
        optim=OptimConfig(lr=3e-3, weight_decay=0.01),
        scheduler=SchedulerConfig(warmup_steps=5),
        trainer=trainer_cfg,
        energy=EnergyConfig(enabled=False),
        name="tiny",
        run_dir=str(run_dir),
    )


def cli_overrides(corpus_dir: Path, data_cache: Path, run_dir: Path, **changes: object) -> list[str]:
    """The same tiny job as Hydra overrides, for subprocess runs of `orchestra-train`.

    ``changes`` replace or add keys, e.g. ``**{"trainer.max_steps": 10, "strategy": "ddp"}``.
    """
    base = [
        "model.name=tiny",
        "model.dim=64",
        "model.n_layers=2",
        "model.n_heads=4",
        "model.n_kv_heads=2",
        "model.ffn_dim=128",
        "model.max_seq_len=64",
        "data=files",
        "data.name=tiny-stdlib",
        f"data.paths=[{corpus_dir}/*.txt]",
        f"data.cache_dir={data_cache}",
        "data.vocab_size=512",
        "data.tokenize_workers=1",
        "data.loader_workers=0",
        "optim.lr=3e-3",
        "optim.weight_decay=0.01",
        "scheduler.warmup_steps=5",
        "trainer.max_steps=30",
        "trainer.micro_batch_size=4",
        "trainer.global_batch_size=8",
        "trainer.log_every_n_steps=1",
        "trainer.val_every_n_steps=10",
        "trainer.val_batches=4",
        "trainer.ckpt_every_n_steps=5",
        "trainer.progress_bar=false",
        "trainer.sample_tokens=8",
        "energy=none",
        "name=tiny",
        f"hydra.run.dir={run_dir}",
    ]
    pairs = dict(item.split("=", 1) for item in base)
    pairs.update(
        {key: str(value).lower() if isinstance(value, bool) else str(value) for key, value in changes.items()}
    )
    return [f"{key}={value}" for key, value in pairs.items()]
