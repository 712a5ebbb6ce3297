"""classification: accuracy, precision / recall / F1 (per class, macro, micro), confusion matrix, calibration.

A classifier checkpoint (task=classification) predicts with its own head. A language model
classifies zero-shot: each label is scored as the continuation ``" <label>"`` of
``"<text>\\nLabel:"`` and the labels' log-likelihoods, normalised over the labels, are its
class probabilities (which the calibration error and Brier score read).
"""

from __future__ import annotations

from typing import Any

import torch

from orchestra.config import EvalConfig
from orchestra.data.tasks.classification import collate_classification, read_classification
from orchestra.eval.model import EvalModel
from orchestra.eval.scoring import score_continuations
from orchestra.eval.tasks.spec import EvalDataError, EvalTask, Paired, Ranks, TaskResult, limited

PROMPT = "{text}\nLabel:"


def _path(cfg: EvalConfig) -> str:
    if cfg.classification_path:
        return cfg.classification_path
    from orchestra.data.examples import example_paths

    return str(example_paths(cfg.data_cache, "classification")[1])


@torch.no_grad()
def _head_probs(evaluated: EvalModel, texts: list[str], batch_size: int) -> torch.Tensor:
    """Class probabilities [N, C] from a classifier's head (texts cut to the context)."""
    from orchestra.model.heads import SequenceClassifier

    assert isinstance(evaluated.model, SequenceClassifier)
    context = evaluated.model.model.cfg.max_seq_len
    out = []
    for start in range(0, len(texts), batch_size):
        chunk = texts[start : start + batch_size]
        items = [
            {"tokens": torch.tensor(evaluated.encode(t, add_special_tokens=False)[:context] or [evaluated.eos_ids[0]]),
             "label": 0}
            for t in chunk
        ]  # fmt: skip
        batch = collate_classification(items, evaluated.eos_ids[0])
        logits = evaluated.model(
            batch["tokens"].to(evaluated.device), batch["last_index"].to(evaluated.device)
        )
        out.append(torch.softmax(logits.float(), dim=-1).cpu())
    return torch.cat(out)


def _zero_shot_probs(
    evaluated: EvalModel, texts: list[str], labels: list[str], batch_size: int
) -> torch.Tensor:
    requests = []
    for text in texts:
        context = evaluated.encode(PROMPT.format(text=text))
        for label in labels:
            whole = evaluated.encode(PROMPT.format(text=text) + " " + label)
            cont = (
                whole[len(context) :]
                if whole[: len(context)] == context
                else evaluated.encode(" " + label, False)
            )
            requests.append((context, cont))
    scored = score_continuations(evaluated.model, requests, batch_size)
    logprobs = torch.tensor([s.logprob for s in scored], dtype=torch.float64).view(len(texts), len(labels))
    return torch.softmax(logprobs, dim=-1).float()


def run(evaluated: EvalModel, cfg: EvalConfig, ranks: Ranks) -> TaskResult:
    from orchestra.eval.metrics import classification_report

    path = _path(cfg)
    texts, names = read_classification(path)
    texts, names = limited(texts, cfg.limit), limited(names, cfg.limit)
    if not texts:
        raise EvalDataError(f"classification: {path} holds no example")
    labels = list(cfg.labels or evaluated.labels or sorted(set(names)))
    unknown = sorted(set(names) - set(labels))
    if unknown:
        raise EvalDataError(
            f"classification: {path} has labels {unknown} outside {labels} (set labels=[...])"
        )
    if evaluated.labels and list(evaluated.labels) != labels:
        raise EvalDataError(
            f"classification: the classifier {evaluated.source} was trained on labels {list(evaluated.labels)}, "
            f"not {labels}"
        )
    mine = ranks.shard(list(zip(texts, names, strict=True)))
    my_texts = [t for _, (t, _) in mine]
    probs = (
        _head_probs(evaluated, my_texts, cfg.batch_size)
        if evaluated.labels
        else _zero_shot_probs(evaluated, my_texts, labels, cfg.batch_size)
    )
    records: list[tuple[int, dict[str, Any]]] = []
    for row, (i, (_, name)) in enumerate(mine):
        p = probs[row]
        pred = int(p.argmax())
        records.append(
            (
                i,
                {
                    "example": i,
                    "label": name,
                    "prediction": labels[pred],
                    "correct": float(labels[pred] == name),
                    "probs": [float(x) for x in p],
                },
            )
        )
    samples = ranks.gather(records)
    target = torch.tensor([labels.index(r["label"]) for r in samples])
    preds = torch.tensor([labels.index(r["prediction"]) for r in samples])
    all_probs = torch.tensor([r["probs"] for r in samples])
    report = classification_report(preds, target, all_probs, labels)
    metrics = {k: float(v) for k, v in report.items() if isinstance(v, (int, float))}
    details = {k: v for k, v in report.items() if not isinstance(v, (int, float))}
    details["mode"] = "classifier head" if evaluated.labels else "zero-shot label likelihood"
    details["path"] = path
    return TaskResult(
        metrics, samples, paired={"accuracy": Paired("correct", higher_is_better=True)}, details=details
    )


TASK = EvalTask(name="classification", run=run, lm_head=False)
