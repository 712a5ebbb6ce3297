"""From the strategy config to a Lightning strategy, and the one place parallelism touches the model.

The model file knows nothing of devices or processes. Everything distributed happens here:

- :func:`build_strategy` turns ``strategy=...`` into Lightning's DDPStrategy, ModelParallelStrategy
  (FSDP2) or DeepSpeedStrategy, with precision and batch sizes derived from ``trainer.*``.
- :func:`parallelize` takes the plain model and applies, in this order, activation checkpointing,
  per-block ``torch.compile`` and FSDP2 sharding (the order torchtitan uses: compile sees the
  checkpointed block, and sharding wraps the compiled block).
- :func:`deepspeed_config` generates the DeepSpeed JSON from the Hydra config, so no knob is set
  in two places.
"""

from __future__ import annotations

import os
import time
from datetime import timedelta
from typing import Any

import torch
from torch import nn

from orchestra.config import (
    ActivationCheckpointing,
    ConfigError,
    StrategyConfig,
    StrategyName,
    TrainConfig,
    accumulation_steps,
    data_parallel_size,
)


def world_size_of(cfg: TrainConfig) -> int:
    return cfg.trainer.devices * cfg.trainer.num_nodes


def uses_bf16(precision: str) -> bool:
    return precision.startswith("bf16")


def lightning_precision(cfg: TrainConfig, precision: str) -> str:
    """Precision string for Lightning's plugin.

    Under FSDP2 mixed precision is the sharding's own MixedPrecisionPolicy (bf16 gathers, fp32
    reductions), so Lightning must not add autocast on top: it gets 32-true.
    """
    if cfg.strategy.name == StrategyName.fsdp and uses_bf16(precision):
        return "32-true"
    return precision


def recompute_factor(st: StrategyConfig, n_layers: int) -> float:
    """Hardware FLOPs / model FLOPs: recomputed forwards count as hardware work (HFU)."""
    if st.activation_checkpointing == ActivationCheckpointing.none:
        return 1.0
    checkpointed = (
        n_layers
        if st.activation_checkpointing == ActivationCheckpointing.full
        else len(range(0, n_layers, st.ac_every_k))
    )
    # A training step is 1 forward + 2 backward units; each recomputed block adds one forward.
    return (3.0 + checkpointed / n_layers) / 3.0


def apply_activation_checkpointing(model: nn.Module, mode: ActivationCheckpointing, every_k: int) -> None:
    """Wrap blocks so their activations are recomputed in backward instead of stored.

    torch's checkpoint_wrapper (non-reentrant) keeps state_dict keys unchanged, so checkpoints and
    exports do not depend on this setting.
    """
    if mode == ActivationCheckpointing.none:
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointImpl, checkpoint_wrapper

    layers = decoder_of(model).layers
    for key, block in blocks_of(model):
        if mode == ActivationCheckpointing.full or key % every_k == 0:
            wrapped = checkpoint_wrapper(block, checkpoint_impl=CheckpointImpl.NO_REENTRANT)
            if isinstance(layers, nn.ModuleDict):
                layers[str(key)] = wrapped
            else:
                layers[key] = wrapped
    _refresh_stage_views(model)


def blocks_of(model: nn.Module) -> list[tuple[int, nn.Module]]:
    """(layer index, block) of the decoder's blocks on this rank: all of them, or a pipeline rank's."""
    layers = decoder_of(model).layers
    if isinstance(layers, nn.ModuleDict):  # strategy.pp: this rank's blocks keyed by their index
        return [(int(key), block) for key, block in layers.items()]
    return list(enumerate(layers))


def _refresh_stage_views(model: nn.Module) -> None:
    """Point the pipeline stage views at the decoder's current blocks (after a wrapper replaced them)."""
    decoder = decoder_of(model)
    for stage in getattr(decoder, "pipeline_stages", ()):
        for key in list(stage.layers.keys()):
            stage.layers[key] = decoder.layers[key]


def decoder_of(model: nn.Module) -> Any:
    """The Transformer inside a task / PEFT wrapper (which keeps it as ``.model``)."""
    return model if hasattr(model, "layers") else decoder_of(model.model)  # type: ignore[arg-type]


