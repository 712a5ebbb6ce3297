"""PackedDataset windows and the global-index batch samplers (determinism, resume, world size)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from orchestra.config import ConfigError
from orchestra.data.dataset import GlobalBatchSampler, PackedDataset, ValBatchSampler, data_step
from orchestra.data.errors import DataError
from orchestra.data.shards import FORMAT_VERSION, ShardWriter
from orchestra.data.tokenizer import file_sha256


def fake_dataset(root: Path, train: np.ndarray, val: np.ndarray, shard_tokens: int) -> Path:
    """A prepared-dataset dir written directly, so token values are known exactly."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "tokenizer.json").write_text("{}")
    splits = {}
    for split, tokens in (("train", train), ("val", val)):
        writer = ShardWriter(root, split, np.dtype("<u2"), shard_tokens)
        writer.write(tokens)
        splits[split] = writer.close()
    manifest = {
        "format_version": FORMAT_VERSION,
        "dtype": "uint16",
        "vocab_size": 65536,
        "eos_id": 0,
        "tokenizer": {"file": "tokenizer.json", "sha256": file_sha256(root / "tokenizer.json")},
        "splits": splits,
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root


# --------------------------------------------------------------------------- PackedDataset


def test_windows_are_shifted_and_span_shards(tmp_path: Path) -> None:
    tokens = np.arange(1000, dtype=np.int64)
    ds = PackedDataset(fake_dataset(tmp_path, tokens, tokens[:50], shard_tokens=37), "train", seq_len=16)
    assert len(ds) == (1000 - 1) // 16
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.dtype == y.dtype == torch.int64
        assert x.tolist() == list(range(i * 16, i * 16 + 16))
        assert y.tolist() == list(range(i * 16 + 1, i * 16 + 17))
    with pytest.raises(IndexError):
        ds[len(ds)]


def test_exact_fit_and_too_short_split(tmp_path: Path) -> None:
    root = fake_dataset(tmp_path, np.arange(33), np.arange(10), shard_tokens=8)
    assert len(PackedDataset(root, "train", seq_len=32)) == 1  # 33 tokens = one window + its label
    with pytest.raises(DataError, match=r"val split has 10 tokens, fewer than seq_len \+ 1 = 33"):
        PackedDataset(root, "val", seq_len=32)


def test_dataset_pickles_without_its_memmaps(tmp_path: Path) -> None:
    import pickle

    ds = PackedDataset(fake_dataset(tmp_path, np.arange(100), np.arange(20), 30), "train", seq_len=8)
    ds[0]
    clone = pickle.loads(pickle.dumps(ds))
    assert clone._maps is None and clone[3][0].tolist() == ds[3][0].tolist()


# --------------------------------------------------------------------------- GlobalBatchSampler


def make(
    n: int = 50, G: int = 8, m: int = 2, rank: int = 0, W: int = 1, seed: int = 0, T: int = 20, start: int = 0
) -> GlobalBatchSampler:
    return GlobalBatchSampler(n, G, m, rank, W, seed, T, start)


def per_step(n: int, G: int, m: int, W: int, seed: int, T: int, start: int = 0) -> dict[int, list[int]]:
    """Sorted union over ranks of each optimizer step's sample indices."""
    out: dict[int, list[int]] = {}
    for r in range(W):
        sampler = make(n, G, m, r, W, seed, T, start)
        batches = list(sampler)
        assert len(batches) == len(sampler)
        a = sampler.accumulation
        for i, batch in enumerate(batches):
            assert len(batch) == m
            out.setdefault(start + i // a, []).extend(batch)
    return {k: sorted(v) for k, v in out.items()}


def test_same_seed_same_order_other_seed_other_order() -> None:
    assert list(make(seed=1)) == list(make(seed=1))
    assert list(make(seed=1)) != list(make(seed=2))


def test_resume_at_same_world_size_continues_exactly() -> None:
    full = list(make(W=2, rank=1, T=20))
    a = make(W=2).accumulation
    for k in (0, 1, 7, 19, 20):
        assert list(make(W=2, rank=1, T=20, start=k)) == full[k * a :]


@pytest.mark.parametrize("m", [1, 2, 4])
def test_step_union_is_identical_for_any_world_size(m: int) -> None:
    reference = per_step(n=37, G=16, m=1, W=1, seed=3, T=12)
    for W in (1, 2, 4):
        if 16 % (m * W) == 0:
            assert per_step(n=37, G=16, m=m, W=W, seed=3, T=12) == reference
            # resuming at another world size continues with the same data
            assert per_step(n=37, G=16, m=m, W=W, seed=3, T=12, start=5) == {
                k: v for k, v in reference.items() if k >= 5
            }


def test_ranks_are_disjoint_within_a_step() -> None:
    batches = [list(make(n=1000, G=16, m=2, rank=r, W=4, T=3)) for r in range(4)]
    for step in range(3):
        seen = [i for r in range(4) for b in batches[r][step * 2 : (step + 1) * 2] for i in b]
        assert len(seen) == len(set(seen)) == 16


def test_indices_in_range_and_epochs_wrap_as_fresh_permutations() -> None:
    n, G = 10, 4
    sampler = make(n=n, G=G, m=2, T=15)  # 60 samples = 6 epochs of 10
    stream = [i for batch in sampler for i in batch]
    assert all(0 <= i < n for i in stream)
    epochs = [stream[e * n : (e + 1) * n] for e in range(6)]
    for epoch in epochs:
        assert sorted(epoch) == list(range(n))  # each pass sees every sample once
    assert len({tuple(e) for e in epochs}) > 1  # and reshuffles


def test_len_counts_micro_batches_and_offset() -> None:
    s = make(G=8, m=2, W=2, T=10, start=4)
    assert s.accumulation == 2 and len(s) == 12 == len(list(s))
    assert len(GlobalBatchSampler(50, 8, 2, 0, 2, 0, 10, 4, counted_before=8)) == 20


def test_global_batch_must_split_evenly() -> None:
    with pytest.raises(ConfigError, match=r"global_batch_size: 12 is not a multiple of .* 4 x 2 = 8"):
        GlobalBatchSampler(50, 12, 4, 0, 2, 0, 10)
    with pytest.raises(ConfigError, match="rank 2 is outside"):
        GlobalBatchSampler(50, 8, 2, 2, 2, 0, 10)


def test_state_dict_round_trip_and_guard() -> None:
    s = make(T=10)
    it = iter(s)
    for _ in range(3 * s.accumulation):
        next(it)
    state = s.state_dict()
    assert state == {"consumed_samples": 3 * 8, "seed": 0, "global_batch_size": 8}
    fresh = make(T=10)
    fresh.load_state_dict(state)
    assert list(fresh) == list(make(T=10, start=3))
    with pytest.raises(ConfigError, match="seed: checkpoint 0 vs now 5"):
        make(seed=5).load_state_dict(state)
    with pytest.raises(ConfigError, match="global_batch_size: checkpoint 8 vs now 16"):
        make(G=16).load_state_dict(state)


# --------------------------------------------------------------------------- ValBatchSampler


@pytest.mark.parametrize("W", [1, 2, 4])
def test_val_set_is_the_same_at_every_world_size(W: int) -> None:
    m, batches = 3, 4
    per_rank = [list(ValBatchSampler(100, m, r, W, batches)) for r in range(W)]
    assert all(len(p) == batches // W for p in per_rank)  # equal counts: a sharded forward is a collective
    union = sorted(i for p in per_rank for b in p for i in b)
    assert union == list(range(batches * m))
    assert per_rank[0] == list(ValBatchSampler(100, m, 0, W, batches))


def test_val_sampler_shrinks_or_refuses_a_small_split() -> None:
    assert (
        len(ValBatchSampler(10, 2, 0, 2, batches=20)) == 2
    )  # 5 micro-batches fit, rounded to 4 = 2 per rank
    assert ValBatchSampler(100, 2, 0, 4, batches=6).total_batches == 4  # rounded down to a multiple of W
    with pytest.raises(DataError, match="val split has 3 samples, fewer than"):
        ValBatchSampler(3, 2, 0, 2, batches=1)


def test_skipped_data_steps_are_never_read_and_the_rest_keep_their_order() -> None:
    """Independent reference: the unskipped stream's steps with the skipped ones taken out."""
    n, G, m, W, T = 37, 8, 2, 2, 12
    skips = (3, 4, 9)
    plain = [
        [GlobalBatchSampler(n, G, m, r, W, 5, T + 3).step_indices(d) for r in range(W)] for d in range(T + 3)
    ]
    kept = [d for d in range(T + 3) if d not in skips][:T]
    for rank in range(W):
        skipping = GlobalBatchSampler(n, G, m, rank, W, 5, T, skip_steps=skips)
        assert [skipping.step_indices(k) for k in range(T)] == [plain[d][rank] for d in kept]
        # Resuming mid-run reads the same batches as the uninterrupted sampler from there on.
        resumed = GlobalBatchSampler(n, G, m, rank, W, 5, T, start_step=6, skip_steps=skips)
        assert list(resumed) == [b for d in kept[6:] for b in plain[d][rank]]
    assert [data_step(k, skips) for k in range(6)] == [0, 1, 2, 5, 6, 7]
    assert data_step(4, (4, 4, 2)) == 6  # unsorted, repeated
