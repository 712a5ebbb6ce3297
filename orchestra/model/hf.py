"""Conversion between our Transformer and Hugging Face ``LlamaForCausalLM`` (and import of HF folders).

Only names change: the model was built so that every tensor has the same shape and layout as
in transformers (including the non-interleaved RoPE of q/k, so no permutation is needed). This
module does not import transformers; the exporter and the parity tests do.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestra.model.build import build_model
from orchestra.model.config import KernelBackend, ModelConfig
from orchestra.model.transformer import Transformer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

# Per-layer names: ours -> HF (under "layers.{i}." / "model.layers.{i}.").
_LAYER_NAMES: dict[str, str] = {
    "attention_norm.weight": "input_layernorm.weight",
    "attention.q_proj.weight": "self_attn.q_proj.weight",
    "attention.k_proj.weight": "self_attn.k_proj.weight",
    "attention.v_proj.weight": "self_attn.v_proj.weight",
    "attention.o_proj.weight": "self_attn.o_proj.weight",
    "mlp_norm.weight": "post_attention_layernorm.weight",
    "mlp.gate_proj.weight": "mlp.gate_proj.weight",
    "mlp.up_proj.weight": "mlp.up_proj.weight",
    "mlp.down_proj.weight": "mlp.down_proj.weight",
}


def hf_config_dict(
    cfg: ModelConfig,
    vocab_size: int,
    bos_id: int | None = None,
    eos_id: int | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """``LlamaConfig`` keyword arguments (and config.json content) describing this model.

    RoPE's theta is written twice on purpose: transformers 5 reads ``rope_parameters``
    ({"rope_type": "default", "rope_theta": ...}) and transformers 4 reads ``rope_theta``;
    5.x accepts both and gives rope_parameters precedence, so one file loads in either.
    bos/eos are always written (None when unknown) because LlamaConfig otherwise defaults
    them to 1 and 2, which are arbitrary tokens of our vocabulary.
    """
    return {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": vocab_size,
        "hidden_size": cfg.dim,
        "intermediate_size": cfg.ffn_dim,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.n_kv_heads,
        "head_dim": cfg.head_dim,
        "max_position_embeddings": cfg.max_seq_len,
        "rope_theta": float(cfg.rope_theta),
        "rope_parameters": {"rope_type": "default", "rope_theta": float(cfg.rope_theta)},
        "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": bool(cfg.tie_embeddings),
        "attention_bias": False,
        "mlp_bias": False,
        "hidden_act": "silu",
        "initializer_range": cfg.init_std,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "torch_dtype": torch_dtype,
    }


def name_map(cfg: ModelConfig) -> dict[str, str]:
    """Our parameter name -> HF name, for every tensor HF stores (lm_head only when untied)."""
    names = {"tok_embeddings.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight"}
    for i in range(cfg.n_layers):
        for ours, theirs in _LAYER_NAMES.items():
            names[f"layers.{i}.{ours}"] = f"model.layers.{i}.{theirs}"
    if not cfg.tie_embeddings:
        names["lm_head.weight"] = "lm_head.weight"
    return names


def _expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape, for checking a state dict before anything is loaded."""
    D, F, hd = cfg.dim, cfg.ffn_dim, cfg.head_dim
    layer = {
        "attention_norm.weight": (D,),
        "attention.q_proj.weight": (cfg.n_heads * hd, D),
        "attention.k_proj.weight": (cfg.n_kv_heads * hd, D),
        "attention.v_proj.weight": (cfg.n_kv_heads * hd, D),
        "attention.o_proj.weight": (D, cfg.n_heads * hd),
        "mlp_norm.weight": (D,),
        "mlp.gate_proj.weight": (F, D),
        "mlp.up_proj.weight": (F, D),
        "mlp.down_proj.weight": (D, F),
    }
    shapes = {"tok_embeddings.weight": (vocab_size, D), "norm.weight": (D,)}
    for i in range(cfg.n_layers):
        for name, shape in layer.items():
            shapes[f"layers.{i}.{name}"] = shape
    if not cfg.tie_embeddings:
        shapes["lm_head.weight"] = (vocab_size, D)
    return shapes