def apply_tensor_parallel(model: nn.Module, tp_mesh: Any) -> None:
    """Split the decoder's matrices over the tensor-parallel ranks (Megatron-style TP + SP), in place.

    torch's own parallel styles on the plain modules, as torchtitan applies them to Llama:
    q/k/v and gate/up split by output columns, o/down by input rows (one reduce-scatter per
    sublayer), so each rank runs whole heads and a slice of the FFN. Between the sublayers the
    residual stream is split along the sequence (sequence parallelism): the norms run on each
    rank's tokens, with their gains replicated so their gradients are summed over the group.
    The embedding rows and the output projection are split over the vocabulary; the loss then
    runs under ``loss_parallel`` (see :class:`TensorParallelStrategy`), so no rank holds the
    full [tokens, vocab] logits. Logits for generation are gathered whole.
    """
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import (
        ColwiseParallel,
        PrepareModuleInput,
        PrepareModuleOutput,
        RowwiseParallel,
        SequenceParallel,
        parallelize_module,
    )

    decoder = decoder_of(model)
    tied = decoder.lm_head.weight is decoder.tok_embeddings.weight
    parallelize_module(
        decoder,
        tp_mesh,
        {
            "tok_embeddings": RowwiseParallel(input_layouts=Replicate(), output_layouts=Shard(1)),
            "norm": SequenceParallel(),
            # The loss reads lm_head.weight (sharded by vocabulary rows) and the gathered hidden
            # states; called as a module (logits), it returns the full logits.
            "lm_head": ColwiseParallel(input_layouts=Replicate(), output_layouts=Replicate()),
        },
    )
    # The final norm's output, whole on every rank, for the vocabulary-sharded projection.
    parallelize_module(
        decoder.norm,
        tp_mesh,
        PrepareModuleOutput(
            output_layouts=Shard(1), desired_output_layouts=Replicate(), use_local_output=False
        ),
    )
    if tied:  # parallelize_module wraps each in its own Parameter: one matrix again
        decoder.lm_head.weight = decoder.tok_embeddings.weight
    # Attention(x, cos, sin, kv_cache, start_pos, attn_mask): only x is gathered.
    rest: tuple[None, ...] = (None,) * 5
    for block in decoder.layers:
        plan: dict[str, Any] = {
            "attention_norm": SequenceParallel(),
            "attention": PrepareModuleInput(
                input_layouts=(Shard(1), *rest), desired_input_layouts=(Replicate(), *rest)
            ),
            "attention.q_proj": ColwiseParallel(),
            "attention.k_proj": ColwiseParallel(),
            "attention.v_proj": ColwiseParallel(),
            "attention.o_proj": RowwiseParallel(output_layouts=Shard(1)),
            "mlp_norm": SequenceParallel(),
            "mlp": PrepareModuleInput(input_layouts=(Shard(1),), desired_input_layouts=(Replicate(),)),
            "mlp.gate_proj": ColwiseParallel(),
            "mlp.up_proj": ColwiseParallel(),
            "mlp.down_proj": RowwiseParallel(output_layouts=Shard(1)),
        }
        for name in ("attention_post_norm", "mlp_post_norm"):  # Gemma 2/3 sandwich norms
            if getattr(block, name) is not None:
                plan[name] = SequenceParallel(use_local_output=True)
        for name in ("q_norm", "k_norm"):  # Qwen3 / Gemma 3: one gain over [B, T, heads, hd]
            if getattr(block.attention, name) is not None:
                # Each rank norms its own heads; split along dim 2 so the gain's gradient is
                # summed over the group, as a sequence-parallel norm's is.
                plan[f"attention.{name}"] = SequenceParallel(sequence_dim=2, use_local_output=True)
        parallelize_module(block, tp_mesh, plan)
        # The fused add + norm would bypass mlp_norm's module call, where sequence parallelism
        # turns its input into the sharded DTensor; the block adds, then calls the norm.
        block.fuse_residual_norm = False


def fp8_capable() -> bool:
    """Whether this process has a GPU with FP8 tensor cores (compute capability 8.9: Ada, Hopper, later)."""
    return torch.cuda.is_available() and torch.cuda.get_device_capability() >= (8, 9)


