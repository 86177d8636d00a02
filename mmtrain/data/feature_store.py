"""A folder of cached frozen-tower outputs: safetensors shards plus an index from image to (shard, row).

One folder per cache key (the tower's weights, image transform and feature layer: see
`mmtrain.engine.feature_cache`). Shards are written whole and renamed into place, and the index
records each shard's size: a truncated or missing shard is dropped on reading (its images count as
missing and are computed again), never read. Rows are read memory-mapped, one image at a time, so
DataLoader workers share the page cache instead of copies. Several jobs may fill one folder at once:
index updates merge under a file lock; at worst two jobs compute the same images.
"""

from __future__ import annotations

import fcntl
import json
import logging
import uuid
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from mmtrain.utils.io import atomic_write_json, file_digest

log = logging.getLogger(__name__)
INDEX_FILE = "index.json"
FEATURES = "features"


def image_key(path: str | Path) -> str:
    """An image's cache key: the hash of its file's bytes (the same picture under another path is a hit)."""
    return file_digest(path, "blake2b", digest_size=16)


class FeatureStore:
    """The shards of one cache key's folder; `rows` maps image key -> (shard file, row)."""

    def __init__(self, folder: str | Path, info: dict[str, Any] | None = None) -> None:
        self.folder = Path(folder)
        self.info = info or {}
        self.rows: dict[str, tuple[str, int]] = {}
        self.damaged: list[str] = []
        self.computed = 0  # images the last fill ran through the tower
        self._handles: dict[str, Any] = {}

    # ------------------------------------------------------------ reading
    def load(self) -> dict[str, tuple[str, int]]:
        """Read the index, dropping shards that are missing, truncated or unreadable; returns `rows`."""
        self.rows, self.damaged = {}, []
        index = self._read_index()
        for name, shard in index.get("shards", {}).items():
            problem = self._shard_problem(name, shard)
            if problem:
                self.damaged.append(name)
                log.warning("feature cache %s: shard %s %s; its %d images will be computed again",
                            self.folder, name, problem, len(shard["keys"]))
                continue
            for row, key in enumerate(shard["keys"]):
                self.rows[key] = (name, row)
        return self.rows

    def _read_index(self) -> dict[str, Any]:
        path = self.folder / INDEX_FILE
        if not path.is_file():
            return {}
        try:
            return json.loads(path.read_text())
        except (OSError, ValueError) as error:
            log.warning("feature cache %s: unreadable index (%s); every image will be computed again", self.folder, error)
            return {}

    def _shard_problem(self, name: str, shard: dict[str, Any]) -> str | None:
        path = self.folder / name
        if not path.is_file():
            return "is missing"
        if path.stat().st_size != shard.get("bytes"):
            return f"has {path.stat().st_size} bytes, not the {shard.get('bytes')} written (truncated)"
        try:
            with safe_open(str(path), framework="pt") as handle:
                rows = handle.get_slice(FEATURES).get_shape()[0]
        except Exception as error:  # noqa: BLE001 (safetensors raises several types on damaged files)
            return f"is unreadable ({error})"
        if rows != len(shard["keys"]):
            return f"holds {rows} rows for {len(shard['keys'])} images"
        return None

    def get(self, key: str) -> torch.Tensor:
        """The features of one image ([T, D]), read from its shard's memory map."""
        name, row = self.rows[key]
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = safe_open(str(self.folder / name), framework="pt")
        return handle.get_slice(FEATURES)[row]

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_handles": {}}  # workers open their own memory maps

    # ------------------------------------------------------------ writing
    def write_shard(self, keys: list[str], features: torch.Tensor) -> dict[str, Any]:
        """Write one shard (temporary name, then renamed); returns its index entry, not yet committed."""
        if len(keys) != features.shape[0]:
            raise ValueError(f"{len(keys)} image keys for {features.shape[0]} feature rows")
        self.folder.mkdir(parents=True, exist_ok=True)
        name = f"shard-{uuid.uuid4().hex[:16]}.safetensors"
        temporary = self.folder / f".{name}.tmp"
        save_file({FEATURES: features.contiguous()}, str(temporary))
        temporary.rename(self.folder / name)
        return {"name": name, "bytes": (self.folder / name).stat().st_size, "keys": list(keys)}

    def commit(self, entries: Iterable[dict[str, Any]]) -> None:
        """Add written shards to the index, and remove the damaged ones `load` found (merged under a
        lock with other jobs' changes)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        with open(self.folder / ".lock", "w") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            index = self._read_index()
            shards = index.get("shards", {})
            for name in self.damaged:
                if name in shards and self._shard_problem(name, shards[name]):
                    del shards[name]
                    (self.folder / name).unlink(missing_ok=True)
            for entry in entries:
                shards[entry["name"]] = {"bytes": entry["bytes"], "keys": entry["keys"]}
            atomic_write_json(self.folder / INDEX_FILE, {"key": self.info, "shards": shards})
