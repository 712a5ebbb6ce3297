"""Fixed-length windows over a prepared dataset, and the batch samplers that order them.

The files underneath (manifest, shards and their checks) are :mod:`orchestra.data.shards`.

The samplers are keyed on a *global sample index* (as in Megatron-LM and MosaicML streaming):
the order of samples is a function of (seed, position in the stream) only, and each optimizer
step consumes the next ``global_batch_size`` positions. Ranks and gradient accumulation merely
cut a step's slice into pieces, so a run resumed at another world size continues with exactly
the samples the uninterrupted run would have used.
"""

from __future__ import annotations

import bisect
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset, Sampler

from orchestra.config import ConfigError
from orchestra.data.errors import DataError

# load_manifest and verify_shards are also imported from here (orchestra.train.run, orchestra.cli.prepare).
from orchestra.data.shards import SPLITS, load_manifest, split_shards, stored_dtype, verify_shards


class PackedDataset(Dataset[tuple[torch.Tensor, torch.Tensor]]):
    """Fixed-length next-token windows over one split's shards, read through memmaps.

    Sample i covers tokens [i*seq_len, i*seq_len + seq_len + 1) of the split's concatenated
    shards (windows may cross shard and document boundaries) and returns
    ``(input_ids, labels)``, both int64 of length seq_len, labels shifted by one.
    """

    def __init__(
        self, dataset_dir: str | os.PathLike[str], split: str, seq_len: int, verify: bool = True
    ) -> None:
        if split not in SPLITS:
            raise ConfigError(f"split: {split!r} is not one of {list(SPLITS)}")
        if seq_len <= 0:
            raise ConfigError(f"seq_len: must be positive, got {seq_len}")
        self.dataset_dir = Path(dataset_dir)
        self.split, self.seq_len = split, seq_len
        self.manifest = load_manifest(self.dataset_dir)
        if verify:
            verify_shards(self.dataset_dir, splits=(split,))
        self.dtype = stored_dtype(self.manifest)
        shards = split_shards(self.dataset_dir, self.manifest, split)
        self._files = [file for file, _ in shards]
        self._sizes = [tokens for _, tokens in shards]
        self._starts = np.cumsum([0, *self._sizes]).tolist()  # shard s holds [starts[s], starts[s+1])
        self.total_tokens = int(self._starts[-1])
        if self.total_tokens < seq_len + 1:
            raise DataError(
                f"{self.dataset_dir}: the {split} split has {self.total_tokens} tokens, fewer than "
                f"seq_len + 1 = {seq_len + 1} needed for one sample; use a shorter model.max_seq_len or more data"
            )
        self._maps: list[np.memmap] | None = None

    def __len__(self) -> int:
        return (self.total_tokens - 1) // self.seq_len

    def _memmaps(self) -> list[np.memmap]:
        # Opened lazily so each DataLoader worker maps the files itself (a pickled memmap would
        # copy the data into the worker instead).
        if self._maps is None:
            self._maps = [
                np.memmap(f, dtype=self.dtype, mode="r", shape=(n,))
                for f, n in zip(self._files, self._sizes, strict=True)
            ]
        return self._maps

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_maps"] = None
        return state

    def tokens(self, start: int, stop: int) -> np.ndarray:
        """Tokens [start, stop) of the split, gathered across shard boundaries."""
        maps = self._memmaps()
        pieces = []
        shard = bisect.bisect_right(self._starts, start) - 1
        while start < stop:
            end = min(stop, self._starts[shard + 1])
            offset = self._starts[shard]
            pieces.append(maps[shard][start - offset : end - offset])
            start = end
            shard += 1
        return np.concatenate(pieces) if len(pieces) > 1 else np.array(pieces[0])

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"sample {index} out of range for {len(self)} samples")
        start = index * self.seq_len
        window = torch.from_numpy(self.tokens(start, start + self.seq_len + 1).astype(np.int64))
        return window[:-1], window[1:]


