"""Build a surrogate folder from a target LLM's folder by streaming its safetensors checkpoint.

`build_surrogate(target, cut, out)` writes an ordinary Hugging Face folder: the surrogate's weights
(target layers 0..K-1, the translator copied from layer K, the last layer, embeddings, final norm
and LM head, bit for bit), its config.json (with an `mmtrain_surrogate` record of where it came
from and the sha256 of every file written) and the target's tokenizer and other small files.
Tensors are copied one by one through a fixed buffer, so memory does not grow with the target.
The folder is built under a hidden staging name next to `out` and renamed into place at the end;
on any error the staging folder is removed.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
import shutil
import tempfile
import time
from dataclasses import dataclass
from decimal import Decimal
from pathlib import Path
from typing import Any

from mmtrain.methods.grafting.layout import (
    EMBEDDINGS,
    SurrogateBuildError,
    check_cut,
    check_model_type,
    check_tensor_names,
    layer_map,
    num_layers,
    split_layer_name,
    surrogate_config,
    surrogate_name,
)
from mmtrain.methods.grafting.stream import (
    CHUNK_BYTES,
    TensorEntry,
    WrittenFile,
    copy_file,
    plan_shards,
    read_header,
    write_bytes,
    write_safetensors,
)

__all__ = ["SurrogateBuildError", "SurrogateInfo", "build_surrogate", "checkpoint_tensors", "parse_size"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".gguf", ".onnx", ".index.json")
NOT_COPIED = ("config.json", "asset.json")
SIZE_UNITS = {"": 1, "B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
              "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40}
SIZE_RE = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([A-Za-z]*)\s*$")


@dataclass(frozen=True)
class SurrogateInfo:
    """What `build_surrogate` wrote."""

    out: Path
    target: Path
    cut: int
    target_num_layers: int
    num_layers: int
    layer_map: dict[int, int]
    weight_files: list[str]
    files: dict[str, str]
    bytes_read: int
    bytes_written: int
    largest_tensor_bytes: int
    buffer_bytes: int
    seconds: float

    def summary(self) -> str:
        kept = f"layers 0..{self.cut - 1}" if self.cut > 1 else "layer 0"
        dropped = self.target_num_layers - self.num_layers
        others = sorted(set(self.files) - set(self.weight_files) - {INDEX_NAME})
        return "\n".join([
            f"surrogate of {self.target} (L={self.target_num_layers} layers), cut K={self.cut} -> {self.out}",
            f"  {self.num_layers} layers: {kept} kept, translator = copy of layer {self.cut}, "
            f"last = layer {self.target_num_layers - 1} ({dropped} dropped)",
            f"  weights: {len(self.weight_files)} file(s), {_human(self.bytes_read)} of tensors copied "
            f"(largest {_human(self.largest_tensor_bytes)}) through a {self.buffer_bytes / 2**20:g} MiB buffer",
            f"  also: config.json{''.join(', ' + name for name in others)}",
            f"  {_human(self.bytes_written)} written in {self.seconds:.1f} s",
        ])


def _human(nbytes: int) -> str:
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.2f} {unit}"
    return f"{nbytes} B"


def parse_size(text: str | int) -> int:
    """Bytes in a size such as "2GB" (10^9), "500MB", "1.5GiB" (2^30) or "123" (bytes)."""
    if isinstance(text, int) and not isinstance(text, bool):
        value, unit = text, ""
    else:
        match = SIZE_RE.match(str(text))
        if not match or match.group(2).upper() not in SIZE_UNITS:
            raise SurrogateBuildError(f"cannot read {text!r} as a size: use a number of bytes or a number with "
                                      "a unit, one of KB, MB, GB, TB (powers of 10) or KiB, MiB, GiB, TiB "
                                      "(powers of 2), e.g. 2GB or 1.5GiB")
        value, unit = Decimal(match.group(1)), match.group(2).upper()
    size = int(value * SIZE_UNITS[unit])
    if size < 1:
        raise SurrogateBuildError(f"a size must be at least one byte, got {text!r}")
    return size


@dataclass(frozen=True)
class _Target:
    folder: Path
    config: dict[str, Any]
    config_sha256: str
    index_sha256: str
    tensors: dict[str, TensorEntry]


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _read_json(path: Path, what: str) -> tuple[Any, bytes]:
    data = path.read_bytes()
    try:
        return json.loads(data), data
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise SurrogateBuildError(f"{what} {path} is not valid JSON ({exc})") from None


def _load_target(folder: Path) -> _Target:
    if not folder.is_dir():
        raise SurrogateBuildError(f"the target folder {folder} does not exist")
    if not (folder / "config.json").is_file():
        raise SurrogateBuildError(f"the target folder {folder} has no config.json")
    config, config_bytes = _read_json(folder / "config.json", "the target's config")
    if not isinstance(config, dict):
        raise SurrogateBuildError(f"{folder / 'config.json'} is not a JSON object")
    check_model_type(config)
    if (folder / INDEX_NAME).is_file():
        tensors, index_sha256 = _load_sharded(folder)
    elif (folder / SINGLE_NAME).is_file():
        header = read_header(folder / SINGLE_NAME)
        tensors, index_sha256 = header.tensors, _sha256(header.raw)
    else:
        found = ", ".join(sorted(p.name for p in folder.iterdir())) or "nothing"
        raise SurrogateBuildError(f"the target folder {folder} has neither {INDEX_NAME} nor {SINGLE_NAME} "
                                  f"(found: {found}); only safetensors checkpoints are supported")
    return _Target(folder, config, _sha256(config_bytes), index_sha256, tensors)


def checkpoint_tensors(folder: str | Path) -> dict[str, TensorEntry]:
    """Name -> dtype/shape/location of every tensor of a model folder's safetensors checkpoint (headers only)."""
    return _load_target(Path(folder)).tensors


