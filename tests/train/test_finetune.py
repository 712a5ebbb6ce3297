"""Fine-tuning from a trained run or an HF folder: what trains, what is saved, resume, export."""

from __future__ import annotations

import hashlib
import json
import math
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneMethod,
    ScheduleName,
    SchedulerConfig,
    TaskConfig,
    TaskName,
    TrainConfig,
)
from orchestra.train.checkpoint import CheckpointError, load_checkpoint_file
from orchestra.train.export import consolidated_state_dict, export_hf
from orchestra.train.run import train
from orchestra.train.run import validate_run as validate
from tests.helpers import tiny_config
from tests.train.test_run import column, read_metrics


def ft_config(
    corpus_dir: Path, data_cache: Path, run_dir: Path, method: str, init_from: Path, **trainer: object
) -> TrainConfig:
    """The tiny job as a fine-tune: constant lr, so a run can be extended by raising max_steps.

    Validation runs at the last step: Lightning defers the last step's checkpoint to a validation.
    """
    settings: dict[str, object] = {"max_steps": 4, "ckpt_every_n_steps": 2, **trainer}
    settings.setdefault("val_every_n_steps", settings["max_steps"])
    cfg = tiny_config(corpus_dir, data_cache, run_dir, **settings)
    cfg.scheduler = SchedulerConfig(name=ScheduleName.constant, warmup_steps=0)
    cfg.finetune = FinetuneConfig(method=FinetuneMethod(method), init_from=str(init_from))
    return cfg


def base_ckpt(trained_run: Path) -> Path:
    return trained_run / "checkpoints" / "last.ckpt"


def base_val_loss(trained_run: Path) -> float:
    return float(json.loads((trained_run / "summary.json").read_text())["val_loss"])


def test_lora_trains_only_lora_saves_only_it_and_exports_merged(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from orchestra.model.peft import merge_lora
    from orchestra.train.finetune import rebuild_peft_model

    base = base_ckpt(trained_run)
    result = train(ft_config(corpus_dir, data_cache, tmp_path / "run", "lora", base))
    assert result.module is not None
    model = result.module.model
    base_state, _ = consolidated_state_dict(base)

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)
    for name, p in model.named_parameters():
        if p.requires_grad:
            continue
        assert torch.equal(p.detach(), base_state[name.replace(".base.", ".")]), name  # bit for bit
    assert all(model.get_parameter(n).abs().sum() > 0 for n in trainable if ".lora_B." in n)  # B started at 0

    ckpt_path = tmp_path / "run" / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(ckpt_path)
    assert set(ckpt["state_dict"]) == {f"model.{n}" for n in trainable}
    peft = ckpt["orchestra"]["peft"]
    assert peft["method"] == "lora" and peft["config"]["lora_rank"] == 8
    assert peft["base"] == {
        "path": str(base.resolve()),
        "sha256": hashlib.sha256(base.read_bytes()).hexdigest(),
    }

    out = export_hf(ckpt_path, tmp_path / "hf")
    hf = AutoModelForCausalLM.from_pretrained(out, torch_dtype=torch.float32).eval()
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    merged = rebuild_peft_model(trained, ckpt["orchestra"], ckpt_path).eval()
    tokens = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        unmerged_logits = merged(tokens)
        merge_lora(merged)
        assert torch.allclose(merged(tokens), unmerged_logits, atol=1e-5, rtol=0)
        assert torch.allclose(hf(tokens).logits, unmerged_logits, atol=1e-5, rtol=0)
        assert torch.allclose(model.eval()(tokens), unmerged_logits, atol=1e-5, rtol=0)