class GlobalBatchSampler(Sampler[list[int]]):
    """Micro-batches of sample indices for one rank, keyed on the global sample position.

    The sample stream is ``s_j = perm_e[j mod N]`` with ``e = j // N`` and ``perm_e`` a
    permutation of the N samples seeded by (seed, e): every epoch is a fresh shuffle. Optimizer
    step k consumes stream positions ``[k*G, (k+1)*G)``; rank r takes the contiguous slice
    ``[r*G/W, (r+1)*G/W)`` of it and yields it as G/(W*micro) micro-batches (the gradient
    accumulation steps). Steps ``start_step .. total_steps-1`` are yielded.

    ``skip_steps`` are data steps (global batches of the stream, 0-based) never trained on: the
    loss guard's rollback and ``data.skip_steps`` put them there. Training step k reads the k-th
    data step not skipped (:func:`data_step`), so every later step shifts along by one window.

    ``counted_before`` is added to ``__len__`` only: Lightning restores its per-epoch batch
    counter on resume and ends the epoch when that counter reaches ``len(dataloader)``, so the
    length it sees must include the batches it counted before the restart.
    """

    def __init__(
        self,
        num_samples: int,
        global_batch_size: int,
        micro_batch_size: int,
        rank: int,
        world_size: int,
        seed: int,
        total_steps: int,
        start_step: int = 0,
        counted_before: int = 0,
        skip_steps: tuple[int, ...] = (),
    ) -> None:
        if num_samples <= 0:
            raise DataError(f"the dataset has no samples (num_samples={num_samples})")
        if micro_batch_size <= 0 or world_size <= 0 or global_batch_size <= 0:
            raise ConfigError(
                f"trainer: micro_batch_size ({micro_batch_size}), world size ({world_size}) and "
                f"global_batch_size ({global_batch_size}) must be positive"
            )
        if global_batch_size % (micro_batch_size * world_size) != 0:
            raise ConfigError(
                f"trainer.global_batch_size: {global_batch_size} is not a multiple of micro_batch_size x "
                f"world_size = {micro_batch_size} x {world_size} = {micro_batch_size * world_size}"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        if not 0 <= start_step <= total_steps:
            raise ConfigError(f"start_step {start_step} must be in [0, total_steps={total_steps}]")
        self.num_samples, self.global_batch_size, self.micro_batch_size = (
            num_samples,
            global_batch_size,
            micro_batch_size,
        )
        self.rank, self.world_size, self.seed = rank, world_size, seed
        self.total_steps, self.start_step, self.counted_before = total_steps, start_step, counted_before
        self.accumulation = global_batch_size // (micro_batch_size * world_size)
        self.skip_steps = tuple(sorted(set(skip_steps)))
        self.consumed_samples = start_step * global_batch_size
        self._perm_cache: tuple[int, np.ndarray] | None = None

    def permutation(self, epoch: int) -> np.ndarray:
        """The sample order of one pass over the data (cached: consecutive steps share it)."""
        if self._perm_cache is None or self._perm_cache[0] != epoch:
            rng = np.random.default_rng([self.seed, epoch])
            self._perm_cache = (epoch, rng.permutation(self.num_samples))
        return self._perm_cache[1]

    def stream(self, start: int, stop: int) -> np.ndarray:
        """Sample indices at global stream positions [start, stop)."""
        positions = np.arange(start, stop, dtype=np.int64)
        epochs = positions // self.num_samples
        out = np.empty_like(positions)
        for epoch in np.unique(epochs).tolist():
            mask = epochs == epoch
            out[mask] = self.permutation(epoch)[positions[mask] % self.num_samples]
        return out

    def step_indices(self, step: int) -> list[list[int]]:
        """This rank's micro-batches for one optimizer step."""
        per_rank = self.global_batch_size // self.world_size
        base = data_step(step, self.skip_steps) * self.global_batch_size + self.rank * per_rank
        indices = self.stream(base, base + per_rank)
        m = self.micro_batch_size
        return [indices[i * m : (i + 1) * m].tolist() for i in range(self.accumulation)]

    def __iter__(self) -> Iterator[list[int]]:
        for step in range(self.start_step, self.total_steps):
            micro_batches = self.step_indices(step)
            for j, batch in enumerate(micro_batches):
                if j == len(micro_batches) - 1:
                    # Counts what was handed out, which runs ahead of training when the DataLoader
                    # prefetches; the DataModule checkpoints trainer.global_step * G instead.
                    self.consumed_samples = (step + 1) * self.global_batch_size
                yield batch

    def __len__(self) -> int:
        return self.counted_before + (self.total_steps - self.start_step) * self.accumulation

    def state_dict(self) -> dict[str, int]:
        return {
            "consumed_samples": int(self.consumed_samples),
            "seed": int(self.seed),
            "global_batch_size": int(self.global_batch_size),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_sampler_state(state, self.seed, self.global_batch_size)
        consumed = int(state["consumed_samples"])
        self.start_step = consumed // self.global_batch_size
        self.consumed_samples = consumed


def data_step(step: int, skip_steps: tuple[int, ...]) -> int:
    """The data step training step ``step`` reads: the step-th one (0-based) not in ``skip_steps``."""
    data = step
    for skipped in sorted(set(skip_steps)):
        if skipped <= data:
            data += 1
    return data


def check_sampler_state(state: dict[str, Any], seed: int, global_batch_size: int) -> None:
    """A checkpoint's data position only means the same thing under the same seed and global batch."""
    problems = []
    if int(state.get("seed", seed)) != seed:
        problems.append(f"seed: checkpoint {state['seed']} vs now {seed}")
    if int(state.get("global_batch_size", global_batch_size)) != global_batch_size:
        problems.append(
            f"trainer.global_batch_size: checkpoint {state['global_batch_size']} vs now {global_batch_size}"
        )
    if problems:
        raise ConfigError(
            "cannot resume the data order: "
            + "; ".join(problems)
            + " (both change which samples each step sees; resume with the checkpoint's values)"
        )
    consumed = int(state.get("consumed_samples", 0))
    if consumed % global_batch_size != 0:
        raise ConfigError(
            f"checkpoint consumed_samples={consumed} is not a whole number of global batches of {global_batch_size}"
        )


class ValBatchSampler(Sampler[list[int]]):
    """The first ``batches * micro`` samples in order, the same set at every world size.

    Micro-batch b covers samples [b*micro, (b+1)*micro) and goes to rank b % W, so the validation
    loss (reduced as a token-weighted sum, see CausalLMModule) does not depend on how many ranks
    share it. Every rank must run the same number of batches (a sharded forward is a collective),
    so ``batches`` is rounded down to a multiple of W; a split too small for ``batches`` uses fewer.
    A split too small for one batch per rank is a :class:`DataError` about the numbers only; the
    data module that built the split adds which setting to change.
    """

    def __init__(
        self, num_samples: int, micro_batch_size: int, rank: int, world_size: int, batches: int
    ) -> None:
        per_round = micro_batch_size * world_size
        if num_samples < per_round:
            raise DataError(
                f"the val split has {num_samples} samples, fewer than micro_batch_size x world_size = "
                f"{per_round} needed for one validation batch per rank"
            )
        if not 0 <= rank < world_size:
            raise ConfigError(f"rank {rank} is outside world_size {world_size}")
        self.micro_batch_size, self.rank, self.world_size = micro_batch_size, rank, world_size
        self.requested = batches
        total = min(batches, num_samples // micro_batch_size)
        self.total_batches = max(world_size, total - total % world_size)
        self.batches = self.total_batches // world_size  # per rank

    def __iter__(self) -> Iterator[list[int]]:
        m = self.micro_batch_size
        for b in range(self.rank, self.total_batches, self.world_size):
            yield list(range(b * m, (b + 1) * m))

    def __len__(self) -> int:
        return self.batches