def _load_sharded(folder: Path) -> tuple[dict[str, TensorEntry], str]:
    index, data = _read_json(folder / INDEX_NAME, "the checkpoint index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not weight_map:
        raise SurrogateBuildError(f"{folder / INDEX_NAME} has no weight_map")
    shards = sorted(set(weight_map.values()))
    missing = [name for name in shards if not (folder / name).is_file()]
    if missing:
        raise SurrogateBuildError(f"{folder / INDEX_NAME} names shard(s) missing from {folder}: {', '.join(missing)}")
    headers = {name: read_header(folder / name).tensors for name in shards}
    tensors = {}
    for tensor, shard in weight_map.items():
        if tensor not in headers[shard]:
            raise SurrogateBuildError(f"{folder / INDEX_NAME} puts {tensor} in {shard}, whose header lacks it")
        tensors[tensor] = headers[shard][tensor]
    return tensors, _sha256(data)


def _output_tensors(tensors: dict[str, TensorEntry], total: int, cut: int) -> list[tuple[str, TensorEntry]]:
    """(surrogate name, source) for every kept tensor: embeddings, layers in order, then the rest."""
    to_surrogate = {target: index for index, target in layer_map(total, cut).items()}
    renamed = [(new, src) for name, src in tensors.items() if (new := surrogate_name(name, to_surrogate)) is not None]
    return sorted(renamed, key=lambda item: _order_key(item[0]))


def _order_key(name: str) -> tuple[int, int, str]:
    split = split_layer_name(name)
    if split is not None:
        return (1, split[0], split[1])
    return (0 if name == EMBEDDINGS else 2, 0, name)


def _write_weights(staging: Path, tensors: list[tuple[str, TensorEntry]], max_shard_bytes: int,
                   buffer: bytearray) -> list[WrittenFile]:
    shards = plan_shards(tensors, max_shard_bytes)
    if len(shards) == 1:
        return [write_safetensors(staging / SINGLE_NAME, shards[0], buffer)]
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    written = [write_safetensors(staging / name, shard, buffer) for name, shard in zip(names, shards)]
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor, _ in shard}
    index = {
        "metadata": {"total_size": sum(src.nbytes for _, src in tensors),
                     "total_parameters": sum(math.prod(src.shape) for _, src in tensors)},
        "weight_map": dict(sorted(weight_map.items())),
    }
    written.append(write_bytes(staging / INDEX_NAME, (json.dumps(index, indent=2) + "\n").encode()))
    return written


