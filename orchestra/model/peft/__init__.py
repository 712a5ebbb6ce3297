"""Parameter-efficient fine-tuning building blocks, in plain PyTorch.

Every method here changes a pretrained :class:`~orchestra.model.transformer.Transformer` from
the outside, without editing transformer.py, so the model stays readable and the Hugging Face
name mapping in hf.py keeps working after :func:`merge_lora`:

- LoRA (Hu et al. 2021), lora.py: :class:`LoRALinear`, :func:`apply_lora`, :func:`merge_lora`.
- Bottleneck adapters (Houlsby et al. 2019), adapter.py: :func:`apply_adapters`.
- Prompt tuning (Lester et al. 2021), prompt.py: :class:`SoftPrompt`, :class:`PromptTunedModel`.
- Freezing, freeze.py: :func:`trainable_parameter_names`, :func:`unfreeze_schedule`,
  :func:`set_trainable_layers`, and :func:`is_new_parameter` to tell PEFT parameters apart.

Each method that adds modules starts the model *identical* to the pretrained one (LoRA's B and
the adapters' up projection are zero, the soft prompt is made of real token embeddings), so
fine-tuning begins from the pretrained loss rather than from a perturbed one. Like the rest of
model/, nothing here imports Lightning, Hydra or torch.distributed; apply these before the
strategy shards the model (FSDP2 accepts mixed ``requires_grad`` inside one unit). Optimiser-side
techniques (L2-SP, layer-wise learning rates) are in orchestra/train/optim.py.
"""

from orchestra.model.peft.adapter import AdaptedModule, Adapter, apply_adapters
from orchestra.model.peft.freeze import (
    NEW_PARAM_MARKERS,
    is_new_parameter,
    set_trainable_layers,
    trainable_parameter_names,
    unfreeze_schedule,
)
from orchestra.model.peft.lora import ALL_LINEAR, DoRALinear, LoraConfig, LoRALinear, apply_lora, merge_lora
from orchestra.model.peft.prompt import PromptTunedModel, SoftPrompt

__all__ = [
    "ALL_LINEAR",
    "NEW_PARAM_MARKERS",
    "AdaptedModule",
    "Adapter",
    "DoRALinear",
    "LoRALinear",
    "LoraConfig",
    "PromptTunedModel",
    "SoftPrompt",
    "apply_adapters",
    "apply_lora",
    "is_new_parameter",
    "merge_lora",
    "set_trainable_layers",
    "trainable_parameter_names",
    "unfreeze_schedule",
]
