"""Tokens/s, TFLOP/s per device, MFU/HFU, peak memory and time spent waiting for data.

Lightning ships a ThroughputMonitor, but its MFU comes from its own (NVIDIA-only) device table
and it cannot tell model FLOPs from hardware FLOPs; this callback follows the project's MFU
contract (6N + attention over a table or config peak, see orchestra.train.flops).

Every rank times its own window; the slowest rank sets the pace of a synchronous step, so the
window time is reduced with MAX before tokens/s is computed. That makes ``perf/tokens_per_s`` the
global rate (all ranks' tokens over the wall time they took), the same number on every rank.
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Sequence
from typing import Any

import lightning as L
import torch
import torch.distributed as dist
from lightning.pytorch.utilities import rank_zero_warn

from orchestra.train.flops import device_peak_flops, precision_dtype


def reduce_across_ranks(values: Sequence[float], op: str, device: torch.device) -> list[float]:
    """Element-wise ``sum`` or ``max`` over all ranks in one collective; identity without a group.

    ``device`` must suit the process group's backend (the strategy's root device does: CUDA for
    NCCL, CPU for gloo). float64 keeps small energy readings (kWh) exact through the sum.
    """
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return [float(v) for v in values]
    tensor = torch.tensor(list(values), dtype=torch.float64, device=device)
    dist.all_reduce(tensor, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX}[op])
    return tensor.tolist()


def _host_peak_rss_gb() -> float:
    """Peak resident memory of this process (ru_maxrss is KiB on Linux, bytes on macOS)."""
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return rss / (2**30 if sys.platform == "darwin" else 2**20)


class ThroughputCallback(L.Callback):
    def __init__(
        self,
        tokens_per_step: int | None,
        flops_per_token: float,
        log_every_n_steps: int,
        peak_flops: float | None = None,
        recompute_factor: float = 1.0,
    ) -> None:
        """``recompute_factor`` > 1 when activation checkpointing recomputes the forward (HFU).

        ``tokens_per_step=None`` counts the token positions of every batch instead (fine-tuning
        batches are padded to their longest example, so their size varies), summed over ranks.
        """
        self.tokens_per_step = tokens_per_step
        self.flops_per_token = flops_per_token
        self.log_every_n_steps = log_every_n_steps
        self.peak_override = peak_flops
        self.recompute_factor = recompute_factor
        self.peak: float | None = None
        self._window_start: float | None = None
        self._window_steps = 0
        self._window_tokens = 0
        self._data_wait = 0.0
        self._batch_end: float | None = None
        self._last_step = -1
        self.train_seconds = 0.0
        self.train_steps = 0
        self.train_tokens = 0.0  # every rank's token positions in the measured windows
        self.last: dict[str, float] = {}
        self._world = 1
        self._replicas = 1
        self._paused_at: float | None = None

    def on_fit_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        from orchestra.data.datamodule import sampler_kwargs

        self._world = trainer.world_size
        # Ranks that read the same batches (a tensor- or context-parallel group) count each once.
        kwargs = sampler_kwargs(trainer)
        self._replicas = max(1, trainer.world_size // kwargs["num_replicas"]) if kwargs else 1
        if self.peak_override is not None:
            self.peak = self.peak_override
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            name = torch.cuda.get_device_name(device)
            units = torch.cuda.get_device_properties(device).multi_processor_count
            dtype = precision_dtype(str(trainer.precision))
            self.peak = device_peak_flops(name, dtype, units)
            if self.peak is None:
                rank_zero_warn(
                    f"MFU: no peak FLOP/s known for {name!r} in {dtype} (precision {trainer.precision}); "
                    "MFU/HFU are not reported. Set trainer.peak_flops=<dense FLOP/s per device> from "
                    "the data sheet to get them."
                )
        else:
            rank_zero_warn(
                f"MFU: no peak FLOP/s for device type {device.type!r}; MFU is not reported "
                "unless trainer.peak_flops is set."
            )

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        now = time.perf_counter()
        if self._batch_end is not None:
            self._data_wait += now - self._batch_end
        if self._window_start is None:
            self._window_start = now
            self._last_step = trainer.global_step

    def on_train_batch_end(
        self, trainer: L.Trainer, pl_module: L.LightningModule, outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self.tokens_per_step is None:
            tokens = batch["tokens"] if isinstance(batch, dict) else batch[0]
            self._window_tokens += int(tokens.numel())
        step = trainer.global_step
        if step != self._last_step:  # an optimizer step happened in this batch
            self._window_steps += step - self._last_step
            self._last_step = step
            # On Lightning's own logging steps (global_step % log_every_n_steps == 0), so the values
            # reach the loggers at the step they describe, also after a resume at an odd step.
            if step % self.log_every_n_steps == 0:
                self._flush(trainer, pl_module)
        self._batch_end = time.perf_counter()

    def on_validation_start(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        self._paused_at = time.perf_counter()

    def on_validation_end(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        # Validation is not training throughput: shift the window past it.
        if self._paused_at is not None and self._window_start is not None:
            self._window_start += time.perf_counter() - self._paused_at
        self._paused_at = None
        self._batch_end = None

    def _flush(self, trainer: L.Trainer, pl_module: L.LightningModule) -> None:
        device = trainer.strategy.root_device
        on_cuda = device.type == "cuda"
        if on_cuda:
            torch.cuda.synchronize(device)
        now = time.perf_counter()
        assert self._window_start is not None
        local = [
            max(now - self._window_start, 1e-9),
            self._data_wait,
            torch.cuda.max_memory_allocated(device) / 2**30 if on_cuda else 0.0,
            torch.cuda.max_memory_reserved(device) / 2**30 if on_cuda else 0.0,
            _host_peak_rss_gb(),
        ]
        # One collective for everything: the slowest rank's window, the hungriest rank's memory.
        elapsed, data_wait, peak_mem, reserved, host_rss = reduce_across_ranks(local, "max", device)
        self.train_seconds += elapsed
        self.train_steps += self._window_steps
        world = trainer.world_size
        if self.tokens_per_step is None:
            (window_tokens,) = reduce_across_ranks([self._window_tokens], "sum", device)
            window_tokens /= self._replicas
        else:
            window_tokens = self._window_steps * self.tokens_per_step
        self.train_tokens += window_tokens
        tokens_per_s = window_tokens / elapsed
        model_flops_per_device = tokens_per_s * self.flops_per_token / world
        metrics = {
            "perf/tokens_per_s": tokens_per_s,
            "perf/tokens_per_s_per_device": tokens_per_s / world,
            "perf/tflops_per_device": model_flops_per_device / 1e12,
            "perf/data_wait_frac": data_wait / elapsed,
            "system/host_peak_rss_gb": host_rss,
        }
        if self.peak:
            metrics["perf/mfu"] = model_flops_per_device / self.peak
            metrics["perf/hfu"] = metrics["perf/mfu"] * self.recompute_factor
        if on_cuda:
            metrics["perf/peak_mem_gb"] = peak_mem
            metrics["system/gpu_mem_reserved_gb"] = reserved
        self.last = metrics
        for key, value in metrics.items():
            pl_module.log(key, value, on_step=True, on_epoch=False, rank_zero_only=True)
        self._window_start = now  # the collective and logging belong to the next window's wall time
        self._window_steps = 0
        self._window_tokens = 0
        self._data_wait = 0.0

    def summary(self) -> dict[str, float | None]:
        """Mean throughput over the whole run (measured windows only)."""
        if self.train_seconds == 0:
            return {"tokens_per_s": None, "mfu": None, "tokens": None}
        tokens_per_s = self.train_tokens / self.train_seconds
        return {
            "tokens": self.train_tokens,
            "tokens_per_s": tokens_per_s,
            "mfu": None if not self.peak else tokens_per_s * self.flops_per_token / self._world / self.peak,
        }
