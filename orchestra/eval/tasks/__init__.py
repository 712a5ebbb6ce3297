"""The evaluation tasks, one file each; ``tasks=[...]`` names them (EvalConfig.tasks)."""

from __future__ import annotations

import importlib

from orchestra.eval.tasks.spec import EvalDataError, EvalTask, Paired, Ranks, TaskResult

# Task name -> its module (imported when the task runs: lm-eval and ROUGE load only when needed).
MODULES = {
    "perplexity": "perplexity",
    "classification": "classification",
    "generation": "generation",
    "lm_eval": "harness",
    "bias": "bias",
    "pii": "pii",
}


def eval_task(name: str) -> EvalTask:
    if name not in MODULES:
        raise ValueError(f"tasks: unknown task {name!r}; known: {list(MODULES)}")
    task: EvalTask = importlib.import_module(f"orchestra.eval.tasks.{MODULES[name]}").TASK
    return task


__all__ = ["MODULES", "EvalDataError", "EvalTask", "Paired", "Ranks", "TaskResult", "eval_task"]
