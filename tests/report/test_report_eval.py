"""The report's "Evaluation" section, read from the files orchestra-eval and the in-training
evaluation leave in a run dir: eval/<name>/eval.json, compare.json, the eval/... columns of
metrics.csv and early_stopping.json.

The eval folders and compare.json are written by orchestra-eval's own writers (results_document,
write_results, compare_folders), so the report is tested against the format as it is produced,
not against a copy of it; the report package itself reads the files only.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from orchestra.config import EvalConfig
from orchestra.eval.compare import compare_folders
from orchestra.eval.model import EvalModel
from orchestra.eval.run import results_document, write_results
from orchestra.eval.tasks import Paired, TaskResult
from orchestra.report import build_report, write_report
from tests.report.test_report import PNG_MAGIC, column, csv_rows, line

MEASURES = (
    "The association, in log-likelihood, between the subjects of this template set and its occupations.\n"
    "It is not a measure of harm, nor a certificate that the model is fair."
)
LABELS = ["negative", "positive"]


def _run_dir(run: Path, eval_columns: bool = False) -> Path:
    """A finished 40-step run: train rows every 10 steps, validations at 0-based steps 19 and 39
    (where the evaluation callback, when it ran, logged its eval/<task>/<metric> columns)."""
    run.mkdir()
    header = ["epoch", "step", "train/loss", "val/loss"]
    rows: list[list[object]] = [[0, s, loss, ""] for s, loss in ((9, 7.4), (19, 6.5), (29, 6.0), (39, 5.9))]
    rows += [[0, 19, "", 6.6], [0, 39, "", 6.1]]
    if eval_columns:
        # generation's column exists (another run's header) but never got a value.
        header += ["eval/classification/accuracy", "eval/perplexity/ppl", "eval/generation/rougeL"]
        rows = [[*r, "", "", ""] for r in rows]
        rows[4][4:6], rows[5][4:6] = [0.55, 410.0], [0.6875, 365.25]
    with open(run / "metrics.csv", "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(header)
        writer.writerows(rows)
    (run / "summary.json").write_text(json.dumps({"steps": 40, "tokens": 163840, "train_loss": 5.9}))
    return run


def _results(correct: list[float], ppl: float) -> dict[str, TaskResult]:
    """perplexity, classification (confusion matrix) and bias (its measures text), as the tasks return them."""
    samples = [
        {"example": i, "label": LABELS[i % 2], "prediction": LABELS[(i + int(c == 0)) % 2], "correct": c}
        for i, c in enumerate(correct)
    ]
    matrix = [[0, 0], [0, 0]]
    for s in samples:
        matrix[LABELS.index(str(s["label"]))][LABELS.index(str(s["prediction"]))] += 1
    return {
        "perplexity": TaskResult(
            {"ppl": ppl, "nll": 5.0123456, "tokens": 2048.0},
            [{"doc": 0, "nll": 5.0}],
            details={"source": "paths", "stride": 128},
        ),
        "classification": TaskResult(
            {"accuracy": sum(correct) / len(correct)},
            samples,
            paired={"accuracy": Paired("correct", higher_is_better=True)},
            details={"labels": LABELS, "confusion_matrix": matrix, "mode": "classifier head"},
        ),
        "bias": TaskResult(
            {"gender/mean_gap": -0.0123456},
            [{"pair": 0, "gap": -0.01}],
            details={"probe": "counterfactual occupation bias", "measures": MEASURES},
        ),
    }


def _write_eval(folder: Path, source: str, correct: list[float], ppl: float) -> dict[str, TaskResult]:
    evaluated = EvalModel(
        model=torch.nn.Linear(1, 1),
        tokenizer=None,
        eos_ids=(0,),
        kind="checkpoint",
        source=source,
        tokenizer_sha256="ab" * 32,
    )
    results = _results(correct, ppl)
    cfg = EvalConfig(ckpt=source, tasks=list(results), out=str(folder))
    write_results(folder, results_document(evaluated, cfg, results), results)
    return results


# Model a gets 20 of 40 right, model b 36 of 40 (the same examples, paired by "example").
CORRECT_A = [float(i % 9 < 4) for i in range(40)]
CORRECT_B = [float(i % 10 != 0) for i in range(40)]


def test_every_eval_folder_gets_its_table_measures_and_confusion_matrix(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    _write_eval(run / "eval" / "step000040", str(run / "checkpoints" / "step000040.ckpt"), CORRECT_B, 365.25)
    _write_eval(run / "eval" / "last", str(run / "checkpoints" / "last.ckpt"), CORRECT_A, 412.3456)
    md = build_report(run).markdown

    section = md.split("## Evaluation\n")[1].split("\n## ")[0]
    assert "### During training" not in section  # no eval/ columns, no early_stopping.json
    # Sorted by name, each with who was evaluated and when.
    last, step40 = section.index("### `eval/last`"), section.index("### `eval/step000040`")
    assert last < step40
    created = json.loads((run / "eval" / "last" / "eval.json").read_text())["created"]
    assert f"Model `{run / 'checkpoints' / 'last.ckpt'}` (checkpoint), evaluated {created}." in section
    assert "Examples per task: perplexity 1, classification 40, bias 1." in section

    first = section[last:step40]
    assert "| task | metric | value |" in first
    assert "| perplexity | ppl | 412.3 |" in first  # 4 significant digits
    assert "| perplexity | nll | 5.012 |" in first
    assert f"| classification | accuracy | {sum(CORRECT_A) / 40:.4g} |" in first
    assert "| bias | gender/mean_gap | -0.01235 |" in first
    assert "| perplexity | ppl | 365.2 |" in section[step40:]

    # The bias task's measures text, quoted under the table.
    assert first.index("| bias | gender/mean_gap |") < first.index("What `bias` measures:")
    assert "> The association, in log-likelihood, between the subjects" in first
    assert "> It is not a measure of harm, nor a certificate that the model is fair." in first

    # The classification confusion matrix: rows true class, columns predicted.
    doc = json.loads((run / "eval" / "last" / "eval.json").read_text())
    (neg, pos) = doc["tasks"]["classification"]["details"]["confusion_matrix"]
    assert "Confusion matrix of `classification` (rows: true class, columns: predicted):" in first
    assert "| true \\ predicted | negative | positive |" in first
    assert f"| negative | {neg[0]} | {neg[1]} |" in first and f"| positive | {pos[0]} | {pos[1]} |" in first
    assert "What `perplexity` measures" not in section and "Confusion matrix of `perplexity`" not in section

    assert "- `eval/<name>/`: orchestra-eval results" in md
    assert "skipped" not in section


def test_compare_json_becomes_a_verdict_table(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    a, b = run / "eval" / "last", run / "eval" / "step000040"
    _write_eval(a, "last.ckpt", CORRECT_A, 412.0)
    _write_eval(b, "step000040.ckpt", CORRECT_B, 365.0)
    # Both places a comparison can be: a compare*/ folder and an eval/<name>/ folder.
    compare_folders(a, b, run / "compare", n_resamples=500)
    compare_folders(b, a, run / "eval" / "b-vs-a", alpha=0.1, n_resamples=500)
    md = build_report(run).markdown
    section = md.split("## Evaluation\n")[1].split("\n## ")[0]

    for rel, level in (("compare/compare.json", "95% CI"), ("eval/b-vs-a/compare.json", "90% CI")):
        doc = json.loads((run / rel).read_text())
        table = section.split(f"### `{rel}`")[1].split("###")[0]
        assert f"b = `{doc['b']}` vs a = `{doc['a']}`, alpha = {doc['alpha']:.4g}" in table
        assert f"| task | metric | a | b | b − a | {level} | p | test | n | verdict |" in table
        (c,) = doc["comparisons"]  # accuracy is the only paired metric here
        assert (
            f"| classification | accuracy | {c['a']:.4g} | {c['b']:.4g} | {c['difference']:+.4g} | "
            f"[{c['ci_low']:+.3g}, {c['ci_high']:+.3g}] | {c['p_value']:.3g} | {c['test']} | {c['n']} | "
            f"{c['verdict']} |"
        ) in table
    # 36 vs 20 of 40 right: b is better, whichever way round the comparison was asked.
    assert "| 40 | b better |" in section.split("### `compare/compare.json`")[1]
    assert "| 40 | a better |" in section.split("### `eval/b-vs-a/compare.json`")[1]
    assert "- `compare.json`: orchestra-eval compare's paired tests" in md


def test_a_lower_is_better_comparison_says_so(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    (run / "compare-ppl").mkdir()
    row = {
        "task": "perplexity",
        "metric": "nll",
        "a": 5.1,
        "b": 4.9,
        "difference": -0.2,
        "ci_low": -0.3,
        "ci_high": -0.1,
        "p_value": 0.002,
        "n": 12,
        "test": "bootstrap",
        "higher_is_better": False,
        "verdict": "b better",
    }
    (run / "compare-ppl" / "compare.json").write_text(
        json.dumps({"a": "x", "b": "y", "alpha": 0.05, "comparisons": [row]})
    )
    md = build_report(run).markdown
    assert (
        "| perplexity | nll (lower is better) | 5.1 | 4.9 | -0.2 | [-0.3, -0.1] | 0.002 | bootstrap | 12 | b better |"
        in md
    )


def test_evaluation_during_training_is_plotted_with_the_early_stopping_outcome(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run", eval_columns=True)
    (run / "early_stopping.json").write_text(
        json.dumps(
            {
                "monitor": "eval/perplexity/ppl",
                "mode": "min",
                "patience": 3,
                "best": 365.25,
                "best_step": 40,
                "stopped_step": 40,
            }
        )
    )
    report = write_report(run)
    data = (run / "eval.png").read_bytes()
    assert data.startswith(PNG_MAGIC) and len(data) > 5000

    # Each eval/ column drawn over optimizer steps (0-based CSV step + 1), exactly as written.
    metrics = csv_rows(run / "metrics.csv")
    fig = report.figures["eval.png"]
    for key in ("eval/classification/accuracy", "eval/perplexity/ppl"):
        steps, values = column(metrics, key)
        assert steps == [19, 39]
        assert line(fig, key) == ([s + 1 for s in steps], values)
        assert report.series[key] == ([20, 40], values)
    assert "eval/generation/rougeL" not in report.series  # a column with no value draws nothing
    assert len([ax for ax in fig.axes if ax.get_lines()]) == 2

    md = (run / "report.md").read_text()
    section = md.split("## Evaluation\n")[1].split("\n## ")[0]
    assert "### During training" in section and "![evaluation during training](eval.png)" in section
    assert "Early stopping (`early_stopping.json`):" in section
    assert "| monitor | `eval/perplexity/ppl` (min) |" in section
    assert "| patience | 3 checks |" in section
    assert "| best | 365.2 at step 40 |" in section
    assert "| outcome | stopped early at step 40 |" in section
    assert "- `early_stopping.json`: the in-training evaluation's early-stopping outcome" in md
    # The rest of the report is as without evaluation.
    assert "![loss](loss.png)" in md and "## Sustainability" in md

    (run / "early_stopping.json").write_text(
        json.dumps(
            {
                "monitor": "val/loss",
                "mode": "min",
                "patience": 2,
                "best": 6.1,
                "best_step": 40,
                "stopped_step": None,
            }
        )
    )
    md = build_report(run).markdown
    assert "| outcome | did not stop early (training ran to its end) |" in md


def test_early_stopping_alone_makes_the_section(tmp_path: Path) -> None:
    """early stopping on val/loss with no eval tasks: no eval/ columns, no figure, the outcome still."""
    run = _run_dir(tmp_path / "run")
    (run / "early_stopping.json").write_text(
        json.dumps({"monitor": "val/loss", "mode": "min", "patience": 1, "best": 6.1, "best_step": 40})
    )
    report = build_report(run)
    assert "eval.png" not in report.figures and "](eval.png)" not in report.markdown
    assert "| monitor | `val/loss` (min) |" in report.markdown
    assert "| outcome | did not stop early (training ran to its end) |" in report.markdown


def test_a_damaged_eval_file_is_named_and_the_rest_still_renders(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    _write_eval(run / "eval" / "good", "good.ckpt", CORRECT_A, 412.0)
    truncated = (run / "eval" / "good" / "eval.json").read_text()[:100]
    (run / "eval" / "broken").mkdir()
    (run / "eval" / "broken" / "eval.json").write_text(truncated)
    (run / "eval" / "future").mkdir()
    (run / "eval" / "future" / "eval.json").write_text(json.dumps({"format": 2, "tasks": {}}))
    (run / "eval" / "notasks").mkdir()
    (run / "eval" / "notasks" / "eval.json").write_text(json.dumps({"format": 1, "tasks": {"x": 3}}))
    (run / "eval" / "binary").mkdir()
    (run / "eval" / "binary" / "eval.json").write_bytes(b"\xff\xfe\x00garbage")
    (run / "compare").mkdir()
    (run / "compare" / "compare.json").write_text(json.dumps({"comparisons": [{"task": "x"}]}))
    (run / "early_stopping.json").write_text("[]")
    (run / "eval" / "unfinished").mkdir()  # an evaluation that never wrote its eval.json: not listed

    report = write_report(run)
    md = (run / "report.md").read_text()
    assert md == report.markdown
    section = md.split("## Evaluation\n")[1].split("\n## ")[0]
    assert "- skipped `eval/broken/eval.json`: it is not valid JSON (" in section
    assert "- skipped `eval/future/eval.json`: it has results format 2; this report reads format 1" in section
    assert "- skipped `eval/notasks/eval.json`: it has a task 'x' without a `metrics` object" in section
    assert "- skipped `eval/binary/eval.json`: it cannot be read (UnicodeDecodeError: " in section
    assert "- skipped `compare/compare.json`: it has comparison 0 without metric, a, b," in section
    assert "- skipped `early_stopping.json`: it is not an early-stopping record" in section
    assert len([ln for ln in section.splitlines() if ln.startswith("- skipped ")]) == 6
    assert "unfinished" not in md
    # The readable evaluation and the rest of the report are there.
    assert "### `eval/good`" in section and "| perplexity | ppl | 412 |" in section
    for heading in ("## Learning", "## Throughput", "## Sustainability", "## Files"):
        assert heading in md
    assert (run / "loss.png").read_bytes().startswith(PNG_MAGIC)


def test_a_run_without_evaluation_has_no_evaluation_section(tmp_path: Path) -> None:
    run = _run_dir(tmp_path / "run")
    (run / "eval").mkdir()  # an empty eval/ folder is no evaluation either
    report = build_report(run)
    assert "Evaluation" not in report.markdown and "eval" not in report.markdown.split("## Files")[1]
    assert set(report.figures) == {"loss.png", "throughput.png"}
    assert not any(k.startswith("eval/") for k in report.series)