def _fp8_target(module: nn.Module, fqn: str) -> bool:
    """The decoder blocks' linear layers whose sizes FP8 matmuls take (multiples of 16).

    The output projection stays out (its logits feed the loss; torchtitan keeps it too), as do
    task heads, adapters and anything outside the blocks.
    """
    if not isinstance(module, nn.Linear) or not fqn.startswith("layers."):
        return False
    return module.in_features % 16 == 0 and module.out_features % 16 == 0


def apply_fp8(model: nn.Module, st: StrategyConfig) -> None:
    """Swap the blocks' nn.Linear for torchao's Float8Linear (dynamic scaling), in place.

    Weights stay in their dtype (the optimizer and checkpoints see the same tensors); each
    matmul casts its inputs to FP8 with a fresh scale, per tensor or per row. Under FSDP2 with
    tensorwise scaling the weights are also all-gathered in FP8, halving that traffic.
    """
    from dataclasses import replace

    from torchao.float8 import Float8LinearConfig, convert_to_float8_training

    config = Float8LinearConfig.from_recipe_name(st.fp8)
    config = replace(
        config,
        emulate=st.fp8_emulate,
        enable_fsdp_float8_all_gather=st.name == StrategyName.fsdp and st.fp8 == "tensorwise",
    )
    convert_to_float8_training(decoder_of(model), module_filter_fn=_fp8_target, config=config)


def compile_options(block: nn.Module, st: StrategyConfig) -> dict[str, Any]:
    """torch.compile's arguments for one block: fullgraph where it traces whole, CUDA graphs if asked.

    Under strategy.compile_fullgraph=null a block is compiled as one graph when it is the plain
    decoder's: nn.Linear layers (a fine-tuning method's or FP8's replacements may break the
    graph) and the torch ops on CUDA (the Triton kernels' launch code is not traced whole; with
    torch's ops the compiler fuses the elementwise work itself). Elsewhere torch compiles the
    block in pieces instead of refusing it.
    """
    fullgraph = st.compile_fullgraph
    if fullgraph is None:
        linears = [m for m in block.modules() if isinstance(m, nn.Linear) or "Linear" in type(m).__name__]
        ops = next((m.ops for m in block.modules() if hasattr(m, "ops")), None)
        torch_ops = ops is None or getattr(ops.cuda, "name", "torch") == "torch"
        fullgraph = torch_ops and all(type(m) is nn.Linear for m in linears)
    options: dict[str, Any] = {"fullgraph": fullgraph}
    if st.cuda_graphs:
        options["mode"] = "reduce-overhead"  # CUDA graph trees; ignored (with a warning) off CUDA
    return options


def parallelize(
    model: nn.Module, st: StrategyConfig, precision: str, device_mesh: Any | None = None
) -> nn.Module:
    """Apply tensor parallelism, activation checkpointing, compile and (FSDP2) sharding, in place.

    The order is torchtitan's: TP splits the plain modules, checkpointing and compile see the
    split blocks, and FSDP2 shards what TP left over the data-parallel ranks (2-D parameters).
    """
    if st.fp8 != "off":
        apply_fp8(model, st)
    if st.tp > 1:
        if device_mesh is None:
            raise RuntimeError("strategy.tp needs the device mesh of Lightning's ModelParallelStrategy")
        apply_tensor_parallel(model, device_mesh["tensor_parallel"])
    if st.pp > 1:
        if device_mesh is None:
            raise RuntimeError("strategy.pp needs the device mesh of PipelineParallelStrategy")
        from orchestra.train.pipeline import split_decoder

        pp_rank = device_mesh["pipeline_parallel"].get_local_rank()
        split_decoder(decoder_of(model), pp_rank, st.pp, st.pp_stages_per_rank, st.pp_schedule)
    apply_activation_checkpointing(model, st.activation_checkpointing, st.ac_every_k)
    if st.compile:
        for _, block in blocks_of(model):
            block.compile(**compile_options(block, st))
    if st.name == StrategyName.fsdp:
        if device_mesh is None:
            raise RuntimeError("strategy=fsdp needs the device mesh of Lightning's ModelParallelStrategy")
        from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, fully_shard

        mesh = device_mesh["data_parallel"]
        if st.cp > 1:
            # Context ranks hold different tokens of the same rows: their gradients are averaged
            # with the data ranks', so FSDP shards over both dimensions as one.
            mesh = device_mesh["data_parallel", "context_parallel"]._flatten("data_context_parallel")
        if st.hybrid_shard:
            mesh = _hybrid_mesh(mesh)
        kwargs: dict[str, Any] = {
            "mesh": mesh,
            "reshard_after_forward": st.reshard_after_forward,
            "mp_policy": MixedPrecisionPolicy(
                param_dtype=torch.bfloat16 if uses_bf16(precision) else None, reduce_dtype=torch.float32
            ),
        }
        if st.cpu_offload:
            kwargs["offload_policy"] = CPUOffloadPolicy()
        for _, block in blocks_of(model):
            fully_shard(block, **kwargs)
        stages = getattr(decoder_of(model), "pipeline_stages", None)
        if stages:
            # strategy.pp: each stage view is its own FSDP root (the schedule calls the stages,
            # never the decoder), holding whichever of the embedding, final norm and head it owns.
            for stage in stages:
                fully_shard(stage, **kwargs)
        else:
            # The root holds the embeddings, final norm and lm head (and a task head or soft
            # prompt of a wrapper, so their gradients are reduced too).
            fully_shard(model, **kwargs)
    return model


