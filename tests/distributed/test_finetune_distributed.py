"""LoRA and DPO fine-tuning under FSDP2 on 2 CPU processes against the single-process run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.distributed.test_strategies import job, losses, run

pytestmark = pytest.mark.slow


def lora_job(
    corpus_dir: Path, data_cache: Path, run_dir: Path, world: int, strategy: str, base: Path
) -> list[str]:
    return job(
        corpus_dir,
        data_cache,
        run_dir,
        world,
        strategy,
        **{
            "finetune": "lora",
            "finetune.init_from": base,
            "finetune.lora_targets": "[all-linear]",
            "trainer.max_steps": 6,
            "trainer.val_every_n_steps": 3,
            "trainer.ckpt_every_n_steps": 3,
            "scheduler": "constant",
            "scheduler.warmup_steps": 0,
        },
    )


def test_lora_under_fsdp_matches_one_process_and_checkpoints_only_lora(
    corpus_dir: Path, data_cache: Path, trained_run: Path, tmp_path: Path
) -> None:
    from transformers import AutoModelForCausalLM

    from orchestra.train.checkpoint import load_checkpoint_file
    from orchestra.train.export import consolidated_state_dict, export_hf

    base = trained_run / "checkpoints" / "last.ckpt"
    single, sharded = tmp_path / "single", tmp_path / "fsdp"
    run(lora_job(corpus_dir, data_cache, single, 1, "single", base), 1, tmp_path / "single.log")
    run(lora_job(corpus_dir, data_cache, sharded, 2, "fsdp", base), 2, tmp_path / "fsdp.log")
    ref, got = losses(single), losses(sharded)
    assert sorted(got) == sorted(ref) == list(range(6))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)

    ckpt = sharded / "checkpoints" / "last.ckpt"
    assert ckpt.is_dir()  # a DCP directory, one shard file per rank
    assert load_checkpoint_file(ckpt)["orchestra"]["peft"]["method"] == "lora"
    trainable, _ = consolidated_state_dict(ckpt)
    assert trainable and all("lora_" in name for name in trainable)
    reference, _ = consolidated_state_dict(single / "checkpoints" / "last.ckpt")
    assert set(trainable) == set(reference)
    for name, tensor in trainable.items():
        torch.testing.assert_close(tensor, reference[name], rtol=1e-4, atol=1e-6)
    # The merged exports of the sharded and the single-process run give the same logits.
    probe = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = [
            AutoModelForCausalLM.from_pretrained(export_hf(c, tmp_path / name)).eval()(probe).logits
            for c, name in ((ckpt, "hf-fsdp"), (single / "checkpoints" / "last.ckpt", "hf-single"))
        ]
    torch.testing.assert_close(logits[0], logits[1], rtol=1e-4, atol=1e-4)
    # orchestra-generate reads the sharded PEFT directory as it reads the single-file checkpoint.
    from orchestra.cli.generate import sample
    from orchestra.config import GenerateConfig

    texts = [
        sample(GenerateConfig(ckpt=str(c), prompt="def ", max_new_tokens=8, temperature=0.0, top_k=None))
        for c in (ckpt, single / "checkpoints" / "last.ckpt")
    ]
    assert texts[0] == texts[1]
