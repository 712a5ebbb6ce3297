"""Per-example and corpus metrics for generated text and classification, as plain Python numbers.

Every function returns floats, lists and dicts of them (JSON-serialisable), so a result can go
straight into a report or a results file. Per-example scores (``exact_match``, ``token_f1``,
``rouge_scores``, ``sentence_bleu``) exist so that two models evaluated on the same examples can
be compared pairwise with :mod:`orchestra.eval.stats`; corpus scores (``bleu_score``) are the
numbers one reports. Conventions follow the reference implementations, so our numbers can be
put next to published ones: SQuAD's evaluation script for EM/F1, Google's ``rouge_score`` for
ROUGE, ``sacrebleu`` for BLEU, and torchmetrics / scikit-learn for classification.

``sacrebleu`` and ``rouge_score`` are imported inside the functions that need them, so that
importing this module (e.g. for the classification report) costs nothing extra.
"""

from __future__ import annotations

import re
import string
from collections import Counter
from collections.abc import Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import torch

__all__ = [
    "bleu_score",
    "classification_report",
    "exact_match",
    "normalize_answer",
    "rouge_scores",
    "sentence_bleu",
    "token_f1",
]

ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")
"""The ROUGE variants reported. rougeLsum is left out: it splits sentences with nltk's punkt
model, which is downloaded data and not available offline."""

ECE_BINS = 15

_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCTUATION = frozenset(string.punctuation)


def _check_references(references: Sequence[str], what: str) -> None:
    # A bare string is a Sequence[str] too: iterating it would silently score against characters.
    if isinstance(references, str):
        raise TypeError(f"{what}: references must be a sequence of strings, not a single string")
    if len(references) == 0:
        raise ValueError(f"{what}: at least one reference is needed (use [''] for 'no answer')")


# --------------------------------------------------------------------------- SQuAD EM / F1


def normalize_answer(text: str) -> str:
    """SQuAD's answer normalisation: lower-case, drop punctuation and the articles a/an/the, collapse whitespace.

    Same steps in the same order as the official SQuAD v1.1/v2.0 evaluation scripts, so that
    "The Eiffel Tower!" and "eiffel tower" count as the same answer.
    """
    text = text.lower()
    text = "".join(ch for ch in text if ch not in _PUNCTUATION)
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def exact_match(prediction: str, references: Sequence[str]) -> float:
    """1.0 when the normalised prediction equals any normalised reference, else 0.0 (SQuAD EM)."""
    _check_references(references, "exact_match")
    pred = normalize_answer(prediction)
    return float(any(pred == normalize_answer(ref) for ref in references))


def _f1_single(pred_tokens: list[str], ref_tokens: list[str]) -> float:
    if not pred_tokens or not ref_tokens:
        # SQuAD v2: a no-answer is right only when both are empty.
        return float(pred_tokens == ref_tokens)
    common = Counter(pred_tokens) & Counter(ref_tokens)
    same = sum(common.values())
    if same == 0:
        return 0.0
    precision = same / len(pred_tokens)
    recall = same / len(ref_tokens)
    return 2 * precision * recall / (precision + recall)


def token_f1(prediction: str, references: Sequence[str]) -> float:
    """SQuAD token-overlap F1 (bag of normalised words), the maximum over the references.

    Gives partial credit where exact match gives none; an empty prediction against an empty
    reference scores 1.0 (SQuAD v2's no-answer convention).
    """
    _check_references(references, "token_f1")
    pred_tokens = normalize_answer(prediction).split()
    return max(_f1_single(pred_tokens, normalize_answer(ref).split()) for ref in references)


# --------------------------------------------------------------------------- ROUGE / BLEU


def _check_corpus(predictions: Sequence[str], references: Sequence[Sequence[str]], what: str) -> None:
    if isinstance(predictions, str):
        raise TypeError(f"{what}: predictions must be a sequence of strings, not a single string")
    if len(predictions) != len(references):
        raise ValueError(
            f"{what}: {len(predictions)} predictions but {len(references)} reference lists; they must pair up"
        )
    if len(predictions) == 0:
        raise ValueError(f"{what}: no predictions to score")
    for refs in references:
        _check_references(refs, what)


