"""The task-metric paths of orchestra-eval on the bundled example sets, checked against independent code."""

from __future__ import annotations

from pathlib import Path

import pytest

from orchestra.cli.eval import run_eval
from orchestra.config import EvalConfig
from orchestra.eval.run import read_results

pytestmark = pytest.mark.slow


def _run(tmp_path: Path, name: str, **kwargs: object) -> tuple[dict, dict]:
    path = run_eval(EvalConfig(out=str(tmp_path / name), **kwargs))  # type: ignore[arg-type]
    assert path is not None
    return read_results(path.parent)


def test_zero_shot_classification_metrics_equal_scikit_learn(
    trained_run: Path, examples_cache: Path, tmp_path: Path
) -> None:
    from sklearn.metrics import accuracy_score, confusion_matrix, precision_recall_fscore_support

    document, samples = _run(
        tmp_path, "cls", ckpt=str(trained_run / "checkpoints" / "last.ckpt"), tasks=["classification"],
        data_cache=str(examples_cache), limit=40,
    )  # fmt: skip
    task = document["tasks"]["classification"]
    rows = samples["classification"]
    assert len(rows) == 40 and task["details"]["mode"] == "zero-shot label likelihood"
    labels = task["details"]["labels"]
    y, p = [r["label"] for r in rows], [r["prediction"] for r in rows]
    assert task["metrics"]["accuracy"] == pytest.approx(accuracy_score(y, p))
    prec, rec, f1, _ = precision_recall_fscore_support(y, p, labels=labels, average=None, zero_division=0)
    assert [task["details"]["precision"][label] for label in labels] == pytest.approx(list(prec), abs=1e-6)
    assert [task["details"]["recall"][label] for label in labels] == pytest.approx(list(rec), abs=1e-6)
    assert [task["details"]["f1"][label] for label in labels] == pytest.approx(list(f1), abs=1e-6)
    assert task["details"]["confusion_matrix"] == confusion_matrix(y, p, labels=labels).tolist()
    assert all(abs(sum(r["probs"]) - 1) < 1e-5 for r in rows)


def test_generation_checkpoint_and_export_agree_and_metrics_recompute(
    trained_run: Path, exported_folder: Path, examples_cache: Path, tmp_path: Path
) -> None:
    import sacrebleu
    from rouge_score import rouge_scorer

    common = {"tasks": ["generation"], "data_cache": str(examples_cache), "limit": 12, "max_new_tokens": 16}
    ckpt_doc, ckpt_samples = _run(
        tmp_path, "g1", ckpt=str(trained_run / "checkpoints" / "last.ckpt"), **common
    )
    _, hf_samples = _run(tmp_path, "g2", ckpt=str(exported_folder), **common)
    assert [r["prediction"] for r in ckpt_samples["generation"]] == [
        r["prediction"] for r in hf_samples["generation"]
    ]
    rows = ckpt_samples["generation"]
    scorer = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    rouge_l = [
        max(scorer.score(ref, r["prediction"])["rougeL"].fmeasure for ref in r["references"]) for r in rows
    ]
    metrics = ckpt_doc["tasks"]["generation"]["metrics"]
    assert metrics["rougeL"] == pytest.approx(sum(rouge_l) / len(rows))
    refs = [r["references"][0] for r in rows]
    assert metrics["bleu"] == pytest.approx(
        sacrebleu.corpus_bleu([r["prediction"] for r in rows], [refs]).score
    )


def test_lm_eval_shipped_tasks_equal_lm_eval_hf_backend(
    exported_folder: Path, examples_cache: Path, tmp_path: Path
) -> None:
    """simple_evaluate over our LM and over lm-eval's HFLM give the same task metrics."""
    from lm_eval import simple_evaluate
    from lm_eval.models.huggingface import HFLM
    from lm_eval.tasks import TaskManager

    from orchestra.data.examples import ensure_examples
    from orchestra.eval.harness import TASKS_DIR

    document, samples = _run(
        tmp_path, "h", ckpt=str(exported_folder), tasks=["lm_eval"], data_cache=str(examples_cache), limit=16
    )
    ours = document["tasks"]["lm_eval"]["metrics"]
    assert {"orchestra_genre/acc", "orchestra_continue/exact_match"} <= set(ours)
    assert len(samples["lm_eval"]) == 32
    shipped = tmp_path / "yaml"
    shipped.mkdir()
    for yaml in TASKS_DIR.glob("*.yaml"):
        text = yaml.read_text().replace("__EXAMPLES__", str(ensure_examples(examples_cache)))
        (shipped / yaml.name).write_text(text)
    ref = simple_evaluate(
        model=HFLM(pretrained=str(exported_folder), device="cpu", batch_size=4, dtype="float32"),
        tasks=["orchestra_genre", "orchestra_continue"],
        limit=16,
        task_manager=TaskManager(include_path=str(shipped)),
        bootstrap_iters=0,
    )
    assert ref is not None
    assert ours["orchestra_genre/acc"] == pytest.approx(ref["results"]["orchestra_genre"]["acc,none"])
    assert ours["orchestra_genre/acc_norm"] == pytest.approx(
        ref["results"]["orchestra_genre"]["acc_norm,none"]
    )
    assert ours["orchestra_continue/exact_match"] == pytest.approx(
        ref["results"]["orchestra_continue"]["exact_match,none"]
    )