def _copy_small_files(target: Path, staging: Path, buffer: bytearray) -> list[WrittenFile]:
    """Every regular file of the target but its weights, config.json and asset.json (subfolders skipped)."""
    names = sorted(p.name for p in target.iterdir()
                   if p.is_file() and p.name not in NOT_COPIED and not p.name.endswith(WEIGHT_SUFFIXES))
    return [copy_file(target / name, staging / name, buffer) for name in names]


def _config_bytes(target: _Target, cut: int, files: list[WrittenFile]) -> bytes:
    total = num_layers(target.config)
    config = surrogate_config(target.config, cut)
    config["mmtrain_surrogate"] = {
        "target": str(target.folder),
        "target_num_layers": total,
        "cut": cut,
        "translator_layer": cut,
        "layer_map": {str(s): t for s, t in layer_map(total, cut).items()},
        "target_config_sha256": target.config_sha256,
        "target_index_sha256": target.index_sha256,
        "files": {f.path.name: f.sha256 for f in files},
    }
    return (json.dumps(config, indent=2, sort_keys=True) + "\n").encode()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def build_surrogate(target: str | Path, cut: int, out: str | Path, max_shard_bytes: int = 2 * 10**9,
                    chunk_bytes: int = CHUNK_BYTES) -> SurrogateInfo:
    """Build the surrogate of the target folder for cut K=`cut` as a new folder `out`.

    Weight shards hold at most `max_shard_bytes` of tensor data each (one bigger tensor gets a shard
    of its own); tensors are copied through a `chunk_bytes` buffer. Raises SurrogateBuildError, also
    for file-system errors (a missing permission, a full disk).
    """
    start = time.monotonic()
    out = Path(out).absolute()
    if out.exists() or out.is_symlink():
        raise SurrogateBuildError(f"the output folder {out} exists already; choose a new one or remove it")
    if max_shard_bytes < 1 or chunk_bytes < 1:
        raise SurrogateBuildError("max_shard_bytes and chunk_bytes must be positive")
    try:
        source = _load_target(Path(target).resolve())
        total = num_layers(source.config)
        check_cut(cut, total)
        check_tensor_names(list(source.tensors), total, bool(source.config.get("tie_word_embeddings", False)))
        tensors = _output_tensors(source.tensors, total, cut)
        files = _build_in_staging(source, cut, tensors, out, max_shard_bytes, chunk_bytes)
    except OSError as exc:
        raise SurrogateBuildError(f"building {out} failed: {exc}") from exc
    weight_files = [name for name in files if name.endswith(".safetensors")]
    return SurrogateInfo(
        out=out, target=source.folder, cut=cut, target_num_layers=total, num_layers=cut + 2,
        layer_map=layer_map(total, cut), weight_files=weight_files,
        files={name: f.sha256 for name, f in files.items() if name != "config.json"},
        bytes_read=sum(src.nbytes for _, src in tensors), bytes_written=sum(f.size for f in files.values()),
        largest_tensor_bytes=max(src.nbytes for _, src in tensors), buffer_bytes=chunk_bytes,
        seconds=time.monotonic() - start)


def _build_in_staging(source: _Target, cut: int, tensors: list[tuple[str, TensorEntry]], out: Path,
                      max_shard_bytes: int, chunk_bytes: int) -> dict[str, WrittenFile]:
    """Write the surrogate into a hidden folder next to `out`, then rename it to `out`; name -> file written."""
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.partial-{os.getpid()}-", dir=out.parent))
    try:
        os.chmod(staging, 0o777 & ~_umask())
        buffer = bytearray(chunk_bytes)
        files = _write_weights(staging, tensors, max_shard_bytes, buffer)
        files += _copy_small_files(source.folder, staging, buffer)
        files.append(write_bytes(staging / "config.json", _config_bytes(source, cut, files)))
        _fsync_dir(staging)
        if out.exists() or out.is_symlink():
            raise SurrogateBuildError(f"the output folder {out} appeared while the surrogate was being built")
        os.rename(staging, out)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    _fsync_dir(out.parent)
    return {f.path.name: f for f in files}


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask
