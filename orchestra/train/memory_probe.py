"""trainer.memory_probe: the micro-batch and the recomputation a run trains with, from measured memory.

Before training, a throwaway copy of the run's model (its task, fine-tuning method, precision
and optimizer) takes real steps on random tokens of the run's row length, on the device the run
trains on, and the peak memory of each is measured. The choice is the least recomputation that
fits (none, then every second block, then every block) and, with it, the largest micro-batch that
divides the global batch and fits the budget. Recomputation costs a third more compute per
recomputed block, so it is only taken where memory needs it.

Why not torch or Lightning's own: Lightning's batch-size finder doubles a dataloader's batch
until CUDA runs out of memory, which changes the global batch (the optimization itself) and knows
nothing of recomputation; here the global batch stays and only its split changes.

What a measurement is: the steady state of a step, i.e. the second of two accumulated
micro-batches (the first one's gradients held, AdamW's states created), through the optimizer
step. On CUDA the allocator's peak reserved bytes (what an out-of-memory error is about); on CPU,
torch's MemTracker over the same step. Two micro-batch sizes are measured per recomputation
choice, the line through them proposes the largest that fits, and that one is measured too
(and smaller ones until one fits), so every choice rests on a measurement, never on the line
alone. The result is logged, written to ``memory_probe.json`` in the run dir, and kept by a
resume of that run (the same split, so the resumed run continues the same computation).
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import torch

from orchestra.config import (
    ActivationCheckpointing,
    ConfigError,
    StrategyName,
    TrainConfig,
    accumulation_steps,
    data_parallel_size,
)
from orchestra.io import atomic_write_text
from orchestra.train.plan import RunPlan

log = logging.getLogger(__name__)

PROBE_FILE = "memory_probe.json"
# Recomputation in the order it is tried: the cheapest first.
MODES = (ActivationCheckpointing.none, ActivationCheckpointing.every_k, ActivationCheckpointing.full)
GIB = 1024**3


@dataclass(frozen=True)
class Measurement:
    """One probed step: its recomputation, micro-batch and peak bytes (None: out of memory)."""

    activation_checkpointing: str
    micro_batch_size: int
    peak_bytes: int | None

    def fits(self, budget: int) -> bool:
        return self.peak_bytes is not None and self.peak_bytes <= budget


@dataclass(frozen=True)
class ProbeResult:
    """What the probe chose, on which device and budget, and every measurement behind it."""

    device: str
    budget_bytes: int
    micro_batch_size: int
    activation_checkpointing: str
    ac_every_k: int
    measurements: list[Measurement]

    def table(self) -> str:
        rows = [f"memory probe on {self.device}, budget {self.budget_bytes / GIB:.2f} GiB:"]
        for m in self.measurements:
            peak = "out of memory" if m.peak_bytes is None else f"{m.peak_bytes / GIB:.3f} GiB"
            fits = "fits" if m.fits(self.budget_bytes) else "too large"
            rows.append(
                f"  recompute={m.activation_checkpointing:<8} micro_batch={m.micro_batch_size:<4} {peak} ({fits})"
            )
        rows.append(
            f"  chosen: trainer.micro_batch_size={self.micro_batch_size} "
            f"strategy.activation_checkpointing={self.activation_checkpointing}"
        )
        return "\n".join(rows)

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1) + "\n"


def check_probe(cfg: TrainConfig, model_parallel_loss: bool) -> None:
    """Where the probe can measure the run: one device, a task whose loss is the decoder's own."""
    if not cfg.trainer.memory_probe:
        return
    if cfg.strategy.name != StrategyName.single:
        raise ConfigError(
            f"trainer.memory_probe: measures one device's run, strategy=single (got strategy={cfg.strategy.name.value}); "
            "size sharded runs with orchestra-plan"
        )
    if not model_parallel_loss:
        raise ConfigError(
            f"trainer.memory_probe: task={cfg.task.name} has its own head or a second model; the probe "
            "measures the decoder's next-token loss (task=pretrain or sft)"
        )


def candidates(global_batch: int, data_parallel: int) -> list[int]:
    """Micro-batch sizes that split each rank's share of the global batch evenly, smallest first."""
    share = global_batch // data_parallel
    return [n for n in range(1, share + 1) if share % n == 0]


