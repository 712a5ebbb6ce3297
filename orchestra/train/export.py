"""Consolidate any training checkpoint into a Hugging Face folder of its family, or export PEFT weights alone.

Checkpoint kinds: a single file (single device, DDP), a torch.distributed.checkpoint directory
(FSDP2, any number of shards) and a DeepSpeed ZeRO directory (stages 1-3). Each is turned into one
full fp32 state dict of our parameter names, checked against the model shape recorded in the
checkpoint, renamed to transformers' names for the model's family (a Qwen2 base fine-tuned here
is written back as ``Qwen2ForCausalLM``, Phi-3's q/k/v fused again; see orchestra/model/families/)
and written as safetensors with config.json and the tokenizer files. The folder loads with
``AutoModelForCausalLM.from_pretrained``.

:func:`export_peft` (``orchestra-export ... peft_only=true``) writes only the trained weights of a
PEFT checkpoint: LoRA and prompt tuning in Hugging Face peft's format (``adapter_config.json`` +
``adapter_model.safetensors``, loaded with ``peft.PeftModel.from_pretrained`` on the exported
base), bottleneck adapters, which peft has no equivalent of, under our own names. Every such
folder also holds ``orchestra_peft.json`` (method, finetune config, base reference, model shape)
and ``tokenizer.json``, which is what :func:`load_peft_export` reads back.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from orchestra.io import staged_dir
from orchestra.train.checkpoint.io import PREFIX, check_shapes, consolidated_state_dict
from orchestra.train.checkpoint.meta import CheckpointError, CheckpointMeta, check_tensors
from orchestra.train.methods import method_spec
from orchestra.train.methods.spec import trainable_layout
from orchestra.train.model_card import write_model_card

EOS_TOKEN = "<|endoftext|>"
_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
PEFT_CONFIG_FILE = "adapter_config.json"
PEFT_WEIGHTS_FILE = "adapter_model.safetensors"
ORCHESTRA_PEFT_FILE = "orchestra_peft.json"


def _merged_peft_state(
    trainable: dict[str, torch.Tensor], meta: CheckpointMeta, ckpt: Path
) -> dict[str, torch.Tensor]:
    """A PEFT checkpoint holds its trainable tensors only: rebuild base + method and merge them."""
    from orchestra.train.finetune import rebuild_peft_model

    assert meta.peft is not None
    spec = method_spec(meta.peft.method, ckpt)
    if spec.unmergeable is not None:
        raise CheckpointError(
            f"checkpoint {ckpt} is a {spec.name} fine-tune: {spec.unmergeable}, so it cannot be merged into the "
            f"Hugging Face weights; export its trained weights alone with peft_only=true (orchestra-export "
            f"ckpt={ckpt} out=DIR peft_only=true), or fine-tune with finetune=lora or full for a merged folder"
        )
    model = rebuild_peft_model(trainable, meta, ckpt)
    if spec.merge is not None:
        spec.merge(model)
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
    """Write a Hugging Face folder of the checkpoint's family for ``ckpt`` into ``out`` (atomically); returns ``out``."""
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from orchestra.model.families import family
    from orchestra.model.hf import hf_config_dict, to_hf_state_dict

    ckpt, out = Path(ckpt), Path(out)
    torch_dtype = _torch_dtype(dtype)
    _check_out(out, overwrite)

    state, meta = consolidated_state_dict(ckpt)
    if meta.peft is not None:
        state = _merged_peft_state(state, meta, ckpt)
    cfg, vocab_size = meta.model_config, meta.vocab_size
    labels = list(meta.labels) if meta.is_classifier else None
    score = None
    if labels:
        # A SequenceClassifier: the decoder under "model.", the head as "score" (HF's own name).
        score = state["score.weight"]
        state = {k[len(PREFIX) :]: v for k, v in state.items() if k.startswith(PREFIX)}
    check_shapes(state, cfg, vocab_size, ckpt)
    hf_state = {k: v.detach().to(torch_dtype).contiguous() for k, v in to_hf_state_dict(state, cfg).items()}
    if score is not None:
        hf_state = {k: v for k, v in hf_state.items() if k != "lm_head.weight"}  # unused by the classifier
        hf_state["score.weight"] = score.detach().to(torch_dtype).contiguous()

    tokenizer = Tokenizer.from_str(meta.tokenizer_json)
    eos_id = meta.eos_id if meta.eos_id is not None else tokenizer.token_to_id(EOS_TOKEN)
    eos_token = tokenizer.id_to_token(eos_id) if eos_id is not None else EOS_TOKEN
    # Every eos id generation stops on (a Llama 3.x Instruct base has three), as transformers lists them.
    stop = list(meta.stop_ids) or ([eos_id] if eos_id is not None else [])
    eos_ids: int | list[int] | None = stop[0] if len(stop) == 1 else (stop or None)
    # A base's own BOS (None: ours, which reuses the end-of-text token, as before).
    bos_id = meta.bos_id if meta.bos_id is not None else eos_id
    bos_token = tokenizer.id_to_token(bos_id) if bos_id is not None else eos_token
    with staged_dir(out) as tmp:
        save_file(hf_state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = hf_config_dict(cfg, vocab_size, bos_id=bos_id, eos_id=eos_ids, torch_dtype=dtype)
        if labels:
            # <Family>ForSequenceClassification reads the last token before the first pad: pad = eos,
            # which classification texts never contain (the data module pads with it too).
            config.update(
                architectures=[family(cfg.family).classifier_architecture],
                num_labels=len(labels),
                id2label=dict(enumerate(labels)),
                label2id={n: i for i, n in enumerate(labels)},
                pad_token_id=eos_id,
                tie_word_embeddings=False,
            )
        (tmp / "config.json").write_text(json.dumps(config, indent=2) + "\n")
        (tmp / "generation_config.json").write_text(
            json.dumps({"bos_token_id": bos_id, "eos_token_id": eos_ids}) + "\n"
        )
        tokenizer.save(str(tmp / "tokenizer.json"))
        tokenizer_config: dict[str, Any] = {
            "tokenizer_class": "PreTrainedTokenizerFast",
            "bos_token": bos_token,
            "eos_token": eos_token,
            "model_max_length": cfg.max_seq_len,
            "clean_up_tokenization_spaces": False,
        }
        if meta.chat_template is not None:  # the base's own, so the fine-tune chats as it was trained
            tokenizer_config["chat_template"] = meta.chat_template
        (tmp / "tokenizer_config.json").write_text(json.dumps(tokenizer_config, indent=2) + "\n")
        (tmp / "special_tokens_map.json").write_text(
            json.dumps({"bos_token": bos_token, "eos_token": eos_token}) + "\n"
        )
        write_model_card(tmp, ckpt, meta, name=out.resolve().name)  # README.md, from the run's records
    return out


# ---------------------------------------------------------------------------------------------
# PEFT-only export: the trained tensors of a lora / prompt / adapter checkpoint, without the base.
# ---------------------------------------------------------------------------------------------


def _check_trainable(trainable: dict[str, torch.Tensor], meta: CheckpointMeta, source: Path) -> None:
    """The tensors against the method's layout, built on the meta device (the base is not read)."""
    assert meta.peft is not None
    spec = method_spec(meta.peft.method, source)
    layout = trainable_layout(meta, source, spec.apply)
    check_tensors(trainable, layout, source, f"the {spec.name} layout recorded in it")


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
    if meta.peft is None:
        raise CheckpointError(
            f"checkpoint {ckpt} is not a PEFT (lora, adapter or prompt) checkpoint: it holds the whole model, so "
            f"there are no adapter weights to export alone; use the merged export (orchestra-export ckpt={ckpt} "
            "out=DIR, without peft_only=true)"
        )
    if meta.is_classifier:
        raise CheckpointError(
            f"checkpoint {ckpt} is a classifier: its new head has no place in peft's adapter files; use the "
            f"merged export (orchestra-export ckpt={ckpt} out=DIR), a <Family>ForSequenceClassification folder"
        )
    spec = method_spec(meta.peft.method, ckpt)
    if spec.peft_files is None:
        raise CheckpointError(f"checkpoint {ckpt}: method {spec.name!r} has no PEFT-only export")
    _check_trainable(trainable, meta, ckpt)
    trainable = {k: v.detach().to(torch_dtype).contiguous() for k, v in trainable.items()}
    adapter_config, tensors, names = spec.peft_files(trainable, meta.model_config, meta.peft)
    record = {
        "format": 1,
        "method": spec.name,
        "config": meta.peft.config,
        "base": meta.peft.base.to_dict(),
        "model_config": meta.to_dict()["model_config"],
        "vocab_size": meta.vocab_size,
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
        (tmp / "tokenizer.json").write_text(meta.tokenizer_json)
        write_model_card(tmp, ckpt, meta, name=out.resolve().name, peft_only=True)
    return out


def load_peft_export(folder: str | Path) -> tuple[dict[str, torch.Tensor], CheckpointMeta]:
    """(trained tensors under our names, checkpoint metadata) from an :func:`export_peft` folder.

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
        record: dict[str, Any] = json.loads(record_file.read_text())
        raw = {
            "format": record["format"],
            "model_config": record["model_config"],
            "vocab_size": int(record["vocab_size"]),
            "tokenizer_json": (folder / "tokenizer.json").read_text(),
            "peft": {"method": record["method"], "config": record["config"], "base": record["base"]},
        }
    except (json.JSONDecodeError, KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"{record_file}: not an Orchestra PEFT record ({err})") from err
    meta = CheckpointMeta.from_dict(raw, record_file)
    assert meta.peft is not None
    spec = method_spec(meta.peft.method, record_file)
    if spec.read_peft_files is None:
        raise CheckpointError(f"{record_file}: method {spec.name!r} has no PEFT-only export")
    trainable = spec.read_peft_files(load_file(str(weights_file)), meta, weights_file)
    _check_trainable(trainable, meta, folder)
    return trainable, meta
