"""Every fine-tuning method on the pretrain task: what trains changes, everything else stays bit for bit."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from orchestra.config import (
    ConfigError,
    FinetuneConfig,
    FinetuneMethod,
    StrategyName,
    TaskConfig,
    TaskName,
    TrainConfig,
)
from orchestra.train.export import consolidated_state_dict
from orchestra.train.run import train
from orchestra.train.run import validate_run as validate
from tests.train.test_finetune import base_ckpt, ft_config
from tests.train.test_run import column, read_metrics


def base_name(name: str) -> str:
    """Our parameter name as it was in the base model, before a method wrapped its module."""
    name = re.sub(r"^model\.", "", name) if name.startswith("model.") and "soft_prompt" not in name else name
    return name.replace(".base.", ".").replace(".inner.", ".")


def run_method(
    corpus_dir: Path,
    data_cache: Path,
    trained_run: Path,
    run_dir: Path,
    method: str,
    steps: int = 3,
    **finetune: object,
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], set[str]]:
    """(base state, trained parameters by base name or own name, names of trainable parameters)."""
    cfg = ft_config(corpus_dir, data_cache, run_dir, method, base_ckpt(trained_run), max_steps=steps)
    for key, value in finetune.items():
        setattr(cfg.finetune, key, value)
    result = train(cfg)
    assert result.module is not None
    base, _ = consolidated_state_dict(base_ckpt(trained_run))
    params = {base_name(n): p.detach() for n, p in result.module.model.named_parameters()}
    trainable = {base_name(n) for n, p in result.module.model.named_parameters() if p.requires_grad}
    return base, params, trainable


@pytest.mark.parametrize("method", ["lora", "dora", "adapter", "prompt"])
def test_frozen_base_methods_change_only_their_own_weights(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path, method: str
) -> None:
    extra = {"prompt_tokens": 8} if method == "prompt" else {}
    base, params, trainable = run_method(
        corpus_dir, data_cache, trained_run, tmp_path / "run", method, **extra
    )
    markers = {
        "lora": ("lora_A", "lora_B"),
        "dora": ("lora_A", "lora_B", "lora_magnitude_vector"),
        "adapter": (".adapter.",),
        "prompt": ("soft_prompt",),
    }[method]
    assert trainable and all(any(m in n for m in markers) for n in trainable)
    for name, tensor in base.items():
        assert torch.equal(params[name], tensor), f"{method}: frozen {name} changed"
    new = {n: p for n, p in params.items() if n not in base}
    assert set(new) == trainable
    moved = [n for n in trainable if "lora_A" not in n and ".down." not in n]
    if method == "dora":  # the magnitudes start at the base's row norms and train
        magnitudes = [n for n in trainable if n.endswith("lora_magnitude_vector")]
        assert magnitudes and len(magnitudes) == sum(n.endswith("lora_A.weight") for n in trainable)
    if method == "prompt":
        assert not torch.equal(
            new["soft_prompt.weight"], base["tok_embeddings.weight"][result_init_ids(8, base)]
        ), "soft prompt did not train"
    else:  # zero-initialised halves (LoRA B, adapter up) must have left zero
        assert any(new[n].abs().max() > 0 for n in moved if "lora_B" in n or ".up." in n)


def result_init_ids(n: int, base: dict[str, torch.Tensor]) -> torch.Tensor:
    """The vocabulary rows PromptTunedModel initialises its soft prompt from (seed 0)."""
    gen = torch.Generator().manual_seed(0)
    return torch.randint(0, base["tok_embeddings.weight"].shape[0], (n,), generator=gen)


def test_gradual_unfreezing_keeps_waiting_blocks_bit_for_bit(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    # Two blocks, one more every 3 steps: steps 0-2 train block 1 (+ norm, head) only.
    base, params, _ = run_method(
        corpus_dir, data_cache, trained_run, tmp_path / "run", "unfreeze", steps=3, unfreeze_every_n_steps=3
    )
    waiting = [n for n in base if n.startswith("layers.0.") or n == "tok_embeddings.weight"]
    training = [n for n in base if n.startswith("layers.1.") or n in ("norm.weight", "lm_head.weight")]
    assert waiting and training
    for name in waiting:
        assert torch.equal(params[name], base[name]), f"waiting {name} changed"
    for name in training:
        assert not torch.equal(params[name], base[name]), f"{name} should have trained"
    unfrozen = column(read_metrics(tmp_path / "run"), "train/unfrozen_blocks")
    assert [float(unfrozen[s]) for s in sorted(unfrozen)] == [1.0, 1.0, 1.0]


def test_lora_with_layerwise_lr_decay(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    _, _, trainable = run_method(
        corpus_dir, data_cache, trained_run, tmp_path / "run", "lora", steps=2, layer_lr_decay=0.5
    )
    assert all("lora_" in n for n in trainable)
    rows = read_metrics(tmp_path / "run")
    top, bottom = (
        float(column(rows, "train/lr_layer1.decay")[0]),
        float(column(rows, "train/lr_layer0.decay")[0]),
    )
    assert bottom == pytest.approx(top * 0.5)


@pytest.mark.parametrize(
    ("changes", "expected"),
    [
        (
            {"method": "prompt", "layer_lr_decay": 0.5},
            r"finetune.layer_lr_decay: does not apply to finetune=prompt",
        ),
        ({"method": "adapter", "l2sp": 0.1}, r"finetune.l2sp: applies to full-weight methods"),
        (
            {"method": "unfreeze", "unfreeze_every_n_steps": 0},
            r"finetune.unfreeze_every_n_steps: must be a positive",
        ),
        ({"method": "prompt", "prompt_tokens": 0}, r"finetune.prompt_tokens: must be a positive"),
        ({"method": "full", "task": "sft", "strategy": "deepspeed_zero2"}, None),
        ({"method": "unfreeze", "strategy": "deepspeed_zero2"}, r"strategy: finetune=unfreeze needs"),
        (
            {"method": "prompt", "strategy": "fsdp"},
            r"strategy: finetune=prompt runs under strategy=single or ddp",
        ),
        ({"method": "prompt", "task": "classification"}, r"finetune: finetune=prompt conditions generation"),
        ({"method": "prompt", "task": "sft"}, r"task.pack: finetune=prompt prepends"),
        (
            {"method": "full", "task": "dpo", "strategy": "deepspeed_zero3"},
            r"strategy: task=dpo with finetune=full",
        ),
        ({"method": "none", "task": "sft"}, r"task: task=sft adapts a pretrained model"),
        ({"method": "full", "task": "dpo", "beta": 0.0}, r"task.beta: must be positive"),
    ],
)
def test_method_task_strategy_combinations(changes: dict[str, object], expected: str | None) -> None:
    cfg = TrainConfig()
    method = FinetuneMethod(changes.pop("method"))
    cfg.finetune = FinetuneConfig(
        method=method, init_from=None if method == FinetuneMethod.none else "base.ckpt"
    )
    for key in ("layer_lr_decay", "l2sp", "unfreeze_every_n_steps", "prompt_tokens"):
        if key in changes:
            setattr(cfg.finetune, key, changes.pop(key))
    cfg.task = TaskConfig(
        name=TaskName(changes.pop("task", "pretrain")), beta=float(changes.pop("beta", 0.1))
    )
    if "strategy" in changes:
        cfg.strategy.name = StrategyName(changes.pop("strategy"))
        cfg.trainer.devices, cfg.trainer.global_batch_size = 2, 16
    assert not changes
    if expected is None:
        validate(cfg)
        return
    with pytest.raises(ConfigError, match=expected):
        validate(cfg)


def test_model_hf_preset_sets_the_base() -> None:
    from tests.test_config import composed

    cfg = composed("model=hf", "model.path=/models/llama", "finetune=lora", "task=sft")
    assert cfg.model.path == "/models/llama" and cfg.finetune.init_from is None
    validate(cfg)
    with pytest.raises(ConfigError, match=r"model.path: '/models/llama' is set but finetune.method is none"):
        validate(composed("model=hf", "model.path=/models/llama"))
    with pytest.raises(ConfigError, match=r"finetune.init_from: 'x' differs from model.path"):
        validate(composed("model=hf", "model.path=/models/llama", "finetune=full", "finetune.init_from=x"))


def test_qlora_trains_lora_over_an_nf4_base_and_exports_what_it_computes(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    """finetune=qlora in one process: NF4 blocks, LoRA alone trains and is saved, the merged export is the model."""
    from transformers import AutoModelForCausalLM

    from orchestra.model.peft.nf4 import NF4Linear
    from orchestra.train.export import export_hf

    run = tmp_path / "run"
    cfg = ft_config(corpus_dir, data_cache, run, "qlora", base_ckpt(trained_run), max_steps=8)
    cfg.finetune.lora_targets = ["all-linear"]
    cfg.optim.lr = 3e-3
    result = train(cfg)
    assert result.module is not None
    model = result.module.model.eval()
    assert sum(isinstance(m, NF4Linear) for m in model.modules()) == 2 * 7
    loss = column(read_metrics(run), "train/loss")
    assert sorted(loss) == list(range(8)) and all(0 < float(v) < 10 for v in loss.values())
    trainable, meta = consolidated_state_dict(run / "checkpoints" / "last.ckpt")
    assert meta.peft is not None and meta.peft.method == "qlora"
    assert trainable and all(".lora_A." in n or ".lora_B." in n for n in trainable)  # no NF4 tensor saved
    assert all(trainable[n].abs().max() > 0 for n in trainable if ".lora_B." in n)  # B left zero: it trained
    hf = AutoModelForCausalLM.from_pretrained(
        export_hf(run / "checkpoints" / "last.ckpt", tmp_path / "hf")
    ).eval()
    probe = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(hf(probe).logits, model(probe), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("strategy", ["ddp", "fsdp", "deepspeed_zero2"])
def test_qlora_is_refused_beyond_one_device(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path, strategy: str
) -> None:
    cfg = ft_config(corpus_dir, data_cache, tmp_path / "run", "qlora", base_ckpt(trained_run), max_steps=2)
    cfg.strategy.name = StrategyName(strategy)
    with pytest.raises(ConfigError, match=r"^strategy: finetune=qlora runs on one device"):
        validate(cfg)
    assert not (tmp_path / "run").exists()


def test_peft_resume_on_another_base_is_refused(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    from orchestra.train.checkpoint import CheckpointError
    from orchestra.train.export import export_hf

    run = tmp_path / "run"
    train(ft_config(corpus_dir, data_cache, run, "lora", base_ckpt(trained_run), max_steps=2))
    other = export_hf(base_ckpt(trained_run), tmp_path / "hf-base")  # same weights, another base file
    before = sorted(p.name for p in (run / "checkpoints").iterdir())
    with pytest.raises(CheckpointError, match=r"base model: checkpoint trained on .*last.ckpt"):
        train(ft_config(corpus_dir, data_cache, run, "lora", other, max_steps=4))
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == before  # nothing written


def test_finetune_seq_len_cuts_rows_not_the_model(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    cfg = ft_config(corpus_dir, data_cache, tmp_path / "run", "lora", base_ckpt(trained_run), max_steps=2)
    cfg.finetune.seq_len = 32
    result = train(cfg)
    assert result.module is not None and result.module.cfg.model.max_seq_len == 64  # the base's context
    assert result.summary["tokens"] == 2 * cfg.trainer.global_batch_size * 32
    with pytest.raises(ConfigError, match=r"finetune.seq_len: must be a positive integer or null"):
        validate(TrainConfig(finetune=FinetuneConfig(method=FinetuneMethod.full, init_from="x", seq_len=0)))
