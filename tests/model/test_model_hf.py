"""Parity with transformers' LlamaForCausalLM and the name mapping in both directions."""

from __future__ import annotations

import json

import pytest
import torch

from orchestra.model import build_model
from orchestra.model.hf import from_hf_state_dict, hf_config_dict, to_hf_state_dict

transformers = pytest.importorskip("transformers")

CASES = {
    "mha": dict(n_heads=4, n_kv_heads=4),
    "gqa": dict(n_heads=4, n_kv_heads=2),
    "mqa_odd_vocab": dict(n_heads=4, n_kv_heads=1, vocab=131),
    "tied": dict(n_heads=4, n_kv_heads=2, tie_embeddings=True),
    "rope_theta_5e5": dict(n_heads=8, n_kv_heads=2, rope_theta=500000.0, norm_eps=1e-6),
}


def _hf_model(cfg, vocab: int, attn: str = "sdpa"):
    hf_cfg = transformers.LlamaConfig(**hf_config_dict(cfg, vocab), attn_implementation=attn)
    return transformers.LlamaForCausalLM(hf_cfg).float().eval()


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_logits_match_transformers(make_cfg, case, attn):
    opts = dict(CASES[case])
    vocab = opts.pop("vocab", 97)
    cfg = make_cfg(**opts)
    ours = build_model(cfg, vocab).eval()
    hf = _hf_model(cfg, vocab, attn)
    assert hf.config._attn_implementation == attn
    missing, unexpected = hf.load_state_dict(to_hf_state_dict(ours.state_dict(), cfg), strict=False)
    assert unexpected == []
    assert missing == (["lm_head.weight"] if cfg.tie_embeddings else [])
    if cfg.tie_embeddings:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()

    tokens = torch.randint(0, vocab, (2, 40))
    with torch.no_grad():
        ref = hf(tokens).logits.float()
        out = ours(tokens)
    assert (out - ref).abs().max().item() <= 1e-5


def test_exported_folder_loads_with_auto_model(make_cfg, tmp_path):
    """config.json + model.safetensors, as orchestra-export writes them, load with identical logits."""
    from safetensors.torch import save_file

    cfg = make_cfg(rope_theta=50000.0, tie_embeddings=True)
    ours = build_model(cfg, 97).eval()
    (tmp_path / "config.json").write_text(json.dumps(hf_config_dict(cfg, 97, bos_id=1, eos_id=2)))
    tensors = {k: v.contiguous() for k, v in to_hf_state_dict(ours.state_dict(), cfg).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"), metadata={"format": "pt"})

    hf = transformers.AutoModelForCausalLM.from_pretrained(str(tmp_path), attn_implementation="sdpa").eval()
    assert hf.config.rope_parameters["rope_theta"] == 50000.0
    assert hf.config.tie_word_embeddings and hf.config.eos_token_id == 2
    tokens = torch.randint(0, 97, (1, 24))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits.float()).abs().max().item() <= 1e-5


def test_hf_model_loads_back_into_ours(make_cfg):
    cfg = make_cfg(n_kv_heads=1)
    hf = _hf_model(cfg, 97)
    ours = build_model(cfg, 97, init=False).eval()  # every weight comes from the HF model
    ours.load_state_dict(from_hf_state_dict(hf.state_dict(), cfg), strict=True)
    tokens = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        assert (ours(tokens) - hf(tokens).logits).abs().max().item() <= 1e-5


@pytest.mark.parametrize("tie", [False, True])
def test_round_trip(make_cfg, tie):
    cfg = make_cfg(tie_embeddings=tie)
    sd = build_model(cfg, 97).state_dict()
    hf_sd = to_hf_state_dict(sd, cfg)
    assert ("lm_head.weight" in hf_sd) is not tie
    assert "model.layers.1.self_attn.k_proj.weight" in hf_sd
    assert "model.layers.0.post_attention_layernorm.weight" in hf_sd
    back = from_hf_state_dict(hf_sd, cfg)
    assert back.keys() == sd.keys()
    for k in sd:
        assert torch.equal(back[k], sd[k]), k


def test_tied_hf_dict_with_head_and_inv_freq_is_accepted(make_cfg):
    cfg = make_cfg(tie_embeddings=True)
    sd = build_model(cfg, 97).state_dict()
    hf_sd = dict(to_hf_state_dict(sd, cfg))
    hf_sd["lm_head.weight"] = hf_sd["model.embed_tokens.weight"].clone()
    hf_sd["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    back = from_hf_state_dict(hf_sd, cfg)
    assert back["lm_head.weight"] is back["tok_embeddings.weight"]
    hf_sd["lm_head.weight"] = torch.zeros_like(hf_sd["lm_head.weight"])
    with pytest.raises(ValueError, match=r"lm_head\.weight"):
        from_hf_state_dict(hf_sd, cfg)


def test_conversion_errors_name_the_tensor(make_cfg):
    cfg = make_cfg()
    hf_sd = to_hf_state_dict(build_model(cfg, 97).state_dict(), cfg)

    missing = {k: v for k, v in hf_sd.items() if k != "model.layers.1.mlp.up_proj.weight"}
    with pytest.raises(ValueError, match=r"missing.*model\.layers\.1\.mlp\.up_proj\.weight"):
        from_hf_state_dict(missing, cfg)

    extra = {**hf_sd, "model.layers.2.self_attn.q_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"unexpected.*model\.layers\.2\.self_attn\.q_proj\.weight"):
        from_hf_state_dict(extra, cfg)

    bad = {**hf_sd, "model.layers.0.self_attn.k_proj.weight": torch.zeros(64, 64)}
    with pytest.raises(ValueError, match=r"k_proj\.weight.*\(64, 64\).*\(32, 64\)"):
        from_hf_state_dict(bad, cfg)

    ours = build_model(cfg, 97).state_dict()
    del ours["norm.weight"]
    with pytest.raises(ValueError, match=r"missing.*norm\.weight"):
        to_hf_state_dict(ours, cfg)


def test_config_dict_is_a_valid_llama_config(make_cfg):
    cfg = make_cfg(rope_theta=1234.0, norm_eps=1e-6, tie_embeddings=True)
    d = hf_config_dict(cfg, 97, bos_id=3, eos_id=4)
    c = transformers.LlamaConfig(**d)
    assert c.hidden_size == 64 and c.intermediate_size == cfg.ffn_dim
    assert c.num_hidden_layers == 2 and c.num_attention_heads == 4 and c.num_key_value_heads == 2
    assert c.head_dim == 16 and c.vocab_size == 97 and c.max_position_embeddings == cfg.max_seq_len
    assert c.rms_norm_eps == 1e-6 and c.tie_word_embeddings is True
    assert c.bos_token_id == 3 and c.eos_token_id == 4
    assert json.loads(json.dumps(d)) == d  # plain JSON: it is written as config.json
    rope = getattr(c, "rope_parameters", None) or {"rope_theta": c.rope_theta}
    assert rope["rope_theta"] == 1234.0