def _vocab_size(sd: dict[str, torch.Tensor], key: str, what: str) -> int:
    if key not in sd:
        raise ValueError(f"{what} state dict is missing {key!r}")
    return int(sd[key].shape[0])


def _check(
    sd: dict[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, ignore: set[str]
) -> None:
    """Raise ValueError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise ValueError(f"{what} state dict is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    unexpected = sorted(k for k in set(sd) - set(expected) if k not in ignore)
    if unexpected:
        raise ValueError(
            f"{what} state dict has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise ValueError(f"{what} tensor {name!r} has shape {tuple(sd[name].shape)}, expected {shape}")


def to_hf_state_dict(state_dict: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``model.state_dict()`` -> HF ``LlamaForCausalLM`` names (same tensors, no copies).

    With tied embeddings lm_head.weight is left out, as transformers' own save does; the
    (identical) ``lm_head.weight`` entry of our state dict is accepted and dropped.
    """
    vocab = _vocab_size(state_dict, "tok_embeddings.weight", "Orchestra")
    ours = _expected_shapes(cfg, vocab)
    ignore = {"lm_head.weight"} if cfg.tie_embeddings else set()
    _check(state_dict, ours, "Orchestra", ignore)
    return {theirs: state_dict[name] for name, theirs in name_map(cfg).items()}


def from_hf_state_dict(hf_sd: dict[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF ``LlamaForCausalLM`` state dict -> ours, ready for ``model.load_state_dict(strict=True)``.

    Tolerated extras: rotary ``inv_freq`` buffers (old checkpoints saved them) and, when tied,
    an ``lm_head.weight`` equal to the embedding. With tied embeddings the result holds the
    embedding under both ``tok_embeddings.weight`` and ``lm_head.weight``, as our own
    state_dict() does.
    """
    names = name_map(cfg)
    vocab = _vocab_size(hf_sd, "model.embed_tokens.weight", "Hugging Face")
    expected = {names[k]: shape for k, shape in _expected_shapes(cfg, vocab).items()}
    ignore = {k for k in hf_sd if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in hf_sd:
        head, emb = hf_sd["lm_head.weight"], hf_sd["model.embed_tokens.weight"]
        # Meta tensors (a header-only check) carry no values to compare; the real load compares them.
        if head.shape != emb.shape or (not head.is_meta and not torch.equal(head, emb)):
            raise ValueError(
                "Hugging Face tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', "
                "but model.tie_embeddings=true; set tie_embeddings=false to load an untied head"
            )
        ignore.add("lm_head.weight")
    _check(hf_sd, expected, "Hugging Face", ignore)
    out = {ours: hf_sd[theirs] for ours, theirs in names.items()}
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# Import: a Hugging Face folder (config.json + safetensors [+ tokenizer.json]) -> our model.
#
# Read with json + safetensors only, so importing works without transformers installed.
# ---------------------------------------------------------------------------------------------

# Architectures whose math is ours exactly (given the config checks below), and the defaults
# their transformers config classes use for keys a config.json may leave out.
_SUPPORTED: dict[str, dict[str, Any]] = {
    "LlamaForCausalLM": {"max_position_embeddings": 2048, "rms_norm_eps": 1e-6},
    "MistralForCausalLM": {"max_position_embeddings": 4096 * 32, "rms_norm_eps": 1e-6},
}
# Recognised but refused, with the reason (checked before anything else is looked at).
_REFUSED: dict[str, str] = {
    "Qwen2ForCausalLM": (
        "its attention has q/k/v projection biases (attention_bias: tensors "
        "model.layers.N.self_attn.{q,k,v}_proj.bias), which transformers' Qwen2 always builds and "
        "our model does not have by design (no biases); RoPE is applied after the bias, so it cannot "
        "be folded into the weights"
    ),
}
_MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
_INDEX = "model.safetensors.index.json"


class HFImportError(ValueError):
    """A Hugging Face folder we cannot load exactly; the message names the key, tensor or file."""


def _architecture(config: dict[str, Any]) -> str:
    """The one causal-LM class a config.json names (``architectures``, else ``model_type``)."""
    supported = sorted(_SUPPORTED)
    archs = config.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise HFImportError(f"config.json: architectures={archs!r}; expected exactly one of {supported}")
        arch = str(archs[0])
    elif config.get("model_type") in _MODEL_TYPES:
        arch = _MODEL_TYPES[config["model_type"]]
    else:
        raise HFImportError(
            f"config.json names no architecture (architectures missing, model_type={config.get('model_type')!r}); "
            f"supported: {supported}"
        )
    if arch in _REFUSED:
        raise HFImportError(f"config.json: architecture {arch} is not supported: {_REFUSED[arch]}")
    if arch not in _SUPPORTED:
        raise HFImportError(f"config.json: architecture {arch!r} is not supported; supported: {supported}")
    return arch


def _rope_theta(config: dict[str, Any]) -> float:
    """RoPE base frequency, refusing any scaling our rope_cache does not compute.

    transformers 5 writes ``rope_parameters`` ({"rope_type", "rope_theta", ...}); 4.x wrote a
    top-level ``rope_theta`` and an optional ``rope_scaling`` ({"rope_type" or "type", ...}).
    """
    theta = config.get("rope_theta")
    if config.get("partial_rotary_factor", 1.0) != 1.0:
        raise HFImportError(
            f"config.json: partial_rotary_factor={config['partial_rotary_factor']} is not supported; "
            "our RoPE rotates the whole head"
        )
    for key in ("rope_scaling", "rope_parameters"):
        params = config.get(key)
        if params is None:
            continue
        if not isinstance(params, dict):
            raise HFImportError(f"config.json: {key}={params!r} is not a dict")
        if (
            "rope_type" not in params
            and "type" not in params
            and all(isinstance(v, dict) for v in params.values())
        ):
            raise HFImportError(
                f"config.json: {key} is given per layer type ({sorted(params)}); only one default RoPE is supported"
            )
        if params.get("partial_rotary_factor", 1.0) != 1.0:
            raise HFImportError(
                f"config.json: {key}.partial_rotary_factor={params['partial_rotary_factor']} is not supported; "
                "our RoPE rotates the whole head"
            )
        rope_type = params.get("rope_type", params.get("type", "default"))
        if rope_type != "default":
            raise HFImportError(
                f"config.json: {key}.rope_type={rope_type!r} (RoPE scaling) is not supported; "
                "only 'default' (unscaled) RoPE matches our model"
            )
        if params.get("rope_theta") is not None:
            theta = params["rope_theta"]  # transformers 5 gives rope_parameters precedence
    return float(theta if theta is not None else 10000.0)


def model_config_from_hf(config: dict[str, Any]) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab size) for a config.json whose model computes exactly what ours does.

    Anything that would change the math (biases, another activation, scaled RoPE, a sliding
    window shorter than the context, a head_dim not equal to hidden_size / heads) is refused
    with an HFImportError naming the config key, rather than loaded into a model that would
    silently give different logits.
    """
    arch = _architecture(config)
    defaults = _SUPPORTED[arch]

    def req_int(key: str) -> int:
        value = config.get(key)
        if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
            raise HFImportError(f"config.json: {key}={value!r}; expected a positive integer")
        return value

    dim, n_heads = req_int("hidden_size"), req_int("num_attention_heads")
    ffn_dim, n_layers, vocab = (
        req_int("intermediate_size"),
        req_int("num_hidden_layers"),
        req_int("vocab_size"),
    )
    n_kv_heads = req_int("num_key_value_heads") if config.get("num_key_value_heads") is not None else n_heads
    if n_heads % n_kv_heads:
        raise HFImportError(
            f"config.json: num_attention_heads={n_heads} is not a multiple of num_key_value_heads={n_kv_heads}"
        )
    if dim % n_heads:
        raise HFImportError(
            f"config.json: hidden_size={dim} is not divisible by num_attention_heads={n_heads}"
        )
    head_dim = config.get("head_dim")
    if head_dim is not None and head_dim != dim // n_heads:
        raise HFImportError(
            f"config.json: head_dim={head_dim} differs from hidden_size/num_attention_heads={dim // n_heads}; "
            "our model derives head_dim from hidden_size"
        )
    if (dim // n_heads) % 2:
        raise HFImportError(f"config.json: head dimension {dim // n_heads} is odd; RoPE needs an even one")

    act = config.get("hidden_act", "silu")
    if act not in ("silu", "swish"):
        raise HFImportError(f"config.json: hidden_act={act!r} is not supported; our MLP is SwiGLU (silu)")
    for key in ("attention_bias", "mlp_bias"):
        if config.get(key):
            raise HFImportError(
                f"config.json: {key}=true is not supported; our model has no biases by design"
            )
    if config.get("quantization_config"):
        raise HFImportError("config.json: quantization_config is set; only unquantized weights can be loaded")

    if config.get("max_position_embeddings") is None:
        config = {**config, "max_position_embeddings": defaults["max_position_embeddings"]}
    max_pos = req_int("max_position_embeddings")
    window = config.get("sliding_window")
    if window is not None and window < max_pos:
        raise HFImportError(
            f"config.json: sliding_window={window} is shorter than max_position_embeddings={max_pos}; "
            "our attention is full causal, so logits would differ beyond the window "
            "(set sliding_window to null or >= max_position_embeddings to accept that)"
        )
    layer_types = config.get("layer_types")
    if layer_types and any(t != "full_attention" for t in layer_types):
        raise HFImportError(
            f"config.json: layer_types={sorted(set(layer_types))}; only full_attention is supported"
        )

    cfg = ModelConfig(
        name=f"hf-{config.get('model_type') or arch}",
        dim=dim,
        n_layers=n_layers,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        ffn_dim=ffn_dim,
        vocab_size=vocab,
        pad_vocab_to=1,  # the checkpoint fixes the embedding rows; never pad them
        max_seq_len=max_pos,
        rope_theta=_rope_theta(config),
        norm_eps=float(config.get("rms_norm_eps") or defaults["rms_norm_eps"]),
        tie_embeddings=bool(config.get("tie_word_embeddings", False)),
        init_std=float(config.get("initializer_range", 0.02)),
    )
    return cfg, vocab


def _folder(folder: str | os.PathLike[str]) -> Path:
    path = Path(folder)
    if not path.is_dir():
        raise FileNotFoundError(
            f"Hugging Face model folder {str(path)!r} does not exist or is not a directory"
        )
    return path


def _header_tensors(file: str) -> dict[str, torch.Tensor]:
    """A safetensors file's tensors as meta tensors of the right shape and dtype (reads the header only)."""
    from safetensors import safe_open

    out: dict[str, torch.Tensor] = {}
    with safe_open(file, framework="pt") as f:
        for key in f.keys():  # noqa: SIM118 -- safe_open handles have keys(), not iteration
            piece = f.get_slice(key)
            out[key] = torch.empty(piece.get_shape(), device="meta")
    return out


def load_hf_state_dict(folder: str | os.PathLike[str], meta_only: bool = False) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors weights, single-file or sharded (with its index).

    ``meta_only`` reads the headers only and returns meta tensors: enough to check names and
    shapes before anything is loaded. pytorch_model.bin is refused: it is a pickle, and loading
    pickles can run code (the design allows weights_only checkpoints or safetensors only).
    """
    from safetensors.torch import load_file as load_tensors

    load_file = _header_tensors if meta_only else load_tensors
    path = _folder(folder)
    single, index = path / "model.safetensors", path / _INDEX
    if single.is_file():
        return load_file(str(single))
    if index.is_file():
        try:
            weight_map: dict[str, str] = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFImportError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        shards = sorted(set(weight_map.values()))
        missing = [s for s in shards if not (path / s).is_file()]
        if missing:
            raise FileNotFoundError(
                f"{index} lists shard(s) missing from {path}: {missing} ({len(shards)} shard(s) indexed)"
            )
        state: dict[str, torch.Tensor] = {}
        for shard in shards:
            tensors = load_file(str(path / shard))
            expected = {k for k, s in weight_map.items() if s == shard}
            if not expected <= tensors.keys():
                lost = sorted(expected - tensors.keys())
                raise HFImportError(f"shard {shard} lacks tensor(s) its index maps to it, e.g. {lost[:3]}")
            state.update({k: tensors[k] for k in expected})
        return state
    if (path / "pytorch_model.bin").is_file() or (path / "pytorch_model.bin.index.json").is_file():
        raise HFImportError(
            f"{path} holds pytorch_model.bin (pickle) weights, which are refused because unpickling can run "
            "code; convert them to safetensors first, e.g. AutoModelForCausalLM.from_pretrained(folder)"
            ".save_pretrained(out, safe_serialization=True) in a trusted environment"
        )
    others = sorted(p.name for p in path.glob("*.safetensors"))
    hint = f"; found {others} but no {_INDEX} to say how they fit together" if others else ""
    raise FileNotFoundError(f"{path} has no model.safetensors nor {_INDEX}{hint}")


def hf_weight_names(folder: str | os.PathLike[str], cfg: ModelConfig) -> dict[str, str]:
    """Check a folder's safetensors headers against ``cfg`` without loading; our name -> HF name.

    Raises what the real load would (HFImportError / FileNotFoundError naming the tensor or file).
    """
    from_hf_state_dict(load_hf_state_dict(folder, meta_only=True), cfg)
    return name_map(cfg)


def load_hf_tokenizer(folder: str | os.PathLike[str]) -> tuple[Tokenizer | None, str | None]:
    """(tokenizers.Tokenizer, None) from tokenizer.json, or (None, the reason there is none)."""
    path = _folder(folder)
    file = path / "tokenizer.json"
    if not file.is_file():
        slow = [n for n in ("tokenizer.model", "vocab.json", "merges.txt") if (path / n).is_file()]
        extra = (
            f"; it has {slow}, a slow-tokenizer format: save it once with "
            "AutoTokenizer.from_pretrained(folder).save_pretrained(folder) to write tokenizer.json"
            if slow
            else ""
        )
        return None, f"no tokenizer.json in {path}{extra}"
    from tokenizers import Tokenizer as _Tokenizer

    try:
        return _Tokenizer.from_file(str(file)), None
    except Exception as e:  # the tokenizers library raises a bare Exception on a bad file
        raise HFImportError(f"{file} could not be read by the tokenizers library: {e}") from e


def load_hf_pretrained(
    folder: str | os.PathLike[str],
    dtype: torch.dtype = torch.float32,
    kernels: KernelBackend = KernelBackend.auto,
) -> tuple[Transformer, Tokenizer | None]:
    """(our Transformer with the folder's weights in ``dtype``, in eval mode; its tokenizers.Tokenizer or None).

    The public way to use a Hugging Face Llama/Mistral folder directly: the config is checked
    (:func:`model_config_from_hf`), the weights are checked and renamed (:func:`from_hf_state_dict`)
    and loaded strictly into a model from ``build_model(init=False)``, so a large checkpoint is
    never randomly initialised first. A missing tokenizer.json is not an error (the weights are
    still useful); the reason is logged and also available from :func:`load_hf_tokenizer`.
    """
    path = _folder(folder)
    config_file = path / "config.json"
    if not config_file.is_file():
        raise FileNotFoundError(f"{path} has no config.json; it is not a Hugging Face model folder")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as e:
        raise HFImportError(f"{config_file} is not valid JSON: {e}") from e
    cfg, vocab = model_config_from_hf(config)
    cfg = replace(cfg, kernels=kernels)

    state = from_hf_state_dict(load_hf_state_dict(path), cfg)
    model = build_model(cfg, vocab, device="cpu", init=False)
    model.to(dtype)
    model.load_state_dict(state, strict=True)
    model.reset_rope_cache()  # fp32 tables, as in a model built directly
    model.eval()

    tokenizer, reason = load_hf_tokenizer(path)
    if tokenizer is None:
        logger.warning("loaded %s without a tokenizer: %s", path, reason)
    return model, tokenizer
