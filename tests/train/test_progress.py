"""The progress bar counts optimizer steps of max_steps ("step 40/300"), never "Epoch 0/-2"."""

from __future__ import annotations

from types import SimpleNamespace

from orchestra.train.progress import StepProgressBar


def test_the_description_is_steps_of_max_steps() -> None:
    bar = StepProgressBar()
    bar._trainer = SimpleNamespace(max_steps=300, global_step=40, current_epoch=0)  # type: ignore[assignment]
    assert bar._get_train_description(0) == "step 40/300 "
    bar._trainer.global_step = 300  # type: ignore[union-attr]
    assert bar._get_train_description(0) == "step 300/300"  # padded to this width from the start
    assert "Epoch" not in bar._get_train_description(0)


def test_a_run_with_the_bar_trains(corpus_dir, data_cache, tmp_path) -> None:
    from orchestra.train.run import build_callbacks, plan_run
    from tests.helpers import tiny_config

    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run", progress_bar=True)
    bars = [c for c in build_callbacks(plan_run(cfg)).all() if isinstance(c, StepProgressBar)]
    assert len(bars) == 1
