"""Run evaluation tasks on one model and write their results: eval.json, samples/, a console table.

``out/eval.json`` holds, per task, its metrics, the paired fields a comparison reads, and its
details; ``out/samples/<task>.jsonl`` one record per example. Both are written only after every
task has finished, each atomically, so a failed or interrupted evaluation leaves an earlier
one's results as they were.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from orchestra.config import EvalConfig, to_plain
from orchestra.eval.model import EvalModel
from orchestra.eval.tasks import Ranks, TaskResult, eval_task
from orchestra.io import atomic_write_text

RESULTS_FILE = "eval.json"
SAMPLES_DIR = "samples"
FORMAT = 1


def check_tasks(evaluated: EvalModel, cfg: EvalConfig) -> None:
    """Refuse, before anything runs, a task this model cannot do."""
    for name in cfg.tasks:
        task = eval_task(name)
        if evaluated.labels and task.lm_head:
            raise ValueError(
                f"tasks: {name} needs a language model, but {evaluated.source} is a sequence classifier "
                "(task=classification); it runs tasks=[classification]"
            )


def evaluate(evaluated: EvalModel, cfg: EvalConfig) -> dict[str, TaskResult]:
    """Every task of ``cfg.tasks`` on the model, in order (the same results on every rank)."""
    check_tasks(evaluated, cfg)
    ranks = Ranks()
    return {name: eval_task(name).run(evaluated, cfg, ranks) for name in cfg.tasks}


def results_document(evaluated: EvalModel, cfg: EvalConfig, results: dict[str, TaskResult]) -> dict[str, Any]:
    return {
        "format": FORMAT,
        "created": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "model": {
            "source": evaluated.source,
            "kind": evaluated.kind,
            "tokenizer_sha256": evaluated.tokenizer_sha256,
        },
        "config": to_plain(cfg),
        "tasks": {
            name: {
                "metrics": r.metrics,
                "n": len(r.samples),
                "paired": {k: asdict(p) for k, p in r.paired.items()},
                "details": r.details,
                "samples": f"{SAMPLES_DIR}/{name}.jsonl",
            }
            for name, r in results.items()
        },
    }


def check_out(out: Path, overwrite: bool) -> None:
    if (out / RESULTS_FILE).exists() and not overwrite:
        raise FileExistsError(
            f"out: {out} already holds the results of an evaluation ({RESULTS_FILE}); "
            "choose another out= or set overwrite=true"
        )


def write_results(out: Path, document: dict[str, Any], results: dict[str, TaskResult]) -> Path:
    """samples/<task>.jsonl, then eval.json (the file that marks the folder complete)."""
    (out / SAMPLES_DIR).mkdir(parents=True, exist_ok=True)
    for name, r in results.items():
        atomic_write_text(
            out / SAMPLES_DIR / f"{name}.jsonl", "".join(json.dumps(s) + "\n" for s in r.samples)
        )
    atomic_write_text(out / RESULTS_FILE, json.dumps(document, indent=2) + "\n")
    return out / RESULTS_FILE


def read_results(folder: str | Path) -> tuple[dict[str, Any], dict[str, list[dict[str, Any]]]]:
    """(eval.json, samples per task) of an evaluation folder."""
    folder = Path(folder)
    path = folder / RESULTS_FILE
    try:
        document = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise ValueError(f"{path}: not a readable orchestra-eval result ({err})") from None
    if document.get("format") != FORMAT:
        raise ValueError(f"{path}: results format {document.get('format')!r}; this version reads {FORMAT}")
    samples = {}
    for name, task in document["tasks"].items():
        lines = (folder / task["samples"]).read_text().splitlines()
        samples[name] = [json.loads(line) for line in lines if line.strip()]
    return document, samples


def summary_rows(document: dict[str, Any]) -> list[tuple[str, str, float]]:
    """(task, metric, value) rows of the console table and the report."""
    return [
        (task, metric, value)
        for task, body in document["tasks"].items()
        for metric, value in body["metrics"].items()
    ]
