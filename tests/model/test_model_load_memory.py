"""Loading a pretrained base holds its weights once: built on the meta device, then assigned.

The memory test saves a ~300 MB random Llama with transformers and loads it in a fresh
subprocess, measuring the peak resident set over the one after the imports. The peak is read
from /proc/self/status (VmHWM, reset through /proc/self/clear_refs once the imports are done):
``getrusage(RUSAGE_SELF).ru_maxrss`` is no use here, because a child started by ``subprocess``
(vfork + exec) inherits the parent's high-water mark, so under pytest it reports pytest's peak.
Touched pages of a memory-mapped file count in the resident set (RssFile), so a forward pass is
run to page every weight in.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestra.model.build import load_into_meta_model
from orchestra.model.config import ModelConfig
from orchestra.model.hf import (
    from_hf_state_dict,
    load_hf_pretrained,
    load_hf_state_dict,
    model_config_from_hf,
)

transformers = pytest.importorskip("transformers")

TINY = dict(
    vocab_size=101,
    hidden_size=64,
    intermediate_size=160,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)

# Run in a fresh interpreter: peak resident memory of load_hf_pretrained + one forward pass.
_CHILD = r"""
import json, re, sys
import torch
from orchestra.model.build import build_model
from orchestra.model.config import ModelConfig
from orchestra.model.hf import load_hf_pretrained

def status(key):
    return int(re.search(key + r":\s+(\d+)", open("/proc/self/status").read()).group(1)) * 1024

torch.set_num_threads(2)
# The baseline holds what any load pays once (lazy imports of the ops table, first-op buffers).
warm = build_model(ModelConfig(dim=64, n_layers=1, n_heads=4, ffn_dim=128, max_seq_len=16), 32)
with torch.no_grad():
    warm(torch.zeros(1, 4, dtype=torch.long))
del warm
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # reset VmHWM to the current resident set
base = status("VmRSS")
model, _ = load_hf_pretrained(sys.argv[1], dtype=getattr(torch, sys.argv[2]))
with torch.no_grad():
    model(torch.zeros(1, 4, dtype=torch.long))
    for p in model.parameters():
        p.sum()  # page in every weight: a forward reads one embedding row only
print(json.dumps({"peak": status("VmHWM") - base}))
"""


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _save(folder: Path, **overrides: object) -> torch.nn.Module:
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**{**TINY, **overrides})).float().eval()
    model.save_pretrained(str(folder))
    return model


def _peak_bytes(folder: Path, dtype: str) -> int:
    out = subprocess.run(
        [sys.executable, "-c", _CHILD, str(folder), dtype], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return int(json.loads(out.stdout.strip().splitlines()[-1])["peak"])


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random 77M-parameter Llama (296 MiB of fp32), untied, in one model.safetensors."""
    folder = tmp_path_factory.mktemp("big")
    config = transformers.LlamaConfig(
        vocab_size=32000,
        hidden_size=768,
        intermediate_size=2048,
        num_hidden_layers=4,
        num_attention_heads=12,
        num_key_value_heads=12,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        model = transformers.LlamaForCausalLM(config)
    # Random values without transformers' (slow) init; the load does not care what they are.
    model.to_empty(device="cpu")
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.02)
    model.save_pretrained(str(folder))
    return folder


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_fp32_load_holds_the_weights_once(big_folder: Path) -> None:
    # Measured (CPU, Linux) on these 296 MiB of fp32 weights: 303 MiB (1.02x) with the weights
    # assigned from the memory map; the old build_model(init=False) + load_state_dict copy of
    # load_file's tensors peaked at 592 MiB (2.00x). (642 MiB of weights: 650 vs 1285 MiB.)
    size = (big_folder / "model.safetensors").stat().st_size
    peak = _peak_bytes(big_folder, "float32")
    assert peak < 1.3 * size, f"peak {peak / 2**20:.0f} MiB for {size / 2**20:.0f} MiB of weights"


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc peak-RSS reset")
def test_bf16_load_from_fp32_converts_one_tensor_at_a_time(big_folder: Path) -> None:
    # The bf16 result is 0.5x the fp32 file, plus one fp32 tensor at a time (the largest, the
    # embedding, is 0.33x): measured 190 MiB (0.64x); the old load (the whole fp32 file mapped
    # beside the bf16 model) 443 MiB (1.50x). (642 MiB fp32 file: 341 vs 963 MiB.)
    size = (big_folder / "model.safetensors").stat().st_size
    peak = _peak_bytes(big_folder, "bfloat16")
    assert peak < 0.9 * size, f"peak {peak / 2**20:.0f} MiB for a {size / 2**20:.0f} MiB fp32 file"


