"""`orchestra-export ... peft_only=true`: LoRA and prompt tuning in Hugging Face peft's format, adapters in ours.

The PEFT checkpoints here are built by hand in exactly the layout training writes (the base loaded
with load_base, the method applied with apply_method, the metadata from peft_record), with
trainable tensors moved away from their zero/base init as training would, so every parity check
below can fail. The models are tiny (dim 64, two layers), so the whole file runs in seconds.
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from torch import nn

from orchestra.config import FinetuneConfig, FinetuneMethod, KernelBackend, ModelConfig, to_plain
from orchestra.model import build_model
from orchestra.train.checkpoint import CheckpointError
from orchestra.train.export import export_hf, export_peft, load_peft_export
from orchestra.train.finetune import apply_method, load_base, peft_record, rebuild_peft_model

VIRTUAL = 6  # soft prompt length of the prompt-tuning checkpoints
TEXT = "def add(x, y):\n    return x + y\n\nclass Point:\n    pass\n" * 8


def tiny_tokenizer_json() -> str:
    """A byte-level BPE with <|endoftext|> as id 0, as orchestra-prepare trains one (small vocab)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=300,
        special_tokens=["<|endoftext|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([TEXT], trainer=trainer)
    return tok.to_str()


def write_base_checkpoint(path: Path, seed: int = 0) -> Path:
    """A randomly initialised tiny model saved as an Orchestra training checkpoint."""
    from tokenizers import Tokenizer

    tokenizer_json = tiny_tokenizer_json()
    vocab = Tokenizer.from_str(tokenizer_json).get_vocab_size(with_added_tokens=True)
    cfg = ModelConfig(
        name="tiny",
        dim=64,
        n_layers=2,
        n_heads=4,
        n_kv_heads=2,
        ffn_dim=128,
        max_seq_len=64,
        vocab_size=vocab,
        kernels=KernelBackend.torch,
    )
    torch.manual_seed(seed)
    model = build_model(cfg, vocab)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(
        {
            "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "global_step": 30,
            "orchestra": {
                "format": 1,
                "model_config": to_plain(cfg),
                "vocab_size": vocab,
                "tokenizer_json": tokenizer_json,
            },
        },
        path,
    )
    return path


def write_peft_checkpoint(
    base: Path, method: str, path: Path, seed: int = 1, **finetune: object
) -> nn.Module:
    """A PEFT checkpoint in training's layout; returns the (unmerged, eval-mode) model it holds.

    Trainable tensors get a random push (LoRA's B and the adapters' up projection start at zero),
    so the fine-tuned model differs from its base the way a trained one does.
    """
    settings: dict[str, object] = {
        "lora_rank": 4,
        "lora_alpha": 8.0,
        "adapter_bottleneck": 8,
        "prompt_tokens": VIRTUAL,
        **finetune,
    }
    ft = FinetuneConfig(method=FinetuneMethod(method), init_from=str(base), **settings)  # type: ignore[arg-type]
    b = load_base(base)
    cfg = replace(b.model_config, vocab_size=b.vocab_size)
    model = build_model(cfg, b.vocab_size, init=False)
    model.load_state_dict(b.state_dict, strict=True)
    model = apply_method(model, ft)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=gen) * 0.3)
    trainable = {f"model.{n}": p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    torch.save(
        {
            "state_dict": trainable,
            "global_step": 5,
            "orchestra": {
                "format": 1,
                "model_config": to_plain(cfg),
                "vocab_size": b.vocab_size,
                "tokenizer_json": b.tokenizer_json,
                "peft": peft_record(ft, b.reference).to_dict(),
            },
        },
        path,
    )
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_base_checkpoint(tmp_path_factory.mktemp("base") / "last.ckpt")


@pytest.fixture(scope="module")
def hf_base(base: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The base as a Hugging Face folder: what peft's adapters are loaded onto."""
    return export_hf(base, tmp_path_factory.mktemp("hf") / "base")


def tokens(vocab: int = 257) -> torch.Tensor:
    """A [2, 20] batch of ids every tiny tokenizer has (256 bytes + <|endoftext|>)."""
    return torch.randint(0, vocab, (2, 20), generator=torch.Generator().manual_seed(0))


def hf_model(folder: Path) -> nn.Module:
    from transformers import LlamaForCausalLM

    return LlamaForCausalLM.from_pretrained(folder, torch_dtype=torch.float32).eval()


@pytest.mark.parametrize(
    ("targets", "peft_targets"),
    [
        (["q_proj", "v_proj", "gate_proj", "down_proj"], ["down_proj", "gate_proj", "q_proj", "v_proj"]),
        # One layer's q_proj only: peft needs a regex of the full module names for that.
        (["layers.1.attention.q_proj", "up_proj"], "regex"),
    ],
)
def test_lora_export_loads_in_peft_with_our_logits(
    base: Path, hf_base: Path, tmp_path: Path, targets: list[str], peft_targets: list[str] | str
) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    ours = write_peft_checkpoint(base, "lora", tmp_path / "lora.ckpt", lora_targets=targets)
    out = export_peft(tmp_path / "lora.ckpt", tmp_path / "adapter")
    assert {p.name for p in out.iterdir()} == {
        "README.md",
        "adapter_config.json",
        "adapter_model.safetensors",
        "orchestra_peft.json",
        "tokenizer.json",
    }
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM"
    assert (config["r"], config["lora_alpha"], config["lora_dropout"], config["bias"]) == (4, 8, 0.0, "none")
    assert config["base_model_name_or_path"] == str(base.resolve())
    if peft_targets == "regex":
        assert (
            config["target_modules"] == r"^(?:model\.layers\.0\.mlp\.up_proj|model\.layers\.1\.mlp\.up_proj|"
            r"model\.layers\.1\.self_attn\.q_proj)$"
        )
    else:
        assert config["target_modules"] == peft_targets
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight" in keys or peft_targets == "regex"
    assert "base_model.model.model.layers.1.mlp.up_proj.lora_B.weight" in keys or peft_targets != "regex"

    theirs = PeftModel.from_pretrained(hf_model(hf_base), out).eval()
    merged = hf_model(export_hf(tmp_path / "lora.ckpt", tmp_path / "merged"))
    x = tokens()
    with torch.no_grad():
        expected = ours(x)
        assert not torch.allclose(hf_model(hf_base)(x).logits, expected, atol=1e-3)  # LoRA changes the model
        torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=0)


def test_dora_export_loads_in_peft_as_dora_with_our_logits(base: Path, hf_base: Path, tmp_path: Path) -> None:
    """finetune=dora: peft's files with use_dora and the magnitudes; peft's DoRA and the merged model agree."""
    from peft import PeftModel
    from safetensors.torch import load_file

    ours = write_peft_checkpoint(base, "dora", tmp_path / "dora.ckpt", lora_targets=["all-linear"])
    out = export_peft(tmp_path / "dora.ckpt", tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is True
    keys = set(load_file(out / "adapter_model.safetensors"))
    assert "base_model.model.model.layers.1.mlp.down_proj.lora_magnitude_vector" in keys
    assert len(keys) == 3 * 7 * 2  # A, B and magnitude of seven projections in two layers
    theirs = PeftModel.from_pretrained(hf_model(hf_base), out).eval()
    merged = hf_model(export_hf(tmp_path / "dora.ckpt", tmp_path / "merged"))
    x = tokens()
    with torch.no_grad():
        expected = ours(x)
        assert not torch.allclose(hf_model(hf_base)(x).logits, expected, atol=1e-3)
        torch.testing.assert_close(theirs(x).logits, expected, atol=1e-5, rtol=0)
        torch.testing.assert_close(merged(x).logits, expected, atol=1e-5, rtol=0)
    tensors, meta = load_peft_export(out)  # and back into our model, from peft's files
    assert sum(name.endswith(".lora_magnitude_vector") for name in tensors) == 14
    rebuilt = rebuild_peft_model(tensors, meta, out).eval()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), expected, atol=1e-6, rtol=0)


