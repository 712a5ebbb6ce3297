"""The data of the fine-tuning tasks: jsonl readers, chat rendering, datasets, the DataModule.

Three jsonl formats, one record per line (blank lines skipped), one file each:

* :mod:`.sft`: ``{"prompt": str, "response": str}`` or ``{"messages": [{"role": "system"|"user"|
  "assistant", "content": str}, ...]}`` ending with an assistant message. A prompt/response pair
  is the conversation [user: prompt, assistant: response] (:mod:`.chat` renders conversations).
* :mod:`.classification`: ``{"text": str, "label": str}``.
* :mod:`.dpo`: ``{"prompt": str, "chosen": str, "rejected": str}``.

A bad record is refused with one :class:`DataError` naming ``file:line`` and what is wrong
(:mod:`.formats`). Labels are ``-100`` (:data:`IGNORE_INDEX`) where no loss is taken: the prompt,
system and user turns, padding. Every trained response ends with an EOS token, which is trained,
so the model learns to stop. No BOS token is used, except with a Hugging Face base whose
tokenizer adds one (:mod:`orchestra.data.hf_tokenizer`); such a base's own chat template is used
when task.chat_template is null. Each task file's docstring gives the
batches the LightningModule receives; :mod:`.datamodule` serves them. A new task is a new file
here defining a ``TaskData``, registered in :data:`~.datamodule.TASKS`.
"""

from __future__ import annotations

from orchestra.data.tasks.chat import ROLES, Messages, Segments, as_messages, render_chat
from orchestra.data.tasks.classification import (
    ClassificationDataset,
    collate_classification,
    encode_texts,
    read_classification,
)
from orchestra.data.tasks.datamodule import TaskDataModule, hold_out, resolve_task_paths
from orchestra.data.tasks.dpo import DPODataset, collate_dpo, dpo_row, dpo_side, read_dpo
from orchestra.data.tasks.formats import IGNORE_INDEX
from orchestra.data.tasks.sft import SFTDataset, encode_sft, encode_sft_batch, read_sft

__all__ = [
    "IGNORE_INDEX",
    "ROLES",
    "ClassificationDataset",
    "DPODataset",
    "Messages",
    "SFTDataset",
    "Segments",
    "TaskDataModule",
    "as_messages",
    "collate_classification",
    "collate_dpo",
    "dpo_row",
    "dpo_side",
    "encode_sft",
    "encode_sft_batch",
    "encode_texts",
    "hold_out",
    "read_classification",
    "read_dpo",
    "read_sft",
    "render_chat",
    "resolve_task_paths",
]