def rouge_scores(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per-example ROUGE-1/2/L F-measures (Porter stemming), the best reference per example and type.

    Per example rather than averaged, so that models can be compared pairwise; the corpus score is
    the mean. Uses Google's ``rouge_score`` (the implementation behind most published ROUGE
    numbers), whose tokenizer keeps only ASCII letters and digits: non-Latin text scores 0.
    """
    _check_corpus(predictions, references, "rouge_scores")
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=True)
    out: dict[str, list[float]] = {name: [] for name in ROUGE_TYPES}
    for prediction, refs in zip(predictions, references, strict=True):
        per_ref = [scorer.score(ref, prediction) for ref in refs]  # score(target, prediction)
        for name in ROUGE_TYPES:
            out[name].append(float(max(s[name].fmeasure for s in per_ref)))
    return out


def bleu_score(predictions: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    """Corpus BLEU (0-100) with sacrebleu's defaults (13a tokenisation, exp smoothing).

    BLEU is a corpus statistic (n-gram counts are pooled before the geometric mean), so this,
    not the mean of :func:`sentence_bleu`, is the number to report. ``references[i]`` holds the
    references of example i and may have any length: sacrebleu wants one stream per reference
    position, so shorter lists are padded with ``None``, which sacrebleu skips (an empty string
    would count as a zero-length reference and change the brevity penalty).
    """
    _check_corpus(predictions, references, "bleu_score")
    import sacrebleu

    width = max(len(refs) for refs in references)
    streams: list[list[str | None]] = [
        [refs[k] if k < len(refs) else None for refs in references] for k in range(width)
    ]
    result = sacrebleu.corpus_bleu(list(predictions), streams)  # type: ignore[arg-type]
    return float(result.score)


def sentence_bleu(prediction: str, references: Sequence[str]) -> float:
    """Sentence-level BLEU (0-100, sacrebleu's smoothed defaults), one number per example.

    Noisy on its own; meant for paired comparisons of two systems over the same examples, where
    the corpus BLEU of :func:`bleu_score` has no per-example breakdown to resample.
    """
    _check_references(references, "sentence_bleu")
    import sacrebleu

    return float(sacrebleu.sentence_bleu(prediction, list(references)).score)


# --------------------------------------------------------------------------- classification


def _scalar(value: torch.Tensor | float) -> float:
    """A metric value as a Python float; float32 values as their shortest float32 decimal.

    torchmetrics computes its ratios in float32, so 3/5 comes back as 0.6000000238418579; the
    shortest decimal that is the same float32 (0.6) is just as exact and reads as the number it is.
    """
    if isinstance(value, torch.Tensor) and value.dtype == torch.float32:
        return float(str(np.float32(value.item())))
    return float(value)


def _as_labels(
    values: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor, name: str, num_classes: int
) -> torch.Tensor:
    t = values.detach().cpu() if isinstance(values, torch.Tensor) else torch.as_tensor(list(values))
    if t.ndim != 1:
        raise ValueError(
            f"classification_report: {name} must be 1-D class indices, got shape {tuple(t.shape)}"
        )
    if t.is_floating_point() and not torch.equal(t, t.round()):
        raise ValueError(f"classification_report: {name} must hold integer class indices")
    t = t.long()
    if t.numel() and (int(t.min()) < 0 or int(t.max()) >= num_classes):
        raise ValueError(
            f"classification_report: {name} has class indices outside [0, {num_classes}) "
            f"(min {int(t.min())}, max {int(t.max())})"
        )
    return t


def _probability_metrics(probs: torch.Tensor, target: torch.Tensor, num_classes: int) -> dict[str, float]:
    from torchmetrics.functional.classification import multiclass_calibration_error

    p = probs.detach().cpu().double()
    if p.ndim != 2 or p.shape != (target.numel(), num_classes):
        raise ValueError(
            f"classification_report: probs must have shape [N, C] = [{target.numel()}, {num_classes}], "
            f"got {tuple(p.shape)}"
        )
    if not bool(torch.isfinite(p).all()) or float(p.min()) < 0.0 or float(p.max()) > 1.0:
        raise ValueError(
            "classification_report: probs must be probabilities in [0, 1] (apply softmax to logits)"
        )
    row_sums = p.sum(dim=1)
    if not torch.allclose(row_sums, torch.ones_like(row_sums), atol=1e-4):
        worst = float((row_sums - 1).abs().max())
        raise ValueError(f"classification_report: probs rows must sum to 1 (largest deviation {worst:.3g})")

    # Top-label ECE: confidence = max probability, correctness of argmax(probs), 15 equal-width bins.
    ece = multiclass_calibration_error(p, target, num_classes=num_classes, n_bins=ECE_BINS, norm="l1")
    onehot = torch.nn.functional.one_hot(target, num_classes).double()
    # Multiclass Brier score (Brier 1950): squared error summed over classes, mean over examples; in
    # [0, 2]. For two classes it is twice the binary (positive-class) Brier score.
    brier = ((p - onehot) ** 2).sum(dim=1).mean()
    # NLL with probabilities clipped at machine epsilon (as scikit-learn's log_loss), so a zero
    # probability on the true class gives a large finite number rather than inf (not valid JSON).
    eps = torch.finfo(p.dtype).eps
    p_true = p.gather(1, target[:, None]).squeeze(1).clamp(eps, 1 - eps)
    nll = -torch.log(p_true).mean()
    return {"ece": _scalar(ece), "brier": float(brier), "nll": float(nll)}


def classification_report(
    preds: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    target: Sequence[int] | npt.NDArray[np.integer[Any]] | torch.Tensor,
    probs: torch.Tensor | None,
    labels: Sequence[str],
) -> dict[str, Any]:
    """Accuracy, per-class and averaged precision/recall/F1, confusion matrix and (with probs) calibration.

    ``preds`` and ``target`` are class indices into ``labels`` (two labels for a binary task).
    Returned keys:

    * ``accuracy``; ``precision``, ``recall``, ``f1`` and ``support`` as dicts label -> value;
    * ``macro`` and ``micro``: dicts with ``precision``, ``recall``, ``f1``;
    * ``confusion_matrix``: list of rows, row = true class, column = predicted class;
    * ``n`` and ``labels``;
    * when ``probs`` ([N, C], rows summing to 1) is given: ``ece`` (top-label expected calibration
      error, 15 equal-width bins, L1; computed from ``argmax(probs)``, which should be ``preds``),
      ``brier`` (multiclass, in [0, 2]) and ``nll`` (mean negative log-likelihood of the target).

    A score whose denominator is zero is 0 (scikit-learn's ``zero_division=0``): precision of a
    class never predicted, recall of a class absent from ``target``. The macro average is taken
    over the classes that occur in ``target`` or ``preds`` (torchmetrics' convention, and
    scikit-learn's default label set): a label absent from both has no defined score, and
    counting it as 0 would drag the average down for a class the data never tested.
    """
    from torchmetrics.functional.classification import (
        multiclass_accuracy,
        multiclass_confusion_matrix,
        multiclass_f1_score,
        multiclass_precision,
        multiclass_recall,
    )

    if isinstance(labels, str):
        raise TypeError("classification_report: labels must be a sequence of class names, not a string")
    names = [str(label) for label in labels]
    num_classes = len(names)
    if num_classes < 2:
        raise ValueError(f"classification_report: need at least 2 labels, got {num_classes}")
    if len(set(names)) != num_classes:
        raise ValueError(f"classification_report: labels must be distinct, got {names}")
    p = _as_labels(preds, "preds", num_classes)
    t = _as_labels(target, "target", num_classes)
    if p.numel() != t.numel():
        raise ValueError(f"classification_report: {p.numel()} predictions but {t.numel()} targets")
    if p.numel() == 0:
        raise ValueError("classification_report: no examples")

    kw: dict[str, Any] = {"num_classes": num_classes, "validate_args": True}
    per_class = {
        "precision": multiclass_precision(p, t, average=None, **kw),
        "recall": multiclass_recall(p, t, average=None, **kw),
        "f1": multiclass_f1_score(p, t, average=None, **kw),
    }
    report: dict[str, Any] = {
        "labels": names,
        "n": int(t.numel()),
        "accuracy": _scalar(multiclass_accuracy(p, t, average="micro", **kw)),
    }
    for key, values in per_class.items():
        report[key] = {name: _scalar(v) for name, v in zip(names, values.unbind(), strict=True)}
    for average in ("macro", "micro"):
        report[average] = {
            "precision": _scalar(multiclass_precision(p, t, average=average, **kw)),
            "recall": _scalar(multiclass_recall(p, t, average=average, **kw)),
            "f1": _scalar(multiclass_f1_score(p, t, average=average, **kw)),
        }
    confusion = multiclass_confusion_matrix(p, t, **kw)  # [true, predicted]
    report["confusion_matrix"] = [[int(v) for v in row] for row in confusion.tolist()]
    support = torch.bincount(t, minlength=num_classes)
    report["support"] = {name: int(v) for name, v in zip(names, support.tolist(), strict=True)}
    if probs is not None:
        report.update(_probability_metrics(probs, t, num_classes))
    return report