def test_qlora_exports_plain_lora_adapters_and_rebuilds_over_the_nf4_base(base: Path, tmp_path: Path) -> None:
    """finetune=qlora: peft's LORA files (the adapters alone, for a base in any precision); read back, the
    NF4 base is quantized again and computes what training computed."""
    from safetensors.torch import load_file

    ours = write_peft_checkpoint(base, "qlora", tmp_path / "qlora.ckpt", lora_targets=["q_proj", "v_proj"])
    out = export_peft(tmp_path / "qlora.ckpt", tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["use_dora"] is False
    assert config["target_modules"] == ["q_proj", "v_proj"]
    assert len(load_file(out / "adapter_model.safetensors")) == 2 * 2 * 2
    tensors, meta = load_peft_export(out)
    rebuilt = rebuild_peft_model(tensors, meta, out).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ours(x), atol=0, rtol=0)  # NF4 quantization is deterministic


def test_prompt_export_loads_in_peft_with_our_logits(base: Path, hf_base: Path, tmp_path: Path) -> None:
    from peft import PeftModel
    from safetensors.torch import load_file

    ours = write_peft_checkpoint(base, "prompt", tmp_path / "prompt.ckpt")
    out = export_peft(tmp_path / "prompt.ckpt", tmp_path / "adapter")
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "PROMPT_TUNING" and config["task_type"] == "CAUSAL_LM"
    assert (config["num_virtual_tokens"], config["token_dim"], config["num_transformer_submodules"]) == (
        VIRTUAL,
        64,
        1,
    )
    assert (config["num_attention_heads"], config["num_layers"]) == (4, 2)
    saved = load_file(out / "adapter_model.safetensors")
    assert set(saved) == {"prompt_embeddings"}
    assert torch.equal(saved["prompt_embeddings"], ours.soft_prompt.weight)

    theirs = PeftModel.from_pretrained(hf_model(hf_base), out).eval()
    x = tokens()
    with torch.no_grad():
        logits = theirs(x).logits
        # peft returns logits for the virtual positions too: [B, P + T, V]; ours are the real ones.
        assert logits.shape == (2, VIRTUAL + 20, ours.model.vocab_size)
        expected = ours(x)
        assert not torch.allclose(hf_model(hf_base)(x).logits, expected, atol=1e-3)
        torch.testing.assert_close(logits[:, VIRTUAL:], expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("method", ["adapter", "lora", "prompt"])
def test_peft_export_round_trips_into_orchestra(base: Path, tmp_path: Path, method: str) -> None:
    from safetensors.torch import load_file

    ours = write_peft_checkpoint(base, method, tmp_path / "ft.ckpt")
    ckpt = torch.load(tmp_path / "ft.ckpt", weights_only=True)
    out = export_peft(tmp_path / "ft.ckpt", tmp_path / "adapter")
    record = json.loads((out / "orchestra_peft.json").read_text())
    assert record["method"] == method and record["base"] == ckpt["orchestra"]["peft"]["base"]
    assert record["config"] == ckpt["orchestra"]["peft"]["config"]
    assert (out / "tokenizer.json").read_text() == ckpt["orchestra"]["tokenizer_json"]
    if method == "adapter":  # peft has no Houlsby adapters: our own names, no adapter_config.json
        assert not (out / "adapter_config.json").exists() and record["readable_by"] == "Orchestra only"
        saved = load_file(out / "adapter_model.safetensors")
        assert saved.keys() == {k.removeprefix("model.") for k in ckpt["state_dict"]}

    trainable, meta = load_peft_export(out)
    expected = {k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()}
    assert trainable.keys() == expected.keys()
    assert all(torch.equal(trainable[k], expected[k]) for k in expected)
    rebuilt = rebuild_peft_model(trainable, meta, out).eval()
    x = tokens()
    with torch.no_grad():
        torch.testing.assert_close(rebuilt(x), ours(x), atol=0, rtol=0)

    half = export_peft(tmp_path / "ft.ckpt", tmp_path / "bf16", dtype="bfloat16")
    assert {t.dtype for t in load_file(half / "adapter_model.safetensors").values()} == {torch.bfloat16}


def test_refusals_name_the_fix_and_damage_nothing(base: Path, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"not a PEFT .*use the merged export"):
        export_peft(base, tmp_path / "out")
    assert not (tmp_path / "out").exists()

    for method in ("adapter", "prompt"):
        write_peft_checkpoint(base, method, tmp_path / f"{method}.ckpt")
        with pytest.raises(CheckpointError, match=rf"{method} fine-tune: .*cannot be merged.*peft_only=true"):
            export_hf(tmp_path / f"{method}.ckpt", tmp_path / "merged")
        assert not (tmp_path / "merged").exists()

    write_peft_checkpoint(base, "lora", tmp_path / "lora.ckpt")
    out = export_peft(tmp_path / "lora.ckpt", tmp_path / "out")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    with pytest.raises(FileExistsError, match="overwrite=true"):
        export_peft(tmp_path / "adapter.ckpt", out)
    with pytest.raises(ValueError, match="dtype"):
        export_peft(tmp_path / "adapter.ckpt", out, dtype="int8", overwrite=True)
    ckpt = torch.load(tmp_path / "lora.ckpt", weights_only=True)
    dropped = sorted(ckpt["state_dict"])[0]
    del ckpt["state_dict"][dropped]
    torch.save(ckpt, tmp_path / "torn.ckpt")
    with pytest.raises(CheckpointError, match=rf"torn\.ckpt.*{dropped.removeprefix('model.')}"):
        export_peft(tmp_path / "torn.ckpt", out, overwrite=True)
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # the failed exports left it alone
    assert sorted(p.name for p in tmp_path.iterdir() if ".tmp-" in p.name or ".old-" in p.name) == []

    export_peft(tmp_path / "adapter.ckpt", out, overwrite=True)  # overwrite replaces the whole folder
    assert json.loads((out / "orchestra_peft.json").read_text())["method"] == "adapter"
    assert not (out / "adapter_config.json").exists()


def test_cli_peft_only(
    base: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    write_peft_checkpoint(base, "lora", tmp_path / "lora.ckpt")
    cmd = [
        sys.executable,
        "-m",
        "orchestra.cli.export",
        f"ckpt={tmp_path / 'lora.ckpt'}",
        f"out={tmp_path / 'adapter'}",
        "peft_only=true",
    ]
    ok = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    assert ok.returncode == 0, ok.stdout + ok.stderr
    assert "lora" in ok.stdout and "adapter_model.safetensors" in ok.stdout and "peft.PeftModel" in ok.stdout

    # The refusal in-process (a second interpreter would spend seconds importing Lightning again).
    from orchestra.cli import export as cli

    monkeypatch.setattr(
        sys, "argv", ["orchestra-export", f"ckpt={base}", f"out={tmp_path / 'x'}", "peft_only=true"]
    )
    with pytest.raises(SystemExit) as exit_info:
        cli.main()
    said = capsys.readouterr().out
    assert (
        exit_info.value.code != 0
        and "merged export" in said
        and str(base) in said
        and "Traceback" not in said
    )
    assert len(said.strip().splitlines()) <= 3  # one message (rich may wrap it)
    assert not (tmp_path / "x").exists()
