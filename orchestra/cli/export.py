"""`orchestra-export ckpt=PATH out=DIR [dtype=float32|bfloat16|float16] [overwrite=true] [peft_only=true]`.

Consolidates a single-device, DDP, FSDP2 (sharded) or DeepSpeed ZeRO checkpoint into a Hugging
Face Llama folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads (a LoRA
fine-tune merged into its base). With ``peft_only=true`` a lora/prompt/adapter checkpoint's
trained weights are written alone: LoRA and prompt tuning in Hugging Face peft's format,
adapters in Orchestra's (see orchestra/train/export.py:export_peft).
"""

from __future__ import annotations

import json

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import ConfigError, ExportConfig, register_configs

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from orchestra.train.checkpoint import CheckpointError
    from orchestra.train.export import ORCHESTRA_PEFT_FILE, export_hf, export_peft

    config: ExportConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    export = export_peft if config.peft_only else export_hf
    try:
        out = export(config.ckpt, config.out, dtype=config.dtype, overwrite=config.overwrite)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as err:
        fail(str(err))
        return
    files = ", ".join(sorted(p.name for p in out.iterdir()))
    if not config.peft_only:
        console.print(f"exported {config.ckpt} -> {out} ({files})", soft_wrap=True, highlight=False)
        return
    record = json.loads((out / ORCHESTRA_PEFT_FILE).read_text())
    reader = (
        "peft.PeftModel.from_pretrained on the base exported without peft_only"
        if record["tensor_names"] == "peft"
        else "Orchestra only (peft has no bottleneck adapters)"
    )
    console.print(
        f"exported the {record['method']} weights of {config.ckpt} -> {out} ({files}); "
        f"base: {record['base']['path']}; readable by {reader}",
        soft_wrap=True,
        highlight=False,
    )


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