def choose(
    sizes: list[int],
    measure: Callable[[ActivationCheckpointing, int], int | None],
    budget: int,
) -> tuple[ActivationCheckpointing, int, list[Measurement]]:
    """The least recomputation that fits, with its largest fitting micro-batch (see the module doc)."""
    measured: list[Measurement] = []
    cache: dict[tuple[ActivationCheckpointing, int], int | None] = {}

    def peak(mode: ActivationCheckpointing, size: int) -> int | None:
        if (mode, size) not in cache:
            cache[mode, size] = measure(mode, size)
            measured.append(Measurement(mode.value, size, cache[mode, size]))
        return cache[mode, size]

    def fits(mode: ActivationCheckpointing, size: int) -> bool:
        value = peak(mode, size)
        return value is not None and value <= budget

    for mode in MODES:
        if not fits(mode, sizes[0]):
            continue
        best = sizes[0]
        if len(sizes) > 1 and fits(mode, sizes[1]):
            best = sizes[1]
            first, second = peak(mode, sizes[0]), peak(mode, sizes[1])
            assert first is not None and second is not None
            # Activations grow linearly with the micro-batch; the rest (weights, gradients,
            # optimizer states) does not. The line proposes; only measurements decide.
            per_row = max(1.0, (second - first) / (sizes[1] - sizes[0]))
            reach = sizes[0] + (budget - first) / per_row
            for size in sorted((n for n in sizes if best < n <= reach), reverse=True):
                if fits(mode, size):
                    best = size
                    break
            for size in (n for n in sizes if n > best):  # past the line too, up to the first misfit
                if not fits(mode, size):
                    break
                best = size
        return mode, best, measured
    smallest = peak(MODES[-1], sizes[0])
    need = "out of memory" if smallest is None else f"{smallest / GIB:.2f} GiB"
    raise ConfigError(
        f"trainer.memory_probe: even micro-batch {sizes[0]} with full recomputation does not fit "
        f"({need} against a budget of {budget / GIB:.2f} GiB); shard the model (strategy=fsdp), "
        "shorten the rows, or raise trainer.memory_budget_gb"
    )


def probe_plan(plan: RunPlan) -> RunPlan:
    """The plan with the probe's micro-batch and recomputation (a resume keeps its first choice)."""
    cfg = plan.config
    path = plan.run_dir / PROBE_FILE
    if plan.resume_path is not None and path.is_file():
        result = read_result(path)
        log.info("memory probe: resuming with the first start's choice (%s)", path)
    else:
        device = _device(cfg)
        budget = _budget(cfg, device)
        sizes = candidates(cfg.trainer.global_batch_size, data_parallel_size(cfg))
        mode, size, measured = choose(sizes, _Prober(plan, device).measure, budget)
        result = ProbeResult(
            device=str(device),
            budget_bytes=budget,
            micro_batch_size=size,
            activation_checkpointing=mode.value,
            ac_every_k=cfg.strategy.ac_every_k,
            measurements=measured,
        )
        plan.run_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(path, result.to_json())
    log.info("%s", result.table())
    trainer = replace(cfg.trainer, micro_batch_size=result.micro_batch_size)
    strategy = replace(
        cfg.strategy,
        activation_checkpointing=ActivationCheckpointing(result.activation_checkpointing),
        ac_every_k=result.ac_every_k,
    )
    cfg = replace(cfg, trainer=trainer, strategy=strategy)
    return replace(plan, config=cfg, accumulation=accumulation_steps(cfg.trainer, data_parallel_size(cfg)))


def read_result(path: Path) -> ProbeResult:
    try:
        data = json.loads(path.read_text())
        data["measurements"] = [Measurement(**m) for m in data["measurements"]]
        return ProbeResult(**data)
    except (OSError, ValueError, TypeError, KeyError) as err:
        raise ConfigError(
            f"trainer.memory_probe: {path} is unreadable ({err}); delete it to probe again"
        ) from err


