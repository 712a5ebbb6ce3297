"""Conversion between our Transformer and the Hugging Face families (and import of HF folders).

Only names change, plus the fused tensors some families store (families/): the model was built
so that every tensor has the same shape and layout as in transformers (including the
non-interleaved RoPE of q/k, so no permutation is needed). This module does not import
transformers; the exporter and the parity tests do.
"""

from __future__ import annotations

import json
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from orchestra.model.build import load_into_meta_model
from orchestra.model.config import KernelBackend, ModelConfig
from orchestra.model.families import BY_ARCHITECTURE, BY_MODEL_TYPE, Family, family
from orchestra.model.families.spec import HFImportError
from orchestra.model.transformer import Transformer

if TYPE_CHECKING:
    from tokenizers import Tokenizer

logger = logging.getLogger(__name__)

__all__ = ["HFImportError"]


def hf_config_dict(
    cfg: ModelConfig,
    vocab_size: int,
    bos_id: int | None = None,
    eos_id: int | list[int] | None = None,
    torch_dtype: str = "float32",
) -> dict[str, Any]:
    """The config.json content (and config-class keyword arguments) of ``cfg``'s family.

    RoPE's theta is written twice on purpose: transformers 5 reads ``rope_parameters`` and
    transformers 4 reads ``rope_theta`` (and ``rope_scaling``); 5.x gives rope_parameters
    precedence, so one file loads in either. bos/eos are always written (None when unknown)
    because the config classes otherwise default them to arbitrary tokens of our vocabulary.
    """
    fam = family(cfg.family)
    return {
        **fam.write(cfg),
        "vocab_size": vocab_size,
        "bos_token_id": bos_id,
        "eos_token_id": eos_id,
        "pad_token_id": None,  # Phi3Config would default it to 32000, outside small vocabularies
        "torch_dtype": torch_dtype,
    }


def _expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, tuple[int, ...]]:
    """Our parameter name -> shape (lm_head only when untied), from the model built on the meta device."""
    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    # named_parameters() lists a tied matrix once, under tok_embeddings.
    return {name: tuple(p.shape) for name, p in model.named_parameters()}


def _layer_map(fam: Family, i: int, ours: str) -> str | None:
    """HF name of our per-layer parameter ``ours`` (``attention.q_proj.weight``), None when fused."""
    module, _, leaf = ours.rpartition(".")
    if module not in fam.layer_names:
        return None
    return f"model.layers.{i}.{fam.layer_names[module]}.{leaf}"


def name_map(cfg: ModelConfig, params: Iterable[str] | None = None) -> dict[str, str]:
    """Our parameter name -> HF name, for every tensor HF stores under its own name (lm_head only
    when untied); tensors a family stores fused (Phi-3's qkv_proj) are not in it.

    ``params`` are the model's parameter names when the caller already has them (from
    :func:`_expected_shapes`), so a conversion builds the meta model once.
    """
    fam = family(cfg.family)
    names: dict[str, str] = {}
    for ours in params if params is not None else _expected_shapes(cfg, 1):
        if ours.startswith("layers."):
            _, i, rest = ours.split(".", 2)
            theirs = _layer_map(fam, int(i), rest)
            if theirs is None:
                if not any(rest.rpartition(".")[0] in parts for parts in fam.fused.values()):
                    raise KeyError(f"family {fam.name} has no Hugging Face name for {ours}")
                continue
            names[ours] = theirs
        elif ours == "tok_embeddings.weight":
            names[ours] = "model.embed_tokens.weight"
        elif ours == "norm.weight":
            names[ours] = "model.norm.weight"
        elif ours == "lm_head.weight":
            names[ours] = "lm_head.weight"
        else:  # pragma: no cover - a new top-level parameter needs a name here
            raise KeyError(f"no Hugging Face name for {ours}")
    return names


def _fused_groups(cfg: ModelConfig) -> list[tuple[str, list[str]]]:
    """(HF fused tensor name, our tensor names concatenated in it, in order) for every layer."""
    fam = family(cfg.family)
    groups = []
    for i in range(cfg.n_layers):
        for theirs, parts in fam.fused.items():
            for leaf in ("weight", "bias"):
                ours = [f"layers.{i}.{p}.{leaf}" for p in parts]
                groups.append((f"model.layers.{i}.{theirs}.{leaf}", ours))
    return groups


def _vocab_size(sd: Mapping[str, torch.Tensor], key: str, what: str) -> int:
    if key not in sd:
        raise HFImportError(f"{what} state dict is missing {key!r}")
    return int(sd[key].shape[0])


