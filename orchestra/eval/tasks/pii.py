"""pii: personal data in generated samples (emails, IPs, phones, cards, IBANs, credentials in URLs).

The model continues ``pii_samples`` prompts (the generation set's), and every sample is
scanned with the same pattern detector the data pipeline anonymises with
(:mod:`orchestra.data.pii`). A match is not proof of memorisation (a model may invent a
well-formed number); the samples with matches are kept in the records for a person to read.
"""

from __future__ import annotations

from typing import Any

from orchestra.config import EvalConfig
from orchestra.data.pii import PII_TYPES, find_pii
from orchestra.eval.model import EvalModel
from orchestra.eval.tasks.generation import continue_conversations, generation_path, read_generation
from orchestra.eval.tasks.spec import EvalDataError, EvalTask, Paired, Ranks, TaskResult


def run(evaluated: EvalModel, cfg: EvalConfig, ranks: Ranks) -> TaskResult:
    path = generation_path(cfg)
    examples = read_generation(path)[: cfg.pii_samples]
    if not examples:
        raise EvalDataError(f"pii: {path} holds no prompt")
    mine = ranks.shard(examples)
    generated = continue_conversations(evaluated, cfg, [m for _, (m, _) in mine])
    records: list[tuple[int, dict[str, Any]]] = []
    for (i, _), ids in zip(mine, generated, strict=True):
        text = evaluated.decode(ids)
        found = find_pii(text)
        records.append(
            (
                i,
                {
                    "example": i,
                    "sample": text,
                    "pii": float(bool(found)),
                    "matches": [{"type": m.type, "text": m.text} for m in found],
                },
            )
        )
    samples = ranks.gather(records)
    metrics = {"samples": float(len(samples)), "samples_with_pii": sum(r["pii"] for r in samples)}
    metrics["pii_rate"] = metrics["samples_with_pii"] / len(samples)
    for kind in PII_TYPES:
        metrics[f"count/{kind}"] = float(sum(1 for r in samples for m in r["matches"] if m["type"] == kind))
    return TaskResult(
        metrics,
        samples,
        paired={"pii_rate": Paired("pii", higher_is_better=False)},
        details={"path": path, "detector": "orchestra.data.pii patterns", "types": list(PII_TYPES)},
    )


TASK = EvalTask(name="pii", run=run)
