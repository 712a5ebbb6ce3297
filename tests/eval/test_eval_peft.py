"""orchestra-eval on PEFT checkpoints (only the trainable tensors, rebuilt on their recorded base)
against lm-eval's Hugging Face backend running Hugging Face peft on the exported adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("lm_eval")
pytest.importorskip("peft")

from lm_eval.api.instance import Instance
from lm_eval.models.huggingface import HFLM

from orchestra.cli.eval import run_eval
from orchestra.config import EvalConfig
from orchestra.eval.harness import OrchestraLM
from orchestra.eval.run import read_results
from orchestra.train.checkpoint.load import load_for_eval
from orchestra.train.export import export_hf, export_peft
from tests.train.test_export_peft import VIRTUAL, write_base_checkpoint, write_peft_checkpoint

# Short enough that one window covers each document with the soft prompt's positions taken.
DOCS = [
    "def add(x, y):\n    return x + y\n",
    "class Point:\n    pass\n\nimport os\n",
    "for i in range(3):\n    print(i)\n",
]


@pytest.fixture(scope="module")
def base(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("peft-eval")
    ckpt = write_base_checkpoint(root / "base" / "last.ckpt")
    return ckpt, export_hf(ckpt, root / "hf-base")


@pytest.mark.parametrize("method", ["lora", "prompt"])
def test_peft_checkpoint_scores_and_generates_like_peft(
    base: tuple[Path, Path], tmp_path: Path, method: str
) -> None:
    base_ckpt, hf_base = base
    ckpt = tmp_path / f"{method}.ckpt"
    write_peft_checkpoint(base_ckpt, method, ckpt)
    adapter = export_peft(ckpt, tmp_path / "adapter")
    ref = HFLM(pretrained=str(hf_base), peft=str(adapter), device="cpu", batch_size=2, dtype="float32")
    evaluated = load_for_eval(ckpt)
    assert evaluated.kind == "peft checkpoint"
    ours = OrchestraLM(evaluated, batch_size=2)
    assert max(len(ours.tok_encode(d)) for d in DOCS) + 1 <= 64 - VIRTUAL

    rolling = [Instance("loglikelihood_rolling", {}, (d,), i) for i, d in enumerate(DOCS)]
    want = ref.loglikelihood_rolling(rolling)
    got = ours.loglikelihood_rolling(rolling)
    assert got == pytest.approx(want, abs=1e-4)

    # The whole command on the checkpoint: its perplexity is the reference's over the same tokens.
    files = []
    for i, d in enumerate(DOCS):
        files.append(tmp_path / f"doc{i}.txt")
        files[-1].write_text(d)
    path = run_eval(
        EvalConfig(
            ckpt=str(ckpt), tasks=["perplexity"], paths=[str(f) for f in files], out=str(tmp_path / "e")
        )
    )
    assert path is not None
    document, _ = read_results(path.parent)
    metrics = document["tasks"]["perplexity"]["metrics"]
    assert metrics["nll"] == pytest.approx(-sum(want) / metrics["tokens"], rel=1e-5)
    assert document["model"]["kind"] == "peft checkpoint"

    # Greedy generation of prompts of different lengths (one batch for LoRA, a batch per length
    # for the soft prompt). The reference is greedy argmax over full forwards of peft's model:
    # peft's cached generate for prompt tuning ignores position ids and can drift from it.
    args = [
        (d[:n], {"until": ["\n\n"], "max_gen_toks": 8, "do_sample": False})
        for d, n in zip(DOCS, (5, 14, 9), strict=True)
    ]
    generated = ours.generate_until([Instance("generate_until", {}, a, i) for i, a in enumerate(args)])
    expected = []
    with torch.no_grad():
        for context, _ in args:
            seq = torch.tensor([ref.tok_encode(context)])
            width = seq.shape[1]
            for _ in range(8):
                seq = torch.cat([seq, ref.model(input_ids=seq).logits[:, -1].argmax(-1, keepdim=True)], dim=1)
            expected.append(ref.tok_decode(seq[0, width:].tolist()).split("\n\n")[0])
    assert generated == expected
    if method == "lora":  # peft's own batched generate agrees here too
        assert generated == ref.generate_until(
            [Instance("generate_until", {}, a, i) for i, a in enumerate(args)]
        )
