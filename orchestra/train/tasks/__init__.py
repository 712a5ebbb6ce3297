"""Tasks: one file per task, each exporting a :class:`~orchestra.train.plan.TaskSpec` named ``SPEC``.

A task is its data module, its LightningModule (a :class:`~orchestra.train.module.CausalLMModule`
or a subclass that changes the head, loss and metrics), its FLOPs terms and its config rules.
Adding a task is a new file here, a line in :data:`TASKS`, its data under orchestra/data/tasks/,
and its preset in conf/task/.
"""

from __future__ import annotations

from orchestra.config import ConfigError, TaskName
from orchestra.train.plan import TaskSpec
from orchestra.train.tasks import classification, dpo, grpo, kto, orpo, pretrain, reward, sft, simpo

TASKS: dict[str, TaskSpec] = {
    t.SPEC.name: t.SPEC for t in (pretrain, sft, classification, dpo, kto, orpo, simpo, reward, grpo)
}


def task_spec(task: str | TaskName) -> TaskSpec:
    """The spec of ``task.name`` (a name or the enum)."""
    name = task.value if isinstance(task, TaskName) else str(task)
    if name not in TASKS:
        raise ConfigError(f"task.name: {name!r} is not one of {', '.join(TASKS)}")
    return TASKS[name]


__all__ = ["TASKS", "TaskSpec", "task_spec"]
