"""Streaming safetensors I/O: parse headers, lay out output shards, copy tensor bytes in chunks.

A safetensors file is an 8-byte little-endian header length N, N bytes of JSON
(`{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}`, offsets relative
to the end of the header) and the raw tensor data. Nothing here maps or loads a whole file: headers
come from plain reads, and tensor bytes go from source to output through one reusable buffer, so
memory stays at the buffer's size whatever the size of the checkpoint. Output files are hashed
(sha256) while they are written.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Iterable

from mmtrain.methods.grafting.layout import SurrogateBuildError

CHUNK_BYTES = 64 * 2**20
MAX_HEADER_BYTES = 100 * 2**20
DTYPE_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8,
               "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1, "F8_E8M0": 1}


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor's bytes lie: `nbytes` bytes at absolute `offset` in `file`."""

    name: str
    dtype: str
    shape: tuple[int, ...]
    file: Path
    offset: int
    nbytes: int


@dataclass(frozen=True)
class SafetensorsHeader:
    path: Path
    tensors: dict[str, TensorEntry]
    raw: bytes


@dataclass(frozen=True)
class WrittenFile:
    path: Path
    size: int
    sha256: str
    tensor_bytes: int


def read_header(path: Path) -> SafetensorsHeader:
    """Parse and check the header of the safetensors file at `path` (reads only the header)."""
    size = path.stat().st_size
    with open(path, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise SurrogateBuildError(f"{path} is not a safetensors file: {size} bytes, too short for a header")
        length = struct.unpack("<Q", prefix)[0]
        if length > MAX_HEADER_BYTES or 8 + length > size:
            raise SurrogateBuildError(f"{path} is not a valid safetensors file: header length {length} "
                                      f"for a file of {size} bytes")
        text = handle.read(length)
    try:
        header = json.loads(text)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SurrogateBuildError(f"{path}: the safetensors header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise SurrogateBuildError(f"{path}: the safetensors header is not a JSON object")
    data_start, data_size = 8 + length, size - 8 - length
    tensors = {name: _entry(path, name, spec, data_start, data_size)
               for name, spec in header.items() if name != "__metadata__"}
    return SafetensorsHeader(path, tensors, prefix + text)


def _entry(path: Path, name: str, spec: object, data_start: int, data_size: int) -> TensorEntry:
    try:
        dtype, shape, (begin, end) = spec["dtype"], tuple(spec["shape"]), spec["data_offsets"]
        valid = (isinstance(dtype, str) and all(isinstance(d, int) and d >= 0 for d in shape)
                 and isinstance(begin, int) and isinstance(end, int) and 0 <= begin <= end <= data_size)
    except (TypeError, KeyError, ValueError):
        valid = False
    if not valid:
        raise SurrogateBuildError(f"{path}: bad header entry for tensor {name!r}: {spec!r} "
                                  f"(the data section holds {data_size} bytes)")
    if dtype in DTYPE_BYTES and end - begin != math.prod(shape) * DTYPE_BYTES[dtype]:
        raise SurrogateBuildError(f"{path}: tensor {name!r} ({dtype}, shape {list(shape)}) has "
                                  f"{end - begin} bytes of data")
    return TensorEntry(name, dtype, shape, path, data_start + begin, end - begin)


def plan_shards(tensors: list[tuple[str, TensorEntry]], max_shard_bytes: int) -> list[list[tuple[str, TensorEntry]]]:
    """Split (output name, source) pairs, in order, into shards of at most `max_shard_bytes` of data.

    A tensor larger than the limit gets a shard of its own.
    """
    shards: list[list[tuple[str, TensorEntry]]] = []
    size = 0
    for item in tensors:
        if not shards or (shards[-1] and size + item[1].nbytes > max_shard_bytes):
            shards.append([])
            size = 0
        shards[-1].append(item)
        size += item[1].nbytes
    return shards


def encode_header(tensors: Iterable[tuple[str, str, tuple[int, ...], int]]) -> bytes:
    """The length prefix and JSON header for (name, dtype, shape, nbytes) tensors stored in that order.

    Padded with spaces to a multiple of 8 bytes, like the safetensors library does.
    """
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name, dtype, shape, nbytes in tensors:
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":")).encode("utf-8")
    text += b" " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text


class HashingWriter:
    """A file being written, with its running sha256 and size; fsynced on close."""

    def __init__(self, path: Path):
        self.path = path
        self.handle: BinaryIO = open(path, "xb")
        self.sha256 = hashlib.sha256()
        self.size = 0

    def write(self, data: bytes | memoryview) -> None:
        self.handle.write(data)
        self.sha256.update(data)
        self.size += len(data)

    def close(self) -> None:
        self.handle.flush()
        os.fsync(self.handle.fileno())
        self.handle.close()

    def __enter__(self) -> HashingWriter:
        return self

    def __exit__(self, *exc: object) -> None:
        if exc[0] is None:
            self.close()
        else:
            self.handle.close()


def copy_range(source: Path, offset: int, nbytes: int, sink: HashingWriter, buffer: bytearray) -> None:
    """Copy `nbytes` bytes at `offset` of `source` to `sink` through `buffer`."""
    view = memoryview(buffer)
    with open(source, "rb", buffering=0) as handle:
        handle.seek(offset)
        remaining = nbytes
        while remaining:
            got = handle.readinto(view[:min(remaining, len(view))])
            if not got:
                raise SurrogateBuildError(f"{source} ends {remaining} bytes before the end of a tensor's data "
                                          "(truncated file?)")
            sink.write(view[:got])
            remaining -= got


def write_safetensors(path: Path, tensors: list[tuple[str, TensorEntry]], buffer: bytearray) -> WrittenFile:
    """Write a safetensors file holding each source tensor under its output name, streaming the data."""
    header = encode_header((name, src.dtype, src.shape, src.nbytes) for name, src in tensors)
    with HashingWriter(path) as sink:
        sink.write(header)
        for _, src in tensors:
            copy_range(src.file, src.offset, src.nbytes, sink, buffer)
    return WrittenFile(path, sink.size, sink.sha256.hexdigest(), sum(src.nbytes for _, src in tensors))


def copy_file(source: Path, dest: Path, buffer: bytearray) -> WrittenFile:
    """Copy a whole file through `buffer`, hashing it."""
    with HashingWriter(dest) as sink:
        copy_range(source, 0, source.stat().st_size, sink, buffer)
    return WrittenFile(dest, sink.size, sink.sha256.hexdigest(), 0)


def write_bytes(dest: Path, data: bytes) -> WrittenFile:
    with HashingWriter(dest) as sink:
        sink.write(data)
    return WrittenFile(dest, sink.size, sink.sha256.hexdigest(), 0)
