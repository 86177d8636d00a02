"""Input-embedding tables of language models, read without building the model.

From a checkpoint folder, only the one tensor is read (single or sharded safetensors), found by
its usual Hugging Face names or by name and shape. From a live model, the table is gathered when ZeRO-3 has
partitioned it, so every rank gets the full table.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from torch import nn

from mmtrain.errors import UserError


class EmbeddingReadError(UserError, ValueError):
    """The embedding table could not be read from an LLM folder; the message says why."""


# Where Hugging Face architectures keep the input embedding, most common first.
KNOWN_NAMES = ("model.embed_tokens.weight", "model.language_model.embed_tokens.weight", "shared.weight",
               "model.shared.weight", "encoder.embed_tokens.weight", "model.decoder.embed_tokens.weight",
               "transformer.wte.weight", "gpt_neox.embed_in.weight", "transformer.word_embeddings.weight",
               "embed_tokens.weight")
TIED_HEAD_NAME = "lm_head.weight"


def _tensor_files(folder: Path) -> dict[str, Path]:
    """Tensor name -> safetensors file holding it, for a single-file or sharded checkpoint."""
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        return {name: folder / file for name, file in weight_map.items()}
    single = folder / "model.safetensors"
    if not single.is_file():
        raise EmbeddingReadError(f"{folder}: no model.safetensors or model.safetensors.index.json; the word "
                                 "converter reads embedding tables from safetensors checkpoints only")
    with safe_open(str(single), framework="pt") as handle:
        return {name: single for name in handle.keys()}


def read_embedding_table(folder: str | Path) -> torch.Tensor:
    """The [vocab, width] input-embedding table of the LLM in `folder`, as float32.

    Only that tensor is read. It is found by name (the usual Hugging Face names; with tied embeddings,
    `lm_head.weight` when the checkpoint stores the shared matrix under that name only, as
    transformers 5 saves SmolLM2), else as the one tensor named like an embedding with shape [vocab_size, hidden_size] from the folder's config.json.
    No model is built: this also runs while ZeRO-3 construction hooks are active.

    Raises:
        EmbeddingReadError: no safetensors checkpoint in the folder, or no such tensor in it.
    """
    folder = Path(folder)
    files = _tensor_files(folder)
    config = json.loads((folder / "config.json").read_text()) if (folder / "config.json").is_file() else {}
    name = next((n for n in KNOWN_NAMES if n in files), None)
    if name is None and config.get("tie_word_embeddings", True) and TIED_HEAD_NAME in files:
        name = TIED_HEAD_NAME  # a tied checkpoint may store the shared matrix under the head's name only
    if name is None:
        width = config.get("hidden_size", config.get("d_model", config.get("n_embd")))
        candidates = []
        for candidate, path in files.items():
            lowered = candidate.lower()
            if ("embed" in lowered or "wte" in lowered) and "position" not in lowered and "lm_head" not in lowered:
                with safe_open(str(path), framework="pt") as handle:
                    shape = handle.get_slice(candidate).get_shape()
                if len(shape) == 2 and (width is None or shape[1] == width) and shape[0] >= config.get("vocab_size", 0):
                    candidates.append(candidate)
        if len(candidates) != 1:
            found = ", ".join(candidates) or "none"
            raise EmbeddingReadError(f"{folder}: cannot tell which tensor is the input embedding (candidates: "
                                     f"{found}); expected one of {', '.join(KNOWN_NAMES[:3])}, ...")
        name = candidates[0]
    with safe_open(str(files[name]), framework="pt") as handle:
        return handle.get_tensor(name).float()


@torch.no_grad()
def gathered_embedding_table(embedding: nn.Embedding) -> torch.Tensor:
    """A full float32 CPU copy of `embedding.weight`, gathered first when ZeRO-3 partitioned it.

    Collective under ZeRO-3: every rank must call it.
    """
    weight = embedding.weight
    if hasattr(weight, "ds_id"):
        # heavy; imported where used, once the accelerator is chosen
        import deepspeed

        with deepspeed.zero.GatheredParameters([weight], modifier_rank=None):
            return weight.detach().float().cpu().clone()
    return weight.detach().float().cpu().clone()
