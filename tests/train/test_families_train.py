"""Every family through a real fine-tuning run: LoRA and full SFT from a transformers-built base,
then export back to the same architecture, loaded by from_pretrained with equal logits."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.config import TaskConfig, TaskName, TrainConfig
from orchestra.train.checkpoint import CheckpointError, load_checkpoint_file
from orchestra.train.run import train
from tests.train.test_finetune import base_ckpt, ft_config

transformers = pytest.importorskip("transformers")

HALF = 8  # head_dim 16 / 2
SHAPE: dict[str, Any] = dict(
    hidden_size=64,
    intermediate_size=96,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
FAMILIES: dict[str, tuple[str, dict[str, Any]]] = {
    "llama3": (
        "Llama",
        dict(
            rope_parameters={
                "rope_type": "llama3",
                "rope_theta": 500000.0,
                "factor": 8.0,
                "low_freq_factor": 1.0,
                "high_freq_factor": 4.0,
                "original_max_position_embeddings": 16,
            }
        ),
    ),
    "mistral": ("Mistral", dict(sliding_window=8, head_dim=24)),
    "qwen2": ("Qwen2", dict(tie_word_embeddings=True)),
    "qwen3": ("Qwen3", dict(head_dim=24)),
    "gemma": ("Gemma", dict(head_dim=16, num_key_value_heads=1)),
    "gemma2": (
        "Gemma2",
        dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, attn_logit_softcapping=5.0),
    ),
    "gemma3": (
        "Gemma3Text",
        dict(head_dim=16, sliding_window=8, query_pre_attn_scalar=16, sliding_window_pattern=2),
    ),
    "phi3": (
        "Phi3",
        dict(
            original_max_position_embeddings=32,
            rope_parameters={
                "rope_type": "longrope",
                "rope_theta": 10000.0,
                "short_factor": [1.0 + 0.1 * i for i in range(HALF)],
                "long_factor": [1.0 + 0.5 * i for i in range(HALF)],
            },
        ),
    ),
}


CLASSES_FUSED = {"phi3": True}  # families whose q/k/v transformers stores as one tensor


@pytest.fixture(scope="module")
def tokenizer_file(trained_run: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny run's tokenizer.json, which every base below is given."""
    from orchestra.train.export import export_hf

    folder = export_hf(base_ckpt(trained_run), tmp_path_factory.mktemp("tok") / "hf")
    return folder / "tokenizer.json"


def hf_base(family: str, folder: Path, tokenizer_file: Path) -> Any:
    """A random transformers base of ``family`` with the tiny tokenizer, saved into ``folder``."""
    from tokenizers import Tokenizer

    prefix, opts = FAMILIES[family]
    tokenizer = Tokenizer.from_file(str(tokenizer_file))
    eos = tokenizer.token_to_id("<|endoftext|>")
    config = getattr(transformers, f"{prefix}Config")(
        **{**SHAPE, **opts},
        vocab_size=tokenizer.get_vocab_size(),
        bos_token_id=eos,
        eos_token_id=eos,
        pad_token_id=eos,
    )
    torch.manual_seed(0)
    model = getattr(transformers, f"{prefix.removesuffix('Text')}ForCausalLM")(config).float().eval()
    model.save_pretrained(str(folder))
    shutil.copy(tokenizer_file, folder / "tokenizer.json")
    return model


def sft_config(corpus: Path, cache: Path, run: Path, method: str, base: Path, steps: int) -> TrainConfig:
    cfg = ft_config(corpus, cache, run, method, base, max_steps=steps, val_every_n_steps=steps)
    cfg.task = TaskConfig(name=TaskName.sft)
    return cfg


