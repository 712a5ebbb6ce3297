"""`orchestra-generate`: samples from a checkpoint with the KV cache; bad input gets one clear line."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from orchestra.cli.generate import sample
from orchestra.config import GenerateConfig
from orchestra.model.generate import generate
from orchestra.train.checkpoint import CheckpointError, load_model_from_checkpoint


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "orchestra.cli.generate", *args],
                          capture_output=True, text=True, timeout=120)


def test_greedy_sample_equals_model_argmax_decoding(trained_run: Path) -> None:
    ckpt = trained_run / "checkpoints" / "last.ckpt"
    text = sample(GenerateConfig(ckpt=str(ckpt), prompt="def ", max_new_tokens=12, temperature=0.0))
    model, tokenizer, _ = load_model_from_checkpoint(ckpt)
    ids = tokenizer.encode("def ").ids
    tokens = torch.tensor([ids])
    with torch.no_grad():  # reference: full forward each step, no cache
        for _ in range(12):
            nxt = model(tokens)[:, -1].argmax(-1, keepdim=True)
            tokens = torch.cat([tokens, nxt], dim=1)
    eos = tokenizer.token_to_id("<|endoftext|>")
    ref = tokens[0].tolist()
    if eos in ref[len(ids):]:
        ref = ref[: ref.index(eos, len(ids)) + 1]
    assert text == tokenizer.decode(ref)
    assert text.startswith("def")


def test_cli_samples_reproducibly(trained_run: Path) -> None:
    args = [f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}", "prompt=import", "max_new_tokens=16",
            "temperature=0.9", "top_p=0.9", "top_k=20", "seed=7"]
    first, second = cli(*args), cli(*args)
    assert first.returncode == 0, first.stderr
    assert first.stdout == second.stdout and first.stdout.startswith("import")
    assert not (Path.cwd() / ".hydra").exists()


@pytest.mark.parametrize(
    ("args", "must_say"),
    [
        (["ckpt=/nonexistent/last.ckpt"], "/nonexistent/last.ckpt"),
        (["prompt=" + "word " * 200], "context"),
        (["temperature=-1"], "temperature"),
    ],
)
def test_cli_errors_are_one_clear_line(trained_run: Path, args: list[str], must_say: str) -> None:
    base = [f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}"]
    proc = cli(*base, *args)
    assert proc.returncode != 0
    out = proc.stdout + proc.stderr
    assert must_say in out and "Traceback" not in out, out


def test_corrupt_checkpoint_is_named(tmp_path: Path) -> None:
    bad = tmp_path / "torn.ckpt"
    bad.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(CheckpointError, match=r"torn\.ckpt"):
        load_model_from_checkpoint(bad)


def test_generate_uses_the_cache_consistently(trained_run: Path) -> None:
    model, tokenizer, _ = load_model_from_checkpoint(trained_run / "checkpoints" / "last.ckpt")
    prompt = torch.tensor([tokenizer.encode("class Foo").ids])
    g1 = torch.Generator().manual_seed(3)
    g2 = torch.Generator().manual_seed(3)
    a = generate(model, prompt, max_new_tokens=10, temperature=1.0, top_k=10, generator=g1)
    b = generate(model, prompt, max_new_tokens=10, temperature=1.0, top_k=10, generator=g2)
    assert torch.equal(a, b) and a.shape[1] <= prompt.shape[1] + 10
