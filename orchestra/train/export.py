"""Consolidate any training checkpoint into a Hugging Face Llama folder, or export PEFT weights alone.

Checkpoint kinds: a single file (single device, DDP), a torch.distributed.checkpoint directory
(FSDP2, any number of shards) and a DeepSpeed ZeRO directory (stages 1-3). Each is turned into one
full fp32 state dict of our parameter names, checked against the model shape recorded in the
checkpoint, renamed to transformers' Llama names and written as safetensors with config.json and
the tokenizer files. The folder loads with ``AutoModelForCausalLM.from_pretrained``.

:func:`export_peft` (``orchestra-export ... peft_only=true``) writes only the trained weights of a
PEFT checkpoint: LoRA and prompt tuning in Hugging Face peft's format (``adapter_config.json`` +
``adapter_model.safetensors``, loaded with ``peft.PeftModel.from_pretrained`` on the exported
base), bottleneck adapters, which peft has no equivalent of, under our own names. Every such
folder also holds ``orchestra_peft.json`` (method, finetune config, base reference, model shape)
and ``tokenizer.json``, which is what :func:`load_peft_export` reads back.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch

from orchestra.config import ModelConfig, model_config_from_dict
from orchestra.io import staged_dir
from orchestra.train.checkpoint import (
    CheckpointError,
    is_deepspeed_checkpoint,
    is_sharded_checkpoint,
    load_checkpoint_file,
)

EOS_TOKEN = "<|endoftext|>"
_PREFIX = "model."
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ORCHESTRA_PEFT_FILE = "orchestra_peft.json"
# peft prefixes every module of the wrapped model with this (PeftModel.base_model.model).
_PEFT_PREFIX = "base_model.model."
_PEFT_PROMPT_KEY = "prompt_embeddings"
_SOFT_PROMPT = "soft_prompt.weight"


def _strip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names, whether saved from the LightningModule (model.*) or the bare model."""
    if any(k.startswith(_PREFIX) for k in state):
        return {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    return dict(state)


def _expected_shapes(cfg: ModelConfig, vocab_size: int) -> dict[str, torch.Size]:
    from orchestra.model import Transformer

    with torch.device("meta"):
        model = Transformer(cfg, vocab_size)
    return {k: v.shape for k, v in model.state_dict().items()}


def consolidated_state_dict(path: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(full fp32 state dict with our names, Orchestra metadata) from any kind of checkpoint."""
    path = Path(path)
    if is_deepspeed_checkpoint(path):
        meta = load_checkpoint_file(path).get("orchestra")
        if meta is None:
            raise CheckpointError(
                f"DeepSpeed checkpoint {path} carries no Orchestra metadata (client state 'orchestra')"
            )
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(path))
        return _strip(state), meta

    ckpt = load_checkpoint_file(path)  # a sharded dir yields its metadata only
    meta = ckpt.get("orchestra")
    if not isinstance(meta, dict) or "model_config" not in meta:
        raise CheckpointError(f"checkpoint {path} carries no Orchestra metadata (model config, tokenizer)")
    if not is_sharded_checkpoint(path):
        return _strip(ckpt["state_dict"]), meta

    import torch.distributed.checkpoint as dcp

    if "peft" in meta:
        # Only the trainable tensors were saved: take their names and shapes from the DCP metadata.
        stored = dcp.FileSystemReader(str(path)).read_metadata().state_dict_metadata
        templates = {
            k[len("state_dict.") :]: torch.empty(tuple(m.size))
            for k, m in stored.items()
            if k.startswith("state_dict.") and hasattr(m, "size")
        }
    else:
        cfg = model_config_from_dict(meta["model_config"])
        shapes = _expected_shapes(cfg, int(meta["vocab_size"]))
        templates = {_PREFIX + k: torch.empty(shape) for k, shape in shapes.items()}
    state = {"state_dict": templates}
    try:
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    except Exception as err:  # a shape or key mismatch surfaces as a planner error
        raise CheckpointError(
            f"sharded checkpoint {path} does not match its recorded model config: {err}"
        ) from err
    return _strip(state["state_dict"]), meta


def check_shapes(state: dict[str, torch.Tensor], cfg: ModelConfig, vocab_size: int, source: Path) -> None:
    expected = _expected_shapes(cfg, vocab_size)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint {source} does not fit the model it records: missing tensors {missing[:5]}, "
            f"unexpected tensors {unexpected[:5]}"
        )
    for name, shape in expected.items():
        if state[name].shape != shape:
            raise CheckpointError(
                f"checkpoint {source}: tensor {name!r} has shape {tuple(state[name].shape)}, but the model "
                f"config recorded in it (dim={cfg.dim}, n_layers={cfg.n_layers}, ...) needs {tuple(shape)}"
            )


_UNMERGEABLE = {
    "adapter": "adapters add layers a Llama folder has no place for",
    "prompt": "a soft prompt is extra input embeddings, not a change to any weight",
}


def _merged_peft_state(
    trainable: dict[str, torch.Tensor], meta: dict[str, Any], ckpt: Path
) -> dict[str, torch.Tensor]:
    """A LoRA checkpoint holds its trainable tensors only: rebuild base + LoRA and merge them."""
    from orchestra.model.peft import merge_lora
    from orchestra.train.finetune import rebuild_peft_model

    method = meta["peft"]["method"]
    if method != "lora":
        why = _UNMERGEABLE.get(method, "only LoRA folds into the base weights")
        raise CheckpointError(
            f"checkpoint {ckpt} is a {method} fine-tune: {why}, so it cannot be merged into the Hugging Face "
            f"weights; export its trained weights alone with peft_only=true (orchestra-export ckpt={ckpt} "
            "out=DIR peft_only=true), or fine-tune with finetune=lora or full for a merged folder"
        )
    model = rebuild_peft_model(trainable, meta, ckpt)
    merge_lora(model)
    return {k: v.detach() for k, v in model.state_dict().items()}


def _torch_dtype(dtype: str) -> torch.dtype:
    if dtype not in _DTYPES:
        raise ValueError(f"dtype: {dtype!r} is not one of {', '.join(_DTYPES)}")
    return _DTYPES[dtype]


def _check_out(out: Path, overwrite: bool) -> None:
    """Refuse, before reading anything, an output that is a file or a non-empty folder (without overwrite)."""
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"out: {out} is a file; give a folder to write into")
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(
            f"out: {out} exists and is not empty; choose another folder or set overwrite=true"
        )


def export_hf(ckpt: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write a Hugging Face Llama folder for ``ckpt`` into ``out`` (atomically); returns ``out``."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from orchestra.model.hf import hf_config_dict, to_hf_state_dict

    ckpt, out = Path(ckpt), Path(out)
    torch_dtype = _torch_dtype(dtype)
    _check_out(out, overwrite)

    state, meta = consolidated_state_dict(ckpt)
    if "peft" in meta:
        state = _merged_peft_state(state, meta, ckpt)
    cfg = model_config_from_dict(meta["model_config"])
    vocab_size = int(meta["vocab_size"])
    labels = meta.get("labels") if meta.get("task") == "classification" else None
    score = None
    if labels:
        # A SequenceClassifier: the decoder under "model.", the head as "score" (HF's own name).
        score = state["score.weight"]
        state = {k[len(_PREFIX) :]: v for k, v in state.items() if k.startswith(_PREFIX)}
    check_shapes(state, cfg, vocab_size, ckpt)
    hf_state = {k: v.detach().to(torch_dtype).contiguous() for k, v in to_hf_state_dict(state, cfg).items()}
    if score is not None:
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}  # unused by the classifier
        hf_state["score.weight"] = score.detach().to(torch_dtype).contiguous()

    tokenizer = Tokenizer.from_str(meta["tokenizer_json"])
    eos_id = int(meta["eos_id"]) if meta.get("eos_id") is not None else tokenizer.token_to_id(EOS_TOKEN)
    eos_token = tokenizer.id_to_token(eos_id) if eos_id is not None else EOS_TOKEN
    with staged_dir(out) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config_dict(cfg, vocab_size, bos_id=eos_id, eos_id=eos_id, torch_dtype=dtype)
        if labels:
            # LlamaForSequenceClassification reads the last token before the first pad: pad = eos,
            # which classification texts never contain (the data module pads with it too).
            config.update(
                architectures=["LlamaForSequenceClassification"],
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)},
                pad_token_id=eos_id,
                tie_word_embeddings=False,
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": eos_id, "eos_token_id": eos_id}) + "\n"
        )
        tokenizer.save(str(tmp / "tokenizer.json"))
        (tmp / "tokenizer_config.json").write_text(
            json.dumps(
                {
                    "tokenizer_class": "PreTrainedTokenizerFast",
                    "bos_token": eos_token,
                    "eos_token": eos_token,
                    "model_max_length": cfg.max_seq_len,
                    "clean_up_tokenization_spaces": False,
                },
                indent=2,
            )
            + "\n"
        )
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": eos_token, "eos_token": eos_token}) + "\n"
        )
    return out


# ---------------------------------------------------------------------------------------------
# PEFT-only export: the trained tensors of a lora / prompt / adapter checkpoint, without the base.
# ---------------------------------------------------------------------------------------------


def _trainable_layout(meta: dict[str, Any], ckpt: Path) -> dict[str, tuple[int, ...]]:
    """Name -> shape of the tensors a checkpoint's method trains, from a model on the meta device.

    This checks a PEFT checkpoint without loading its (possibly large, possibly absent) base.
    """
    from orchestra.model import Transformer
    from orchestra.train.finetune import apply_method, finetune_config_from_dict

    try:
        cfg = model_config_from_dict(meta["model_config"])
        ft = finetune_config_from_dict(meta["peft"]["config"])
        with torch.device("meta"):
            model = apply_method(Transformer(cfg, int(meta["vocab_size"])), ft)
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(
            f"checkpoint {ckpt}: its PEFT metadata does not describe a model: {err}"
        ) from err
    return {n: tuple(p.shape) for n, p in model.named_parameters() if p.requires_grad}


def _check_trainable(trainable: dict[str, torch.Tensor], meta: dict[str, Any], ckpt: Path) -> None:
    layout = _trainable_layout(meta, ckpt)
    method = meta["peft"]["method"]
    if set(trainable) != set(layout):
        differing = sorted(set(trainable) ^ set(layout))
        raise CheckpointError(
            f"checkpoint {ckpt}: its tensors do not match the {method} layout recorded in it "
            f"(differing: {differing[:4]}, {len(differing)} in all)"
        )
    for name, shape in layout.items():
        if tuple(trainable[name].shape) != shape:
            raise CheckpointError(
                f"checkpoint {ckpt}: tensor {name!r} has shape {tuple(trainable[name].shape)}, but its "
                f"{method} config needs {shape}"
            )


def _lora_peft_names(names: list[str], cfg: ModelConfig) -> dict[str, str]:
    """Our LoRA tensor name -> peft's, through hf.py's name map of the wrapped linear.

    layers.0.attention.q_proj.lora_A.weight -> base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight
    """
    from orchestra.model.hf import _name_map

    weights = _name_map(cfg)
    out: dict[str, str] = {}
    for name in names:
        module, _, leaf = name.rpartition(".lora_")
        if leaf not in ("A.weight", "B.weight") or f"{module}.weight" not in weights:
            raise CheckpointError(f"LoRA tensor {name!r} is not a lora_A/lora_B weight of a Llama projection")
        hf_module = weights[f"{module}.weight"].removesuffix(".weight")
        out[name] = f"{_PEFT_PREFIX}{hf_module}.lora_{leaf}"
    return out


def _peft_target_modules(wrapped: set[str], cfg: ModelConfig) -> list[str] | str:
    """peft's ``target_modules`` selecting exactly the wrapped HF modules.

    Leaf names (["q_proj", "v_proj"]) when every layer has the same ones, as peft's own configs
    do; otherwise one anchored regex of the full names, which peft matches with re.fullmatch.
    """
    from orchestra.model.hf import _name_map

    linears = {v.removesuffix(".weight") for v in _name_map(cfg).values() if v.endswith("_proj.weight")}
    leaves = sorted({m.rpartition(".")[2] for m in wrapped})
    if {m for m in linears if m.rpartition(".")[2] in leaves} == wrapped:
        return leaves
    return "^(?:" + "|".join(re.escape(m) for m in sorted(wrapped)) + ")$"


def _number(x: float) -> int | float:
    """16.0 -> 16: peft's configs write integers where they can."""
    return int(x) if float(x).is_integer() else float(x)


def _lora_files(
    trainable: dict[str, torch.Tensor], cfg: ModelConfig, ft: dict[str, Any], base: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft LORA adapter_config.json + tensors under peft's key names."""
    names = _lora_peft_names(sorted(trainable), cfg)
    tensors = {names[k]: v for k, v in trainable.items()}
    wrapped = {n.removeprefix(_PEFT_PREFIX).rpartition(".lora_")[0] for n in names.values()}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "r": int(ft["lora_rank"]),
        "lora_alpha": _number(ft["lora_alpha"]),
        "lora_dropout": float(ft["lora_dropout"]),
        "target_modules": _peft_target_modules(wrapped, cfg),
        "bias": "none",
        "fan_in_fan_out": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "layers_to_transform": None,
        "layers_pattern": None,
        "rank_pattern": {},
        "alpha_pattern": {},
        "use_rslora": False,  # our scale is alpha / r, peft's default
        "use_dora": False,
    }
    return config, tensors


def _prompt_files(
    trainable: dict[str, torch.Tensor], cfg: ModelConfig, base: str
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """peft PROMPT_TUNING adapter_config.json + the [P, dim] soft prompt as "prompt_embeddings"."""
    prompt = trainable[_SOFT_PROMPT]
    config = {
        "peft_type": "PROMPT_TUNING",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base,
        "revision": None,
        "inference_mode": True,
        "num_virtual_tokens": int(prompt.shape[0]),
        "token_dim": int(prompt.shape[1]),
        "num_transformer_submodules": 1,
        "num_attention_heads": cfg.n_heads,
        "num_layers": cfg.n_layers,
        # RANDOM: peft initialises nothing from a tokenizer; the saved embeddings replace the init.
        "prompt_tuning_init": "RANDOM",
        "prompt_tuning_init_text": None,
        "tokenizer_name_or_path": None,
        "modules_to_save": None,
    }
    return config, {_PEFT_PROMPT_KEY: prompt}


def export_peft(ckpt: str | Path, out: str | Path, dtype: str = "float32", overwrite: bool = False) -> Path:
    """Write only the trained weights of a PEFT checkpoint into ``out`` (atomically); returns ``out``.

    - lora: ``adapter_config.json`` (peft_type LORA) + ``adapter_model.safetensors`` with peft's
      names (``base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight``);
    - prompt: ``adapter_config.json`` (peft_type PROMPT_TUNING) + ``adapter_model.safetensors``
      holding ``prompt_embeddings`` [num_virtual_tokens, dim];
    - adapter: ``adapter_model.safetensors`` under our own names (``layers.0.attention.adapter.
      down.weight``); peft has no Houlsby adapter, so only Orchestra (:func:`load_peft_export`)
      reads it back.

    All three add ``orchestra_peft.json`` and ``tokenizer.json``. The base model is not needed
    (it is not read): the tensors are checked against the method's layout on the meta device.
    For peft, load the base exported with ``orchestra-export`` (without peft_only) and wrap it:
    ``PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_folder), out)``.
    """
    from safetensors.torch import save_file

    ckpt, out = Path(ckpt), Path(out)
    torch_dtype = _torch_dtype(dtype)
    _check_out(out, overwrite)
    trainable, meta = consolidated_state_dict(ckpt)
    peft = meta.get("peft")
    if not isinstance(peft, dict):
        raise CheckpointError(
            f"checkpoint {ckpt} is not a PEFT (lora, adapter or prompt) checkpoint: it holds the whole model, so "
            f"there are no adapter weights to export alone; use the merged export (orchestra-export ckpt={ckpt} "
            "out=DIR, without peft_only=true)"
        )
    if not {"method", "config", "base"} <= peft.keys():
        raise CheckpointError(f"checkpoint {ckpt}: its 'peft' metadata lacks method/config/base: {peft!r}")
    if meta.get("task") == "classification":
        raise CheckpointError(
            f"checkpoint {ckpt} is a classifier: its new head has no place in peft's adapter files; use the "
            f"merged export (orchestra-export ckpt={ckpt} out=DIR), a LlamaForSequenceClassification folder"
        )
    _check_trainable(trainable, meta, ckpt)
    method = peft["method"]
    cfg = model_config_from_dict(meta["model_config"])
    base = str(peft["base"]["path"])
    trainable = {k: v.detach().to(torch_dtype).contiguous() for k, v in trainable.items()}
    adapter_config: dict[str, Any] | None
    if method == "lora":
        adapter_config, tensors = _lora_files(trainable, cfg, peft["config"], base)
        names = "peft"
    elif method == "prompt":
        adapter_config, tensors = _prompt_files(trainable, cfg, base)
        names = "peft"
    elif method == "adapter":
        adapter_config, tensors, names = None, trainable, "orchestra"
    else:
        raise CheckpointError(
            f"checkpoint {ckpt}: PEFT method {method!r} is not one of lora, adapter, prompt"
        )
    record = {
        "format": 1,
        "method": method,
        "config": peft["config"],
        "base": peft["base"],
        "model_config": meta["model_config"],
        "vocab_size": int(meta["vocab_size"]),
        # Key names in adapter_model.safetensors: peft's (lora, prompt) or ours (adapter).
        "tensor_names": names,
        "readable_by": "peft.PeftModel.from_pretrained and Orchestra"
        if names == "peft"
        else "Orchestra only",
    }
    with staged_dir(out) as tmp:
        save_file(tensors, str(tmp / PEFT_WEIGHTS_FILE), metadata={"format": "pt"})
        if adapter_config is not None:
            (tmp / PEFT_CONFIG_FILE).write_text(json.dumps(adapter_config, indent=2) + "\n")
        (tmp / ORCHESTRA_PEFT_FILE).write_text(json.dumps(record, indent=2) + "\n")
        (tmp / "tokenizer.json").write_text(meta["tokenizer_json"])
    return out


def load_peft_export(folder: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(trained tensors under our names, checkpoint-style metadata) from an :func:`export_peft` folder.

    ``rebuild_peft_model(*load_peft_export(folder), Path(folder))`` (orchestra.train.finetune)
    then rebuilds base + method, loading the base from its recorded path.
    """
    from safetensors.torch import load_file

    folder = Path(folder)
    record_file, weights_file = folder / ORCHESTRA_PEFT_FILE, folder / PEFT_WEIGHTS_FILE
    for f in (record_file, weights_file, folder / "tokenizer.json"):
        if not f.is_file():
            raise CheckpointError(f"{folder} is not an Orchestra PEFT export: {f.name} is missing")
    try:
        record = json.loads(record_file.read_text())
        method = record["method"]
        meta = {
            "format": record["format"],
            "model_config": record["model_config"],
            "vocab_size": int(record["vocab_size"]),
            "tokenizer_json": (folder / "tokenizer.json").read_text(),
            "peft": {"method": method, "config": record["config"], "base": record["base"]},
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{record_file}: not an Orchestra PEFT record ({err})") from err
    tensors = load_file(str(weights_file))
    if method == "lora":
        cfg = model_config_from_dict(meta["model_config"])
        ours = {
            theirs: name
            for name, theirs in _lora_peft_names(sorted(_trainable_layout(meta, folder)), cfg).items()
        }
        unknown = sorted(set(tensors) - set(ours))
        if unknown:
            raise CheckpointError(f"{weights_file}: tensors {unknown[:3]} are not LoRA weights of this model")
        trainable = {ours[k]: v for k, v in tensors.items()}
    elif method == "prompt":
        if set(tensors) != {_PEFT_PROMPT_KEY}:
            raise CheckpointError(
                f"{weights_file}: expected one tensor {_PEFT_PROMPT_KEY!r}, found {sorted(tensors)}"
            )
        trainable = {_SOFT_PROMPT: tensors[_PEFT_PROMPT_KEY]}
    else:
        trainable = dict(tensors)
    _check_trainable(trainable, meta, folder)
    return trainable, meta
