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
    return subprocess.run(
        [sys.executable, "-m", "orchestra.cli.generate", *args], capture_output=True, text=True, timeout=120
    )


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
    if eos in ref[len(ids) :]:
        ref = ref[: ref.index(eos, len(ids)) + 1]
    assert text == tokenizer.decode(ref)
    assert text.startswith("def")


def test_cli_samples_reproducibly(trained_run: Path) -> None:
    args = [
        f"ckpt={trained_run / 'checkpoints' / 'last.ckpt'}",
        "prompt=import",
        "max_new_tokens=16",
        "temperature=0.9",
        "top_p=0.9",
        "top_k=20",
        "seed=7",
    ]
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


# ------------------------------------------------------------------ PEFT checkpoints (lora, adapter, prompt)


@pytest.fixture(scope="module")
def peft_base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from tests.train.test_export_peft import write_base_checkpoint

    return write_base_checkpoint(tmp_path_factory.mktemp("peft-base") / "base.ckpt")


def greedy_reference(model: torch.nn.Module, ids: list[int], n: int, eos: int) -> list[int]:
    """Greedy decoding by full recomputation, stopping after eos as sample() does."""
    tokens = torch.tensor([ids])
    with torch.no_grad():
        for _ in range(n):
            tokens = torch.cat([tokens, model(tokens)[:, -1].argmax(-1, keepdim=True)], dim=1)
    ref = tokens[0].tolist()
    return ref[: ref.index(eos, len(ids)) + 1] if eos in ref[len(ids) :] else ref


@pytest.mark.parametrize("method", ["lora", "adapter", "prompt"])
def test_peft_checkpoints_load_and_sample(peft_base: Path, tmp_path: Path, method: str) -> None:
    from orchestra.model.generate import context_length
    from orchestra.model.peft import AdaptedModule, LoRALinear, PromptTunedModel
    from tests.train.test_export_peft import VIRTUAL, write_peft_checkpoint

    ckpt = tmp_path / f"{method}.ckpt"
    reference = write_peft_checkpoint(peft_base, method, ckpt)  # unmerged, eval mode
    model, tokenizer, meta = load_model_from_checkpoint(ckpt)
    assert not model.training and meta.peft is not None and meta.peft.method == method
    modules = list(model.modules())
    assert not any(isinstance(m, LoRALinear) for m in modules)  # LoRA is merged: base-model speed
    assert any(isinstance(m, AdaptedModule) for m in modules) == (method == "adapter")
    assert isinstance(model, PromptTunedModel) == (method == "prompt")
    assert context_length(model) == 64 - (VIRTUAL if method == "prompt" else 0)
    x = torch.randint(0, 257, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(x), atol=1e-5, rtol=0)

    text = sample(GenerateConfig(ckpt=str(ckpt), prompt="def add", max_new_tokens=10, temperature=0.0))
    ids = tokenizer.encode("def add").ids
    assert text == tokenizer.decode(
        greedy_reference(reference, ids, 10, tokenizer.token_to_id("<|endoftext|>"))
    )

    if method == "prompt":  # the soft prompt's positions are not the prompt's to use
        room = context_length(model)
        words = "x " * 200
        long_ids = tokenizer.encode(words).ids
        fits_base_only = tokenizer.decode(long_ids[: room + 1])
        with pytest.raises(
            ValueError, match=rf"context of {room} tokens \(model.max_seq_len less {VIRTUAL} soft"
        ):
            sample(GenerateConfig(ckpt=str(ckpt), prompt=fits_base_only, temperature=0.0))
        assert len(tokenizer.encode(fits_base_only).ids) < 64  # it would have fitted the base model


def test_peft_checkpoint_needs_its_unchanged_base(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from orchestra.cli import generate as generate_cli
    from tests.train.test_export_peft import write_base_checkpoint, write_peft_checkpoint

    base = write_base_checkpoint(tmp_path / "base" / "last.ckpt")
    write_peft_checkpoint(base, "lora", tmp_path / "lora.ckpt")
    write_base_checkpoint(base, seed=1)  # retrained in place: another sha256
    with pytest.raises(CheckpointError, match=r"lora\.ckpt: base .*last\.ckpt has changed since training"):
        load_model_from_checkpoint(tmp_path / "lora.ckpt")
    base.unlink()
    # The CLI in-process: a subprocess would spend most of its time importing Lightning.
    monkeypatch.setattr(sys, "argv", ["orchestra-generate", f"ckpt={tmp_path / 'lora.ckpt'}", "prompt=x"])
    with pytest.raises(SystemExit) as exit_info:
        generate_cli.main()
    out = capsys.readouterr().out
    assert exit_info.value.code != 0 and "Traceback" not in out, out
    assert "lora.ckpt" in out and f"base model {base} does not exist" in out, out


def test_sample_stops_on_any_eos_id_the_checkpoint_records(trained_run: Path, tmp_path: Path) -> None:
    """A checkpoint recording several EOS ids (an HF base's) stops on a later one, not only eos_id."""
    from orchestra.train.checkpoint import load_checkpoint_file

    ckpt = trained_run / "checkpoints" / "last.ckpt"
    model, tokenizer, _ = load_model_from_checkpoint(ckpt)
    ids = tokenizer.encode("def ").ids
    greedy = generate(model, torch.tensor([ids]), max_new_tokens=12, temperature=0.0)[0].tolist()
    new = greedy[len(ids) :]
    stop = new[3]  # the fourth generated token; the recorded eos_id never comes up
    unused = next(i for i in range(tokenizer.get_vocab_size()) if i not in new)
    checkpoint = load_checkpoint_file(ckpt)
    checkpoint["orchestra"].update(eos_id=unused, eos_ids=[unused, stop])
    torch.save(checkpoint, tmp_path / "several-eos.ckpt")
    text = sample(
        GenerateConfig(
            ckpt=str(tmp_path / "several-eos.ckpt"), prompt="def ", max_new_tokens=12, temperature=0.0
        )
    )
    assert text == tokenizer.decode(greedy[: len(ids) + new.index(stop) + 1])
