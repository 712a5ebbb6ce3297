"""TokenDataModule on its own and inside a real Lightning fit, including resume."""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from orchestra.config import ConfigError, DataConfig, DataSource
from orchestra.data.datamodule import TokenDataModule
from orchestra.data.pack import prepare_dataset
from orchestra.train.lightning_compat import realign_loop_progress

WORDS = [
    "to",
    "be",
    "or",
    "not",
    "that",
    "is",
    "the",
    "question",
    "whether",
    "tis",
    "nobler",
    "in",
    "mind",
    "suffer",
]


@pytest.fixture(scope="module")
def dataset_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("dm")
    rng = random.Random(0)
    for i in range(30):
        (root / f"doc{i}.txt").write_text(" ".join(rng.choice(WORDS) for _ in range(150)))
    cfg = DataConfig(
        name="dm",
        source=DataSource.files,
        paths=[str(root / "*.txt")],
        cache_dir=str(root / "cache"),
        vocab_size=300,
        tokenize_workers=1,
    )
    return prepare_dataset(cfg, seed=1)


def module(dataset_dir: Path, **kw: Any) -> TokenDataModule:
    args: dict[str, Any] = dict(
        seq_len=8,
        micro_batch_size=2,
        global_batch_size=8,
        seed=7,
        max_steps=10,
        val_batches=2,
        loader_workers=0,
    )
    args.update(kw)
    return TokenDataModule(dataset_dir, **args)


def test_loaders_without_a_trainer(dataset_dir: Path) -> None:
    dm = module(dataset_dir, loader_workers=1)
    assert dm.vocab_size > 256 and dm.eos_id == 0
    train = dm.train_dataloader()
    assert len(train) == 10 * 4  # max_steps x accumulation, world size 1
    x, y = next(iter(train))
    assert x.shape == y.shape == (2, 8) and x.dtype == torch.int64
    assert torch.equal(x[:, 1:], y[:, :-1])
    val = list(dm.val_dataloader())
    assert len(val) == 2 and torch.equal(val[0][0], next(iter(dm.val_dataloader()))[0])


def test_state_guard_refuses_another_seed_or_global_batch(dataset_dir: Path) -> None:
    dm = module(dataset_dir)
    state = dm.state_dict()
    assert state["consumed_samples"] == 0 and state["seed"] == 7 and state["global_batch_size"] == 8
    module(dataset_dir).load_state_dict(state)
    with pytest.raises(ConfigError, match="seed: checkpoint 7 vs now 8"):
        module(dataset_dir, seed=8).load_state_dict(state)
    with pytest.raises(ConfigError, match="global_batch_size: checkpoint 8 vs now 16"):
        module(dataset_dir, global_batch_size=16).load_state_dict(state)


def test_realign_loop_progress_rescales_micro_batch_counters() -> None:
    progress = {
        "total": {"ready": 12, "completed": 11, "started": 12, "processed": 12},
        "current": {"ready": 12, "completed": 11, "started": 12, "processed": 12},
    }
    ckpt = {
        "global_step": 3,
        "loops": {"fit_loop": {"epoch_loop.batch_progress": progress}},
        "TokenDataModule": {"accumulation": 4},
    }
    realign_loop_progress(ckpt, accumulation=8)
    assert progress["total"] == {"ready": 24, "completed": 23, "started": 24, "processed": 24}
    assert progress["current"]["completed"] == 23


class _Recorder(L.LightningModule):
    """Records the first tokens of every micro-batch under the optimizer step it belongs to."""

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.zeros(1))
        self.seen: dict[int, list[tuple[int, ...]]] = {}

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, _ = batch
        self.seen.setdefault(int(self.global_step), []).extend(tuple(row[:4].tolist()) for row in x)
        return self.w * x.float().mean()

    def on_load_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        realign_loop_progress(checkpoint, self.trainer.accumulate_grad_batches)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.0)


def _fit(
    dataset_dir: Path,
    steps: int,
    micro: int,
    ckpt_dir: Path,
    ckpt: str | None = None,
    every: int | None = None,
) -> dict[int, list[tuple[int, ...]]]:
    model = _Recorder()
    callbacks = [ModelCheckpoint(dirpath=ckpt_dir, every_n_train_steps=every, save_top_k=-1)] if every else []
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=steps,
        max_epochs=-1,
        accumulate_grad_batches=8 // micro,
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        callbacks=callbacks,
        enable_checkpointing=bool(every),
        use_distributed_sampler=False,
        limit_val_batches=0,
    )
    trainer.fit(
        model, datamodule=module(dataset_dir, micro_batch_size=micro, max_steps=steps), ckpt_path=ckpt
    )
    assert trainer.global_step == steps
    return {k: sorted(v) for k, v in model.seen.items()}


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_lightning_resume_sees_the_uninterrupted_data(dataset_dir: Path, tmp_path: Path) -> None:
    """Resume after step 3 of 10 with the same and with another accumulation (as at another world
    size): every optimizer step sees the same samples as the uninterrupted run."""
    full = _fit(dataset_dir, 10, micro=2, ckpt_dir=tmp_path / "full")
    first = _fit(dataset_dir, 3, micro=2, ckpt_dir=tmp_path / "ck", every=3)
    (ckpt,) = (tmp_path / "ck").glob("*.ckpt")
    assert torch.load(ckpt, weights_only=True)["TokenDataModule"]["consumed_samples"] == 24
    for micro in (2, 1, 8):
        resumed = {**first, **_fit(dataset_dir, 10, micro=micro, ckpt_dir=tmp_path / "ck", ckpt=str(ckpt))}
        assert resumed == full, f"micro={micro}"
