"""task=sft: supervised fine-tuning on chat or prompt/response examples (loss on responses only).

Data: jsonl ``{"prompt", "response"}`` or ``{"messages": [...]}``, rendered through the chat
template (task.chat_template, else a Hugging Face base's own) and packed several to a row
(task.pack) with attention masked at example boundaries. The module is the causal LM's own.
"""

from __future__ import annotations

from typing import Any

from orchestra.train.module import CausalLMModule
from orchestra.train.plan import RunPlan, TaskSpec


def task_datamodule(plan: RunPlan) -> Any:
    """The jsonl-backed data module of a fine-tuning task (sft, classification, dpo)."""
    from orchestra.data.tasks import TaskDataModule, resolve_task_paths

    cfg = plan.config
    train_path, val_path = resolve_task_paths(cfg.task, cfg.data.cache_dir)
    tokens = plan.base.tokens if plan.base is not None else None  # its chat template and BOS
    return TaskDataModule(
        cfg.task, train_path, val_path, plan.tokenizer_json, plan.eos_id, **plan.batch_args(), tokens=tokens
    )


SPEC = TaskSpec(name="sft", module=CausalLMModule, build_datamodule=task_datamodule, model_parallel=True)
