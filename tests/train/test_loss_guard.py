"""The loss guard: a NaN or a huge loss injected at a chosen step never reaches the weights.

skip leaves the weights and the optimizer's moments exactly as they were; rollback gives, bit
for bit, the run that never saw the offending data window (data.skip_steps, from the start);
stop ends with one report (exit code 5 from the CLI) and no checkpoint of the bad step.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.config import ConfigError, StrategyConfig, StrategyName, validate
from orchestra.train.callbacks.loss_guard import GUARD_FILE, TrainingDiverged
from orchestra.train.checkpoint import checkpoint_step
from orchestra.train.module import CausalLMModule
from orchestra.train.run import train
from tests.helpers import cli_overrides, tiny_config
from tests.train.test_run import column, read_metrics


@dataclasses.dataclass
class Injection:
    """Multiply the loss of every micro-batch of optimizer step ``step`` by ``factor``, on its first pass."""

    step: int
    factor: float
    fired_at: list[int] = dataclasses.field(default_factory=list)
    state: str = "armed"  # armed -> firing (during the step) -> done (a rollback's replay is clean)


@pytest.fixture
def inject(monkeypatch: pytest.MonkeyPatch) -> Iterator[list[Injection]]:
    """Faults to inject into the training loss at chosen steps."""
    faults: list[Injection] = []
    original = CausalLMModule.task_loss

    def task_loss(self: CausalLMModule, batch: Any) -> torch.Tensor:
        loss = original(self, batch)
        if not self.training:
            return loss
        for fault in faults:
            if fault.state == "armed" and self.global_step == fault.step:
                fault.state = "firing"
            if fault.state == "firing":
                if self.global_step == fault.step:
                    fault.fired_at.append(self.global_step)
                    return loss * fault.factor
                fault.state = "done"
        return loss

    monkeypatch.setattr(CausalLMModule, "task_loss", task_loss)
    yield faults


@pytest.fixture
def snapshots(monkeypatch: pytest.MonkeyPatch) -> dict[int, dict[str, Any]]:
    """Weights and AdamW step counts after each optimizer step, keyed by trainer.global_step."""
    taken: dict[int, dict[str, Any]] = {}

    def on_train_batch_end(self: CausalLMModule, outputs: Any, batch: Any, batch_idx: int) -> None:
        optimizer = self.trainer.optimizers[0]
        taken[int(self.global_step)] = {
            "weights": {n: p.detach().clone() for n, p in self.named_parameters()},
            "adam_steps": sorted({float(s["step"]) for s in optimizer.state.values() if "step" in s}),
        }

    monkeypatch.setattr(CausalLMModule, "on_train_batch_end", on_train_batch_end, raising=False)
    return taken


def guard_record(run_dir: Path) -> dict[str, Any]:
    return json.loads((run_dir / GUARD_FILE).read_text())


def same_weights(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_a_nan_step_is_skipped_and_leaves_weights_and_optimizer_untouched(
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
    inject: list[Injection],
    snapshots: dict[int, dict[str, Any]],
) -> None:
    inject.append(Injection(step=4, factor=math.nan))
    run = tmp_path / "run"
    result = train(tiny_config(corpus_dir, data_cache, run, max_steps=8, guard="skip"))

    # Step index 4 ran (global_step 4 -> 5) without an update; steps before and after did update.
    assert same_weights(snapshots[4]["weights"], snapshots[5]["weights"])
    assert snapshots[4]["adam_steps"] == snapshots[5]["adam_steps"] == [4.0]
    assert not same_weights(snapshots[5]["weights"], snapshots[6]["weights"])
    assert not same_weights(snapshots[3]["weights"], snapshots[4]["weights"])
    assert all(torch.isfinite(w).all() for w in snapshots[8]["weights"].values())
    record = guard_record(run)
    assert [(e["step"], e["data_step"], e["action"]) for e in record["events"]] == [(4, 4, "skip")]
    assert "NaN/Inf on 1 of 1" in record["events"][0]["reason"] and record["events"][0]["loss"] is None
    assert record["skip_steps"] == []
    assert result.summary["guard_events"] == 1 and result.summary["steps"] == 8
    assert math.isnan(float(column(read_metrics(run), "train/loss")[4]))
    assert math.isfinite(result.summary["val_loss"])


def test_a_huge_loss_is_a_spike_judged_against_the_running_mean(
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
    inject: list[Injection],
    snapshots: dict[int, dict[str, Any]],
) -> None:
    inject.append(Injection(step=6, factor=1000.0))
    run = tmp_path / "run"
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=8, guard="skip", guard_warmup_steps=3)
    train(cfg)
    (event,) = guard_record(run)["events"]
    assert event["step"] == 6 and "x the running mean" in event["reason"]
    assert event["loss"] > 100 * event["baseline"] > 0
    assert same_weights(snapshots[6]["weights"], snapshots[7]["weights"])


def test_rollback_gives_the_run_that_never_saw_the_window_bit_for_bit(
    corpus_dir: Path, data_cache: Path, tmp_path: Path, inject: list[Injection]
) -> None:
    common = {"max_steps": 12, "ckpt_every_n_steps": 5, "val_every_n_steps": 6}
    inject.append(Injection(step=7, factor=math.nan))
    rolled = tmp_path / "rolled"
    result = train(tiny_config(corpus_dir, data_cache, rolled, guard="rollback", **common))
    assert inject[0].fired_at == [7, 7]  # both micro-batches of the first pass; the replay is clean
    record = guard_record(rolled)
    assert [(e["step"], e["data_step"], e["action"]) for e in record["events"]] == [(7, 7, "rollback")]
    assert record["skip_steps"] == [7]

    inject.clear()
    reference = tmp_path / "reference"
    cfg = tiny_config(corpus_dir, data_cache, reference, **common)
    ref_result = train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_steps=[7])))

    for key in ("train/loss", "val/loss"):
        got, want = column(read_metrics(rolled), key), column(read_metrics(reference), key)
        assert got == want, key
    assert result.summary["steps"] == ref_result.summary["steps"] == 12
    assert result.module is not None and ref_result.module is not None
    assert same_weights(dict(result.module.state_dict()), dict(ref_result.module.state_dict()))
    # The checkpoints after the rollback carry the skipped step, so a resume from them skips it too.
    last = torch.load(rolled / "checkpoints" / "last.ckpt", weights_only=True)
    assert last["TokenDataModule"]["skip_steps"] == [7]


def test_rollback_with_a_wider_window_and_no_checkpoint_yet_starts_over_without_it(
    corpus_dir: Path, data_cache: Path, tmp_path: Path, inject: list[Injection]
) -> None:
    common = {"max_steps": 6, "ckpt_every_n_steps": 100, "val_every_n_steps": 100}
    inject.append(Injection(step=3, factor=math.inf))
    rolled = tmp_path / "rolled"
    train(tiny_config(corpus_dir, data_cache, rolled, guard="rollback", guard_window_steps=2, **common))
    assert guard_record(rolled)["skip_steps"] == [2, 3]

    inject.clear()
    reference = tmp_path / "reference"
    cfg = tiny_config(corpus_dir, data_cache, reference, **common)
    train(dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_steps=[2, 3])))
    assert column(read_metrics(rolled), "train/loss") == column(read_metrics(reference), "train/loss")


def test_stop_raises_one_report_and_keeps_no_checkpoint_of_the_bad_step(
    corpus_dir: Path, data_cache: Path, tmp_path: Path, inject: list[Injection]
) -> None:
    inject.append(Injection(step=6, factor=math.nan))
    run = tmp_path / "run"
    cfg = tiny_config(corpus_dir, data_cache, run, max_steps=10, ckpt_every_n_steps=3, guard="stop")
    with pytest.raises(
        TrainingDiverged, match=r"step 7: the loss is NaN/Inf on 1 of 1.*step0000006\.ckpt"
    ) as err:
        train(cfg)
    assert "data.skip_steps=[6]" in str(err.value)
    steps = sorted(checkpoint_step(p) for p in (run / "checkpoints").glob("*.ckpt"))
    assert max(steps) == 6, steps  # the checkpoints of steps 3 and 6, nothing after the bad step
    assert [e["action"] for e in guard_record(run)["events"]] == ["stop"]


def test_a_run_that_keeps_diverging_stops_after_max_events(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    # Every step after the warm-up is judged a spike (a factor far below 1): two are skipped, the third stops.
    run = tmp_path / "run"
    cfg = tiny_config(
        corpus_dir,
        data_cache,
        run,
        max_steps=10,
        guard="skip",
        guard_spike_factor=1e-3,
        guard_warmup_steps=2,
        guard_max_events=2,
    )
    with pytest.raises(TrainingDiverged, match=r"step 5: .*2 guard events, trainer.guard_max_events=2"):
        train(cfg)
    events = guard_record(run)["events"]
    assert [(e["step"], e["action"]) for e in events] == [(2, "skip"), (3, "skip"), (4, "stop")]


def test_the_cli_exits_5_with_the_report(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    overrides = cli_overrides(
        corpus_dir,
        data_cache,
        run,
        **{
            "trainer.max_steps": 6,
            "trainer.guard": "stop",
            "trainer.guard_spike_factor": 1e-3,
            "trainer.guard_warmup_steps": 2,
        },
    )
    proc = subprocess.run(
        [sys.executable, "-m", "orchestra.cli.train", *overrides],
        capture_output=True,
        text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        timeout=300,
    )
    assert proc.returncode == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    out = proc.stdout + proc.stderr
    assert "loss guard stopped the run at step 3" in out and "Traceback" not in out


@pytest.mark.parametrize(
    ("changes", "key"),
    [
        ({"guard": "sometimes"}, "trainer.guard"),
        ({"guard_spike_factor": -1.0}, "trainer.guard_spike_factor"),
        ({"guard_window_steps": 0}, "trainer.guard_window_steps"),
        ({"guard_max_events": 0}, "trainer.guard_max_events"),
    ],
)
def test_bad_guard_settings_are_named(
    changes: dict[str, Any], key: str, corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path, **changes)
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate(cfg)


def test_skip_is_refused_under_deepspeed_and_auto_rolls_back(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    from orchestra.train.callbacks.loss_guard import resolve_action

    cfg = tiny_config(corpus_dir, data_cache, tmp_path, guard="skip", precision="32-true")
    cfg = dataclasses.replace(cfg, strategy=StrategyConfig(name=StrategyName.deepspeed_zero2))
    with pytest.raises(ConfigError, match=r"trainer\.guard.*DeepSpeed"):
        validate(cfg)
    assert resolve_action("auto", deepspeed=True) == "rollback"
    assert resolve_action("auto", deepspeed=False) == "skip"


def test_bad_skip_steps_are_named(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path)
    cfg = dataclasses.replace(cfg, data=dataclasses.replace(cfg.data, skip_steps=[3, -1]))
    with pytest.raises(ConfigError, match=r"data\.skip_steps.*\[-1\]"):
        validate(cfg)
