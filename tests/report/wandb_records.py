"""Read a W&B run file (``run-<id>.wandb``) back into wandb's own protobuf records.

wandb 0.31 writes these files from its Go core and no longer ships a Python reader (the old
``wandb.sdk.internal.datastore`` is gone), so the framing is undone here and every record is
decoded with wandb's own schema, ``wandb.proto.wandb_internal_pb2.Record``. The framing is
LevelDB's log format behind a 7-byte W&B header: 32 KiB blocks of chunks, each chunk
``crc32 (uint32 LE, seeded with the chunk type) | length (uint16 LE) | type (uint8) | data``,
where a record is one FULL chunk or FIRST, MIDDLE..., LAST.
"""

from __future__ import annotations

import json
import struct
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from wandb.proto import wandb_internal_pb2 as pb

HEADER = struct.pack("<4sHB", b":W&B", 0xBEE1, 0)
BLOCK, CHUNK_HEADER = 32768, 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: Path) -> Iterator[pb.Record]:
    data = Path(path).read_bytes()
    if not data.startswith(HEADER):
        raise ValueError(f"{path} is not a W&B run file (header {data[:7]!r})")
    pos, pending = len(HEADER), b""
    while pos + CHUNK_HEADER <= len(data):
        left_in_block = BLOCK - pos % BLOCK
        if left_in_block < CHUNK_HEADER:  # block trailer: zero padding
            pos += left_in_block
            continue
        crc, length, kind = struct.unpack_from("<IHB", data, pos)
        chunk = data[pos + CHUNK_HEADER : pos + CHUNK_HEADER + length]
        if kind == 0 and length == 0:  # preallocated, not yet written
            break
        if zlib.crc32(chunk, zlib.crc32(bytes([kind]))) & 0xFFFFFFFF != crc:
            raise ValueError(f"{path}: corrupt chunk at byte {pos}")
        pos += CHUNK_HEADER + length
        if kind == FULL:
            yield _decode(chunk)
        elif kind == FIRST:
            pending = chunk
        elif kind == MIDDLE:
            pending += chunk
        elif kind == LAST:
            yield _decode(pending + chunk)
            pending = b""


def finished_records(path: Path, timeout_s: float = 60.0) -> list[pb.Record]:
    """Every record once the run's ``exit`` record is on disk.

    ``run.finish()`` can return while wandb's core process is still writing the file's tail
    (seen on a loaded 2-core machine), so a reader waits for the last record rather than
    reading a half-written file.
    """
    deadline = time.monotonic() + timeout_s
    while True:
        records = list(read_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def _decode(raw: bytes) -> pb.Record:
    record = pb.Record()
    record.ParseFromString(raw)
    return record


def history(records: list[pb.Record]) -> list[dict[str, Any]]:
    """The logged history rows, as wandb.log received them."""
    return [
        {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in r.history.item}
        for r in records
        if r.WhichOneof("record_type") == "history"
    ]
