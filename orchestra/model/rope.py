"""RoPE frequencies and their context-extension scalings, computed the way transformers does.

A base model fixes how its rotary frequencies were stretched to a longer context (Llama 3.1's
``llama3``, linear position interpolation, dynamic NTK, YaRN, Phi-3's LongRoPE); the model must
use the same tables or its logits drift from the first token. Each formula below follows the
published method and transformers' ``modeling_rope_utils`` (whose numbers the parity tests
compare against), written here because the model must not import transformers.

Two scalings depend on the length of the sequence being processed, not only on the config:
dynamic NTK rescales the base once positions pass ``original_max_seq_len``, and LongRoPE switches
from its short to its long factors there. :func:`rope_tables` takes that length (the end position
of the current forward), so a cached generation past the threshold rotates its new tokens as
transformers does.
"""

from __future__ import annotations

import math
from dataclasses import replace

import torch

from orchestra.model.config import ModelConfig, RopeScaling, RopeType


def _exponents(dim: int, device: torch.device | str | None) -> torch.Tensor:
    """2i / dim for i < dim / 2 (int64 arange cast to fp32, as transformers computes it)."""
    return torch.arange(0, dim, 2, dtype=torch.int64, device=device).float() / dim


def length_dependent(cfg: ModelConfig) -> bool:
    """Whether the tables change with the sequence length (dynamic NTK, LongRoPE past the original)."""
    kind = RopeType(cfg.rope.type)
    return kind in (RopeType.dynamic, RopeType.longrope) and cfg.max_seq_len > original_length(cfg)


def original_length(cfg: ModelConfig) -> int:
    """The pretraining context the scaling is relative to (defaults to max_seq_len)."""
    return cfg.rope.original_max_seq_len or cfg.max_seq_len


def inv_freq(
    cfg: ModelConfig, seq_len: int | None = None, device: torch.device | str | None = None
) -> tuple[torch.Tensor, float]:
    """(inverse frequencies [head_dim / 2] in fp32, attention factor multiplying cos and sin).

    ``seq_len`` is the number of positions the current forward reaches (dynamic and longrope
    only; None means within the original context).
    """
    r = cfg.rope
    kind = RopeType(r.type)
    dim, base = cfg.head_size, float(cfg.rope_theta)
    original = original_length(cfg)

    if kind == RopeType.default:
        return 1.0 / (base ** _exponents(dim, device)), 1.0
    if kind == RopeType.linear:
        assert r.factor is not None
        return 1.0 / (base ** _exponents(dim, device)) / r.factor, 1.0
    if kind == RopeType.dynamic:
        # NTK-aware: grow the base with the length once it passes the original context.
        assert r.factor is not None
        length = max(seq_len or 0, original)
        scaled = base * ((r.factor * length / original) - (r.factor - 1)) ** (dim / (dim - 2))
        return 1.0 / (scaled ** _exponents(dim, device)), 1.0
    if kind == RopeType.llama3:
        return _llama3(cfg, dim, base, original, device), 1.0
    if kind == RopeType.yarn:
        return _yarn(cfg, dim, base, original, device)
    if kind == RopeType.longrope:
        factor = r.factor if r.factor is not None else cfg.max_seq_len / original
        attention = r.attention_factor
        if attention is None:
            attention = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(original))
        use_long = seq_len is not None and seq_len > original
        ext = torch.tensor(r.long_factor if use_long else r.short_factor, dtype=torch.float32, device=device)
        return 1.0 / (ext * base ** _exponents(dim, device)), attention
    raise ValueError(f"model.rope.type: unknown RoPE scaling {kind!r}")  # pragma: no cover


def _llama3(
    cfg: ModelConfig, dim: int, base: float, original: int, device: torch.device | str | None
) -> torch.Tensor:
    """Llama 3.1: long wavelengths divided by factor, short ones kept, a smooth ramp in between."""
    r = cfg.rope
    assert r.factor is not None
    freq = 1.0 / (base ** _exponents(dim, device))
    low_freq_wavelen = original / r.low_freq_factor
    high_freq_wavelen = original / r.high_freq_factor
    wavelen = 2 * math.pi / freq
    scaled = torch.where(wavelen > low_freq_wavelen, freq / r.factor, freq)
    smooth = (original / wavelen - r.low_freq_factor) / (r.high_freq_factor - r.low_freq_factor)
    smoothed = (1 - smooth) * scaled / r.factor + smooth * scaled
    is_medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(is_medium, smoothed, scaled)


def _yarn(
    cfg: ModelConfig, dim: int, base: float, original: int, device: torch.device | str | None
) -> tuple[torch.Tensor, float]:
    """YaRN (Peng et al. 2023): interpolate low frequencies, extrapolate high ones, scale attention."""
    r = cfg.rope
    factor = r.factor if r.factor is not None else cfg.max_seq_len / original

    def mscale_of(scale: float, m: float = 1.0) -> float:
        return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

    attention = r.attention_factor
    if attention is None:
        if r.mscale and r.mscale_all_dim:
            attention = mscale_of(factor, r.mscale) / mscale_of(factor, r.mscale_all_dim)
        else:
            attention = mscale_of(factor)

    def correction_dim(rotations: float) -> float:
        return (dim * math.log(original / (rotations * 2 * math.pi))) / (2 * math.log(base))

    low, high = correction_dim(r.beta_fast), correction_dim(r.beta_slow)
    if r.truncate:
        low, high = math.floor(low), math.ceil(high)
    low, high = max(low, 0), min(high, dim - 1)
    if low == high:
        high += 0.001  # a zero-width ramp would divide by zero
    ramp = torch.clamp((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low), 0, 1)
    extrapolation_weight = (1 - ramp).to(device=device)
    pos_freqs = base ** (torch.arange(0, dim, 2).to(device=device, dtype=torch.float) / dim)
    extrapolated, interpolated = 1.0 / pos_freqs, 1.0 / (factor * pos_freqs)
    freq = interpolated * (1 - extrapolation_weight) + extrapolated * extrapolation_weight
    return freq, float(attention)


def rope_tables(
    cfg: ModelConfig,
    n_positions: int,
    device: torch.device | str | None = None,
    seq_len: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos/sin tables [n_positions, head_dim] in fp32 for positions 0 .. n_positions - 1.

    Frequencies are duplicated ([f, f]) to pair dim i with i + head_dim/2 (rotate_half), and
    both tables are multiplied by the scaling's attention factor (1 for most types).
    """
    freq, attention = inv_freq(cfg, seq_len, device)
    t = torch.arange(n_positions, dtype=torch.float32, device=device)
    emb = torch.outer(t, freq)
    emb = torch.cat((emb, emb), dim=-1)
    cos, sin = emb.cos(), emb.sin()
    if attention != 1.0:
        cos, sin = cos * attention, sin * attention
    return cos, sin


def local_rope_tables(
    cfg: ModelConfig, n_positions: int, device: torch.device | str | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The windowed layers' own unscaled tables (Gemma 3's local RoPE), or None when they share the others'."""
    if cfg.rope_local_theta is None:
        return None
    return rope_tables(replace(cfg, rope_theta=cfg.rope_local_theta, rope=RopeScaling()), n_positions, device)
