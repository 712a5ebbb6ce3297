"""Tensor + sequence parallelism (strategy.tp) on CPU gloo ranks against one process.

TP=2 and FSDP x TP = 2 x 2 give the single-process losses step for step; a checkpoint written
under one layout resumes under another (DCP reshards it) and exports to Hugging Face with the
logits transformers computes.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.distributed.test_strategies import STEPS, job, losses, run

pytestmark = pytest.mark.slow

# Grouped-query attention with 2 of 4 kv heads per rank, and the variants whose weights are used
# on split tensors: tied embeddings, biases, q/k norms over heads, sandwich norms.
VARIANT = {
    "model.tie_embeddings": True,
    "model.qkv_bias": True,
    "model.qk_norm": True,
    "model.sandwich_norm": True,
}


def _run(corpus_dir: Path, data_cache: Path, root: Path, name: str, world: int, **extra: object) -> Path:
    run_dir = root / name / "run"
    strategy = "single" if world == 1 and "strategy.tp" not in extra else "fsdp"
    run(job(corpus_dir, data_cache, run_dir, world, strategy, **extra), world, root / f"{name}.log")
    return run_dir


@pytest.fixture(scope="module")
def runs(corpus_dir: Path, data_cache: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tp")
    return {
        "single": _run(corpus_dir, data_cache, root, "single", 1),
        "tp2": _run(corpus_dir, data_cache, root, "tp2", 2, **{"strategy.tp": 2}),
        "fsdp2xtp2": _run(corpus_dir, data_cache, root, "fsdp2xtp2", 4, **{"strategy.tp": 2}),
        "variant-single": _run(corpus_dir, data_cache, root, "variant-single", 1, **VARIANT),
        "variant-tp2-ac": _run(
            corpus_dir,
            data_cache,
            root,
            "variant-tp2-ac",
            2,
            **VARIANT,
            **{"strategy.tp": 2, "strategy.activation_checkpointing": "full"},
        ),
    }


@pytest.mark.parametrize(
    ("layout", "reference"),
    [("tp2", "single"), ("fsdp2xtp2", "single"), ("variant-tp2-ac", "variant-single")],
)
def test_tensor_parallel_matches_one_process(runs: dict[str, Path], layout: str, reference: str) -> None:
    ref, got = losses(runs[reference]), losses(runs[layout])
    assert sorted(got) == sorted(ref) == list(range(STEPS))
    assert got == pytest.approx(ref, rel=1e-5, abs=1e-6)
    assert losses(runs[layout], "val/loss") == pytest.approx(losses(runs[reference], "val/loss"), rel=1e-5)


def test_tensor_parallel_checkpoint_holds_shards(runs: dict[str, Path]) -> None:
    """The saved q projection is written as two row blocks and o as two column blocks."""
    from torch.distributed.checkpoint import FileSystemReader

    meta = FileSystemReader(str(runs["tp2"] / "checkpoints" / "step0000005.ckpt")).read_metadata()
    chunks = {
        key: sorted((tuple(c.offsets), tuple(c.sizes)) for c in value.chunks)  # type: ignore[union-attr]
        for key, value in meta.state_dict_metadata.items()
        if key.startswith("state_dict.model.layers.0.attention.")
        and key.endswith(("q_proj.weight", "o_proj.weight"))
    }
    q = chunks["state_dict.model.layers.0.attention.q_proj.weight"]
    o = chunks["state_dict.model.layers.0.attention.o_proj.weight"]
    assert q == [((0, 0), (32, 64)), ((32, 0), (32, 64))]
    assert o == [((0, 0), (64, 32)), ((0, 32), (64, 32))]


@pytest.mark.parametrize(
    ("source", "world", "extra"),
    [
        ("tp2", 2, {}),  # TP=2 -> FSDP=2
        ("tp2", 1, {"strategy": "fsdp"}),  # TP=2 -> one process
        ("fsdp2xtp2", 2, {"strategy.tp": 2}),  # FSDP x TP 2 x 2 -> TP=2
    ],
    ids=["tp2-to-fsdp2", "tp2-to-one", "fsdp2xtp2-to-tp2"],
)
def test_resume_under_another_layout(
    runs: dict[str, Path],
    corpus_dir: Path,
    data_cache: Path,
    tmp_path: Path,
    source: str,
    world: int,
    extra: dict[str, object],
) -> None:
    ckpt = runs[source] / "checkpoints" / "step0000005.ckpt"
    run_dir = tmp_path / "resumed"
    overrides = {"resume": ckpt, **extra}
    strategy = str(overrides.pop("strategy", "fsdp"))
    run(job(corpus_dir, data_cache, run_dir, world, strategy, **overrides), world, tmp_path / "log")
    ref, got = losses(runs["single"]), losses(run_dir)
    assert sorted(got) == list(range(5, STEPS))
    assert got == pytest.approx({s: ref[s] for s in got}, rel=1e-5, abs=1e-6)


def test_export_of_tensor_parallel_checkpoint(runs: dict[str, Path], tmp_path: Path) -> None:
    from orchestra.train.export import export_hf
    from tests.train.test_export import assert_transformers_matches

    ckpt = runs["tp2"] / "checkpoints" / "last.ckpt"
    assert_transformers_matches(ckpt, export_hf(ckpt, tmp_path / "hf"))
