"""Loss guard: a step whose loss is NaN/Inf on any rank, or spikes, never reaches the weights.

At every optimizer step, after the backward and before the optimizer, each rank puts its step
loss and whether its loss and gradients are finite into one small all-reduce. Every rank gets
the same verdict, so all of them act at the same step: a rank deciding alone would leave the
others waiting in the next collective, or let the replicas drift apart.

The actions (``trainer.guard``):

- ``skip``: the step's gradients are dropped, so the optimizer leaves the weights and its
  moments as they were; the step still counts (its data is consumed, the schedule moves on).
- ``rollback``: no checkpoint is written from here on; the trainer stops at the end of the step,
  and :func:`orchestra.train.run.train` reloads the newest checkpoint and trains on with the
  offending data window (``trainer.guard_window_steps`` data steps ending with this one)
  skipped. The result is the run that never saw that window, bit for bit.
- ``stop``: the same stop, then :class:`TrainingDiverged` (exit code 5, not requeued).

Every event goes to the run dir's ``guard.json`` (rank zero writes it), which also holds the
data steps rollbacks skip, so a requeued job skips them too. A run allowed
``trainer.guard_max_events`` events stops at the next one: a run that keeps diverging needs a
person, not more skipping.

A spike is a step loss above ``guard_spike_factor`` times the running mean (an exponential
average with decay 0.9) of the accepted steps, judged once ``guard_warmup_steps`` steps were
accepted; the running mean is checkpointed, so a resumed run judges exactly as an uninterrupted
one.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import Callback
from torch.distributed.tensor import DTensor

from orchestra.data.dataset import data_step
from orchestra.io import atomic_write_text

GUARD_FILE = "guard.json"
GUARD_FORMAT = 1
# Distinct from 3 and 4 (requeued): training again would only diverge again.
DIVERGED_EXIT_CODE = 5
EMA_DECAY = 0.9


class TrainingDiverged(RuntimeError):
    """The loss guard stopped the run; the message says where, why and how to go on."""


@dataclass(frozen=True)
class GuardEvent:
    """One step the guard stopped from reaching the weights."""

    step: int  # optimizer steps done before this one (the checkpoint of it would be step+1)
    data_step: int  # the data step (global batch of the stream) it read
    loss: float | None  # mean over ranks; None when some rank's loss was not finite
    baseline: float | None  # running mean of the accepted steps
    reason: str
    action: str


@dataclass
class GuardRecord:
    """guard.json: the events of a run dir and the data steps its rollbacks skip."""

    events: list[GuardEvent]
    skip_steps: list[int]

    @classmethod
    def read(cls, path: Path) -> GuardRecord:
        if not path.is_file():
            return cls([], [])
        try:
            data = json.loads(path.read_text())
            if data.get("format") != GUARD_FORMAT:
                raise ValueError(f"format {data.get('format')!r}, this version reads {GUARD_FORMAT}")
            events = [GuardEvent(**e) for e in data["events"]]
            return cls(events, sorted({int(s) for s in data["skip_steps"]}))
        except (OSError, ValueError, KeyError, TypeError) as err:
            from orchestra.config import ConfigError

            raise ConfigError(
                f"{path} is unreadable ({err}); it records the loss guard's events and skipped data "
                "steps: restore it, or move it away to resume without them"
            ) from err

    def write(self, path: Path) -> None:
        data = {
            "format": GUARD_FORMAT,
            "events": [asdict(e) for e in self.events],
            "skip_steps": self.skip_steps,
        }
        atomic_write_text(path, json.dumps(data, indent=1) + "\n")


def resolve_action(action: str, deepspeed: bool) -> str:
    """``auto`` is skip, except under DeepSpeed (its engine owns the gradients): rollback."""
    if action != "auto":
        return action
    return "rollback" if deepspeed else "skip"


class LossGuard(Callback):
    """See the module docstring.

    Args:
        action: skip, rollback, stop or off (``auto`` resolved by :func:`resolve_action`).
        record_path: the run dir's guard.json.
        skip_steps: the data steps this run already skips (to map a step to its data step).
        pause_checkpoints: called once the run must write no more checkpoints (rollback, stop).
        fresh: a run from step 0 that is not a rollback: the dir's earlier record is cleared.
    """

    def __init__(
        self,
        action: str,
        spike_factor: float,
        warmup_steps: int,
        window_steps: int,
        max_events: int,
        record_path: str | Path,
        skip_steps: tuple[int, ...] = (),
        pause_checkpoints: Callable[[str], None] | None = None,
        fresh: bool = False,
    ) -> None:
        self.action = action
        self.spike_factor, self.warmup_steps = spike_factor, warmup_steps
        self.window_steps, self.max_events = window_steps, max_events
        self.record_path = Path(record_path)
        self.skip_steps = tuple(sorted(set(skip_steps)))  # used when the data module has no plan
        self.pause_checkpoints = pause_checkpoints
        self.fresh = fresh
        self.ema: float | None = None
        self.accepted = 0
        self.tripped: GuardEvent | None = None
        self.record = GuardRecord([], [])

    # ------------------------------------------------------------------ state

    def state_dict(self) -> dict[str, Any]:
        return {"ema": self.ema, "accepted": self.accepted}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        ema = state_dict.get("ema")
        self.ema = float(ema) if ema is not None else None
        self.accepted = int(state_dict.get("accepted", 0))

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if stage != "fit":
            return
        self.record = GuardRecord([], []) if self.fresh else GuardRecord.read(self.record_path)
        if self.fresh and trainer.is_global_zero and self.record_path.exists():
            self.record.write(self.record_path)

    # ------------------------------------------------------------------ the check

    def on_before_optimizer_step(
        self, trainer: L.Trainer, pl_module: L.LightningModule, optimizer: torch.optim.Optimizer
    ) -> None:
        if self.action == "off":
            return
        loss = getattr(pl_module, "step_loss", None)
        if loss is None:  # not the last micro-batch of a step (DeepSpeed calls this on each)
            return
        pl_module.step_loss = None
        grads = [p.grad for p in pl_module.parameters() if p.grad is not None]
        local = torch.zeros(3, dtype=torch.float64, device=loss.device)
        finite = bool(torch.isfinite(loss))
        local[0] = loss.double() if finite else 0.0
        local[1] = 0.0 if finite else 1.0
        if grads:
            shards = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            norm = torch.nn.utils.get_total_norm(shards)
            local[2] = 0.0 if bool(torch.isfinite(norm)) else 1.0
        total = trainer.strategy.reduce(local, reduce_op="sum")
        world = max(1, trainer.world_size)
        bad_loss, bad_grads = int(total[1].item()), int(total[2].item())
        mean = float(total[0].item()) / world if bad_loss == 0 else None
        reason = None
        if bad_loss:
            reason = f"the loss is NaN/Inf on {bad_loss} of {world} rank(s)"
        elif bad_grads:
            reason = f"the gradients hold NaN/Inf on {bad_grads} of {world} rank(s) (the loss is {mean:.4g})"
        elif (
            mean is not None
            and self.ema is not None
            and self.spike_factor > 0
            and self.accepted >= self.warmup_steps
            and mean > self.spike_factor * self.ema
        ):
            reason = (
                f"the loss {mean:.4g} is {mean / self.ema:.1f}x the running mean {self.ema:.4g} "
                f"(trainer.guard_spike_factor={self.spike_factor:g})"
            )
        if reason is None:
            assert mean is not None
            self.ema = mean if self.ema is None else EMA_DECAY * self.ema + (1 - EMA_DECAY) * mean
            self.accepted += 1
            return
        self._trip(trainer, pl_module, mean, reason)

    def _trip(
        self, trainer: L.Trainer, pl_module: L.LightningModule, loss: float | None, reason: str
    ) -> None:
        step = int(trainer.global_step)
        skips = getattr(getattr(trainer.datamodule, "plan", None), "skip_steps", self.skip_steps)
        data = data_step(step, tuple(skips))
        # A requeued run replaying a step it already judged replaces that event, not adds one.
        earlier = [e for e in self.record.events if (e.step, e.data_step) != (step, data)]
        action = self.action if len(earlier) < self.max_events else "stop"
        event = GuardEvent(step, data, loss, self.ema, reason, action)
        # Dropping the gradients keeps the optimizer off the weights (AdamW skips a parameter
        # without one); under DeepSpeed the engine's own copy still steps, a rollback undoes it.
        for p in pl_module.parameters():
            p.grad = None
        self.record.events = [*earlier, event]
        if action == "rollback":
            first = max(event.data_step - self.window_steps + 1, 0)
            window = [d for d in range(first, event.data_step + 1)]
            self.record.skip_steps = sorted(set(self.record.skip_steps) | set(window))
        if trainer.is_global_zero:
            self.record.write(self.record_path)
        logging.getLogger(__name__).warning(
            "loss guard at step %d (data step %d): %s; %s", step + 1, event.data_step, reason, action
        )
        pl_module.log("train/guard_events", float(len(self.record.events)), on_step=True, on_epoch=False)
        if action == "skip":
            return
        self.tripped = event
        if self.pause_checkpoints is not None:
            self.pause_checkpoints(f"loss guard: {reason}")
        trainer.should_stop = True

    def report(self, newest_checkpoint: Path | None) -> str:
        """The message of a stop: where, why, and how to go on past it."""
        event = self.tripped
        assert event is not None
        limit = (
            f" (the run had {len(self.record.events) - 1} guard events, trainer.guard_max_events="
            f"{self.max_events})"
            if self.action != "stop"
            else ""
        )
        where = (
            f"the newest good checkpoint is {newest_checkpoint}" if newest_checkpoint else "no checkpoint yet"
        )
        loss = f"{event.loss:.4g}" if event.loss is not None and math.isfinite(event.loss) else "NaN/Inf"
        return (
            f"loss guard stopped the run at step {event.step + 1}: {event.reason}{limit}; loss {loss}, "
            f"events in {self.record_path}; {where}. To train past this data, resume with "
            f"data.skip_steps=[{event.data_step}] (or trainer.guard=rollback); to tolerate it, raise "
            "trainer.guard_spike_factor or set trainer.guard=off"
        )