def logits(model: Any, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        out = model(tokens)
    return (out.logits if hasattr(out, "logits") else out).float()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_lora_and_full_sft_round_trip_through_transformers(
    family: str, corpus_dir: Path, examples_cache: Path, tokenizer_file: Path, tmp_path: Path
) -> None:
    from orchestra.model.peft import merge_lora
    from orchestra.train.export import export_hf, export_peft
    from orchestra.train.finetune import rebuild_peft_model

    base_model = hf_base(family, tmp_path / "base", tokenizer_file)
    vocab = base_model.config.vocab_size
    tokens = torch.randint(0, vocab, (2, 40), generator=torch.Generator().manual_seed(0))

    # LoRA: only adapters train; the merged export is the base's class with the merged weights.
    run = tmp_path / "lora"
    result = train(sft_config(corpus_dir, examples_cache, run, "lora", tmp_path / "base", steps=3))
    assert result.summary["finetune"] == "lora" and result.summary["steps"] == 3
    ckpt_path = run / "checkpoints" / "last.ckpt"
    ckpt = load_checkpoint_file(ckpt_path)
    assert ckpt["orchestra"]["model_config"]["family"] == base_model.config.model_type.removesuffix("_text")
    trained = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    merged = rebuild_peft_model(trained, ckpt["orchestra"], ckpt_path).eval()
    merge_lora(merged)
    out = export_hf(ckpt_path, tmp_path / "lora-hf")
    config = json.loads((out / "config.json").read_text())
    assert config["architectures"] == [type(base_model).__name__]
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert type(back) is type(base_model)
    assert set(back.state_dict()) == set(base_model.state_dict())
    assert (logits(back, tokens) - logits(merged, tokens)).abs().max().item() <= 1e-5
    assert (logits(back, tokens) - logits(base_model, tokens)).abs().max().item() > 0  # LoRA changed it
    if CLASSES_FUSED.get(family):
        with pytest.raises(CheckpointError, match=r"stores fused \(self_attn\.qkv_proj"):
            export_peft(ckpt_path, tmp_path / "peft")
        assert not (tmp_path / "peft").exists()
    else:  # peft's own loader puts the adapters on the original base: the same logits
        from peft import PeftModel

        adapters = export_peft(ckpt_path, tmp_path / "peft")
        wrapped = PeftModel.from_pretrained(base_model, str(adapters)).eval()
        assert (logits(wrapped, tokens) - logits(merged, tokens)).abs().max().item() <= 1e-5

    # Full fine-tuning: every weight trains; the export gives the trained model's logits.
    run = tmp_path / "full"
    result = train(sft_config(corpus_dir, examples_cache, run, "full", tmp_path / "base", steps=2))
    assert result.module is not None
    model = result.module.model.eval()
    out = export_hf(run / "checkpoints" / "last.ckpt", tmp_path / "full-hf")
    back = transformers.AutoModelForCausalLM.from_pretrained(str(out), torch_dtype=torch.float32).eval()
    assert type(back) is type(base_model)
    assert (logits(back, tokens) - logits(model, tokens)).abs().max().item() <= 1e-5


def _damage(folder: Path, how: str) -> str:
    """Break a base folder one way; return the pattern its one error must match."""
    config_file = folder / "config.json"
    config = json.loads(config_file.read_text())
    if how == "missing_shard":
        from safetensors.torch import load_file, save_file

        tensors = load_file(str(folder / "model.safetensors"))
        names = sorted(tensors)
        half = {"a": names[: len(names) // 2], "b": names[len(names) // 2 :]}
        shards = {k: f"model-0000{i + 1}-of-00002.safetensors" for i, k in enumerate(half)}
        save_file({n: tensors[n] for n in half["a"]}, str(folder / shards["a"]))
        (folder / "model.safetensors").unlink()
        weight_map = {n: shards[k] for k, ns in half.items() for n in ns}
        (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
        return r"lists shard\(s\) missing .*model-00002-of-00002\.safetensors"
    if how == "shape":
        config["intermediate_size"] = 80
        config_file.write_text(json.dumps(config))
        return r"mlp\.(gate|up|down)_proj\.weight' has shape"
    if how == "rope_type":
        config["rope_parameters"] = {"rope_type": "ntk-by-parts", "rope_theta": 10000.0, "factor": 2.0}
        config_file.write_text(json.dumps(config))
        return r"rope_type='ntk-by-parts' is not supported"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["missing_shard", "shape", "rope_type"])
def test_a_bad_base_folder_is_one_clear_error_and_nothing_is_written(
    how: str, corpus_dir: Path, examples_cache: Path, tokenizer_file: Path, tmp_path: Path
) -> None:
    from orchestra.config import ConfigError

    base = tmp_path / "base"
    hf_base("qwen2", base, tokenizer_file)
    pattern = _damage(base, how)
    before = {p: p.read_bytes() for p in base.iterdir()}
    with pytest.raises(ConfigError, match=rf"finetune.init_from: .*{pattern}"):
        train(sft_config(corpus_dir, examples_cache, tmp_path / "run", "lora", base, steps=2))
    assert not (tmp_path / "run").exists()
    assert {p: p.read_bytes() for p in base.iterdir()} == before


def test_a_hub_id_fine_tunes_from_the_huggingface_cache_offline(
    corpus_dir: Path,
    examples_cache: Path,
    tokenizer_file: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """finetune.init_from=org/name resolves to its snapshot in a cache laid out as huggingface_hub writes it."""
    from orchestra.config import ConfigError
    from tests.model.test_model_hub import COMMIT, fake_cache

    folder = tmp_path / "downloaded"
    hf_base("qwen2", folder, tokenizer_file)
    files = {p.name: p for p in folder.iterdir()}
    home = tmp_path / "hf-home"
    root = fake_cache(home, "tiny-org/tiny-qwen", {COMMIT: {}}, main=COMMIT)
    for name, src in files.items():  # blobs named by content hash, snapshot entries linking to them
        blob = root / "blobs" / f"{name}-blob"
        blob.write_bytes(src.read_bytes())
        (root / "snapshots" / COMMIT / name).symlink_to(Path("..") / ".." / "blobs" / blob.name)
    monkeypatch.setenv("HF_HOME", str(home))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    run = tmp_path / "run"
    result = train(sft_config(corpus_dir, examples_cache, run, "lora", Path("tiny-org/tiny-qwen"), steps=2))
    assert result.summary["steps"] == 2
    ckpt = load_checkpoint_file(run / "checkpoints" / "last.ckpt")
    assert ckpt["orchestra"]["peft"]["base"]["path"] == str((root / "snapshots" / COMMIT).resolve())

    with pytest.raises(
        ConfigError, match=r"finetune.init_from: 'tiny-org/absent' is not in the Hugging Face cache"
    ):
        train(
            sft_config(
                corpus_dir, examples_cache, tmp_path / "run2", "lora", Path("tiny-org/absent"), steps=2
            )
        )
    assert not (tmp_path / "run2").exists()
