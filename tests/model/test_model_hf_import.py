"""Import of Hugging Face folders (config.json + safetensors + tokenizer.json) into our model.

Every model here is built by transformers from a config and saved locally; nothing is downloaded.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from orchestra.model.config import KernelBackend
from orchestra.model.hf import (
    HFImportError,
    hf_config_dict,
    load_hf_pretrained,
    load_hf_state_dict,
    load_hf_tokenizer,
    model_config_from_hf,
)

transformers = pytest.importorskip("transformers")

VOCAB = 101
SMALL: dict[str, Any] = dict(
    vocab_size=VOCAB,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=4,
    max_position_embeddings=64,
)


def _save(folder: Path, arch: str = "llama", max_shard_size: str | None = None, **overrides: Any):
    """Build a tiny random HF model of ``arch`` from a config, save it into folder, return it."""
    config_cls, model_cls = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[arch]
    config = config_cls(**{**SMALL, **overrides})
    model = model_cls(config).float().eval()
    kwargs = {"max_shard_size": max_shard_size} if max_shard_size else {}
    model.save_pretrained(str(folder), **kwargs)
    return model


def _assert_same_logits(ours: torch.nn.Module, hf: torch.nn.Module, vocab: int = VOCAB) -> None:
    tokens = torch.randint(0, vocab, (2, 48))
    with torch.no_grad():
        diff = (ours(tokens) - hf(tokens).logits.float()).abs().max().item()
    assert diff <= 1e-5, diff


CASES: dict[str, dict[str, Any]] = {
    "llama_mha": dict(arch="llama"),
    "llama_gqa_tied": dict(arch="llama", num_key_value_heads=2, tie_word_embeddings=True),
    "llama_mqa_theta": dict(arch="llama", num_key_value_heads=1, rope_theta=500000.0, rms_norm_eps=1e-5),
    "mistral_gqa": dict(arch="mistral", num_key_value_heads=2, sliding_window=None),
    "mistral_window_covers_context": dict(arch="mistral", num_key_value_heads=2, sliding_window=64),
    "llama_sharded": dict(arch="llama", num_key_value_heads=2, max_shard_size="20KB"),
    "mistral_sharded_tied": dict(
        arch="mistral",
        num_key_value_heads=2,
        sliding_window=None,
        tie_word_embeddings=True,
        max_shard_size="20KB",
    ),
}


@pytest.mark.parametrize("case", list(CASES))
def test_imported_model_matches_transformers(tmp_path, case):
    opts = dict(CASES[case])
    if "rope_theta" in opts:  # transformers 5 takes RoPE settings as rope_parameters
        opts["rope_parameters"] = {"rope_type": "default", "rope_theta": opts.pop("rope_theta")}
    hf = _save(tmp_path, **opts)
    if "max_shard_size" in opts:
        assert (tmp_path / "model.safetensors.index.json").is_file()
        assert len(list(tmp_path.glob("model-*-of-*.safetensors"))) > 1
        assert not (tmp_path / "model.safetensors").exists()

    ours, tok = load_hf_pretrained(tmp_path, kernels=KernelBackend.torch)
    assert tok is None
    assert not ours.training
    cfg = ours.cfg
    assert (cfg.n_heads, cfg.n_kv_heads) == (4, opts.get("num_key_value_heads", 4))
    assert cfg.tie_embeddings is bool(opts.get("tie_word_embeddings", False))
    if cfg.tie_embeddings:
        assert ours.lm_head.weight is ours.tok_embeddings.weight
    else:
        assert torch.equal(ours.lm_head.weight, hf.lm_head.weight)
    assert cfg.rope_theta == hf.config.rope_parameters["rope_theta"]
    assert cfg.norm_eps == hf.config.rms_norm_eps and cfg.max_seq_len == 64
    _assert_same_logits(ours, hf)


def test_bf16_import_keeps_fp32_rope(tmp_path):
    hf = _save(tmp_path, num_key_value_heads=2)
    ours, _ = load_hf_pretrained(tmp_path, dtype=torch.bfloat16, kernels=KernelBackend.torch)
    assert ours.tok_embeddings.weight.dtype == torch.bfloat16
    assert ours.rope_cos.dtype == torch.float32
    assert torch.equal(ours.layers[1].mlp.up_proj.weight, hf.model.layers[1].mlp.up_proj.weight.bfloat16())


def test_sharded_state_dict_equals_single_file(tmp_path):
    hf = _save(tmp_path / "one")
    hf.save_pretrained(str(tmp_path / "many"), max_shard_size="20KB")
    one, many = load_hf_state_dict(tmp_path / "one"), load_hf_state_dict(tmp_path / "many")
    assert one.keys() == many.keys()
    assert all(torch.equal(one[k], many[k]) for k in one)


def test_bias_tensors_are_named_even_if_config_claims_llama(tmp_path):
    """Strict loading: weights that do not fit the config are refused tensor by tensor."""
    _save(tmp_path, arch="qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    config.update(architectures=["LlamaForCausalLM"], model_type="llama", layer_types=None)
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(ValueError, match=r"unexpected.*self_attn\.[qkv]_proj\.bias"):
        load_hf_pretrained(tmp_path)


def test_mismatched_tensor_shape_is_named(tmp_path):
    _save(tmp_path, arch="qwen2")
    config = json.loads((tmp_path / "config.json").read_text())
    config["intermediate_size"] = 192
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFImportError, match=r"mlp\.(gate|up|down)_proj\.weight' has shape .*expected"):
        load_hf_pretrained(tmp_path)


def _config(**overrides: Any) -> dict[str, Any]:
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **SMALL, **overrides}


@pytest.mark.parametrize(
    ("overrides", "pattern"),
    [
        (
            dict(rope_scaling={"type": "ntk-by-parts", "factor": 2.0}),
            r"rope_type='ntk-by-parts' is not supported",
        ),
        (dict(rope_parameters={"rope_type": "yarn"}), r"rope\.factor"),
        (
            dict(rope_parameters={"full_attention": {"rope_type": "default"}, "sliding_attention": {}}),
            r"per layer type",
        ),
        (
            dict(rope_parameters={"rope_type": "default", "partial_rotary_factor": 0.5}),
            r"partial_rotary_factor",
        ),
        (dict(max_position_embeddings=-1), r"max_position_embeddings=-1"),
        (dict(hidden_act="gelu"), r"hidden_act='gelu'"),
        (dict(head_dim=15), r"head_dim=15 is odd"),
        (dict(sliding_window=8), r"sliding_window=8 .*Llama has no sliding window"),
        (dict(num_key_value_heads=3), r"num_attention_heads=4 is not a multiple of num_key_value_heads=3"),
        (dict(hidden_size=66), r"hidden_size=66 is not divisible by num_attention_heads=4"),
        (dict(vocab_size=None), r"vocab_size=None"),
        (dict(quantization_config={"quant_method": "gptq"}), r"quantization_config"),
        (
            dict(architectures=["GPT2LMHeadModel"]),
            r"'GPT2LMHeadModel' is not supported; supported: .*Gemma2ForCausalLM.*LlamaForCausalLM.*Qwen3",
        ),
        (dict(architectures=None, model_type="gpt2"), r"model_type='gpt2'"),
        (dict(layer_types=["full_attention", "sliding_attention"]), r"layer_types"),
        (
            dict(
                architectures=["Qwen2ForCausalLM"],
                use_sliding_window=True,
                sliding_window=8,
                max_window_layers=1,
            ),
            r"max_window_layers=1",
        ),
        (
            dict(
                architectures=["Gemma2ForCausalLM"],
                sliding_window=8,
                layer_types=["full_attention", "sliding_attention"],
            ),
            r"layer_types",
        ),
    ],
)
def test_config_errors_name_the_key(overrides, pattern):
    with pytest.raises(HFImportError, match=pattern):
        model_config_from_hf(_config(**overrides))


def test_config_defaults_and_legacy_keys():
    """transformers 4 style: top-level rope_theta, rope_scaling null, no num_key_value_heads."""
    config = _config(rope_theta=250000.0, rope_scaling=None)
    del config["num_key_value_heads"]
    cfg, vocab = model_config_from_hf(config)
    assert vocab == VOCAB and cfg.vocab_size == VOCAB and cfg.pad_vocab_to == 1
    assert cfg.n_kv_heads == cfg.n_heads == 4 and cfg.rope_theta == 250000.0
    assert cfg.tie_embeddings is False and cfg.norm_eps == 1e-6
    # rope_parameters wins over the top-level key, as in transformers 5; model_type alone suffices.
    config = _config(
        rope_theta=1.0, rope_parameters={"rope_type": "default", "rope_theta": 5.0}, architectures=None
    )
    assert model_config_from_hf(config)[0].rope_theta == 5.0


def test_our_exported_config_round_trips(make_cfg):
    cfg = make_cfg(rope_theta=1234.0, norm_eps=1e-6, tie_embeddings=True, n_kv_heads=1)
    back, vocab = model_config_from_hf(json.loads(json.dumps(hf_config_dict(cfg, 97))))
    assert vocab == 97
    for key in (
        "dim",
        "n_layers",
        "n_heads",
        "n_kv_heads",
        "ffn_dim",
        "max_seq_len",
        "rope_theta",
        "norm_eps",
    ):
        assert getattr(back, key) == getattr(cfg, key), key
    assert back.tie_embeddings is True


def test_missing_shard_is_named(tmp_path):
    _save(tmp_path, max_shard_size="20KB")
    shard = sorted(tmp_path.glob("model-*-of-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(FileNotFoundError, match=rf"missing.*{shard.name}"):
        load_hf_pretrained(tmp_path)


def test_shards_without_index_are_explained(tmp_path):
    _save(tmp_path, max_shard_size="20KB")
    (tmp_path / "model.safetensors.index.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"no model\.safetensors.*found \['model-00001-of"):
        load_hf_state_dict(tmp_path)


def test_pytorch_bin_is_refused(tmp_path):
    hf = _save(tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(hf.state_dict(), tmp_path / "pytorch_model.bin")
    with pytest.raises(HFImportError, match=r"pytorch_model\.bin.*pickle.*safetensors"):
        load_hf_pretrained(tmp_path)


def test_missing_folder_and_config(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"does not exist"):
        load_hf_pretrained(tmp_path / "nope")
    with pytest.raises(FileNotFoundError, match=r"no config\.json"):
        load_hf_pretrained(tmp_path)


def _train_tokenizer(folder: Path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=80, special_tokens=["<unk>", "<|endoftext|>"], show_progress=False
    )
    lines = ["To be, or not to be, that is the question:", "Whether 'tis nobler in the mind to suffer"] * 4
    tok.train_from_iterator(lines, trainer=trainer)
    assert tok.get_vocab_size() <= VOCAB
    tok.save(str(folder / "tokenizer.json"))
    return tok


def test_tokenizer_json_round_trip(tmp_path):
    hf = _save(tmp_path, num_key_value_heads=2)
    original = _train_tokenizer(tmp_path)
    ours, tok = load_hf_pretrained(tmp_path, kernels=KernelBackend.torch)
    assert tok is not None
    text = "To suffer the question, or not? <|endoftext|>"
    ids = tok.encode(text).ids
    assert ids == original.encode(text).ids and tok.decode(ids) == original.decode(ids)
    assert tok.token_to_id("<|endoftext|>") == original.token_to_id("<|endoftext|>")
    _assert_same_logits(ours, hf)


def test_missing_tokenizer_reason(tmp_path, caplog):
    _save(tmp_path)
    (tmp_path / "tokenizer.model").write_bytes(b"")
    tok, reason = load_hf_tokenizer(tmp_path)
    assert tok is None and reason is not None
    assert "no tokenizer.json" in reason and "tokenizer.model" in reason
    with caplog.at_level("WARNING", logger="orchestra.model.hf"):
        _, tok = load_hf_pretrained(tmp_path, kernels=KernelBackend.torch)
    assert tok is None and "no tokenizer.json" in caplog.text


def test_import_does_not_need_transformers():
    code = "import sys, orchestra.model.hf; assert 'transformers' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)