def _check(
    sd: Mapping[str, torch.Tensor], expected: dict[str, tuple[int, ...]], what: str, ignore: set[str]
) -> None:
    """Raise HFImportError naming the first missing, unexpected or mis-shaped tensor."""
    missing = sorted(set(expected) - set(sd))
    if missing:
        raise HFImportError(f"{what} state dict is missing {len(missing)} tensor(s), e.g. {missing[:3]}")
    unexpected = sorted(k for k in set(sd) - set(expected) if k not in ignore)
    if unexpected:
        raise HFImportError(
            f"{what} state dict has {len(unexpected)} unexpected tensor(s), e.g. {unexpected[:3]}"
        )
    for name, shape in expected.items():
        if tuple(sd[name].shape) != shape:
            raise HFImportError(f"{what} tensor {name!r} has shape {tuple(sd[name].shape)}, expected {shape}")


def to_hf_state_dict(state_dict: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """Our ``model.state_dict()`` -> the family's HF names (same tensors; fused ones concatenated).

    With tied embeddings lm_head.weight is left out, as transformers' own save does; the
    (identical) ``lm_head.weight`` entry of our state dict is accepted and dropped.
    """
    vocab = _vocab_size(state_dict, "tok_embeddings.weight", "Orchestra")
    ours = _expected_shapes(cfg, vocab)
    ignore = {"lm_head.weight"} if cfg.tie_embeddings else set()
    _check(state_dict, ours, "Orchestra", ignore)
    out = {theirs: state_dict[name] for name, theirs in name_map(cfg, ours).items()}
    for theirs, parts in _fused_groups(cfg):
        if parts[0] in ours:
            out[theirs] = torch.cat([state_dict[p] for p in parts], dim=0)
    return out


def from_hf_state_dict(hf_sd: Mapping[str, torch.Tensor], cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """HF state dict of ``cfg``'s family -> ours, ready for ``model.load_state_dict(strict=True)``.

    Fused tensors are split into views (no copy). Tolerated extras: rotary ``inv_freq`` buffers
    (old checkpoints saved them) and, when tied, an ``lm_head.weight`` equal to the embedding.
    With tied embeddings the result holds the embedding under both ``tok_embeddings.weight`` and
    ``lm_head.weight``, as our own state_dict() does.
    """
    vocab = _vocab_size(hf_sd, "model.embed_tokens.weight", "Hugging Face")
    shapes = _expected_shapes(cfg, vocab)
    names = name_map(cfg, shapes)
    expected = {names[k]: shape for k, shape in shapes.items() if k in names}
    fused = [(theirs, parts) for theirs, parts in _fused_groups(cfg) if parts[0] in shapes]
    for theirs, parts in fused:
        rows = sum(shapes[p][0] for p in parts)
        expected[theirs] = (rows, *shapes[parts[0]][1:])
    ignore = {k for k in hf_sd if k.endswith("rotary_emb.inv_freq")}
    if cfg.tie_embeddings and "lm_head.weight" in hf_sd:
        head, emb = hf_sd["lm_head.weight"], hf_sd["model.embed_tokens.weight"]
        # Meta tensors (a header-only check) carry no values to compare; the real load compares them.
        if head.shape != emb.shape or (not head.is_meta and not torch.equal(head, emb)):
            raise HFImportError(
                "Hugging Face tensor 'lm_head.weight' differs from 'model.embed_tokens.weight', "
                "but model.tie_embeddings=true; set tie_embeddings=false to load an untied head"
            )
        ignore.add("lm_head.weight")
    _check(hf_sd, expected, "Hugging Face", ignore)
    out = {ours: hf_sd[theirs] for ours, theirs in names.items()}
    for theirs, parts in fused:
        sizes = [shapes[p][0] for p in parts]
        out.update(zip(parts, torch.split(hf_sd[theirs], sizes, dim=0), strict=True))
    if cfg.tie_embeddings:
        out["lm_head.weight"] = out["tok_embeddings.weight"]
    return out


# ---------------------------------------------------------------------------------------------
# Import: a Hugging Face folder (config.json + safetensors [+ tokenizer.json]) -> our model.
#
# Read with json + safetensors only, so importing works without transformers installed.
# ---------------------------------------------------------------------------------------------

_INDEX = "model.safetensors.index.json"


def _family_of(config: Mapping[str, Any]) -> Family:
    """The family of the one causal-LM class a config.json names (``architectures``, else ``model_type``)."""
    supported = sorted(BY_ARCHITECTURE)
    archs = config.get("architectures")
    if archs:
        if not isinstance(archs, list) or len(archs) != 1:
            raise HFImportError(f"config.json: architectures={archs!r}; expected exactly one of {supported}")
        arch = str(archs[0])
        if arch not in BY_ARCHITECTURE:
            raise HFImportError(
                f"config.json: architecture {arch!r} is not supported; supported: {supported}"
            )
        return BY_ARCHITECTURE[arch]
    model_type = config.get("model_type")
    if model_type in BY_MODEL_TYPE:
        return BY_MODEL_TYPE[str(model_type)]
    raise HFImportError(
        f"config.json names no supported architecture (architectures missing, model_type={model_type!r}); "
        f"supported: {supported}"
    )


def model_config_from_hf(config: Mapping[str, Any]) -> tuple[ModelConfig, int]:
    """(ModelConfig, vocab size) for a config.json of a supported family.

    The family's reader (families/) maps every key that changes the math onto ModelConfig
    fields, and refuses with an HFImportError naming the config key what our model does not
    compute, rather than load a model that would silently give different logits.
    """
    cfg = _family_of(config).read(config)
    try:
        cfg.validate("config.json")
    except ValueError as err:
        raise HFImportError(str(err)) from err
    assert cfg.vocab_size is not None
    return cfg, cfg.vocab_size


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


def load_hf_state_dict(
    folder: str | os.PathLike[str], meta_only: bool = False, dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """All tensors of a folder's safetensors weights, single-file or sharded (with its index).

    Nothing is copied that need not be: a tensor stored in ``dtype`` (any tensor with
    ``dtype=None``, and any non-floating one) is a view of the file's memory map, paged in when
    first read. The mapping is private (copy-on-write), so the tensor is writable -- an optimizer
    may update it in place -- and the file is never written. A floating tensor stored in another
    dtype is read into fresh memory and converted on its own (safetensors' ``pread`` backend where
    it has one, else a mapping opened for that tensor alone), so converting a checkpoint holds one
    source tensor at a time, never the whole file beside the result.

    ``meta_only`` reads the headers only and returns meta tensors: enough to check names and
    shapes before anything is loaded. pytorch_model.bin is refused: it is a pickle, and loading
    pickles can run code (the design allows weights_only checkpoints or safetensors only).
    """
    from safetensors import safe_open

    def read(file: str) -> dict[str, torch.Tensor]:
        if meta_only:
            return _header_tensors(file)
        tensors: dict[str, torch.Tensor] = {}
        convert: list[str] = []
        with safe_open(file, framework="pt") as f:  # memory-mapped: getting a tensor reads nothing yet
            for key in f.keys():  # noqa: SIM118 -- safe_open handles have keys(), not iteration
                tensor = f.get_tensor(key)
                if dtype is None or tensor.dtype == dtype or not tensor.is_floating_point():
                    tensors[key] = tensor
                else:
                    convert.append(key)
        if convert:
            assert dtype is not None
            try:
                handle = safe_open(file, framework="pt", backend="pread")
            except TypeError:  # safetensors < 0.8 has no backend: one mapping per tensor, closed after it
                for key in convert:
                    with safe_open(file, framework="pt") as f:
                        tensors[key] = f.get_tensor(key).to(dtype)
            else:
                with handle as f:
                    for key in convert:
                        tensors[key] = f.get_tensor(key).to(dtype)
        return tensors

    path = _folder(folder)
    single, index = path / "model.safetensors", path / _INDEX
    if single.is_file():
        return read(str(single))
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
            tensors = read(str(path / shard))
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
    and become the parameters of a model built on the meta device (:func:`load_into_meta_model`),
    so a large checkpoint is never randomly initialised first nor held twice: in the file's own
    dtype the parameters are its copy-on-write memory map (writable; the file is never written).
    A missing tokenizer.json is not an error (the weights are still useful); the reason is
    logged and also available from :func:`load_hf_tokenizer`.
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

    # Read in ``dtype`` (one tensor converted at a time), then made the parameters themselves:
    # the weights are in memory once (memory-mapped when the file already has ``dtype``).
    state = from_hf_state_dict(load_hf_state_dict(path, dtype=dtype), cfg)
    model = load_into_meta_model(cfg, vocab, state, device="cpu", dtype=dtype)
    del state
    model.eval()

    tokenizer, reason = load_hf_tokenizer(path)
    if tokenizer is None:
        logger.warning("loaded %s without a tokenizer: %s", path, reason)
    return model, tokenizer
