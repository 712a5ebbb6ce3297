"""`orchestra-train`'s console: a summary that prints every value whole, a bar counting optimizer steps."""

from __future__ import annotations

import io
import os
from pathlib import Path
from typing import Any

import lightning as L
import pytest
import rich
import torch
from rich.console import Console
from torch.utils.data import DataLoader, TensorDataset

from orchestra.cli import train as train_cli
from orchestra.cli.train import print_summary, summary_rows
from orchestra.train.progress import StepProgressBar

# Deep enough that no terminal fits it, with brackets that rich would read as markup.
LONG_RUN = Path("/scratch/" + "/".join(f"sweep-lr{i}e-4-[warmup]-seed1234" for i in range(6)) + "/run")


def a_summary(run_dir: Path) -> dict[str, Any]:
    """Shaped as run.py writes it: val_metrics nested, paths as strings."""
    return {
        "steps": 40,
        "tokens": 163840,
        "train_loss": 5.893829345703125,
        "val_loss": 6.056778430938721,
        "val_ppl": 426.99761962890625,
        "task": "classification",
        "val_metrics": {"loss": 6.056778430938721, "ppl": 426.99761962890625, "accuracy": 0.8125},
        "tokens_per_s": 704.7,
        "mfu": None,
        "checkpoint": str(run_dir / "checkpoints" / "last.ckpt"),
        "resumed_from": None,
        "parameters": 5048576,
        "trainable_parameters": 5048576,
        "run_dir": str(run_dir),
    }


def printed(width: int | None = None) -> tuple[Console, io.StringIO]:
    buf = io.StringIO()
    # rich reads COLUMNS from the os.environ it saw when first imported; a library imported by an
    # earlier test may have replaced that mapping, so hand it the current one.
    console = Console(file=buf, width=width, force_terminal=False, color_system=None, _environ=os.environ)
    return console, buf


@pytest.mark.parametrize("width", [40, 120])
def test_summary_prints_every_value_whole_on_one_line(width: int) -> None:
    out, buf = printed(width)
    summary = a_summary(LONG_RUN)
    print_summary("Orchestra run summary — debug", summary, "ROMEO: a sample", LONG_RUN, out=out)
    lines = buf.getvalue().splitlines()
    text = buf.getvalue()
    assert "…" not in text and "{" not in text  # nothing cut, no raw dict
    assert lines[0] == "Orchestra run summary — debug"
    # The paths a user copies: each whole on one line.
    assert any(line.split() == ["checkpoint", summary["checkpoint"]] for line in lines), text
    assert f"run dir: {LONG_RUN}" in lines
    assert f"report:  orchestra-report {LONG_RUN}" in lines
    # One line per value, formatted; the nested metric under its metrics.csv name.
    assert ["steps", "40"] in [line.split() for line in lines]
    assert ["tokens", "163,840"] in [line.split() for line in lines]
    assert ["train_loss", "5.894"] in [line.split() for line in lines]
    assert ["val/accuracy", "0.8125"] in [line.split() for line in lines]
    assert ["mfu", "-"] in [line.split() for line in lines]
    assert ["trainable_parameters", "5,048,576"] in [line.split() for line in lines]
    assert "ROMEO: a sample" in lines


def test_summary_follows_the_terminal_width_from_columns(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CLI's own console, sized by COLUMNS=40 as a narrow terminal would size it."""
    monkeypatch.setenv("COLUMNS", "40")
    out, buf = printed()
    monkeypatch.setattr(train_cli, "console", out)
    assert out.width == 40
    print_summary("Orchestra run summary — x", a_summary(LONG_RUN), "", LONG_RUN, out=train_cli.console)
    lines = buf.getvalue().splitlines()
    assert f"run dir: {LONG_RUN}" in lines
    assert ["checkpoint", str(LONG_RUN / "checkpoints" / "last.ckpt")] in [line.split() for line in lines]


def test_val_metrics_are_rows_and_not_repeated() -> None:
    rows = dict(summary_rows(a_summary(LONG_RUN)))
    assert "val_metrics" not in rows and "run_dir" not in rows  # run_dir is printed after the sample
    assert rows["val/accuracy"] == "0.8125"
    assert "val/loss" not in rows and rows["val_loss"] == "6.057"  # already the val_loss row


# ------------------------------------------------------------------------------ the progress bar


class _Tiny(L.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.layer = torch.nn.Linear(4, 1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = self.layer(batch[0]).pow(2).mean()
        self.log("train/loss", loss, prog_bar=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


class _Watch(L.Callback):
    """What the train bar shows after each micro-batch (runs after the bar's own hook)."""

    def __init__(self, bar: StepProgressBar) -> None:
        self.bar = bar
        self.seen: list[tuple[str, float, float | None]] = []

    def on_train_batch_end(self, trainer: L.Trainer, *args: Any) -> None:
        task = self.bar.train_progress_bar
        self.seen.append((task.description.strip(), task.completed, task.total))


@pytest.fixture
def rich_console() -> Any:
    """The bar draws on rich's global console: into a buffer here, restored afterwards."""
    buf = io.StringIO()
    yield {"file": buf, "force_terminal": False, "width": 100}, buf
    rich.reconfigure()


def test_progress_bar_counts_optimizer_steps_of_max_steps(rich_console: Any, tmp_path: Path) -> None:
    kwargs, buf = rich_console
    bar = StepProgressBar(console_kwargs=kwargs)
    watch = _Watch(bar)
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=3,
        max_epochs=-1,
        accumulate_grad_batches=2,  # two micro-batches per optimizer step
        callbacks=[bar, watch],
        logger=False,
        enable_checkpointing=False,
        enable_model_summary=False,
        limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    trainer.fit(_Tiny(), train_dataloaders=data)
    assert trainer.global_step == 3
    # After micro-batch k (1-based): k // 2 optimizer steps, of max_steps, never micro-batches.
    assert watch.seen == [(f"step {k // 2}/3", k // 2, 3) for k in range(1, 7)]
    final = buf.getvalue()
    assert "step 3/3" in final and "Epoch" not in final and "-2" not in final
    assert "train/loss" in final


@pytest.mark.filterwarnings("ignore:You're resuming from a checkpoint that ended before the epoch ended")
def test_progress_bar_resumed_run_starts_at_its_step(rich_console: Any, tmp_path: Path) -> None:
    """Continuing a run: the bar starts at the restored step, not at zero."""
    kwargs, _ = rich_console
    data = DataLoader(TensorDataset(torch.randn(64, 4)), batch_size=4)
    first = L.Trainer(
        accelerator="cpu", max_steps=2, max_epochs=-1, logger=False, enable_progress_bar=False, enable_checkpointing=False,
        enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path),
    )  # fmt: skip
    module = _Tiny()
    first.fit(module, train_dataloaders=data)
    ckpt = tmp_path / "two.ckpt"
    first.save_checkpoint(ckpt)

    bar = StepProgressBar(console_kwargs=kwargs)
    watch = _Watch(bar)
    second = L.Trainer(
        accelerator="cpu", max_steps=4, max_epochs=-1, logger=False, callbacks=[bar, watch],
        enable_checkpointing=False, enable_model_summary=False, limit_val_batches=0,
        default_root_dir=str(tmp_path),
    )  # fmt: skip
    second.fit(_Tiny(), train_dataloaders=data, ckpt_path=str(ckpt))
    assert watch.seen == [("step 3/4", 3, 4), ("step 4/4", 4, 4)]
