"""finetune=dora: weight-decomposed LoRA (Liu et al. 2024), a learned magnitude per output row.

The finetune.lora_* settings apply as for LoRA. Checkpoints hold the LoRA matrices and the
magnitudes only; export merges them into the base weights, or writes them alone in peft's LORA
format with ``use_dora: true`` (which peft loads as its own DoRA).
"""

from __future__ import annotations

from orchestra.train.methods.lora import lora_spec

SPEC = lora_spec("dora", use_dora=True)