def _hybrid_mesh(mesh: Any) -> Any:
    """2-D (replicate across nodes, shard within a node) mesh for HSDP."""
    from torch.distributed.device_mesh import init_device_mesh

    per_node = int(os.environ.get("LOCAL_WORLD_SIZE", torch.cuda.device_count() or 1))
    nodes = mesh.size() // per_node
    if nodes * per_node != mesh.size():
        raise ConfigError(
            f"strategy.hybrid_shard: world size {mesh.size()} is not nodes x {per_node} devices"
        )
    device = "cuda" if torch.cuda.is_available() else "cpu"
    return init_device_mesh(device, (nodes, per_node), mesh_dim_names=("replicate", "shard"))


def deepspeed_config(cfg: TrainConfig, precision: str, world_size: int | None = None) -> dict[str, Any]:
    """The DeepSpeed config for strategy=deepspeed_zero*, derived entirely from the Hydra config.

    Batch sizes, accumulation, precision and clipping come from trainer.*; a global batch that
    does not split over micro batches and ranks is a ConfigError naming the keys.
    """
    st, t = cfg.strategy, cfg.trainer
    if not st.name.is_deepspeed:
        raise ConfigError(f"strategy: {st.name.value} is not a DeepSpeed strategy")
    world = world_size if world_size is not None else world_size_of(cfg)
    accumulation = accumulation_steps(t, world)
    zero: dict[str, Any] = {
        "stage": st.name.zero_stage,
        "overlap_comm": st.overlap_comm,
        "contiguous_gradients": True,
        "reduce_bucket_size": st.reduce_bucket_size,
        "allgather_bucket_size": st.allgather_bucket_size,
    }
    if st.name == StrategyName.deepspeed_zero3_offload:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    if st.name.zero_stage == 3:
        zero["stage3_gather_16bit_weights_on_model_save"] = False
    return {
        "train_batch_size": t.global_batch_size,
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": accumulation,
        "gradient_clipping": t.grad_clip,
        "bf16": {"enabled": uses_bf16(precision)},
        "zero_optimization": zero,
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }


