"""Evaluation during training (TrainConfig.eval) and early stopping, end to end on the tiny run."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from orchestra.config import ConfigError, EvalConfig, TrainEvalConfig, validate
from tests.helpers import tiny_config

pytestmark = pytest.mark.slow


def test_eval_metrics_logged_equal_orchestra_eval_and_early_stopping_stops(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    from orchestra.cli.eval import run_eval
    from orchestra.eval.run import read_results
    from orchestra.train.run import train

    run_dir = tmp_path / "run"
    cfg = tiny_config(corpus_dir, data_cache, run_dir)
    doc = str(corpus_dir / "heapq.py.txt")
    # mode=max on the validation loss: a falling loss never "improves", so patience 1 stops at the
    # second validation (step 20 of 30) -- a planted overfitting signal.
    cfg.eval = TrainEvalConfig(
        tasks=["perplexity"], limit=4, early_stopping="val/loss", mode="max", patience=1,
        options=EvalConfig(paths=[doc]),
    )  # fmt: skip
    train(cfg)
    with open(run_dir / "metrics.csv") as f:
        table = list(csv.DictReader(f))
    rows = [r for r in table if r.get("eval/perplexity/ppl")]
    # On the validation rows (Lightning's CSV logs them at the step index before the global step).
    assert [r["step"] for r in rows] == [r["step"] for r in table if r.get("val/loss")] and len(rows) == 2
    stopping = json.loads((run_dir / "early_stopping.json").read_text())
    assert (
        stopping["monitor"] == "val/loss" and stopping["stopped_step"] == 20 and stopping["best_step"] == 10
    )
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 20
    # The logged number is the one orchestra-eval computes on the step checkpoint.
    ckpt = run_dir / "checkpoints" / "step0000020.ckpt"
    path = run_eval(
        EvalConfig(ckpt=str(ckpt), tasks=["perplexity"], paths=[doc], limit=4, out=str(tmp_path / "e"))
    )
    assert path is not None
    ppl = read_results(path.parent)[0]["tasks"]["perplexity"]["metrics"]["ppl"]
    logged = float(rows[1]["eval/perplexity/ppl"])
    assert logged == pytest.approx(ppl, rel=1e-5)


def test_bad_eval_settings_are_refused_by_key(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run")
    cases = {
        "eval.tasks": TrainEvalConfig(tasks=["vibes"]),
        "eval.every_n_steps": TrainEvalConfig(tasks=["perplexity"], every_n_steps=15),
        "eval.early_stopping": TrainEvalConfig(tasks=["perplexity"], early_stopping="eval/generation/bleu"),
        "eval.mode": TrainEvalConfig(mode="up"),
    }
    for key, section in cases.items():
        cfg.eval = section
        with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
            validate(cfg)
