"""finetune=qlora: LoRA over a 4-bit NormalFloat base (Dettmers et al. 2023).

Every linear layer of the decoder (not the output head) is frozen in NF4 through torchao; LoRA
matrices on finetune.lora_targets train in the run's precision beside it. Checkpoints hold the LoRA
tensors only (the base is re-quantized from its files on load: NF4 quantization is deterministic);
export dequantizes the base and merges the updates, or writes the adapters alone in peft's LORA
format (to load on the base in full precision, or quantized by bitsandbytes as QLoRA users do).
"""

from __future__ import annotations

from torch import nn

from orchestra.config import ConfigError, FinetuneConfig, StrategyName, TrainConfig, require
from orchestra.model.peft import apply_lora, merge_lora
from orchestra.model.peft.nf4 import dequantize_linears, quantize_linears
from orchestra.train.methods.lora import SPEC as LORA
from orchestra.train.methods.lora import lora_config, read_peft_files_with
from orchestra.train.methods.spec import MethodSpec


def _validate(cfg: TrainConfig) -> None:
    LORA.validate(cfg)
    # Under DDP the LoRA tensors drift from the one-process run (measured on CPU gloo: ~lr after
    # three steps, while plain LoRA agrees to 1e-6), so data-parallel QLoRA is refused until that
    # is understood; sharding an NF4 base (FSDP2 / ZeRO) is not built.
    require(
        cfg.strategy.name == StrategyName.single,
        "strategy",
        f"finetune=qlora runs on one device (strategy=single), not {cfg.strategy.name.value}: its point is "
        "a large base on one GPU; for several GPUs use finetune=lora with strategy=fsdp or deepspeed",
    )
    require(cfg.strategy.fp8 == "off", "strategy.fp8", "FP8 training cannot run over an NF4 base; use off")


def _apply(model: nn.Module, cfg: FinetuneConfig) -> nn.Module:
    # On the meta device (a checkpoint's layout is checked without its base) there is nothing to
    # quantize: the trainable tensors are LoRA's alone either way.
    if not any(p.is_meta for p in model.parameters()):
        try:
            quantize_linears(model)
        except ValueError as err:
            raise ConfigError(f"finetune.method: qlora cannot quantize {err}") from err
    try:
        apply_lora(model, lora_config(cfg, use_dora=False))
    except ValueError as err:
        raise ConfigError(f"finetune.lora_targets: {err}") from err
    return model


def _merge(model: nn.Module) -> list[str]:
    """Dequantize the NF4 base, then fold the LoRA updates into it."""
    dequantize_linears(model)
    return merge_lora(model)


SPEC = MethodSpec(
    name="qlora",
    frozen_base=True,
    apply=_apply,
    merge=_merge,
    validate=_validate,
    peft_files=LORA.peft_files,
    read_peft_files=read_peft_files_with(_apply),
)
