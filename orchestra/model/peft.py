"""Parameter-efficient fine-tuning building blocks, in plain PyTorch.

Every method here changes a pretrained :class:`~orchestra.model.transformer.Transformer` from
the outside, without editing transformer.py, so the model stays readable and the Hugging Face
name mapping in hf.py keeps working after :func:`merge_lora`:

- LoRA (Hu et al. 2021): :class:`LoRALinear`, :func:`apply_lora`, :func:`merge_lora`.
- Bottleneck adapters (Houlsby et al. 2019): :func:`apply_adapters`, :func:`remove_adapters`.
- Prompt tuning (Lester et al. 2021): :class:`SoftPrompt`, :class:`PromptTunedModel`.
- Freezing: :func:`freeze_all_but`, :func:`trainable_parameter_names`,
  :func:`trainable_state_dict`, :func:`unfreeze_schedule`, :func:`set_trainable_layers`.
- L2-SP (Li et al. 2018): :class:`L2SP`, a penalty toward the pretrained weights.
- Layer-wise learning-rate decay (ULMFiT / ELECTRA): :func:`layerwise_lr_groups`.

Each method that adds modules starts the model *identical* to the pretrained one (LoRA's B and
the adapters' up projection are zero, the soft prompt is made of real token embeddings), so
fine-tuning begins from the pretrained loss rather than from a perturbed one. Like the rest of
model/, nothing here imports Lightning, Hydra or torch.distributed; apply these before the
strategy shards the model (FSDP2 accepts mixed ``requires_grad`` inside one unit).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from orchestra.model.transformer import KVCache, Transformer

IGNORE_INDEX = -100
ALL_LINEAR = "all-linear"
# Substrings that mark parameters created by a PEFT method (they have no pretrained value).
NEW_PARAM_MARKERS: tuple[str, ...] = ("lora_A", "lora_B", "adapter.", "soft_prompt.")


# --------------------------------------------------------------------------------------------
# Small configs; the lead wires them into Hydra (conf/finetune/) later.
# --------------------------------------------------------------------------------------------


@dataclass
class LoraConfig:
    """LoRA hyper-parameters; ``target_modules`` are name suffixes or ``["all-linear"]``."""

    rank: int = 8
    alpha: float = 16.0
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "v_proj"])


@dataclass
class AdapterConfig:
    """Houlsby bottleneck adapters after attention and after the MLP of every block."""

    bottleneck: int = 16


@dataclass
class PromptConfig:
    """Prompt tuning: learned embeddings prepended to every sequence."""

    num_virtual_tokens: int = 20
    init_seed: int = 0


# --------------------------------------------------------------------------------------------
# LoRA
# --------------------------------------------------------------------------------------------


class LoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus a trainable low-rank update: y = Wx + (alpha/r) * B A dropout(x).

    A is Kaiming-uniform (a=sqrt(5), as the LoRA reference code and HF peft) and B is zero, so
    the wrapped layer computes exactly the base output until B has been trained. The update is
    applied as two thin matmuls, never as a dense [out, in] matrix, which is what keeps LoRA's
    activation and optimizer memory small. ``lora_A``/``lora_B`` are ``nn.Linear`` modules named
    as in peft so adapter-only weights can be exported under peft's key names.
    """

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float = 0.0) -> None:
        super().__init__()
        if rank <= 0:
            raise ValueError(f"LoRA rank must be a positive integer, got {rank}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.base = base
        self.base.requires_grad_(False)
        self.rank = rank
        self.alpha = alpha
        self.scale = alpha / rank
        w = base.weight
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=w.device, dtype=w.dtype)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=w.device, dtype=w.dtype)
        self.dropout: nn.Module = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.reset_lora_parameters()

    def reset_lora_parameters(self) -> None:
        """A random, B zero: the product BA (the weight update) starts at exactly zero."""
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.lora_B(self.lora_A(self.dropout(x))) * self.scale

    def delta_weight(self) -> torch.Tensor:
        """The dense update scale * B @ A, computed in fp32 for an exact-as-possible merge."""
        return (self.lora_B.weight.float() @ self.lora_A.weight.float()) * self.scale

    @torch.no_grad()
    def merge(self) -> nn.Linear:
        """Fold the update into the base weight and return the plain ``nn.Linear`` (for export)."""
        w = self.base.weight
        w.copy_((w.float() + self.delta_weight()).to(w.dtype))
        return self.base

    def extra_repr(self) -> str:
        return f"rank={self.rank}, alpha={self.alpha}"


