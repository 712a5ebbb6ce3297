"""Pipeline parallelism (``strategy.pp``): the decoder cut into stages by layers, run by torch's schedules.

The model stays the one from orchestra.model; this file only decides which rank holds which
layers and drives torch.distributed.pipelining over them:

- :func:`split_layers` cuts the blocks into contiguous stages whose parameter counts are as
  even as possible, with the input embedding counted on the first stage and the output
  projection on the last (parameters measure both the weight, gradient and optimizer memory of
  a stage and, for blocks and the head, its matmul work).
- :func:`split_decoder` keeps a rank's pieces in the decoder itself, under their own names
  (``layers`` becomes a ModuleDict keyed by the layer index), so its state dict has exactly the
  keys an unsplit model has: checkpoints reshard between layouts with DCP, and export needs no
  renaming. Each stage is a :class:`StageModule` view over those pieces.
- :class:`Pipeline` runs one optimizer step's micro-batches through a schedule (1F1B,
  interleaved 1F1B, looped BFS, zero-bubble, DualPipeV) and evaluates forward-only; the loss of
  each micro-batch is the mean token cross-entropy, and the schedule divides gradients by the
  number of micro-batches, so a step equals gradient accumulation over the same rows.

The last stage turns hidden states into logits and the loss is taken from them: a schedule
calls the loss outside the stage's forward, where a sharded output projection is not gathered,
so the fused linear + cross-entropy kernel cannot run there. The last stage holds one
micro-batch's [rows, tokens, vocab] logits at a time.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from orchestra.config import IGNORE_INDEX, PP_V_SCHEDULES, ConfigError
from orchestra.model.transformer import Transformer


def split_layers(block_costs: list[int], first_extra: int, last_extra: int, n_stages: int) -> list[range]:
    """Contiguous layer ranges, one per stage, minimising the costliest stage.

    ``first_extra`` is added to the first stage (the input embedding) and ``last_extra`` to the
    last (final norm and output projection). Every stage gets at least one block. Exact dynamic
    programming over the cut points: the layer counts are small.
    """
    n = len(block_costs)
    if not 1 <= n_stages <= n:
        raise ValueError(f"cannot split {n} layers into {n_stages} stages of at least one layer each")
    prefix = [0]
    for cost in block_costs:
        prefix.append(prefix[-1] + cost)

    def cost(stage: int, start: int, stop: int) -> int:
        extra = (first_extra if stage == 0 else 0) + (last_extra if stage == n_stages - 1 else 0)
        return prefix[stop] - prefix[start] + extra

    inf = float("inf")
    # best[s][i]: the smallest max stage cost of putting layers [0, i) into stages 0..s-1.
    best = [[inf] * (n + 1) for _ in range(n_stages + 1)]
    cut = [[0] * (n + 1) for _ in range(n_stages + 1)]
    best[0][0] = 0
    for s in range(1, n_stages + 1):
        for i in range(s, n - (n_stages - s) + 1):
            for j in range(s - 1, i):
                value = max(best[s - 1][j], cost(s - 1, j, i))
                if value < best[s][i]:
                    best[s][i], cut[s][i] = value, j
    bounds, stop = [], n
    for s in range(n_stages, 0, -1):
        start = cut[s][stop]
        bounds.append(range(start, stop))
        stop = start
    return bounds[::-1]


def stage_ids(pp_rank: int, pp: int, stages_per_rank: int, schedule: str) -> list[int]:
    """The stages a pipeline rank holds: looped (r, r + pp, ...) or, for V schedules, r and 2·pp-1-r."""
    if schedule in PP_V_SCHEDULES:
        return [pp_rank, 2 * pp - 1 - pp_rank]
    return [pp_rank + k * pp for k in range(stages_per_rank)]


class StageModule(nn.Module):
    """One pipeline stage: a view over the decoder's own embedding, blocks, norm and head.

    The first stage takes token ids, the others the previous stage's hidden states; the last
    returns fp32 logits (soft-capped where the model caps them), the others hidden states.
    ``segment_ids`` (packed rows) reach every stage, so each rebuilds the same attention mask.
    """

    def __init__(self, decoder: Transformer, layers: range, first: bool, last: bool) -> None:
        super().__init__()
        self.tok_embeddings = decoder.tok_embeddings if first else None
        self.layers = nn.ModuleDict({str(i): decoder.layers[str(i)] for i in layers})  # type: ignore[index]
        self.norm = decoder.norm if last else None
        self.lm_head = decoder.lm_head if last else None
        # The decoder owns the RoPE tables and moves them with the LightningModule; kept in a
        # list so it is not registered as a submodule of its own stage.
        self._decoder = [decoder]

    def forward(self, x: torch.Tensor, segment_ids: torch.Tensor | None = None) -> torch.Tensor:
        decoder = self._decoder[0]
        h = decoder.embed(x) if self.tok_embeddings is not None else x
        cos, sin, local = decoder.rope_window(0, h.shape[1], h.device)
        mask = decoder.attention_masks(segment_ids, h.shape[0], h.shape[1], h.device)
        for key, block in self.layers.items():
            c, s = local if decoder.cfg.is_windowed(int(key)) else (cos, sin)
            h = block(h, c, s, None, 0, mask)
        if self.norm is None:
            return h
        return decoder.logits(self.norm(h))


def split_decoder(
    decoder: Transformer, pp_rank: int, pp: int, stages_per_rank: int, schedule: str
) -> list[StageModule]:
    """Keep only this rank's stages in ``decoder`` (in place) and return their views.

    ``decoder.layers`` becomes a ModuleDict of the kept blocks keyed by their index, and the
    embedding, final norm and head are dropped (set to None) where no stage of this rank uses
    them, so the state dict holds this rank's tensors under the unsplit model's names.
    """
    n_stages = pp * stages_per_rank
    blocks = list(decoder.layers)
    costs = [sum(p.numel() for p in b.parameters()) for b in blocks]
    embed = decoder.tok_embeddings.weight.numel()
    head = decoder.lm_head.weight.numel() + sum(p.numel() for p in decoder.norm.parameters())
    bounds = split_layers(costs, embed, head, n_stages)
    mine = stage_ids(pp_rank, pp, stages_per_rank, schedule)
    kept = sorted(i for s in mine for i in bounds[s])
    decoder.layers = nn.ModuleDict({str(i): blocks[i] for i in kept})  # type: ignore[assignment]
    first, last = 0 in mine, n_stages - 1 in mine
    stages = [StageModule(decoder, bounds[s], s == 0, s == n_stages - 1) for s in mine]
    if not first:
        decoder.tok_embeddings = None  # type: ignore[assignment]
    if not last:
        decoder.norm = None  # type: ignore[assignment]
        decoder.lm_head = None  # type: ignore[assignment]
    decoder.pipeline = PipelineLayout(mine, bounds, n_stages)  # type: ignore[assignment]
    decoder.pipeline_stages = stages  # type: ignore[assignment]
    return stages


class PipelineLayout:
    """Which stages a rank holds and the layer range of every stage (for logs and tests)."""

    def __init__(self, stages: list[int], bounds: list[range], n_stages: int) -> None:
        self.stages, self.bounds, self.n_stages = stages, bounds, n_stages

    def __repr__(self) -> str:
        ranges = ", ".join(f"{s}: layers {b.start}-{b.stop - 1}" for s, b in enumerate(self.bounds))
        return f"PipelineLayout(this rank: stages {self.stages}; {ranges})"


def _mean_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """A micro-batch's mean next-token loss over its kept targets (the unsplit model's loss)."""
    return F.cross_entropy(logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX)


def _summed_loss(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(
        logits.flatten(0, 1), targets.flatten(), ignore_index=IGNORE_INDEX, reduction="sum"
    )


class Pipeline:
    """This rank's stages of a decoder and the schedules that train and evaluate it.

    Every rank of a pipeline group calls :meth:`train_step` with the same batch (the first stage
    reads the tokens, the last the labels); the loss comes back on every rank of the group.
    """

    def __init__(
        self,
        stages: list[StageModule],
        pp_mesh: Any,
        schedule: str,
        n_microbatches: int,
        device: torch.device,
    ) -> None:
        from torch.distributed.pipelining import PipelineStage
        from torch.distributed.pipelining.schedules import PipelineScheduleSingle, get_schedule_class

        self.group = pp_mesh.get_group()
        self.pp = pp_mesh.size()
        self.n_stages = self.pp * len(stages)
        self.last_rank = self._rank_of(self.n_stages - 1, schedule)
        self.stage_modules = stages
        layout: PipelineLayout = stages[0]._decoder[0].pipeline  # type: ignore[assignment]

        def pipeline_stages() -> list[Any]:
            return [
                PipelineStage(module, index, self.n_stages, device, group=self.group)
                for module, index in zip(stages, layout.stages, strict=True)
            ]

        # A stage sizes its send and receive buffers for one schedule's micro-batches, so the
        # forward-only schedule gets stages of its own over the same modules.
        self.stages, eval_stages = pipeline_stages(), pipeline_stages()
        self.holds_last = self.n_stages - 1 in layout.stages
        cls = get_schedule_class(schedule)
        single = issubclass(cls, PipelineScheduleSingle)
        try:
            self.train_schedule = cls(
                self.stages[0] if single else self.stages,
                n_microbatches=n_microbatches,
                loss_fn=_mean_loss,
                scale_grads=True,
            )
            # Forward-only over one validation batch at a time (its rows are one micro-batch).
            # DualPipeV needs as many micro-batches as stages; ZBV runs the same V placement.
            eval_cls = get_schedule_class("ZBVZeroBubble") if schedule == "DualPipeV" else cls
            if schedule == "1F1B":  # 1F1B needs a micro-batch per stage; forward-only, GPipe is the same
                eval_cls = get_schedule_class("GPipe")
            self.eval_schedule = eval_cls(
                eval_stages[0] if single else eval_stages,
                n_microbatches=1,
                loss_fn=_summed_loss,
                scale_grads=False,
            )
        except ValueError as err:
            raise ConfigError(f"strategy.pp_schedule: {err}") from None

    def _rank_of(self, stage: int, schedule: str) -> int:
        if schedule in PP_V_SCHEDULES:
            return stage if stage < self.pp else 2 * self.pp - 1 - stage
        return stage % self.pp

    def _broadcast(self, value: torch.Tensor) -> torch.Tensor:
        """``value`` from the rank holding the last stage to its whole pipeline group."""
        import torch.distributed as dist

        dist.broadcast(value, group=self.group, group_src=self.last_rank)
        return value

    def train_step(
        self, tokens: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Forward and backward of one optimizer step's rows; the mean of the micro-batch losses."""
        losses: list[torch.Tensor] = []
        kwargs = {"segment_ids": segment_ids} if segment_ids is not None else {}
        self.train_schedule.step(tokens, target=labels, losses=losses, return_outputs=False, **kwargs)
        loss = torch.zeros((), dtype=torch.float32, device=tokens.device)
        if self.holds_last:
            loss = torch.stack([x.detach().float() for x in losses]).mean()
        return self._broadcast(loss)

    @torch.no_grad()
    def eval_sums(
        self, tokens: torch.Tensor, labels: torch.Tensor, segment_ids: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(summed token loss, kept tokens) of one batch, forward only, on every rank of the group."""
        losses: list[torch.Tensor] = []
        kwargs = {"segment_ids": segment_ids} if segment_ids is not None else {}
        self.eval_schedule.eval(tokens, target=labels, losses=losses, **kwargs)
        summed = torch.zeros((), dtype=torch.float64, device=tokens.device)
        if self.holds_last:
            summed = torch.stack([x.double() for x in losses]).sum()
        kept = (labels != IGNORE_INDEX).sum().double()
        return self._broadcast(summed), kept

    @torch.no_grad()
    def grad_norm(self, parameters: list[nn.Parameter]) -> torch.Tensor:
        """The total gradient norm of the whole model: over this rank's shards, then its pipeline group."""
        import torch.distributed as dist
        from torch.distributed.tensor import DTensor

        grads = [p.grad for p in parameters if p.grad is not None]
        device = self.stages[0].device
        squares = torch.zeros((), dtype=torch.float32, device=device)
        if grads:
            norm = torch.nn.utils.get_total_norm(grads)
            if isinstance(norm, DTensor):  # FSDP2: the norm of this stage's shards over the data ranks
                norm = norm.full_tensor()
            squares = norm.float().square()
        dist.all_reduce(squares, group=self.group)
        return squares.sqrt()

    @torch.no_grad()
    def clip_grad_norm_(self, parameters: list[nn.Parameter], max_norm: float) -> torch.Tensor:
        """Scale every gradient so the whole model's norm is at most ``max_norm``; the norm before."""
        from torch.distributed.tensor import DTensor

        norm = self.grad_norm(parameters)
        if max_norm > 0:
            # The norm is a plain tensor and FSDP2's gradients are DTensors: scale their local
            # shards (the same factor on every rank, since the norm is the whole model's).
            grads = [p.grad for p in parameters if p.grad is not None]
            local = [g.to_local() if isinstance(g, DTensor) else g for g in grads]
            coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
            if local:
                torch._foreach_mul_(local, coef)
        return norm
