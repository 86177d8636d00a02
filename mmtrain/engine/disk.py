"""Disk space: how much a folder's file system has free, and telling a full disk from other write errors.

A checkpoint is written only after every rank has found room for it (`mmtrain.engine.checkpoint`); a
write that runs out of space anyway, or a log line that cannot be appended, stops the run with an
`OutOfSpaceError` that names the folder, the space needed and what to do.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

from mmtrain.errors import UserError

OUT_OF_SPACE_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
_OUT_OF_SPACE_WORDS = ("no space left on device", "os error 28", "disk quota exceeded", "os error 122")
LOW_SPACE_BYTES = 1 << 20
"""After a failed write, less free space than this means the write failed for want of space."""
_UNITS = ("B", "KiB", "MiB", "GiB", "TiB", "PiB")


class OutOfSpaceError(UserError, OSError):
    """A folder mmtrain writes to (a run folder, its checkpoints) has no room left; the message names the
    folder, the space needed and what to do."""


def free_bytes(path: str | Path) -> int:
    """Bytes this user may still write on the file system holding `path` (or its nearest existing parent)."""
    folder = Path(path).absolute()
    while not folder.exists() and folder != folder.parent:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def folder_bytes(path: str | Path) -> int:
    """Total size of the files under `path` (0 when it does not exist)."""
    root = Path(path)
    if not root.is_dir():
        return 0
    return sum(f.stat().st_size for f in root.rglob("*") if f.is_file())


def is_out_of_space(exc: BaseException, folder: str | Path) -> bool:
    """Whether a failed write into `folder` failed because its file system (or the user's quota) is full.

    An `OSError` says so by its errno. torch.save and safetensors do not raise OSErrors: safetensors names
    the OS error in its message, torch's zip writer only reports an "unexpected pos"; for those the file
    system's free space right after the failure decides.
    """
    chain: BaseException | None = exc
    while chain is not None:
        if isinstance(chain, OSError) and chain.errno in OUT_OF_SPACE_ERRNOS:
            return True
        if any(word in str(chain).lower() for word in _OUT_OF_SPACE_WORDS):
            return True
        chain = chain.__cause__ or chain.__context__
    try:
        return free_bytes(folder) < LOW_SPACE_BYTES
    except OSError:
        return False


def human_bytes(count: float) -> str:
    """`count` bytes in binary units: "512 B", "485.4 KiB", "1.2 GiB"."""
    value = float(count)
    for unit in _UNITS:
        if abs(value) < 1024 or unit == _UNITS[-1]:
            break
        value /= 1024
    return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