def _set_submodule(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, child, module)


def _lora_targets(model: nn.Module, target_modules: str | Iterable[str]) -> list[str]:
    """Names of the ``nn.Linear`` modules LoRA should wrap; lm_head is never one of them."""
    targets = [target_modules] if isinstance(target_modules, str) else list(target_modules)
    if not targets:
        raise ValueError(
            "LoRA target_modules is empty; name suffixes such as ['q_proj', 'v_proj'] or 'all-linear'"
        )
    if any(isinstance(m, LoRALinear) for m in model.modules()):
        raise ValueError("the model already has LoRA layers; merge_lora() it before applying LoRA again")
    # Projections of the pretrained model only: an adapter's own linears are new, not targets.
    linears = [
        name
        for name, m in model.named_modules()
        if isinstance(m, nn.Linear) and "adapter" not in name.split(".")
    ]
    if any(t.split(".")[-1] == "lm_head" for t in targets):
        raise ValueError("LoRA cannot target lm_head: the model's loss reads lm_head.weight directly")
    if ALL_LINEAR in targets:
        if len(targets) > 1:
            raise ValueError(f"'{ALL_LINEAR}' must be the only LoRA target, got {targets}")
        return [n for n in linears if n.split(".")[-1] != "lm_head"]
    chosen = [n for n in linears if any(n == t or n.endswith("." + t) for t in targets)]
    matched = {t for t in targets if any(n == t or n.endswith("." + t) for n in chosen)}
    missing = [t for t in targets if t not in matched]
    if missing:
        suffixes = sorted({n.split(".")[-1] for n in linears if n.split(".")[-1] != "lm_head"})
        raise ValueError(
            f"LoRA target_modules {missing} match no nn.Linear; available: {suffixes} or '{ALL_LINEAR}'"
        )
    return chosen


def apply_lora(model: nn.Module, cfg: LoraConfig, freeze_base: bool = True) -> list[str]:
    """Wrap the targeted linears in :class:`LoRALinear` in place and return their names.

    With ``freeze_base`` every pre-existing parameter is frozen first, so only the LoRA matrices
    train (call :func:`freeze_all_but` afterwards to also train, say, the norms).
    """
    names = _lora_targets(model, cfg.target_modules)
    if freeze_base:
        model.requires_grad_(False)
    for name in names:
        base = model.get_submodule(name)
        assert isinstance(base, nn.Linear)
        _set_submodule(model, name, LoRALinear(base, cfg.rank, cfg.alpha, cfg.dropout))
    return names


def merge_lora(model: nn.Module) -> list[str]:
    """Replace every :class:`LoRALinear` by its merged ``nn.Linear``; return the merged names.

    Afterwards the state dict has the original key names again (``...q_proj.weight``), which is
    what hf.py's export mapping expects. The merged weights stay frozen.
    """
    names = [n for n, m in model.named_modules() if isinstance(m, LoRALinear)]
    for name in names:
        lora = model.get_submodule(name)
        assert isinstance(lora, LoRALinear)
        _set_submodule(model, name, lora.merge())
    return names


# --------------------------------------------------------------------------------------------
# Bottleneck adapters
# --------------------------------------------------------------------------------------------


class Adapter(nn.Module):
    """down -> GELU -> up, with ``up`` zero so the adapter adds exactly nothing at first."""

    def __init__(
        self, dim: int, bottleneck: int, device: torch.device | None = None, dtype: torch.dtype | None = None
    ) -> None:
        super().__init__()
        if bottleneck <= 0:
            raise ValueError(f"adapter bottleneck must be a positive integer, got {bottleneck}")
        self.down = nn.Linear(dim, bottleneck, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.up = nn.Linear(bottleneck, dim, device=device, dtype=dtype)
        nn.init.zeros_(self.up.weight)
        nn.init.zeros_(self.up.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.up(self.act(self.down(x)))


class AdaptedModule(nn.Module):
    """Calls the wrapped sublayer unchanged and adds ``adapter(out)`` to its output.

    Wrapping (instead of editing Block.forward) keeps the model file untouched: the Block still
    adds the residual around ``attention``/``mlp``, so the result is Houlsby's
    h = x + f(x) + adapter(f(x)). Attribute lookups fall through to the wrapped module so code
    that reads e.g. ``block.attention.layer_idx`` keeps working.
    """

    def __init__(self, inner: nn.Module, dim: int, bottleneck: int) -> None:
        super().__init__()
        ref = next(inner.parameters())
        self.inner = inner
        self.adapter = Adapter(dim, bottleneck, device=ref.device, dtype=ref.dtype)

    def forward(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        out = self.inner(*args, **kwargs)
        return out + self.adapter(out)

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__("inner"), name)


def _blocks(model: nn.Module) -> nn.ModuleList:
    layers = getattr(model, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise TypeError(
            f"{type(model).__name__} has no .layers ModuleList; expected an orchestra Transformer"
        )
    return layers


def apply_adapters(model: nn.Module, bottleneck: int, freeze_base: bool = True) -> list[str]:
    """Add a residual bottleneck adapter after every block's attention and MLP; return the names.

    With ``freeze_base`` all pre-existing parameters are frozen first, so only adapters train.
    """
    blocks = _blocks(model)
    if any(isinstance(m, AdaptedModule) for m in model.modules()):
        raise ValueError("the model already has adapters; remove_adapters() first")
    if freeze_base:
        model.requires_grad_(False)
    dim = model.cfg.dim if hasattr(model, "cfg") else blocks[0].attention_norm.weight.shape[0]
    names = []
    for i, block in enumerate(blocks):
        for sub in ("attention", "mlp"):
            setattr(block, sub, AdaptedModule(getattr(block, sub), dim, bottleneck))
            names.append(f"layers.{i}.{sub}.adapter")
    return names


def remove_adapters(model: nn.Module) -> None:
    """Unwrap the adapters (dropping them), restoring the original module names."""
    for block in _blocks(model):
        for sub in ("attention", "mlp"):
            wrapped = getattr(block, sub)
            if isinstance(wrapped, AdaptedModule):
                setattr(block, sub, wrapped.inner)


# --------------------------------------------------------------------------------------------
# Prompt tuning
# --------------------------------------------------------------------------------------------


class SoftPrompt(nn.Module):
    """``num_virtual_tokens`` learned input embeddings [P, dim] shared by every sequence."""

    def __init__(self, num_virtual_tokens: int, dim: int, init: torch.Tensor | None = None) -> None:
        super().__init__()
        if num_virtual_tokens <= 0:
            raise ValueError(f"num_virtual_tokens must be a positive integer, got {num_virtual_tokens}")
        weight = torch.empty(num_virtual_tokens, dim) if init is None else init.detach().clone()
        if weight.shape != (num_virtual_tokens, dim):
            raise ValueError(
                f"soft prompt init has shape {tuple(weight.shape)}, expected {(num_virtual_tokens, dim)}"
            )
        if init is None:
            nn.init.normal_(weight, std=0.02)
        self.weight = nn.Parameter(weight)

    def forward(self, batch_size: int) -> torch.Tensor:
        return self.weight.unsqueeze(0).expand(batch_size, -1, -1)


class PromptTunedModel(nn.Module):
    """A frozen Transformer with a trainable :class:`SoftPrompt` prepended to its input.

    The soft prompt starts as the embeddings of ``num_virtual_tokens`` vocabulary tokens drawn
    with a seeded generator (Lester et al. found vocabulary init better than random), kept in
    ``init_token_ids`` so the wrapped model initially equals the base run on those tokens.
    The forward loop replicates Transformer.forward through its public submodules, because the
    model takes token ids, not embeddings. The soft prompt occupies the first
    ``num_virtual_tokens`` positions, so only :attr:`max_real_tokens` remain for real tokens.

    Incremental decoding uses the base model's :class:`~orchestra.model.transformer.KVCache`
    sized for virtual + real positions: the prefill (``start_pos=0``) writes the soft prompt's
    keys/values along with the prompt's, and later steps are plain base-model steps at
    position ``num_virtual_tokens + start_pos``, so decoding costs what the base model's does.
    """

    def __init__(
        self, model: Transformer, num_virtual_tokens: int, seed: int = 0, freeze_base: bool = True
    ) -> None:
        super().__init__()
        self.model = model
        self.num_virtual_tokens = num_virtual_tokens
        if num_virtual_tokens >= model.cfg.max_seq_len:
            raise ValueError(
                f"num_virtual_tokens={num_virtual_tokens} leaves no room in model.max_seq_len={model.cfg.max_seq_len}"
            )
        if freeze_base:
            model.requires_grad_(False)
        emb = model.tok_embeddings.weight
        gen = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, emb.shape[0], (num_virtual_tokens,), generator=gen)
        self.init_token_ids: torch.Tensor
        self.register_buffer("init_token_ids", ids.to(emb.device), persistent=False)
        self.soft_prompt = SoftPrompt(
            num_virtual_tokens, emb.shape[1], init=emb.detach()[self.init_token_ids]
        )

    @property
    def max_real_tokens(self) -> int:
        """Positions left for real tokens once the soft prompt has taken its share of max_seq_len."""
        return self.model.cfg.max_seq_len - self.num_virtual_tokens

    def forward(
        self,
        tokens: torch.Tensor,
        targets: torch.Tensor | None = None,
        *,
        kv_cache: KVCache | None = None,
        start_pos: int = 0,
    ) -> torch.Tensor:
        """Logits [B, T, V] for the real positions only, or the mean loss over real targets.

        ``start_pos`` counts real tokens. At 0 the soft prompt is prepended (a whole sequence,
        or the prefill of ``kv_cache``); above 0 the call continues the sequence the cache holds,
        soft prompt included, so a cache is required there.
        """
        m = self.model
        B, T = tokens.shape
        P = self.num_virtual_tokens
        if start_pos < 0:
            raise ValueError(f"start_pos must be >= 0 (it counts real tokens), got {start_pos}")
        if P + start_pos + T > m.cfg.max_seq_len:
            raise ValueError(
                f"{start_pos + T} tokens plus {P} virtual tokens need {P + start_pos + T} positions, but "
                f"model.max_seq_len={m.cfg.max_seq_len}; prompt tuning leaves {self.max_real_tokens} for real tokens"
            )
        if start_pos > 0:
            if kv_cache is None:
                raise ValueError(
                    f"start_pos={start_pos} continues a sequence whose soft prompt and earlier tokens live in a "
                    "KV cache; pass kv_cache (or start_pos=0 with the whole sequence)"
                )
            # Keys/values of the soft prompt are in the cache: a plain base-model step, shifted by P.
            return m(tokens, targets, kv_cache=kv_cache, start_pos=P + start_pos)
        if kv_cache is not None and (kv_cache.max_len < P + T or kv_cache.batch_size != B):
            raise ValueError(
                f"KV cache holds batch {kv_cache.batch_size} x {kv_cache.max_len} positions; the prefill needs "
                f"batch {B} x {P + T} ({P} virtual + {T} real tokens)"
            )
        tok = m.tok_embeddings(tokens)
        h = torch.cat([self.soft_prompt(B).to(tok.dtype), tok], dim=1)
        cos, sin = m.rope_cos[: P + T], m.rope_sin[: P + T]
        for layer in m.layers:
            h = layer(h, cos, sin, kv_cache, 0)
        h = m.norm(h)
        if targets is None:
            return m.lm_head(h[:, P:]).float()
        # Virtual positions predict nothing; the mean runs over the real targets only, which is
        # the model's own loss on those positions.
        full = torch.cat([targets.new_full((B, P), IGNORE_INDEX), targets], dim=1)
        return m.ops.linear_cross_entropy(
            h.reshape(B * (P + T), -1), m.lm_head.weight, full.reshape(-1), ignore_index=IGNORE_INDEX
        )


# --------------------------------------------------------------------------------------------
# Freezing, gradual unfreezing, PEFT state
# --------------------------------------------------------------------------------------------


def freeze_all_but(model: nn.Module, predicate: Callable[[str], bool]) -> list[str]:
    """Set ``requires_grad`` to ``predicate(name)`` for every parameter; return the trainable names.

    A tied tensor appears once (under its first name), so a predicate on either name decides it.
    """
    for name, p in model.named_parameters():
        p.requires_grad_(bool(predicate(name)))
    return trainable_parameter_names(model)


def trainable_parameter_names(model: nn.Module) -> list[str]:
    """Names of the parameters the optimizer should see (a tied tensor listed once)."""
    return [n for n, p in model.named_parameters() if p.requires_grad]


def trainable_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the trainable tensors, detached: a PEFT checkpoint is this plus a base reference."""
    return {n: p.detach() for n, p in model.named_parameters() if p.requires_grad}


def unfreeze_schedule(n_layers: int, every_steps: int) -> Callable[[int], set[int]]:
    """Gradual unfreezing (ULMFiT): step -> indices of trainable blocks, top block first.

    The top block trains from step 0; every ``every_steps`` one more block below it joins, until
    all ``n_layers`` train. Upper layers are the most task-specific, so they adapt first while
    lower, more general features are protected from the early, large gradients.
    """
    if n_layers <= 0 or every_steps <= 0:
        raise ValueError(
            f"unfreeze_schedule needs n_layers > 0 and every_steps > 0, got {n_layers}, {every_steps}"
        )

    def layers_at(step: int) -> set[int]:
        k = min(n_layers, max(step, 0) // every_steps + 1)
        return set(range(n_layers - k, n_layers))

    return layers_at


def set_trainable_layers(model: nn.Module, layers: set[int], head: bool = True) -> None:
    """Make exactly ``layers`` trainable among the blocks; norm/lm_head follow ``head``.

    The input embeddings train only once block 0 does (the bottom of the network), unless they
    are tied to lm_head, in which case they are the head. Build the optimizer over every
    parameter that will ever train: AdamW skips parameters whose grad is None.
    """
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        block.requires_grad_(i in layers)
    tok = getattr(model, "tok_embeddings", None)
    if isinstance(tok, nn.Module):
        tok.requires_grad_(0 in layers)
    for name in ("norm", "lm_head"):
        mod = getattr(model, name, None)
        if isinstance(mod, nn.Module):
            mod.requires_grad_(head)  # with tied weights this also sets the embedding table


# --------------------------------------------------------------------------------------------
# L2-SP
# --------------------------------------------------------------------------------------------


def is_new_parameter(name: str) -> bool:
    """True for parameters a PEFT method created (LoRA, adapters, soft prompt)."""
    return any(marker in name for marker in NEW_PARAM_MARKERS)


class L2SP:
    """L2-SP: strength/2 * sum ||w - w0||^2 over trainable pretrained weights (Li et al. 2018).

    Unlike weight decay, which pulls toward zero, this pulls toward the starting point, so the
    fine-tuned model forgets less. w0 is a detached copy taken at construction: create it after
    loading pretrained weights (and after sharding, so w0 shards like w). PEFT-created
    parameters have no pretrained value and are excluded by default (``exclude``).
    """

    def __init__(
        self, model: nn.Module, strength: float, exclude: Callable[[str], bool] | None = is_new_parameter
    ) -> None:
        if strength < 0:
            raise ValueError(f"L2-SP strength must be >= 0, got {strength}")
        self.strength = strength
        self.reference: dict[str, torch.Tensor] = {
            n: p.detach().clone()
            for n, p in model.named_parameters()
            if p.requires_grad and not (exclude is not None and exclude(n))
        }

    def penalty(self, model: nn.Module) -> torch.Tensor:
        """The penalty as a differentiable scalar (add it to the task loss)."""
        params = dict(model.named_parameters())
        missing = [n for n in self.reference if n not in params]
        if missing:
            raise KeyError(
                f"L2-SP reference parameters {missing[:3]} are not in the model; was it re-wrapped?"
            )
        total = torch.zeros((), device=next(iter(params.values())).device, dtype=torch.float32)
        for name, w0 in self.reference.items():
            total = total + (params[name].float() - w0.float()).pow(2).sum()
        return total * (self.strength / 2)

    def to(self, device: torch.device | str) -> L2SP:
        """Move the reference weights (e.g. next to the model after it was moved)."""
        self.reference = {n: t.to(device) for n, t in self.reference.items()}
        return self


# --------------------------------------------------------------------------------------------
# Layer-wise learning-rate decay
# --------------------------------------------------------------------------------------------

_LAYER_RE = re.compile(r"(?:^|\.)layers\.(\d+)\.")


def layerwise_lr_groups(
    model: nn.Module, base_lr: float, decay: float, weight_decay: float
) -> list[dict[str, Any]]:
    """Optimizer param groups where lower blocks learn slower: block i of L gets base_lr * decay^(L-i).

    Input embeddings get decay^(L+1); the final norm, lm_head and anything outside the blocks
    (e.g. a soft prompt) get base_lr. A tied embedding is the output head too and gets base_lr.
    Only trainable parameters are included; norms, embeddings, biases and soft prompts are not
    weight-decayed, as in orchestra/train/optim.py:parameter_groups. Groups are named
    ``"layer{i}.decay"``, ``"embeddings.no_decay"``, ``"head.decay"`` and so on, and carry ``lr``.
    """
    if not 0 < decay <= 1:
        raise ValueError(f"layer-wise lr decay must be in (0, 1], got {decay}")
    indices = [int(m.group(1)) for n, _ in model.named_parameters() if (m := _LAYER_RE.search(n))]
    if not indices:
        raise TypeError(
            f"{type(model).__name__} has no 'layers.<i>.' parameters; expected an orchestra Transformer"
        )
    L = max(indices) + 1
    head_ids = {
        id(m.weight)
        for n, m in model.named_modules()
        if n.split(".")[-1] == "lm_head" and hasattr(m, "weight")
    }
    emb_ids = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}

    groups: dict[str, dict[str, Any]] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        if (match := _LAYER_RE.search(name)) is not None:
            i = int(match.group(1))
            level, lr = f"layer{i}", base_lr * decay ** (L - i)
        elif id(p) in emb_ids and id(p) not in head_ids:
            level, lr = "embeddings", base_lr * decay ** (L + 1)
        else:
            level, lr = "head", base_lr
        no_decay = p.ndim < 2 or id(p) in emb_ids or "norm" in name or "soft_prompt" in name
        key = f"{level}.{'no_decay' if no_decay else 'decay'}"
        group = groups.setdefault(
            key, {"params": [], "lr": lr, "weight_decay": 0.0 if no_decay else weight_decay, "name": key}
        )
        group["params"].append(p)
    return list(groups.values())
