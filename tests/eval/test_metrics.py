"""orchestra.eval.metrics against independent references: scikit-learn, a direct numpy ECE, rouge_score, sacrebleu, hand cases."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from sklearn import metrics as skm

from orchestra.eval.metrics import (
    bleu_score,
    classification_report,
    exact_match,
    normalize_answer,
    rouge_scores,
    sentence_bleu,
    token_f1,
)

TOL = 1e-6  # torchmetrics computes its ratios in float32

# --------------------------------------------------------------------------- classification


def _labels(num_classes: int) -> list[str]:
    return [f"class_{i}" for i in range(num_classes)]


def _assert_matches_sklearn(preds: np.ndarray, target: np.ndarray, num_classes: int) -> dict:
    labels = _labels(num_classes)
    report = classification_report(preds.tolist(), torch.as_tensor(target), None, labels)
    every = list(range(num_classes))

    assert report["accuracy"] == pytest.approx(skm.accuracy_score(target, preds), abs=TOL)
    precision, recall, f1, support = skm.precision_recall_fscore_support(
        target, preds, labels=every, average=None, zero_division=0
    )
    for i, name in enumerate(labels):
        assert report["precision"][name] == pytest.approx(precision[i], abs=TOL), name
        assert report["recall"][name] == pytest.approx(recall[i], abs=TOL), name
        assert report["f1"][name] == pytest.approx(f1[i], abs=TOL), name
        assert report["support"][name] == support[i], name
    # Macro over the classes that occur in target or preds: scikit-learn's default label set.
    macro = skm.precision_recall_fscore_support(target, preds, average="macro", zero_division=0)
    micro = skm.precision_recall_fscore_support(target, preds, labels=every, average="micro", zero_division=0)
    for i, key in enumerate(("precision", "recall", "f1")):
        assert report["macro"][key] == pytest.approx(macro[i], abs=TOL), key
        assert report["micro"][key] == pytest.approx(micro[i], abs=TOL), key
    assert report["confusion_matrix"] == skm.confusion_matrix(target, preds, labels=every).tolist()
    assert report["n"] == len(target)
    json.dumps(report, allow_nan=False)  # plain, finite Python values
    return report


@pytest.mark.parametrize("num_classes", [2, 3, 7])
def test_report_matches_sklearn_on_random_predictions(num_classes: int) -> None:
    rng = np.random.default_rng(num_classes)
    target = rng.integers(0, num_classes, size=300)
    # Right 60% of the time, otherwise a random class: a realistic, imbalanced mix of errors.
    preds = np.where(rng.random(300) < 0.6, target, rng.integers(0, num_classes, size=300))
    _assert_matches_sklearn(preds, target, num_classes)


@pytest.mark.parametrize("num_classes", [3, 7])
def test_report_with_a_class_never_predicted_and_one_absent(num_classes: int) -> None:
    rng = np.random.default_rng(100 + num_classes)
    absent = num_classes - 1  # neither in target nor predicted
    target = rng.integers(0, absent, size=200)
    preds = rng.integers(1, absent, size=200)  # class 0 occurs in target but is never predicted
    assert 0 in target and 0 not in preds and absent not in target and absent not in preds
    report = _assert_matches_sklearn(preds, target, num_classes)

    never, gone = _labels(num_classes)[0], _labels(num_classes)[absent]
    assert report["precision"][never] == 0.0  # zero_division=0
    assert report["recall"][never] == 0.0
    assert report["support"][gone] == 0
    assert report["precision"][gone] == report["recall"][gone] == report["f1"][gone] == 0.0
    # The absent label is left out of the macro average, not counted as a zero.
    present = _labels(num_classes)[:absent]
    assert report["macro"]["f1"] == pytest.approx(np.mean([report["f1"][k] for k in present]), abs=TOL)
    assert report["macro"]["f1"] > np.mean(list(report["f1"].values()))


def test_binary_report_with_the_positive_class_never_predicted() -> None:
    target = np.array([0, 1, 1, 0, 1, 0, 0, 1])
    preds = np.zeros_like(target)
    report = _assert_matches_sklearn(preds, target, 2)
    assert report["precision"]["class_1"] == 0.0
    assert report["precision"]["class_0"] == pytest.approx(0.5)
    assert report["confusion_matrix"] == [[4, 0], [4, 0]]


def _numpy_ece(probs: np.ndarray, target: np.ndarray, n_bins: int = 15) -> float:
    """Top-label L1 ECE (Guo et al. 2017): bins ((m-1)/M, m/M], |accuracy - confidence| weighted by bin mass."""
    confidence = probs.max(axis=1)
    correct = (probs.argmax(axis=1) == target).astype(np.float64)
    bins = np.clip(np.ceil(confidence * n_bins).astype(int) - 1, 0, n_bins - 1)
    ece = 0.0
    for m in range(n_bins):
        in_bin = bins == m
        if in_bin.any():
            ece += in_bin.mean() * abs(correct[in_bin].mean() - confidence[in_bin].mean())
    return ece


@pytest.mark.parametrize("num_classes", [2, 5])
def test_calibration_brier_and_nll_against_direct_computation(num_classes: int) -> None:
    gen = torch.Generator().manual_seed(num_classes)
    n = 600
    target = torch.randint(0, num_classes, (n,), generator=gen)
    # Over-confident logits that are right more often than chance, so ECE is clearly non-zero.
    logits = 3.0 * torch.randn(n, num_classes, generator=gen)
    logits[torch.arange(n), target] += 1.5
    probs = torch.softmax(logits.double(), dim=1)
    preds = probs.argmax(dim=1)
    report = classification_report(preds, target, probs, _labels(num_classes))

    p, t = probs.numpy(), target.numpy()
    expected_ece = _numpy_ece(p, t)
    assert expected_ece > 0.02
    assert report["ece"] == pytest.approx(expected_ece, abs=1e-5)
    assert report["brier"] == pytest.approx(
        skm.brier_score_loss(t, p, labels=list(range(num_classes)), scale_by_half=False), rel=1e-9
    )
    assert report["nll"] == pytest.approx(skm.log_loss(t, p, labels=list(range(num_classes))), rel=1e-9)
    json.dumps(report, allow_nan=False)


def test_perfectly_calibrated_certain_predictions() -> None:
    target = torch.tensor([0, 1, 2, 1])
    probs = torch.nn.functional.one_hot(target, 3).double()
    report = classification_report(target, target, probs, ["a", "b", "c"])
    assert report["accuracy"] == 1.0
    assert report["ece"] == 0.0
    assert report["brier"] == 0.0
    assert report["nll"] == pytest.approx(0.0, abs=1e-12)
    # A zero probability on the true class gives a large finite NLL, not inf.
    wrong = torch.nn.functional.one_hot(torch.tensor([1, 0, 0, 0]), 3).double()
    assert np.isfinite(classification_report(target, target, wrong, ["a", "b", "c"])["nll"])


def test_report_rejects_bad_inputs() -> None:
    labels = ["a", "b", "c"]
    with pytest.raises(ValueError, match="outside"):
        classification_report([0, 3], [0, 1], None, labels)
    with pytest.raises(ValueError, match="targets"):
        classification_report([0, 1], [0, 1, 2], None, labels)
    with pytest.raises(ValueError, match="sum to 1"):
        classification_report([0, 1], [0, 1], torch.full((2, 3), 0.5), labels)
    with pytest.raises(ValueError, match="shape"):
        classification_report([0, 1], [0, 1], torch.full((2, 2), 0.5), labels)
    with pytest.raises(ValueError, match="at least 2"):
        classification_report([0], [0], None, ["only"])


# --------------------------------------------------------------------------- SQuAD EM / F1


def test_normalize_answer() -> None:
    assert normalize_answer("The  Eiffel Tower!") == "eiffel tower"
    assert normalize_answer("an apple, a pear and THE plum.") == "apple pear and plum"
    assert normalize_answer("Theater Another") == "theater another"  # articles only as whole words
    assert normalize_answer("  ") == ""


def test_exact_match_and_f1_on_squad_examples() -> None:
    # SQuAD v1.1 dev, "Which NFL team represented the AFC at Super Bowl 50?"
    refs = ["Denver Broncos", "Denver Broncos", "Denver Broncos"]
    assert exact_match("Denver Broncos", refs) == 1.0
    assert exact_match("the Denver Broncos.", refs) == 1.0
    assert exact_match("Broncos", refs) == 0.0
    assert token_f1("Broncos", refs) == pytest.approx(2 / 3)  # P = 1, R = 1/2
    # "Where did Super Bowl 50 take place?": the best of several references counts.
    refs = [
        "Santa Clara, California",
        "Levi's Stadium",
        "Levi's Stadium in the San Francisco Bay Area at Santa Clara, California.",
    ]
    assert exact_match("Levi's Stadium", refs) == 1.0
    assert token_f1("Santa Clara", refs) == pytest.approx(2 * (2 / 3) / (1 + 2 / 3))  # P = 1, R = 2/3
    # Against the long answer alone: 3 of its 11 normalised tokens, all 3 predicted tokens right.
    assert token_f1("in Santa Clara", refs[2:]) == pytest.approx(2 * (3 / 11) / (1 + 3 / 11))
    assert token_f1("Levi's", ["Santa Clara"]) == 0.0
    # Repeated tokens are matched as a multiset.
    assert token_f1("the the cat cat", ["cat"]) == pytest.approx(2 * 0.5 * 1 / 1.5)


def test_empty_answers_follow_squad_v2() -> None:
    assert token_f1("", [""]) == 1.0
    assert token_f1("The", ["a"]) == 1.0  # both normalise to nothing
    assert token_f1("", ["Denver"]) == 0.0
    assert token_f1("Denver", [""]) == 0.0
    assert exact_match("", [""]) == 1.0
    with pytest.raises(TypeError):
        exact_match("Denver", "Denver")  # a string is not a list of references
    with pytest.raises(ValueError):
        token_f1("Denver", [])


# --------------------------------------------------------------------------- ROUGE


def test_rouge_matches_rouge_score() -> None:
    from rouge_score import rouge_scorer

    predictions = [
        "the quick brown fox jumps over the lazy dog",
        "police killed the gunman",
        "models were running quickly",
        "",
    ]
    references = [
        ["a quick brown dog jumps over the fox", "the fast brown fox leaped over a lazy dog"],
        ["the gunman was shot dead by police", "police kill the gunman"],
        ["the model runs quickly"],
        ["nothing here"],
    ]
    got = rouge_scores(predictions, references)
    scorer = rouge_scorer.RougeScorer(["rouge1", "rouge2", "rougeL"], use_stemmer=True)
    for name in ("rouge1", "rouge2", "rougeL"):
        expected = [
            max(scorer.score(r, p)[name].fmeasure for r in refs)
            for p, refs in zip(predictions, references, strict=True)
        ]
        assert got[name] == pytest.approx(expected, abs=1e-12), name
        assert all(type(v) is float for v in got[name])
    assert got["rouge1"][3] == 0.0
    # The stemmer is on: "running"/"runs" and "models"/"model" match.
    assert (
        got["rouge1"][2]
        > rouge_scorer.RougeScorer(["rouge1"]).score(references[2][0], predictions[2])["rouge1"].fmeasure
    )


def test_rouge1_hand_computed() -> None:
    # prediction tokens: cat sat on the mat (5); reference: the cat sat (3); overlap cat, sat, the (3).
    precision, recall = 3 / 5, 3 / 3
    got = rouge_scores(["cat sat on the mat"], [["the cat sat"]])
    assert got["rouge1"] == [pytest.approx(2 * precision * recall / (precision + recall))]
    assert got["rouge1"][0] == pytest.approx(0.75)
    # Bigrams: prediction has 4 (cat sat, sat on, on the, the mat), reference 2 (the cat, cat sat); 1 shared.
    assert got["rouge2"][0] == pytest.approx(2 * (1 / 4) * (1 / 2) / (1 / 4 + 1 / 2))


def test_rouge_rejects_mismatched_lengths() -> None:
    with pytest.raises(ValueError, match="pair up"):
        rouge_scores(["a", "b"], [["a"]])


# --------------------------------------------------------------------------- BLEU


def test_bleu_matches_sacrebleu_with_multiple_references() -> None:
    import sacrebleu

    predictions = [
        "The cat is sitting on the mat.",
        "There is a dog in the garden today.",
        "He read the book because he was interested in world history.",
    ]
    refs_1 = [
        "The cat sits on the mat.",
        "The dog is in the garden.",
        "He was interested in world history because he read the book.",
    ]
    refs_2 = [
        "A cat is on the mat.",
        "There is a dog in the garden.",
        "He read the book since world history interested him.",
    ]
    references = [[r1, r2] for r1, r2 in zip(refs_1, refs_2, strict=True)]
    expected = sacrebleu.corpus_bleu(predictions, [refs_1, refs_2]).score
    assert bleu_score(predictions, references) == pytest.approx(expected, abs=1e-9)
    assert 0.0 < expected < 100.0
    # More references can only help: the single-reference score is lower.
    assert sacrebleu.corpus_bleu(predictions, [refs_1]).score < expected


def test_bleu_with_differing_reference_counts() -> None:
    import sacrebleu

    predictions = [
        "The cat is sitting on the mat.",
        "There is a dog in the garden today.",
        "It rains.",
        "Hello",
    ]
    references = [
        ["The cat sits on the mat.", "A cat is on the mat.", "On the mat sits a cat."],
        ["The dog is in the garden."],
        ["It is raining.", "Rain falls."],
        # One short reference for a one-word prediction: padding with "" would make a zero-length
        # reference the closest in length and change the brevity penalty.
        ["Hello there , my dear old friend"],
    ]
    # Repeating one of an example's own references changes neither the clipped n-gram counts nor
    # the closest reference length, so padding with duplicates is an independent way to get the
    # score sacrebleu gives for a variable number of references.
    width = 3
    streams = [[refs[min(k, len(refs) - 1)] for refs in references] for k in range(width)]
    expected = sacrebleu.corpus_bleu(predictions, streams).score
    assert bleu_score(predictions, references) == pytest.approx(expected, abs=1e-9)


def test_bleu_perfect_match_is_100() -> None:
    predictions = ["the quick brown fox jumps over the lazy dog", "hello world, this is a test"]
    references = [[p] for p in predictions]
    assert bleu_score(predictions, references) == pytest.approx(100.0)
    assert sentence_bleu(predictions[0], [predictions[0], "something else"]) == pytest.approx(100.0)


def test_sentence_bleu_matches_sacrebleu() -> None:
    import sacrebleu

    prediction = "The cat is sitting on the mat."
    refs = ["The cat sits on the mat.", "A cat is on the mat."]
    assert sentence_bleu(prediction, refs) == pytest.approx(sacrebleu.sentence_bleu(prediction, refs).score)
    assert sentence_bleu("completely unrelated words", refs) < 10.0
