"""strategy.fp8 (torchao Float8Linear) on CPU through its emulation; refused without an FP8 GPU.

torchao's emulation runs the same casts and scalings with higher-precision matmuls, so the
numerics checked here are the FP8 path's: which layers convert, losses close to full precision
and still falling, checkpoints and export with unchanged keys and dtypes.
"""

from __future__ import annotations

import copy
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from orchestra.config import ConfigError, ModelConfig, StrategyConfig, StrategyName
from orchestra.model import build_model
from orchestra.train.strategy import build_strategy, parallelize
from tests.helpers import tiny_config

CFG = ModelConfig(dim=64, n_layers=2, n_heads=4, n_kv_heads=2, ffn_dim=128, max_seq_len=32)


@pytest.mark.parametrize("recipe", ["tensorwise", "rowwise"])
def test_blocks_convert_and_stay_close_to_full_precision(recipe: str) -> None:
    from torchao.float8.float8_linear import Float8Linear

    torch.manual_seed(0)
    plain = build_model(CFG, 128)
    fp8 = copy.deepcopy(plain)
    parallelize(fp8, StrategyConfig(fp8=recipe, fp8_emulate=True), "32-true")
    converted = {n for n, m in fp8.named_modules() if isinstance(m, Float8Linear)}
    assert converted == {
        f"layers.{i}.{sub}" for i in range(2) for sub in (
            "attention.q_proj", "attention.k_proj", "attention.v_proj", "attention.o_proj",
            "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj",
        )
    }  # fmt: skip
    assert type(fp8.lm_head) is torch.nn.Linear  # the output projection stays in full precision
    assert fp8.state_dict().keys() == plain.state_dict().keys()
    tokens = torch.randint(0, 128, (4, 33), generator=torch.Generator().manual_seed(1))
    ref = plain(tokens[:, :-1], tokens[:, 1:])
    got = fp8(tokens[:, :-1], tokens[:, 1:])
    got.backward()
    assert float(got) != float(ref)  # the casts are really there
    assert float(got) == pytest.approx(float(ref), rel=2e-2)  # FP8's error, not a different model
    # Gradients flow to every weight in the weights' own dtype.
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fp8.parameters())


def test_emulated_fp8_trains_and_exports(corpus_dir: Path, data_cache: Path, tmp_path: Path) -> None:
    from orchestra.train.export import export_hf
    from orchestra.train.run import train
    from tests.train.test_export import assert_transformers_matches

    base = tiny_config(corpus_dir, data_cache, tmp_path / "plain", max_steps=20, sample_tokens=0)
    fp8 = replace(
        base, run_dir=str(tmp_path / "fp8"), strategy=replace(base.strategy, fp8="rowwise", fp8_emulate=True)
    )
    plain_run, fp8_run = train(base), train(fp8)
    first, last = plain_run.summary["train_loss"], fp8_run.summary["train_loss"]
    assert last == pytest.approx(first, rel=0.03)  # the same training, to FP8's precision
    assert fp8_run.summary["val_loss"] == pytest.approx(plain_run.summary["val_loss"], rel=0.03)
    ckpt = fp8_run.run_dir / "checkpoints" / "last.ckpt"
    assert_transformers_matches(ckpt, export_hf(ckpt, tmp_path / "hf"))


@pytest.mark.skipif(torch.cuda.is_available(), reason="the refusal is for machines without an FP8 GPU")
@pytest.mark.parametrize("strategy", ["single", "ddp", "fsdp"])
def test_fp8_without_an_fp8_gpu_is_one_clear_error(tmp_path: Path, strategy: str) -> None:
    cfg = tiny_config(tmp_path, tmp_path, tmp_path / "run")
    cfg = replace(cfg, strategy=replace(cfg.strategy, name=StrategyName(strategy), fp8="tensorwise"))
    with pytest.raises(
        ConfigError, match=r"strategy\.fp8=tensorwise: FP8 matmuls need a GPU .* no GPU.*fp8_emulate"
    ):
        build_strategy(cfg, "bf16-mixed")


@pytest.mark.parametrize(
    ("fields", "key"),
    [
        ({"fp8": "e4m3"}, "strategy.fp8"),
        ({"fp8": "rowwise", "name": StrategyName.deepspeed_zero2}, "strategy.fp8"),
        ({"fp8": "rowwise", "name": StrategyName.fsdp, "tp": 2}, "strategy.fp8"),
        ({"fp8_emulate": True}, "strategy.fp8_emulate"),
    ],
)
def test_bad_fp8_settings_name_the_key(fields: dict[str, object], key: str) -> None:
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        replace(StrategyConfig(), **fields).validate()  # type: ignore[arg-type]