def test_lora_resume_continues_exactly(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    """Resume from a mid-run PEFT checkpoint (as after a kill at step 3): same losses as straight through."""
    base = base_ckpt(trained_run)
    straight, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    train(ft_config(corpus_dir, data_cache, straight, "lora", base, max_steps=6, ckpt_every_n_steps=3))
    (resumed_dir / "checkpoints").mkdir(parents=True)
    shutil.copy(straight / "checkpoints" / "step0000003.ckpt", resumed_dir / "checkpoints")
    resumed = train(
        ft_config(corpus_dir, data_cache, resumed_dir, "lora", base, max_steps=6, ckpt_every_n_steps=3)
    )
    assert resumed.summary["resumed_from"] is not None and resumed.summary["steps"] == 6
    ref, res = column(read_metrics(straight), "train/loss"), column(read_metrics(resumed_dir), "train/loss")
    assert sorted(ref) == list(range(6)) and sorted(res) == [3, 4, 5]
    assert res == {step: ref[step] for step in res}  # bitwise on CPU


def test_full_finetune_starts_at_base_loss_with_l2sp_and_layer_decay(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    cfg = ft_config(corpus_dir, data_cache, tmp_path / "run", "full", base_ckpt(trained_run), max_steps=3)
    cfg.finetune.l2sp = 0.01
    cfg.finetune.layer_lr_decay = 0.5
    result = train(cfg)
    assert result.module is not None
    assert all(p.requires_grad for p in result.module.model.parameters())
    rows = read_metrics(tmp_path / "run")
    loss0 = float(column(rows, "train/loss")[0])
    assert loss0 < math.log(512) - 1.0  # not a from-scratch loss
    assert abs(loss0 - base_val_loss(trained_run)) < 0.5
    l2sp = column(rows, "train/l2sp")
    assert float(l2sp[0]) == 0.0 and float(l2sp[2]) > 0.0  # zero at the base, grows as weights move
    lr_top, lr_bottom = (
        float(column(rows, "train/lr_layer1.decay")[0]),
        float(column(rows, "train/lr_layer0.decay")[0]),
    )
    assert lr_bottom == pytest.approx(lr_top * 0.5)


def test_hf_folder_base_finetunes_and_adapters_refuse_export(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    hf_base = export_hf(base_ckpt(trained_run), tmp_path / "hf-base")
    run = tmp_path / "run"
    train(ft_config(corpus_dir, data_cache, run, "adapter", hf_base, max_steps=2))
    loss0 = float(column(read_metrics(run), "train/loss")[0])
    assert abs(loss0 - base_val_loss(trained_run)) < 0.5
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["orchestra"]["peft"]["method"] == "adapter"
    assert all(".adapter." in k for k in ckpt["state_dict"])
    with pytest.raises(CheckpointError, match="cannot be merged"):
        export_hf(run / "checkpoints" / "last.ckpt", tmp_path / "out")

    no_tok = tmp_path / "hf-no-tokenizer"
    shutil.copytree(hf_base, no_tok)
    (no_tok / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"finetune.init_from: .* has no tokenizer.json"):
        train(ft_config(corpus_dir, data_cache, tmp_path / "run2", "lora", no_tok))


@pytest.mark.parametrize(
    ("finetune", "expected"),
    [
        (
            FinetuneConfig(method=FinetuneMethod.lora),
            r"finetune.init_from: finetune.method=lora needs a base model",
        ),
        (FinetuneConfig(init_from="x.ckpt"), r"finetune.init_from: .*choose finetune=full"),
        (
            FinetuneConfig(method=FinetuneMethod.full, init_from="x", l2sp=-1.0),
            r"finetune.l2sp: must be >= 0",
        ),
        (
            FinetuneConfig(method=FinetuneMethod.full, init_from="x", layer_lr_decay=0.0),
            r"finetune.layer_lr_decay",
        ),
        (FinetuneConfig(method=FinetuneMethod.lora, init_from="x", l2sp=0.1), r"finetune.l2sp: applies to"),
    ],
)
def test_finetune_config_errors_name_the_key(finetune: FinetuneConfig, expected: str) -> None:
    with pytest.raises(ConfigError, match=expected):
        validate(TrainConfig(finetune=finetune))


def test_missing_base_is_one_clear_error(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"finetune.init_from: .*nope.ckpt' does not exist"):
        train(ft_config(corpus_dir, data_cache, tmp_path / "run", "lora", tmp_path / "nope.ckpt"))
    assert not (tmp_path / "run").exists()


def test_finetune_presets_compose() -> None:
    from tests.test_config import composed

    cfg = composed("finetune=lora", "finetune.init_from=/some/ckpt")
    assert cfg.finetune.method == FinetuneMethod.lora and cfg.finetune.lora_targets == ["q_proj", "v_proj"]
    assert composed().finetune.method == FinetuneMethod.none
    with pytest.raises(ConfigError, match=r"finetune\.init_from"):
        validate(composed("finetune=full"))


def hf_chat_base(folder: Path, family: str = "llama3") -> Any:
    """A random tiny transformers Llama with ``family``'s tokenizer files (tests/data/hf_tokenizers.py)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.data.hf_tokenizers import config_ids, write_tokenizer_files

    tokenizer = write_tokenizer_files(folder, family)
    config = LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
        vocab_size=tokenizer.get_vocab_size(),
        **config_ids(family, tokenizer),
    )
    torch.manual_seed(0)
    LlamaForCausalLM(config).save_pretrained(str(folder))
    return tokenizer


def chat_files(tmp_path: Path) -> tuple[Path, Path]:
    rows = [
        {"prompt": "What is the capital of France?", "response": "The capital of France is Paris."},
        {"prompt": "Name a colour.", "response": "Blue is a colour, and so are red and green."},
        {"prompt": "Tell me a joke.", "response": "Why did the chicken cross the road?"},
    ]
    train_file, val_file = tmp_path / "train.jsonl", tmp_path / "val.jsonl"
    train_file.write_text("".join(json.dumps(r) + "\n" for r in rows * 6))
    val_file.write_text("".join(json.dumps(r) + "\n" for r in rows * 2))
    return train_file, val_file


def sft_chat_config(corpus_dir: Path, data_cache: Path, tmp_path: Path, base: Path, run: Path) -> TrainConfig:
    cfg = ft_config(corpus_dir, data_cache, run, "lora", base, max_steps=2, val_every_n_steps=2)
    train_file, val_file = chat_files(tmp_path)
    # One example per row, so the rows can be read back one by one.
    cfg.task = TaskConfig(name=TaskName.sft, train_path=str(train_file), val_path=str(val_file), pack=False)
    return cfg


def test_an_hf_bases_chat_template_and_eos_ids_reach_sft_and_its_checkpoints(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    """Llama 3.1 Instruct's files: SFT renders through its template, checkpoints stop on its three EOS ids."""
    from orchestra.data.tasks import IGNORE_INDEX, TaskDataModule
    from orchestra.train.finetune import load_base

    base_dir = tmp_path / "base"
    tokenizer = hf_chat_base(base_dir)
    base = load_base(base_dir)
    assert [tokenizer.id_to_token(i) for i in base.eos_ids] == ["<|eot_id|>", "<|end_of_text|>", "<|eom_id|>"]
    assert base.eos_id == tokenizer.token_to_id("<|eot_id|>") and base.add_bos
    assert base.bos_id == tokenizer.token_to_id("<|begin_of_text|>") and "<|start_header_id|>" in str(
        base.chat_template
    )

    cfg = sft_chat_config(corpus_dir, data_cache, tmp_path, base_dir, tmp_path / "run")
    result = train(cfg)
    assert result.summary["steps"] == 2 and result.module is not None
    meta = load_checkpoint_file(tmp_path / "run" / "checkpoints" / "last.ckpt")["orchestra"]
    assert meta["eos_ids"] == list(base.eos_ids) and meta["eos_id"] == base.eos_id

    # What it trained on: the template's render, one BOS, each reply closed by a trained <|eot_id|>.
    dm = TaskDataModule(
        cfg.task, cfg.task.train_path, cfg.task.val_path, base.tokenizer_json, base.eos_id,
        seq_len=256, micro_batch_size=1, global_batch_size=1, seed=0, max_steps=1, val_batches=1,
        tokens=base.tokens,
    )  # fmt: skip
    row = dm.dataset("val")[0]
    tokens, labels = row["tokens"].tolist(), row["labels"].tolist()
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    assert (
        text.startswith("<|begin_of_text|><|start_header_id|>system<|end_header_id|>")
        and tokens.count(base.bos_id) == 1
    )
    trained = tokenizer.decode([y for y in labels if y != IGNORE_INDEX], skip_special_tokens=False)
    assert trained == "The capital of France is Paris.<|eot_id|>"

    # Exported back: the base's template, BOS and every eos id, as transformers reads them.
    from transformers import AutoTokenizer, GenerationConfig

    out = export_hf(tmp_path / "run" / "checkpoints" / "last.ckpt", tmp_path / "hf")
    assert GenerationConfig.from_pretrained(out).eos_token_id == list(base.eos_ids)
    assert json.loads((out / "config.json").read_text())["bos_token_id"] == base.bos_id
    exported, original = AutoTokenizer.from_pretrained(out), AutoTokenizer.from_pretrained(base_dir)
    chat = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello."}]
    assert exported.bos_token == "<|begin_of_text|>"
    assert exported.apply_chat_template(chat, tokenize=False) == original.apply_chat_template(
        chat, tokenize=False
    )


def test_an_eos_token_the_tokenizer_lacks_is_one_clear_error_and_nothing_is_written(
    corpus_dir: Path, data_cache: Path, tmp_path: Path
) -> None:
    base_dir = tmp_path / "base"
    hf_chat_base(base_dir, "qwen2.5")  # a Qwen tokenizer.json ...
    config_file = base_dir / "tokenizer_config.json"
    config = json.loads(config_file.read_text())
    config["eos_token"] = "<|eot_id|>"  # ... under a Llama 3 tokenizer_config.json
    config_file.write_text(json.dumps(config))
    before = {p: p.read_bytes() for p in base_dir.iterdir()}
    with pytest.raises(
        ConfigError,
        match=r"finetune.init_from: .*base/tokenizer_config\.json: eos_token '<\|eot_id\|>' is not a token of the "
        r"base's tokenizer\.json",
    ):
        train(sft_chat_config(corpus_dir, data_cache, tmp_path, base_dir, tmp_path / "run"))
    assert not (tmp_path / "run").exists()
    assert {p: p.read_bytes() for p in base_dir.iterdir()} == before
