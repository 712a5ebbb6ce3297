"""`orchestra-export ckpt=PATH out=DIR [dtype=float32|bfloat16|float16] [overwrite=true]`.

Consolidates a single-device, DDP, FSDP2 (sharded) or DeepSpeed ZeRO checkpoint into a Hugging
Face Llama folder that ``transformers.AutoModelForCausalLM.from_pretrained`` loads.
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig, OmegaConf

from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import ConfigError, ExportConfig, register_configs

register_configs()


@hydra.main(config_path=CONF_DIR, config_name="export", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from orchestra.train.checkpoint import CheckpointError
    from orchestra.train.export import export_hf

    config: ExportConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        out = export_hf(config.ckpt, config.out, dtype=config.dtype, overwrite=config.overwrite)
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as err:
        fail(str(err))
        return
    console.print(f"exported {config.ckpt} -> {out} (config.json, model.safetensors, tokenizer.json)")


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
