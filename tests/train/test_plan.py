"""plan_run: every decision of a run, made without Lightning objects and without changing the config."""

from __future__ import annotations

import copy
import warnings
from pathlib import Path

import lightning as L
import pytest
import torch

from orchestra.config import ConfigError, FinetuneConfig, FinetuneMethod, TaskConfig, TaskName
from orchestra.train.methods import METHODS
from orchestra.train.run import plan_run, validate_run
from orchestra.train.tasks import TASKS
from tests.helpers import tiny_config


def test_a_pretraining_plan(corpus_dir: Path, data_cache: Path, tmp_path: Path, monkeypatch) -> None:
    built: list[str] = []
    monkeypatch.setattr(L.Trainer, "__init__", lambda *a, **k: built.append("Trainer"))
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run")
    before = copy.deepcopy(cfg)
    plan = plan_run(cfg)
    assert built == []  # no Lightning object was made
    assert cfg == before
    assert plan.method is METHODS["none"] and plan.task is TASKS["pretrain"] and plan.base is None
    assert plan.seq_len == 64 and plan.vocab_size == 512 and plan.precision == "32-true"
    assert (plan.world_size, plan.accumulation) == (1, 2)  # global 8 = micro 4 x 2
    assert plan.tokens_per_step == 8 * 64
    assert plan.dataset_dir is not None and (plan.dataset_dir / "manifest.json").is_file()
    assert plan.resume_path is None and plan.run_dir == (tmp_path / "run").resolve()


def test_a_fine_tuning_plan_leaves_the_callers_config_alone(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    base = trained_run / "checkpoints" / "last.ckpt"
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run")
    cfg.model.dim, cfg.model.n_layers = 32, 1  # ignored: the base fixes the shape
    cfg.finetune = FinetuneConfig(method=FinetuneMethod.lora, init_from=str(base), seq_len=32)
    cfg.task = TaskConfig(name=TaskName.sft, pack=False)
    before = copy.deepcopy(cfg)
    plan = plan_run(cfg)
    assert cfg == before
    assert (plan.model.dim, plan.model.n_layers) == (64, 2)  # the base's shape
    assert plan.config.data.name.startswith("tiny-stdlib-tok") and plan.config.data.tokenizer_path
    assert plan.seq_len == 32 and plan.tokens_per_step is None  # padded fine-tuning batches
    assert plan.method.frozen_base and plan.base is not None
    assert plan.base_reference is not None and plan.base_reference.path == str(base.resolve())
    assert not any(isinstance(v, (dict, torch.Tensor)) for v in vars(plan.base).values())  # no weights kept


def test_a_short_smoke_run_clamps_the_warmup_with_one_warning(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run", max_steps=10)
    cfg.scheduler.warmup_steps = 100
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plan = plan_run(cfg)
    messages = [str(w.message) for w in caught if "warmup_steps" in str(w.message)]
    assert messages == [
        "scheduler.warmup_steps=100 is not smaller than trainer.max_steps=10: warming up over 9 steps instead"
    ]
    assert plan.config.scheduler.warmup_steps == 9 and cfg.scheduler.warmup_steps == 100


def test_method_and_task_rules_come_from_their_specs(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    cfg = tiny_config(corpus_dir, data_cache, tmp_path / "run")
    cfg.task = TaskConfig(name=TaskName.dpo)
    with pytest.raises(ConfigError, match=r"^task: task=dpo adapts a pretrained model"):
        validate_run(cfg)
    cfg.finetune = FinetuneConfig(method=FinetuneMethod.prompt, init_from="x", prompt_tokens=4)
    with pytest.raises(ConfigError, match=r"^finetune: finetune=prompt conditions generation"):
        validate_run(cfg)
    assert not (tmp_path / "run").exists()
