"""CheckpointMeta: one typed, versioned record; checkpoints written by earlier releases still load.

The fixture ``main-97452f4-last.ckpt`` was written by ``orchestra-train`` at commit 97452f4
(before the checkpoint package existed), with the logits that release computed from it.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestra.config import ModelConfig
from orchestra.train.checkpoint import CheckpointError, CheckpointMeta, load_checkpoint_file, read_meta
from orchestra.train.checkpoint.load import load_model_from_checkpoint
from orchestra.train.checkpoint.meta import BaseRef, LastRow, PeftRecord, check_tensors
from orchestra.train.export import export_hf

FIXTURES = Path(__file__).parent / "fixtures"
OLD = FIXTURES / "main-97452f4-last.ckpt"


def test_a_checkpoint_of_the_previous_release_loads_with_its_logits() -> None:
    reference = torch.load(FIXTURES / "main-97452f4-logits.pt", weights_only=True)
    model, _tokenizer, meta = load_model_from_checkpoint(OLD)
    assert meta.format == 1 and meta.vocab_size == reference["vocab_size"] and meta.task == "pretrain"
    assert meta.last_row is not None and meta.last_row.step == 3
    with torch.no_grad():
        logits = model(reference["tokens"])
    torch.testing.assert_close(logits, reference["logits"], atol=0, rtol=0)


def test_a_checkpoint_of_the_previous_release_exports(tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    reference = torch.load(FIXTURES / "main-97452f4-logits.pt", weights_only=True)
    out = export_hf(OLD, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    with torch.no_grad():
        torch.testing.assert_close(hf(reference["tokens"]).logits, reference["logits"], atol=1e-5, rtol=0)


def test_round_trip_keeps_every_field() -> None:
    meta = CheckpointMeta(
        model_config=ModelConfig(dim=32, n_layers=1, n_heads=2, n_kv_heads=1, ffn_dim=64),
        vocab_size=320,
        tokenizer_json="{}",
        task="classification",
        eos_id=3,
        eos_ids=(3, 7, 5),
        labels=("neg", "pos"),
        peft=PeftRecord("lora", {"method": "lora", "lora_rank": 4}, BaseRef("/base", "ab" * 32)),
        last_row=LastRow(9, {"train/loss": 1.5}),
    )
    again = CheckpointMeta.from_dict(meta.to_dict(), "x.ckpt")
    assert again == meta
    assert again.is_classifier and again.peft is not None and again.peft.finetune_config().lora_rank == 4


def test_eos_ids_are_optional_and_start_with_eos_id() -> None:
    """A checkpoint from before eos_ids stops on its eos_id (or on nothing recorded); a new one on all."""
    old = read_meta(OLD)
    assert old.eos_ids == () and old.stop_ids == ((old.eos_id,) if old.eos_id is not None else ())
    assert "eos_ids" not in old.to_dict()
    d = {**old.to_dict(), "eos_id": 4}
    assert CheckpointMeta.from_dict(d, "x.ckpt").stop_ids == (4,)
    new = CheckpointMeta.from_dict({**d, "eos_ids": [4, 9]}, "x.ckpt")
    assert new.stop_ids == (4, 9) and new.to_dict()["eos_ids"] == [4, 9] and new.format == 1
    with pytest.raises(
        CheckpointError, match=r"x\.ckpt: malformed .*eos_ids \[9, 4\] must start with eos_id 4"
    ):
        CheckpointMeta.from_dict({**d, "eos_ids": [9, 4]}, "x.ckpt")


def test_a_future_format_is_refused_naming_its_version(tmp_path: Path) -> None:
    ckpt = load_checkpoint_file(OLD)
    ckpt["orchestra"]["format"] = 7
    path = tmp_path / "future.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(
        CheckpointError, match=r"future\.ckpt has metadata format 7; this Orchestra reads format 1"
    ):
        read_meta(path)
    with pytest.raises(CheckpointError, match="format 7"):
        load_model_from_checkpoint(path)


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda d: d.pop("model_config"), r"carries no Orchestra metadata"),
        (lambda d: d.update(vocab_size="many"), r"malformed Orchestra metadata"),
        (lambda d: d["model_config"].update(depth=3), r"malformed Orchestra metadata.*depth"),
        (lambda d: d.update(peft={"method": "lora"}), r"malformed Orchestra metadata"),
    ],
)
def test_malformed_metadata_is_one_error_naming_the_file(change, expected: str, tmp_path: Path) -> None:
    ckpt = load_checkpoint_file(OLD)
    change(ckpt["orchestra"])
    path = tmp_path / "bad.ckpt"
    torch.save(ckpt, path)
    with pytest.raises(CheckpointError, match=rf"bad\.ckpt.*{expected}|{expected}.*"):
        read_meta(path)


def test_the_fit_check_lists_every_difference() -> None:
    meta = read_meta(OLD)
    meta.check_compatible(OLD, meta.model_config, meta.vocab_size, None)  # fits itself
    other = replace(meta.model_config, dim=64, n_layers=2)
    with pytest.raises(CheckpointError) as err:
        meta.check_compatible(OLD, other, meta.vocab_size + 64, "lora")
    message = str(err.value)
    for part in (
        "model.dim: checkpoint 32 vs config 64",
        "model.n_layers",
        "vocab size: checkpoint 320 vs",
        "finetune.method: checkpoint full weights vs config lora",
    ):
        assert part in message
    peft = replace(meta, peft=PeftRecord("lora", {}, BaseRef("/a", "1" * 64)))
    with pytest.raises(
        CheckpointError, match=r"base model: checkpoint trained on /a .* finetune.init_from is /b"
    ):
        peft.check_compatible(OLD, meta.model_config, meta.vocab_size, "lora", BaseRef("/b", "2" * 64))


def test_check_tensors_names_the_missing_the_unexpected_and_the_misshaped() -> None:
    layout = {"a": (2, 3), "b": (4,)}
    check_tensors({"a": torch.zeros(2, 3), "b": torch.zeros(4)}, layout, "x.ckpt", "the layout")
    with pytest.raises(CheckpointError, match=r"missing \['b'\], unexpected \['c'\]"):
        check_tensors({"a": torch.zeros(2, 3), "c": torch.zeros(4)}, layout, "x.ckpt", "the layout")
    with pytest.raises(CheckpointError, match=r"tensor 'b' has shape \(5,\), but the layout needs \(4,\)"):
        check_tensors({"a": torch.zeros(2, 3), "b": torch.zeros(5)}, layout, "x.ckpt", "the layout")
