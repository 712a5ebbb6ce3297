"""The offline half of an A/B test: two models' evaluations, paired example by example.

For every metric a task marks as paired (:class:`~orchestra.eval.tasks.spec.Paired`), the
examples both evaluations scored are matched by their id, and :func:`orchestra.eval.stats.compare`
gives the difference (b − a) with a paired bootstrap confidence interval, a p-value (a paired
permutation test for 0/1 outcomes such as accuracy) and a verdict at ``alpha``. Results go to
``compare.json``.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path
from typing import Any

from rich.table import Table

from orchestra.eval.run import read_results
from orchestra.eval.stats import Comparison, compare
from orchestra.io import atomic_write_text

COMPARE_FILE = "compare.json"


def _key(record: dict[str, Any], index: int) -> Any:
    for name in ("example", "doc", "pair"):
        if name in record:
            return record[name]
    return index


def compare_results(
    a: tuple[dict[str, Any], dict[str, list[dict[str, Any]]]],
    b: tuple[dict[str, Any], dict[str, list[dict[str, Any]]]],
    *,
    alpha: float = 0.05,
    n_resamples: int = 10_000,
    seed: int = 0,
) -> list[tuple[str, Comparison]]:
    """(task, comparison) for every paired metric of every task both evaluations ran."""
    (doc_a, samples_a), (doc_b, samples_b) = a, b
    common = [t for t in doc_a["tasks"] if t in doc_b["tasks"]]
    if not common:
        raise ValueError(
            f"the two evaluations share no task (a: {list(doc_a['tasks'])}, b: {list(doc_b['tasks'])})"
        )
    out = []
    for task in common:
        by_key_a = {_key(r, i): r for i, r in enumerate(samples_a[task])}
        by_key_b = {_key(r, i): r for i, r in enumerate(samples_b[task])}
        keys = [k for k in by_key_a if k in by_key_b]
        for metric, spec in doc_a["tasks"][task]["paired"].items():
            field, weight = spec["field"], spec["weight"]
            rows = [k for k in keys if field in by_key_a[k] and field in by_key_b[k]]
            if task == "lm_eval" and "/" in metric:  # lm-eval records carry their own task
                rows = [k for k in rows if str(k).startswith(metric.rsplit("/", 1)[0] + "/")]
            if len(rows) < 2:
                continue
            out.append(
                (
                    task,
                    compare(
                        metric,
                        [float(by_key_a[k][field]) for k in rows],
                        [float(by_key_b[k][field]) for k in rows],
                        higher_is_better=bool(spec["higher_is_better"]),
                        weights=[float(by_key_a[k][weight]) for k in rows] if weight else None,
                        test=spec.get("test", "auto"),
                        alpha=alpha,
                        n_resamples=n_resamples,
                        seed=seed,
                    ),
                )
            )
    return out


def compare_folders(
    a: Path, b: Path, out: Path, *, alpha: float = 0.05, n_resamples: int = 10_000, seed: int = 0
) -> tuple[Path, list[tuple[str, Comparison]]]:
    """Compare two orchestra-eval folders; writes ``out/compare.json``."""
    comparisons = compare_results(
        read_results(a), read_results(b), alpha=alpha, n_resamples=n_resamples, seed=seed
    )
    out.mkdir(parents=True, exist_ok=True)
    document = {
        "a": str(a),
        "b": str(b),
        "alpha": alpha,
        "comparisons": [{"task": task, **asdict(c)} for task, c in comparisons],
    }
    atomic_write_text(out / COMPARE_FILE, json.dumps(document, indent=2) + "\n")
    return out / COMPARE_FILE, comparisons


def verdict_table(comparisons: list[tuple[str, Comparison]], a: str, b: str) -> Table:
    table = Table(title=f"b = {b}  vs  a = {a}", title_justify="left")
    for column in ("task", "metric", "a", "b", "b - a", "95% CI", "p", "test", "n", "verdict"):
        table.add_column(column)
    for task, c in comparisons:
        table.add_row(
            task,
            c.metric,
            f"{c.a:.4g}",
            f"{c.b:.4g}",
            f"{c.difference:+.4g}",
            f"[{c.ci_low:+.3g}, {c.ci_high:+.3g}]",
            f"{c.p_value:.3g}",
            c.test,
            str(c.n),
            c.verdict,
        )
    return table
