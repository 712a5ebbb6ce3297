"""The presets of published shapes: they compose, validate, and have the published parameter counts.

Counted on the meta device (no memory): our model against the literal count and against the
transformers model that our exported config.json describes.
"""

from __future__ import annotations

import pytest
import torch

from orchestra.model.hf import hf_config_dict
from orchestra.model.transformer import Transformer
from tests.test_config import composed

# Published parameter counts (the models' safetensors totals; tied matrices counted once).
PUBLISHED = {
    "llama-3.2-1b": ("LlamaForCausalLM", 1_235_814_400),
    "llama-3.1-8b": ("LlamaForCausalLM", 8_030_261_248),
    "qwen2.5-0.5b": ("Qwen2ForCausalLM", 494_032_768),
    "qwen2.5-7b": ("Qwen2ForCausalLM", 7_615_616_512),
    "qwen3-0.6b": ("Qwen3ForCausalLM", 596_049_920),
    "qwen3-8b": ("Qwen3ForCausalLM", 8_190_735_360),
    "mistral-7b": ("MistralForCausalLM", 7_241_732_096),
    "gemma-2-2b": ("Gemma2ForCausalLM", 2_614_341_888),
    "phi-3-mini": ("Phi3ForCausalLM", 3_821_079_552),
}


@pytest.mark.parametrize("preset", list(PUBLISHED))
def test_preset_has_the_published_parameter_count(preset: str) -> None:
    transformers = pytest.importorskip("transformers")
    cfg = composed(f"model={preset}").model
    cfg.validate("model")
    assert cfg.vocab_size is not None
    with torch.device("meta"):
        ours = Transformer(cfg, cfg.vocab_size)
    architecture, count = PUBLISHED[preset]
    assert ours.num_parameters() == count

    config = hf_config_dict(cfg, cfg.vocab_size)
    assert config["architectures"] == [architecture]
    hf_config = transformers.AutoConfig.for_model(**{k: v for k, v in config.items() if k != "architectures"})
    with torch.device("meta"):
        theirs = transformers.AutoModelForCausalLM.from_config(hf_config)
    assert type(theirs).__name__ == architecture
    assert sum(p.numel() for p in theirs.parameters()) == count
