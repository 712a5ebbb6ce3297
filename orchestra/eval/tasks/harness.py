"""lm_eval: tasks of lm-evaluation-harness, run in-process on the model (:mod:`orchestra.eval.harness`).

The shipped YAMLs (orchestra/eval/lm_eval_tasks/) cover the bundled example sets, so this runs
offline; any other lm-eval task runs where its data are in the local datasets cache. lm-eval's
per-task metrics are reported as ``<task>/<metric>``; its per-document samples become the
records the paired comparison reads (their ``acc`` / ``exact_match`` / ... fields).
"""

from __future__ import annotations

import math
from typing import Any

from orchestra.config import EvalConfig
from orchestra.eval.model import EvalModel
from orchestra.eval.tasks.spec import EvalTask, Paired, Ranks, TaskResult

# lm-eval's metrics where a smaller number is better.
LOWER_IS_BETTER = ("perplexity", "word_perplexity", "byte_perplexity", "bits_per_byte")


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and math.isfinite(float(value)) else None


def run(evaluated: EvalModel, cfg: EvalConfig, ranks: Ranks) -> TaskResult:
    from orchestra.data.examples import ensure_examples
    from orchestra.eval.harness import TASKS_DIR, run_harness

    shipped = {p.stem for p in TASKS_DIR.glob("*.yaml")}
    examples = ensure_examples(cfg.data_cache) if shipped & set(cfg.lm_eval_tasks) else None
    results = run_harness(
        evaluated,
        cfg.lm_eval_tasks,
        batch_size=cfg.batch_size,
        limit=cfg.limit,
        num_fewshot=cfg.num_fewshot,
        include_path=cfg.lm_eval_include or None,
        seed=cfg.seed,
        examples_dir=examples,
    )
    metrics: dict[str, float] = {}
    samples: list[dict[str, Any]] = []
    paired: dict[str, Paired] = {}
    for task, values in (results.get("results") or {}).items():
        for key, value in values.items():
            number = _number(value)
            if number is None or "_stderr" in key:
                continue
            name = key.split(",")[0]  # lm-eval writes "<metric>,<filter>"
            metrics[f"{task}/{name}"] = number
        for doc in (results.get("samples") or {}).get(task, []):
            record: dict[str, Any] = {"task": task, "example": f"{task}/{doc.get('doc_id')}"}
            for key, value in doc.items():
                number = _number(value)
                if number is not None and key not in ("doc_id",):
                    record[key] = number
                    paired.setdefault(
                        f"{task}/{key}", Paired(key, higher_is_better=key not in LOWER_IS_BETTER)
                    )
            samples.append(record)
    details = {"versions": results.get("versions", {}), "n-shot": results.get("n-shot", {})}
    return TaskResult(metrics, samples, paired=paired, details=details)


TASK = EvalTask(name="lm_eval", run=run)