class _AtomicDirectorySave:
    """Mixin for strategies that write a checkpoint as a directory (FSDP2 DCP, DeepSpeed).

    Lightning writes those straight into their final path, so a kill during the save leaves a
    directory that looks like a checkpoint but is torn. Here every rank writes into
    ``<name>.tmp-<pid of rank 0>`` and rank zero renames it into place after a barrier.
    """

    # Seconds the training loop waited in each save (its stall), newest last.
    checkpoint_stalls: list[float]

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        from pathlib import Path

        from orchestra.io import swap_into_place
        from orchestra.train.checkpoint.manifest import write_manifest

        started = time.perf_counter()
        final = Path(self.broadcast(str(filepath)))  # type: ignore[attr-defined]
        tmp = final.with_name(f"{final.name}.tmp-{self.broadcast(os.getpid())}")  # type: ignore[attr-defined]
        super().save_checkpoint(checkpoint, tmp, storage_options)  # type: ignore[misc]
        self.barrier("orchestra_checkpoint_written")  # type: ignore[attr-defined]
        if self.is_global_zero:  # type: ignore[attr-defined]
            # Every shard is written: hash them, then the directory appears with its manifest.
            write_manifest(tmp)
            swap_into_place(tmp, final)
        self.barrier("orchestra_checkpoint_renamed")  # type: ignore[attr-defined]
        _record_stall(self, time.perf_counter() - started)

    def finish_checkpoint(self) -> None:
        """Synchronous saves are finished when they return."""


def _record_stall(strategy: Any, seconds: float) -> None:
    if not hasattr(strategy, "checkpoint_stalls"):
        strategy.checkpoint_stalls = []
    strategy.checkpoint_stalls.append(seconds)


def _link_copy(source: Any, final: Any) -> None:
    """``final`` as a directory of hard links to ``source``'s files, appearing at once (last.ckpt)."""
    import uuid

    from orchestra.io import swap_into_place

    tmp = final.with_name(f"{final.name}.tmp-link-{uuid.uuid4().hex[:8]}")
    for path in sorted(source.rglob("*")):
        target = tmp / path.relative_to(source)
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
        else:
            target.parent.mkdir(parents=True, exist_ok=True)
            os.link(path, target)
    swap_into_place(tmp, final)


class _AsyncDistributedSave(_AtomicDirectorySave):
    """strategy.async_checkpoint: ModelParallelStrategy's save through DCP's ``async_save``.

    The loop waits while the state is staged in host memory; a background thread writes the
    shards into ``<name>.tmp-<pid>``. The checkpoint appears only when it is whole: DCP's
    coordinator (rank 0) finishes its save after gathering every rank's write results, so when
    rank 0's future is done every shard is on disk, and rank 0 then writes the manifest and
    renames the directory into place (and publishes it as last.ckpt when that was asked for the
    same step). A kill before that leaves only the temp directory, which resume=auto ignores.
    One save is in flight at a time; the next save, the end of fit and a preemption wait for it.
    """

    _pending: Any = None  # (future, step, tmp, final, aliases)
    _async_group: Any = None
    _after_publish: list[Any] | None = None

    @property
    def pending_checkpoint(self) -> Any:
        """The final path of the save in flight, or None."""
        return self._pending[3] if self._pending is not None else None

    def after_publish(self, action: Any) -> None:
        """Run ``action()`` once the save in flight is published (e.g. retention's deletions)."""
        if self._after_publish is None:
            self._after_publish = []
        self._after_publish.append(action)

    def save_checkpoint(self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any = None) -> None:
        from pathlib import Path

        import torch.distributed as dist
        import torch.distributed.checkpoint as dcp

        started = time.perf_counter()
        final = Path(self.broadcast(str(filepath)))  # type: ignore[attr-defined]
        step = int(checkpoint.get("global_step", -1))
        pending = self._pending
        if pending is not None and pending[1] == step and final != pending[3]:
            pending[4].append(final)  # last.ckpt of the step being written: the same files
            _record_stall(self, time.perf_counter() - started)
            return
        self.finish_checkpoint()
        tmp = final.with_name(f"{final.name}.tmp-{self.broadcast(os.getpid())}")  # type: ignore[attr-defined]
        tmp.mkdir(parents=True, exist_ok=True)
        state = {"state_dict": checkpoint.pop("state_dict")}
        state.update({f"optimizer_{i}": o for i, o in enumerate(checkpoint.pop("optimizer_states", []))})
        if self._async_group is None:
            # The background thread's collectives get their own (CPU) group, so they never
            # interleave with the training loop's NCCL or gloo calls.
            self._async_group = dist.new_group(backend="gloo")
        future = dcp.async_save(state, checkpoint_id=str(tmp), process_group=self._async_group)
        if self.is_global_zero:  # type: ignore[attr-defined]
            from lightning.fabric.utilities.load import _METADATA_FILENAME

            torch.save(checkpoint, tmp / _METADATA_FILENAME)
        self._pending = (future, step, tmp, final, [])
        _record_stall(self, time.perf_counter() - started)

    def finish_checkpoint(self) -> None:
        """Wait for the save in flight and publish it (every rank calls this)."""
        pending, self._pending = self._pending, None
        if pending is None:
            return
        from orchestra.io import swap_into_place
        from orchestra.train.checkpoint.manifest import write_manifest

        future, _, tmp, final, aliases = pending
        future.result()  # raises here if this rank's write failed: the temp dir stays unpublished
        if self.is_global_zero:  # type: ignore[attr-defined]
            write_manifest(tmp)
            swap_into_place(tmp, final)
            for alias in aliases:
                _link_copy(final, alias)
        self.barrier("orchestra_async_checkpoint_published")  # type: ignore[attr-defined]
        actions, self._after_publish = self._after_publish or [], None
        for action in actions:
            action()

    def publish_if_done(self) -> None:
        """Publish a finished save without waiting (called between steps; collective)."""
        pending = self._pending
        if pending is None:
            return
        done = torch.tensor([1 if pending[0].done() else 0], device=self.root_device)  # type: ignore[attr-defined]
        done = self.reduce(done, reduce_op="min")  # type: ignore[attr-defined]
        if int(done.item()):
            self.finish_checkpoint()

    def teardown(self) -> None:
        self.finish_checkpoint()
        super().teardown()  # type: ignore[misc]


