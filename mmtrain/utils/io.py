"""Atomic file writes: write to a temporary name in the same folder, fsync, then rename.

A reader (or a resumed job) therefore sees either the old file or the complete new one, never a
half-written one, even when the writer is killed mid-write. Append-only logs (metrics, the ledger,
skipped samples) grow by whole lines only (`append_line`), also when the disk fills up.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Replace `path` with `data` atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600 files; give the usual permissions
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | Path, text: str) -> None:
    """Replace `path` with `text` (UTF-8) atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Replace `path` with `obj` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def append_line(path: str | Path, line: str, sync: bool = False) -> None:
    """Append one line so that the file only ever holds whole lines.

    The line goes out in one `write(2)` on an `O_APPEND` descriptor under an exclusive `flock`, so
    concurrent writers (ranks, DataLoader workers, requeued jobs, hosts sharing a file system) never
    interleave. A line left unterminated by a writer killed mid-write is ended first (its fragment
    keeps a line of its own, which readers skip); a write that fails part-way (a full disk) is cut
    back off before the error propagates. `sync`: fsync, so the line survives the node going down.
    """
    data = (line.rstrip("\n") + "\n").encode("utf-8")
    fd = os.open(path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        size = os.fstat(fd).st_size
        if size and os.pread(fd, 1, size - 1) != b"\n":
            data = b"\n" + data
        try:
            _write_all(fd, data)
            if sync:
                os.fsync(fd)
        except BaseException:
            os.ftruncate(fd, size)
            raise
    finally:
        os.close(fd)  # closing releases the lock


def _write_all(fd: int, data: bytes) -> None:
    """Write every byte of `data` (a single write unless the kernel accepts only part of it)."""
    written = 0
    while written < len(data):
        written += os.write(fd, data[written:])


def file_digest(path: str | Path, algorithm: str = "sha256", **options: Any) -> str:
    """The hex digest of a file's bytes, read in 1 MiB blocks (`options`: e.g. blake2b's digest_size)."""
    digest = hashlib.new(algorithm, **options)
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()