def _device(cfg: TrainConfig) -> torch.device:
    if cfg.trainer.accelerator in ("auto", "gpu", "cuda") and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _budget(cfg: TrainConfig, device: torch.device) -> int:
    """trainer.memory_budget_gb, or the device's free memory less trainer.memory_headroom of its total."""
    if cfg.trainer.memory_budget_gb is not None:
        return int(cfg.trainer.memory_budget_gb * GIB)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
    else:
        import psutil

        memory = psutil.virtual_memory()
        free, total = memory.available, memory.total
    return int(free - cfg.trainer.memory_headroom * total)


class _Prober:
    """Builds the run's model once per recomputation choice and measures steps of it."""

    def __init__(self, plan: RunPlan, device: torch.device) -> None:
        self.plan = plan
        self.device = device
        self.mode: ActivationCheckpointing | None = None
        self.module: Any = None
        self.optimizer: torch.optim.Optimizer | None = None

    def measure(self, mode: ActivationCheckpointing, size: int) -> int | None:
        if mode != self.mode:
            self._release()
            self._build(mode)
        try:
            return self._peak(size)
        except torch.cuda.OutOfMemoryError:
            return None
        finally:
            self._clear()

    def _build(self, mode: ActivationCheckpointing) -> None:
        """The run's LightningModule and model, as configure_model builds them, with ``mode``."""
        from orchestra.train.optim import build_optimizer

        cfg = self.plan.config
        # Eager and uncompiled: compile's graphs would be traced once per probed shape.
        strategy = replace(cfg.strategy, activation_checkpointing=mode, compile=False, cuda_graphs=False)
        plan = replace(self.plan, config=replace(cfg, strategy=strategy))
        module = plan.task.module(plan, None)
        module.configure_model()
        net = module.net
        if self.plan.precision in ("bf16-true", "16-true"):
            net.to(torch.bfloat16 if self.plan.precision.startswith("bf16") else torch.float16)
        net.to(self.device)
        net.train()
        self.module, self.mode = module, mode
        self.optimizer = build_optimizer(net, cfg.optim)

    def _batch(self, size: int) -> Any:
        vocab, seq = self.plan.vocab_size, self.plan.seq_len
        gen = torch.Generator(device="cpu").manual_seed(size)
        tokens = torch.randint(0, vocab, (size, seq), generator=gen).to(self.device)
        labels = torch.randint(0, vocab, (size, seq), generator=gen).to(self.device)
        if self.plan.task.full_rows:  # the packed corpus's (inputs, targets) batches
            return tokens, labels
        # Conversations: a packed row is one document here; its dense mask is held the same.
        return {"tokens": tokens, "labels": labels, "segment_ids": torch.zeros_like(tokens)}

    def _micro_batch(self, size: int) -> None:
        with self._precision():
            loss = self.module.task_loss(self._batch(size))
        loss.backward()

    def _peak(self, size: int) -> int:
        """Peak bytes of a step's second micro-batch and the optimizer step (the steady state)."""
        optimizer = self.optimizer
        assert optimizer is not None
        self._micro_batch(size)  # a first step creates AdamW's states
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        self._micro_batch(size)  # the first of two accumulated micro-batches: its gradients stay
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
            torch.cuda.reset_peak_memory_stats(self.device)
            self._micro_batch(size)
            optimizer.step()
            torch.cuda.synchronize(self.device)
            return int(torch.cuda.max_memory_reserved(self.device))
        from torch.distributed._tools.mem_tracker import MemTracker

        tracker = MemTracker()
        tracker.track_external(self.module.net, optimizer)
        with tracker:
            self._micro_batch(size)
            optimizer.step()
        return int(tracker.get_tracker_snapshot("peak")[self.device]["Total"])

    @contextlib.contextmanager
    def _precision(self) -> Iterator[None]:
        """Lightning's mixed precision: autocast around the forward only."""
        precision = self.plan.precision
        if precision in ("bf16-mixed", "16-mixed"):
            dtype = torch.bfloat16 if precision.startswith("bf16") else torch.float16
            with torch.autocast(self.device.type, dtype=dtype):
                yield
        else:
            yield

    def _clear(self) -> None:
        if self.optimizer is not None:
            self.optimizer.zero_grad(set_to_none=True)
        gc.collect()
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def _release(self) -> None:
        """Drop the model and optimizer of the previous choice before building the next."""
        self.module, self.optimizer, self.mode = None, None, None
        self._clear()