def _tensor_parallel_strategy(base: type) -> type:
    """``base`` (Lightning's ModelParallelStrategy) with the steps run under ``loss_parallel``.

    The cross-entropy of vocabulary-sharded logits, and its backward, must run inside torch's
    loss_parallel context; Lightning calls the step and the backward from its loop, so the
    strategy is where both can be wrapped.
    """
    from torch.distributed.tensor.parallel import loss_parallel

    class TensorParallelStrategy(base):  # type: ignore[misc, valid-type]
        def training_step(self, *args: Any, **kwargs: Any) -> Any:
            with loss_parallel():
                return super().training_step(*args, **kwargs)

        def validation_step(self, *args: Any, **kwargs: Any) -> Any:
            with loss_parallel():
                return super().validation_step(*args, **kwargs)

        def backward(self, *args: Any, **kwargs: Any) -> Any:
            with loss_parallel():
                return super().backward(*args, **kwargs)

    return TensorParallelStrategy


def _context_parallel_strategy(base: type, cp: int) -> type:
    """``base`` with a (data, context, tensor) device mesh and backward under the gathered attention.

    Lightning's ModelParallelStrategy builds a (data, tensor) mesh; here it is rebuilt with the
    context dimension between them, so ``distributed_sampler_kwargs`` (the data dimension) gives
    the ranks of a context group the same batches. A backward that recomputes checkpointed
    blocks runs their attention again, so it runs under the same rule as the forward.
    """

    class ContextParallelStrategy(base):  # type: ignore[misc, valid-type]
        def setup_environment(self) -> None:
            super().setup_environment()
            from torch.distributed.device_mesh import init_device_mesh

            dp = self.world_size // (cp * self._tensor_parallel_size)
            mesh = init_device_mesh(
                self.root_device.type,
                (dp, cp, self._tensor_parallel_size),
                mesh_dim_names=("data_parallel", "context_parallel", "tensor_parallel"),
            )
            self._device_mesh = mesh
            assert self.lightning_module is not None
            self.lightning_module._device_mesh = mesh

        def backward(self, closure_loss: Any, *args: Any, **kwargs: Any) -> Any:
            module = self.lightning_module
            with module.context_parallel_recompute():  # type: ignore[union-attr, operator]
                return super().backward(closure_loss, *args, **kwargs)

    return ContextParallelStrategy


