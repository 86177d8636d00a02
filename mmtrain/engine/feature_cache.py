"""The frozen-tower feature cache (`data.feature_cache`): its key, and filling it before training.

A frozen tower gives every image the same output in every step, stage and experiment arm, so it is
computed once: the images the cache lacks are split across ranks, run through the tower (the
engine's, so ZeRO-3 gathers its weights; every rank runs the same number of forwards), written as
shards, and the datasets then read features instead of decoding images. The cache folder is
`<data.feature_cache>/<key>/`; the key hashes the tower's weights and buffers (as loaded, inherited
weights included), its image transform, the feature selection (`feature_layer`, `drop_cls`,
`cls_every`, `image_size`) and the dtype, so any change to them uses another folder: never stale
features.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from mmtrain.config.errors import ConfigError
from mmtrain.config.schema import VisionConfig
from mmtrain.data import BadSampleError, VLMDataset
from mmtrain.data.feature_store import FeatureStore, image_key

log = logging.getLogger("mmtrain")
SHARD_BYTES = 512 << 20


def frozen_split(vision: nn.Module, cfg: VisionConfig) -> int | None:
    """Where the frozen part of the tower ends: None when all of it is frozen (the cache holds its output),
    else the first trainable block (`trainable_top_k`: the cache holds that block's input)."""
    trainable = [name for name, p in vision.named_parameters() if p.requires_grad]
    if not trainable:
        return None
    blocks = vision.blocks() if cfg.trainable_top_k else []
    start = len(blocks) - cfg.trainable_top_k
    top = {id(p) for block in blocks[start:] for p in block.parameters()}
    outside = [name for name, p in vision.named_parameters() if p.requires_grad and id(p) not in top]
    if not cfg.trainable_top_k or outside:
        raise ConfigError(f"data.feature_cache needs a frozen vision tower, or frozen bottom blocks below "
                          f"model.vision.trainable_top_k, but {(outside or trainable)[0]} trains: set "
                          "model.vision.trainable: frozen (no vision adapter), or data.feature_cache: null")
    if start >= vision.feature_block():
        return None  # the features come from below the trainable blocks: they do not change them
    return start


def tower_weights_hash(vision: nn.Module) -> str:
    """A hash of the tower's frozen parameters and its buffers, by name (gathered first when ZeRO-3
    partitions them). Trainable top blocks are left out: their output is not what the cache holds."""
    params = list(vision.parameters())
    gather: contextlib.AbstractContextManager = contextlib.nullcontext()
    if any(hasattr(p, "ds_id") for p in params):
        import deepspeed  # heavy; only under ZeRO-3

        gather = deepspeed.zero.GatheredParameters(params)
    digest = hashlib.blake2b(digest_size=16)
    with gather:
        frozen = [(name, p) for name, p in vision.named_parameters() if not p.requires_grad]
        tensors = sorted([*frozen, *vision.named_buffers()], key=lambda item: item[0])
        for name, tensor in tensors:
            data = tensor.detach().cpu().contiguous().reshape(-1)
            digest.update(f"{name}:{data.dtype}:{tuple(tensor.shape)};".encode())
            digest.update(data.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key_info(vision: nn.Module, cfg: VisionConfig, start: int | None, device: torch.device) -> dict[str, Any]:
    """What the cached features depend on (written into the folder's index for people to read).
    Collective under ZeRO-3 (it gathers the tower, and probes the split tower's output shape)."""
    processor = getattr(vision, "processor", None)
    transform = processor.to_json_string() if processor is not None else f"{type(vision).__name__}{vision.image_shape}"
    dtype = next(vision.parameters()).dtype
    info = {"tower": type(vision).__name__, "weights": tower_weights_hash(vision),
            "transform": hashlib.blake2b(transform.encode(), digest_size=16).hexdigest(),
            "image_shape": list(vision.image_shape), "dtype": str(dtype)}
    if start is None:
        return {**info, "feature_layer": cfg.feature_layer, "drop_cls": cfg.drop_cls, "cls_every": cfg.cls_every,
                "output_of": "tower", "shape": [vision.num_tokens, vision.out_dim]}
    with torch.no_grad(), _eval_mode(vision):
        probe = _frozen_part(vision, start)(torch.zeros(1, *vision.image_shape, device=device, dtype=dtype))
    return {**info, "output_of": f"block input {start}", "shape": list(probe.shape[1:])}


def _frozen_part(vision: nn.Module, start: int | None):
    """The function the cache stores the output of."""
    return vision if start is None else (lambda pixels: vision.bottom(pixels, start))


def cache_folder(root: str | Path, info: dict[str, Any]) -> Path:
    return Path(root) / hashlib.blake2b(json.dumps(info, sort_keys=True).encode(), digest_size=12).hexdigest()


def sample_image_keys(dataset: VLMDataset) -> list[str | None]:
    """Each sample's image key (None: text-only, or an unreadable file under data.bad_samples=skip)."""
    keys: list[str | None] = []
    for sample in dataset.samples:
        if sample.image is None:
            keys.append(None)
            continue
        try:
            keys.append(image_key(sample.image))
        except OSError as error:
            if dataset.bad_samples == "error":
                raise BadSampleError(sample.manifest, sample.line, f"cannot read image {sample.image}: "
                                     f"{error.strerror or error}") from None
            keys.append(None)
    return keys


def prepare_feature_cache(root: str | Path, model: nn.Module, vision_cfg: VisionConfig, datasets: list[VLMDataset],
                          batch_size: int, device: torch.device) -> FeatureStore:
    """Fill the cache with what `datasets` need (collective: every rank calls it), point them at it,
    and tell the VLM where cached features enter its tower.

    Returns:
        The store; ``computed`` (images this call ran through the tower, all ranks) is set on it.
    """
    vision = model.vision
    start = frozen_split(vision, vision_cfg)
    started = time.perf_counter()
    info = cache_key_info(vision, vision_cfg, start, device)
    store = FeatureStore(cache_folder(root, info), info)
    rank, world = dist.get_rank(), dist.get_world_size()
    keys = [sample_image_keys(dataset) for dataset in datasets]
    wanted: dict[str, tuple[int, int]] = {}
    for d, dataset_keys in enumerate(keys):
        for index, key in enumerate(dataset_keys):
            if key is not None:
                wanted.setdefault(key, (d, index))
    view = [sorted(set(wanted) - set(store.load()))] if rank == 0 else [None]
    dist.broadcast_object_list(view, src=0)  # one view of what is missing: equal forwards on every rank
    missing: list[str] = view[0]
    if missing:
        log.info("feature cache %s: computing %d of %d images on %d rank(s)", store.folder, len(missing),
                 len(wanted), world)
    entries = _compute(store, vision, start, datasets, [(key, wanted[key]) for key in missing[rank::world]],
                       math.ceil(len(missing) / world / batch_size), batch_size, device, tuple(info["shape"]))
    gathered: list[Any] = [None] * world
    dist.all_gather_object(gathered, entries)
    if rank == 0 and (missing or store.damaged):
        store.commit([entry for rank_entries in gathered for entry in rank_entries])
    dist.barrier()
    rows = store.load()
    shape, dtype = tuple(info["shape"]), next(vision.parameters()).dtype
    for dataset, dataset_keys in zip(datasets, keys):
        served = [key if key in rows else None for key in dataset_keys]
        dataset.use_features(store, served, shape, dtype)
    model.reads_cached_features, model.cached_from_block = True, start
    store.computed = len(missing)
    log.info("feature cache %s: %d images ready (%d computed) in %.1f s", store.folder, len(wanted), len(missing),
             time.perf_counter() - started)
    return store


@contextlib.contextmanager
def _eval_mode(module: nn.Module):
    """Frozen means no dropout and untouched BatchNorm statistics, as in training."""
    was_training = module.training
    module.eval()
    try:
        yield
    finally:
        module.train(was_training)


def _compute(store: FeatureStore, vision: nn.Module, start: int | None, datasets: list[VLMDataset],
             todo: list[tuple[str, tuple[int, int]]], num_batches: int, batch_size: int, device: torch.device,
             feature_shape: tuple[int, ...]) -> list[dict[str, Any]]:
    """This rank's share: `num_batches` forwards of the frozen part (padding ones once `todo` runs out,
    so that ZeRO-3's gathers line up), written as shards of at most SHARD_BYTES."""
    dtype = next(vision.parameters()).dtype
    frozen_part = _frozen_part(vision, start)
    per_shard = max(1, SHARD_BYTES // (math.prod(feature_shape) * torch.finfo(dtype).bits // 8))
    entries: list[dict[str, Any]] = []
    pending_keys: list[str] = []
    pending: list[torch.Tensor] = []
    with _eval_mode(vision):
        for b in range(num_batches):
            batch_keys, pixels = [], []
            for key, (d, index) in todo[b * batch_size:(b + 1) * batch_size]:
                try:
                    picture = datasets[d].load_picture(index)
                except BadSampleError:
                    if datasets[d].bad_samples == "error":
                        raise
                    continue  # not cached: the dataset skips the sample when it is drawn
                batch_keys.append(key)
                pixels.append(datasets[d].image_transform(picture))
            inputs = torch.stack(pixels) if pixels else torch.zeros(1, *vision.image_shape)
            with torch.no_grad():
                features = frozen_part(inputs.to(device=device, dtype=dtype))
            if batch_keys:
                pending_keys += batch_keys
                pending.append(features.detach().cpu())
            if len(pending_keys) >= per_shard or (b == num_batches - 1 and pending_keys):
                entries.append(store.write_shard(pending_keys, torch.cat(pending)))
                pending_keys, pending = [], []
    return entries
