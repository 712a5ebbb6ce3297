"""`orchestra-generate ckpt=PATH prompt="..." [temperature= top_k= top_p= max_new_tokens=]`.

Samples from a training checkpoint with a KV cache; the checkpoint carries its model config and
tokenizer, so nothing else is needed. A PEFT checkpoint (finetune=lora|adapter|prompt) also needs
the base model it records, at the recorded path and unchanged; LoRA is merged for sampling, and
a soft prompt's virtual tokens take their share of the context.
"""

from __future__ import annotations

import hydra
import torch
from omegaconf import DictConfig, OmegaConf

from orchestra.cli.common import CONF_DIR, console, fail
from orchestra.config import GenerateConfig, register_configs


def sample(cfg: GenerateConfig) -> str:
    """Generate a continuation of cfg.prompt; raises CheckpointError / ValueError on bad input."""
    from orchestra.model.generate import context_length, generate
    from orchestra.train.checkpoint.load import load_model_from_checkpoint

    if not cfg.ckpt:
        raise ValueError(
            "ckpt: give the checkpoint to sample from, e.g. ckpt=runs/debug/<time>/checkpoints/last.ckpt"
        )
    if cfg.temperature < 0:
        raise ValueError(f"temperature: must be >= 0 (0 is greedy), got {cfg.temperature}")
    if cfg.top_k is not None and cfg.top_k <= 0:
        raise ValueError(f"top_k: must be positive or null, got {cfg.top_k}")
    if cfg.top_p is not None and not 0 < cfg.top_p <= 1:
        raise ValueError(f"top_p: must be in (0, 1] or null, got {cfg.top_p}")
    if cfg.max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens: must be positive, got {cfg.max_new_tokens}")
    device = torch.device(
        "cuda"
        if cfg.device == "auto" and torch.cuda.is_available()
        else ("cpu" if cfg.device == "auto" else cfg.device)
    )
    model, tokenizer, meta = load_model_from_checkpoint(cfg.ckpt)
    model.to(device)
    context = context_length(model)
    virtual = getattr(model, "num_virtual_tokens", 0)
    ids = tokenizer.encode(cfg.prompt).ids
    if not ids:
        raise ValueError("prompt: empty prompt; give at least one character")
    if len(ids) >= context:
        where = f"model.max_seq_len less {virtual} soft-prompt tokens" if virtual else "model.max_seq_len"
        raise ValueError(
            f"prompt: {len(ids)} tokens do not fit the model's context of {context} tokens "
            f"({where}) with room to generate; shorten it"
        )
    budget = min(cfg.max_new_tokens, context - len(ids))
    if budget < cfg.max_new_tokens:
        console.print(
            f"[yellow]note:[/] generating {budget} tokens: the context ({context}) is full after that"
        )
    # Every end token the checkpoint records (an HF base's: Llama 3.x Instruct has three).
    fallback = tokenizer.token_to_id("<|endoftext|>")
    eos_ids = meta.stop_ids or ((fallback,) if fallback is not None else ())
    gen = torch.Generator(device=device).manual_seed(cfg.seed)
    prompt = torch.tensor([ids], device=device)
    out = generate(
        model,
        prompt,
        max_new_tokens=budget,
        temperature=cfg.temperature,
        top_k=cfg.top_k,
        top_p=cfg.top_p,
        eos_id=eos_ids,
        generator=gen,
    )
    return tokenizer.decode(out[0].tolist())


register_configs()


@hydra.main(config_path=CONF_DIR, config_name="generate", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    from orchestra.train.checkpoint import CheckpointError

    config: GenerateConfig = OmegaConf.to_object(cfg)  # type: ignore[assignment]
    try:
        text = sample(config)
    except (CheckpointError, ValueError) as err:
        fail(str(err))
        return
    console.print(text, markup=False, highlight=False)


def main() -> None:
    _main()


if __name__ == "__main__":
    main()