def _pipeline_parallel_strategy(base: type, pp: int) -> type:
    """``base`` with a (pipeline, data, tensor) device mesh; the step's backward is the schedule's.

    Lightning's ModelParallelStrategy builds a (data, tensor) mesh; here it is rebuilt with the
    pipeline dimension outermost (consecutive ranks, usually one node, share a stage's FSDP
    traffic; stage-to-stage sends may cross nodes), so ``distributed_sampler_kwargs`` (the data
    dimension) gives every rank of a pipeline the same rows. The schedule runs the backward
    itself, inside the training step (CausalLMModule.backward is then a no-op).
    """

    class PipelineParallelStrategy(base):  # type: ignore[misc, valid-type]
        def setup_environment(self) -> None:
            super().setup_environment()
            from torch.distributed.device_mesh import init_device_mesh

            dp = self.world_size // (pp * self._tensor_parallel_size)
            mesh = init_device_mesh(
                self.root_device.type,
                (pp, dp, self._tensor_parallel_size),
                mesh_dim_names=("pipeline_parallel", "data_parallel", "tensor_parallel"),
            )
            self._device_mesh = mesh
            assert self.lightning_module is not None
            self.lightning_module._device_mesh = mesh

    return PipelineParallelStrategy


def build_strategy(cfg: TrainConfig, precision: str) -> Any:
    """The Lightning strategy (object or name) for cfg.strategy."""
    from lightning.pytorch.strategies import DDPStrategy, DeepSpeedStrategy, ModelParallelStrategy

    class AtomicModelParallelStrategy(_AtomicDirectorySave, ModelParallelStrategy):
        pass

    class AsyncModelParallelStrategy(_AsyncDistributedSave, ModelParallelStrategy):
        pass

    class AtomicDeepSpeedStrategy(_AtomicDirectorySave, DeepSpeedStrategy):
        pass

    st = cfg.strategy
    # How long a collective waits for the other ranks before it raises (gloo) or aborts (NCCL).
    timeout = timedelta(seconds=cfg.trainer.collective_timeout_s)
    if st.fp8 != "off" and not st.fp8_emulate and (cfg.trainer.accelerator == "cpu" or not fp8_capable()):
        found = (
            f"a GPU of compute capability {'.'.join(map(str, torch.cuda.get_device_capability()))}"
            if torch.cuda.is_available() and cfg.trainer.accelerator != "cpu"
            else "no GPU"
        )
        raise ConfigError(
            f"strategy.fp8={st.fp8}: FP8 matmuls need a GPU with FP8 tensor cores (compute capability "
            f"8.9+: L4, L40S, H100, H200, B200), and this run has {found}; set strategy.fp8=off, or "
            "strategy.fp8_emulate=true to check its numerics without the speed-up"
        )
    if st.name == StrategyName.single:
        return "auto"
    if st.name == StrategyName.ddp:
        return DDPStrategy(
            gradient_as_bucket_view=st.gradient_as_bucket_view, static_graph=False, timeout=timeout
        )
    if st.name == StrategyName.fsdp:
        if st.cpu_offload and (cfg.trainer.accelerator == "cpu" or not torch.cuda.is_available()):
            raise ConfigError(
                "strategy.cpu_offload: moves parameters and optimizer state from GPU memory to the "
                "CPU, and this run has no GPU; set strategy.cpu_offload=false"
            )
        strategy_class: type = (
            AsyncModelParallelStrategy if st.async_checkpoint else AtomicModelParallelStrategy
        )
        if st.tp > 1:
            strategy_class = _tensor_parallel_strategy(strategy_class)
        if st.cp > 1:
            strategy_class = _context_parallel_strategy(strategy_class, st.cp)
        if st.pp > 1:
            strategy_class = _pipeline_parallel_strategy(strategy_class, st.pp)
        return strategy_class(
            # Lightning's own mesh is (data, tensor); the context and pipeline dimensions are cut
            # out of its data dimension by ContextParallelStrategy / PipelineParallelStrategy.
            data_parallel_size=data_parallel_size(cfg) * st.cp * st.pp,
            tensor_parallel_size=st.tp,
            save_distributed_checkpoint=True,
            timeout=timeout,
        )
    config = deepspeed_config(cfg, precision)
    # Lightning sets the accumulation itself from Trainer(accumulate_grad_batches=...), which is
    # derived from the same numbers; it refuses a config that also sets it.
    config.pop("gradient_accumulation_steps")
    config.pop("train_batch_size")
    return AtomicDeepSpeedStrategy(config=config, timeout=timeout)