@pytest.mark.parametrize("tied", [False, True])
def test_loaded_model_matches_transformers(tmp_path: Path, tied: bool) -> None:
    hf = _save(tmp_path, tie_word_embeddings=tied)
    ours, _ = load_hf_pretrained(tmp_path)
    if tied:
        assert ours.lm_head.weight is ours.tok_embeddings.weight
        assert len(list(ours.parameters())) == len(list(hf.parameters()))
    for name, tensor in [*ours.named_parameters(), *ours.named_buffers()]:
        assert tensor.device.type == "cpu" and not tensor.is_meta, name
    assert ours.rope_cos.dtype == torch.float32 and ours.rope_cos.shape[0] == TINY["max_position_embeddings"]
    tokens = torch.randint(0, TINY["vocab_size"], (2, 24))
    with torch.no_grad():
        assert torch.equal(ours(tokens), hf(tokens).logits.float())


def test_same_dtype_parameters_are_the_file_map_and_train_without_writing_it(tmp_path: Path) -> None:
    _save(tmp_path, tie_word_embeddings=True)
    file = tmp_path / "model.safetensors"
    before = _sha256(file)
    model, _ = load_hf_pretrained(tmp_path)
    if Path("/proc/self/maps").exists():  # zero-copy: the parameters live in the file's mapping
        assert str(file) in Path("/proc/self/maps").read_text()
    original = {k: v.clone() for k, v in model.state_dict().items()}

    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16))
    for _ in range(2):
        optimizer.zero_grad()
        model(tokens[:, :-1], tokens[:, 1:]).backward()
        optimizer.step()
    assert model.lm_head.weight is model.tok_embeddings.weight  # still one Parameter after the steps
    assert all(not torch.equal(p, original[n]) for n, p in model.named_parameters())

    assert _sha256(file) == before  # copy-on-write: the updates never reached the file
    again, _ = load_hf_pretrained(tmp_path)
    for name, value in again.state_dict().items():
        assert torch.equal(value, original[name]), name


@pytest.mark.parametrize("pread", [True, False], ids=["pread", "no_backend"])
def test_bf16_load_of_fp32_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, pread: bool) -> None:
    hf = _save(tmp_path)
    if not pread:  # safetensors < 0.8: no backend argument, one mapping per converted tensor
        import safetensors

        real = safetensors.safe_open

        def old_safe_open(*args: object, **kwargs: object) -> object:
            if "backend" in kwargs:
                raise TypeError("safe_open() got an unexpected keyword argument 'backend'")
            return real(*args, **kwargs)

        monkeypatch.setattr(safetensors, "safe_open", old_safe_open)
    model, _ = load_hf_pretrained(tmp_path, dtype=torch.bfloat16)
    reference = dict(hf.state_dict())
    ours = from_hf_state_dict(reference, model.cfg)
    for name, p in model.named_parameters():
        assert p.dtype == torch.bfloat16, name
        assert torch.equal(p, ours[name].to(torch.bfloat16)), name
    assert model.rope_cos.dtype == torch.float32  # the tables stay fp32, as in a model built directly
    tokens = torch.randint(0, TINY["vocab_size"], (2, 16))
    with torch.no_grad():
        logits = model(tokens)
        expected = hf(tokens).logits.float()
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    assert (logits - expected).abs().max() < 0.1


def test_load_into_meta_model_keeps_matching_tensors_and_converts_the_rest(tmp_path: Path) -> None:
    _save(tmp_path, tie_word_embeddings=True)
    bf16 = from_hf_state_dict(load_hf_state_dict(tmp_path, dtype=torch.bfloat16), _cfg(tmp_path))
    assert all(t.dtype == torch.bfloat16 for t in bf16.values())
    # The fine-tuning path: dtype=None is the dtype the model is built in (torch's default).
    model = load_into_meta_model(_cfg(tmp_path), TINY["vocab_size"], bf16, device="cpu")
    assert all(p.dtype == torch.float32 and p.requires_grad for p in model.parameters())
    assert model.lm_head.weight is model.tok_embeddings.weight
    assert torch.equal(model.tok_embeddings.weight, bf16["tok_embeddings.weight"].float())

    fp32 = from_hf_state_dict(load_hf_state_dict(tmp_path), _cfg(tmp_path))
    model = load_into_meta_model(_cfg(tmp_path), TINY["vocab_size"], fp32, device="cpu")
    assert model.norm.weight.data_ptr() == fp32["norm.weight"].data_ptr()  # assigned, not copied
    with pytest.raises(RuntimeError, match="Missing key"):
        load_into_meta_model(_cfg(tmp_path), TINY["vocab_size"], {"norm.weight": fp32["norm.weight"]})


def _cfg(folder: Path) -> ModelConfig:
    return model_config_from_hf(json.loads((folder / "config.json").read_text()))[0]
