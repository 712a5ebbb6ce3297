"""Data pipeline: corpus -> byte-level BPE -> packed uint16/uint32 shards -> resumable, rank-sharded batches.

Kept import-light on purpose: tokenizer worker processes import :mod:`orchestra.data.pack`, and
they should not pay for torch or Lightning. Import the submodules directly.
"""
