"""Export to a Hugging Face folder: transformers loads it with our logits and our tokenizer."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestra.train.checkpoint import CheckpointError, load_model_from_checkpoint
from orchestra.train.export import consolidated_state_dict, export_hf


def assert_transformers_matches(ckpt: Path, folder: Path) -> None:
    """The exported folder gives the logits of the model read straight from the checkpoint."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf = AutoModelForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()
    state, meta = consolidated_state_dict(ckpt)
    from orchestra.model import build_model

    ours = build_model(meta.model_config, meta.vocab_size, init=False)
    ours.load_state_dict(state)
    ours.eval()
    tokens = torch.randint(0, meta.vocab_size, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.allclose(hf(tokens).logits, ours(tokens), atol=1e-5, rtol=0)
    text = "def f(x):\n    return x + 1"
    from tokenizers import Tokenizer

    assert (
        AutoTokenizer.from_pretrained(folder)(text)["input_ids"]
        == Tokenizer.from_str(meta.tokenizer_json).encode(text).ids
    )


def test_single_device_checkpoint_round_trips_through_transformers(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = export_hf(ckpt, tmp_path / "hf")
    assert {p.name for p in out.iterdir()} >= {
        "config.json",
        "model.safetensors",
        "tokenizer.json",
        "tokenizer_config.json",
        "generation_config.json",
    }
    assert_transformers_matches(ckpt, out)


def test_hf_generate_equals_orchestra_greedy(trained_run: Path, tmp_path: Path) -> None:
    from transformers import AutoModelForCausalLM

    from orchestra.model.generate import generate

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    out = export_hf(ckpt, tmp_path / "hf")
    model, tokenizer, _ = load_model_from_checkpoint(ckpt)
    prompt = torch.tensor([tokenizer.encode("import os\n").ids])
    ours = generate(model, prompt, max_new_tokens=12, temperature=0.0)
    hf = AutoModelForCausalLM.from_pretrained(out).eval()
    theirs = hf.generate(prompt, max_new_tokens=12, do_sample=False, eos_token_id=None, pad_token_id=0)
    assert ours.tolist() == theirs[:, : ours.shape[1]].tolist()


def test_cli_export_and_refusals(trained_run: Path, tmp_path: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    cmd = [sys.executable, "-m", "orchestra.cli.export", f"ckpt={ckpt}", f"out={tmp_path / 'hf'}"]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert first.returncode == 0, first.stderr
    before = (tmp_path / "hf" / "model.safetensors").read_bytes()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert again.returncode != 0 and "overwrite=true" in again.stdout + again.stderr
    assert (tmp_path / "hf" / "model.safetensors").read_bytes() == before  # nothing damaged
    missing = subprocess.run(
        [*cmd[:3], f"ckpt={tmp_path / 'nope.ckpt'}", f"out={tmp_path / 'x'}"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert missing.returncode != 0 and "nope.ckpt" in missing.stdout + missing.stderr
    assert "Traceback" not in missing.stdout + missing.stderr


def test_mismatched_tensor_is_named(trained_run: Path, tmp_path: Path) -> None:
    ckpt = torch.load(trained_run / "checkpoints" / "last.ckpt", weights_only=True)
    ckpt["orchestra"]["model_config"]["ffn_dim"] = 96  # metadata of another shape
    bad = tmp_path / "other-shape.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(CheckpointError, match=r"gate_proj\.weight"):
        export_hf(bad, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()
