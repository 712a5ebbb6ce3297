"""bias: the counterfactual bias probe (:mod:`orchestra.eval.bias`) as an evaluation task.

Reported per dimension: the mean log-likelihood gap between the two groups' sentences with its
bootstrap interval, the share of pairs where group A is likelier, and (gender) the
stereotype-consistent preference. Its ``measures`` text says what the numbers mean and what
they do not; it goes with the results into eval.json, the report and the model card.
"""

from __future__ import annotations

from typing import Any

from orchestra.config import EvalConfig
from orchestra.eval.model import EvalModel
from orchestra.eval.tasks.spec import EvalTask, Paired, Ranks, TaskResult

SUMMARY_KEYS = (
    "n_pairs",
    "mean_gap",
    "ci_low",
    "ci_high",
    "share_a_more_likely",
    "stereotype_consistent_preference",
)


def run(evaluated: EvalModel, cfg: EvalConfig, ranks: Ranks) -> TaskResult:
    from orchestra.eval.bias import run_bias_probe

    # The probe scores a few thousand short sentences: every rank runs it whole (no gather needed).
    result = run_bias_probe(
        evaluated, cfg.bias_dimensions, batch_size=cfg.batch_size, seed=cfg.seed, limit=cfg.limit
    )
    metrics: dict[str, float] = {}
    details: dict[str, Any] = {"measures": result["measures"], "units": result.get("units")}
    for dimension, summary in result["dimensions"].items():
        for key in SUMMARY_KEYS:
            value = summary.get(key)
            if isinstance(value, (int, float)):
                metrics[f"{dimension}/{key}"] = float(value)
        details[dimension] = {k: v for k, v in summary.items() if k not in SUMMARY_KEYS}
    samples = [
        {"example": i, **record, "abs_gap": abs(float(record["gap"]))}
        for i, record in enumerate(result["records"])
    ]
    return TaskResult(
        metrics, samples, paired={"abs_gap": Paired("abs_gap", higher_is_better=False)}, details=details
    )


TASK = EvalTask(name="bias", run=run)
