"""The training dataset: samples from a manifest loaded as tensors, with a bad-sample policy.

With ``bad_samples="error"`` the first unusable sample stops training with an
error naming its manifest line. With ``"skip"`` it is recorded (skip log and
warning) and the next usable sample is returned in its place, so batch shapes
never change.
"""

from __future__ import annotations

import json
import logging
import random
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset

from mmtrain.data.errors import BadSampleError
from mmtrain.data.images import ImageLoadError, load_image
from mmtrain.data.manifest import Sample, read_manifest
from mmtrain.data.templates import Encoded, PromptTemplate, TokenizerLike, get_template
from mmtrain.utils.io import append_line

logger = logging.getLogger(__name__)

BAD_SAMPLE_POLICIES: tuple[str, ...] = ("error", "skip")
# Beyond this many skips per process, details go to the skip log only.
_MAX_SKIP_WARNINGS = 20


def random_subset(samples: list[Sample], size: int, seed: int, manifest: str | Path = "the manifest") -> list[Sample]:
    """`size` samples drawn without replacement with `seed`, kept in manifest order."""
    if not 0 < size <= len(samples):
        raise ValueError(f"a subset of {size} samples of {manifest} is impossible: it holds {len(samples)}; "
                         "set data.train_samples / data.val_samples between 1 and that (or null for all)")
    chosen = sorted(random.Random(seed).sample(range(len(samples)), size))
    return [samples[i] for i in chosen]


class VLMDataset(Dataset[dict[str, Any]]):
    """Image-text samples encoded with a prompt template.

    Items are dicts with ``input_ids`` (LongTensor [T]), ``labels``
    (LongTensor [T]), ``image_mask`` (BoolTensor [T]), ``pixel_values``
    (FloatTensor ``image_shape``, zeros for text-only samples) and
    ``has_image`` (bool).

    Attributes:
        skipped: Distinct bad samples this process has skipped.
    """

    def __init__(
        self,
        samples: list[Sample],
        tokenizer: TokenizerLike,
        image_transform: Callable[[Image.Image], torch.Tensor],
        image_shape: tuple[int, int, int],
        template: PromptTemplate,
        num_image_tokens: int,
        max_length: int,
        bad_samples: str = "error",
        skip_log: Path | None = None,
        no_image_text: str | None = None,
    ) -> None:
        """Creates the dataset.

        Args:
            samples: Samples from read_manifest.
            tokenizer: The language model's tokenizer.
            image_transform: Turns an RGB image into a tensor of ``image_shape``.
            image_shape: Shape of ``pixel_values``, e.g. ``(3, 224, 224)``.
            template: How samples become token sequences.
            num_image_tokens: Sequence positions an image takes.
            max_length: Longest allowed encoded sample, in tokens.
            bad_samples: ``"error"`` or ``"skip"``.
            skip_log: JSONL file that receives one line per skipped sample.
            no_image_text: Text standing where the image would, in samples without one.

        Raises:
            ValueError: Unknown ``bad_samples`` policy, no samples, or a
                non-positive ``max_length``.
        """
        if bad_samples not in BAD_SAMPLE_POLICIES:
            raise ValueError(
                f"data.bad_samples must be one of {', '.join(BAD_SAMPLE_POLICIES)}, got {bad_samples!r}"
            )
        if not samples:
            raise ValueError("the dataset has no samples")
        if max_length <= 0:
            raise ValueError(f"data.max_length must be positive, got {max_length}")
        if num_image_tokens < 0:
            raise ValueError(f"num_image_tokens must not be negative, got {num_image_tokens}")
        self.samples = samples
        self.tokenizer = tokenizer
        self.image_transform = image_transform
        self.image_shape = tuple(image_shape)
        self.template = template
        self.no_image_text = no_image_text
        self.num_image_tokens = num_image_tokens
        self.max_length = max_length
        self.bad_samples = bad_samples
        self.skip_log = Path(skip_log) if skip_log is not None else None
        self.skipped = 0
        self._known_bad: set[int] = set()
        self.features: Any = None  # a FeatureStore once `use_features` is called
        self.feature_keys: list[str | None] = []
        self.feature_shape: tuple[int, ...] = ()
        self.feature_dtype = torch.float32

    def use_features(self, store: Any, keys: list[str | None], shape: tuple[int, ...], dtype: torch.dtype) -> None:
        """Serve the frozen tower's cached outputs (``image_features`` [T, D]) instead of decoding images.

        Args:
            store: a FeatureStore holding every image of this dataset.
            keys: each sample's image key in the store (None for text-only samples).
            shape, dtype: of one image's features (text-only samples get zeros of them).
        """
        if len(keys) != len(self.samples):
            raise ValueError(f"{len(keys)} feature keys for {len(self.samples)} samples")
        self.features, self.feature_keys, self.feature_shape, self.feature_dtype = store, keys, tuple(shape), dtype

    @classmethod
    def for_model(cls, manifest: str | Path | list[str | Path], model: Any, tokenizer: TokenizerLike, data_cfg: Any,
                  skip_log: Path | None = None, subset: int | None = None, seed: int = 0) -> "VLMDataset":
        """The dataset of `manifest` wired to a VLM's image transform and visual-token count.

        Args:
            manifest: one manifest, or several whose samples are concatenated in order (a mixture,
                e.g. image-text and text-only; the sampler shuffles them together).
            model: a VisionLanguageModel (uses `vision.image_transform`, `vision.image_shape`,
                `num_image_tokens`).
            data_cfg: the run config's `data` section (template, max_length, bad_samples).
            subset: keep a seeded random subset of this many samples (in manifest order).
        """
        manifests = manifest if isinstance(manifest, list) else [manifest]
        image_root = getattr(data_cfg, "image_root", None)
        samples = [sample for path in manifests for sample in read_manifest(path, image_root)]
        if subset is not None:
            samples = random_subset(samples, subset, seed, ", ".join(str(m) for m in manifests))
        return cls(samples, tokenizer, model.vision.image_transform, tuple(model.vision.image_shape),
                   get_template(data_cfg.template), model.num_image_tokens, data_cfg.max_length,
                   bad_samples=data_cfg.bad_samples, skip_log=skip_log, no_image_text=data_cfg.no_image_text)

    def __len__(self) -> int:
        return len(self.samples)

    def token_lengths(self) -> list[int]:
        """Every sample's encoded length in tokens (image tokens included), without loading images:
        what grouping by length and packing plan with."""
        return [len(self.template.encode(sample, self.tokenizer, self.num_image_tokens,
                                         no_image_text=self.no_image_text)) for sample in self.samples]

    def image_flags(self) -> list[bool]:
        """Whether each sample has an image (grouping by modality)."""
        return [sample.image is not None for sample in self.samples]

    def __getitem__(self, index: int) -> dict[str, Any]:
        """Loads sample ``index``, or under the skip policy the next usable one.

        Raises:
            BadSampleError: The sample is unusable and the policy is
                ``"error"``, or every sample of the dataset is unusable.
        """
        count = len(self.samples)
        for step in range(count):
            current = (index + step) % count
            if current in self._known_bad:
                continue
            try:
                return self.load(current)
            except BadSampleError as error:
                if self.bad_samples == "error":
                    raise
                self._known_bad.add(current)
                self._record_skip(error)
        first = self.samples[index % count]
        raise BadSampleError(
            first.manifest, first.line,
            f"every one of the {count} samples is unusable, nothing left to train on"
            + (f" (reasons in {self.skip_log})" if self.skip_log else ""),
            hint="fix the data",
        )

    def load(self, index: int) -> dict[str, Any]:
        """Loads sample ``index`` without the skip policy.

        Raises:
            BadSampleError: The sample is unusable.
        """
        sample = self.samples[index]
        encoded = self.template.encode(sample, self.tokenizer, self.num_image_tokens,
                                       no_image_text=self.no_image_text)
        self._check_length(sample, encoded)
        if self.features is not None:
            image = {"image_features": self._cached_features(index)}
        elif sample.image is None:
            image = {"pixel_values": torch.zeros(self.image_shape, dtype=torch.float32)}
        else:
            pixel_values = self.image_transform(self.load_picture(index))
            if tuple(pixel_values.shape) != self.image_shape:
                raise RuntimeError(
                    f"the image transform returned shape {tuple(pixel_values.shape)}, "
                    f"expected {self.image_shape}"
                )
            image = {"pixel_values": pixel_values.to(torch.float32)}
        return {
            "input_ids": torch.tensor(encoded.input_ids, dtype=torch.long),
            "labels": torch.tensor(encoded.labels, dtype=torch.long),
            "image_mask": torch.tensor(encoded.image_mask, dtype=torch.bool),
            **image,
            "has_image": sample.image is not None,
        }

    def load_picture(self, index: int) -> Image.Image:
        """Sample ``index``'s image, decoded.

        Raises:
            BadSampleError: The image cannot be loaded.
        """
        sample = self.samples[index]
        try:
            return load_image(sample.image)
        except ImageLoadError as error:
            raise BadSampleError(sample.manifest, sample.line, error.reason) from None

    def _cached_features(self, index: int) -> torch.Tensor:
        sample = self.samples[index]
        if sample.image is None:
            return torch.zeros(self.feature_shape, dtype=self.feature_dtype)
        key = self.feature_keys[index]
        if key is None:
            raise BadSampleError(sample.manifest, sample.line, "its image could not be loaded when the feature "
                                 "cache was built")
        return self.features.get(key)

    def _check_length(self, sample: Sample, encoded: Encoded) -> None:
        if len(encoded) > self.max_length:
            raise BadSampleError(
                sample.manifest, sample.line,
                f"text longer than the context: {len(encoded)} tokens > data.max_length {self.max_length}",
            )

    def _record_skip(self, error: BadSampleError) -> None:
        """Logs a skipped sample to the skip log and, for the first few, as a warning."""
        self.skipped += 1
        if self.skip_log is not None:
            record = {"manifest": str(error.manifest), "line": error.line, "reason": error.reason}
            self.skip_log.parent.mkdir(parents=True, exist_ok=True)
            append_line(self.skip_log, json.dumps(record))  # one O_APPEND write: safe across workers
        if self.skip_log is None or self.skipped <= _MAX_SKIP_WARNINGS:
            logger.warning("skipping bad sample %s:%d: %s", error.manifest, error.line, error.reason)
        if self.skip_log is not None and self.skipped == _MAX_SKIP_WARNINGS:
            logger.warning("further skipped samples are only listed in %s", self.skip_log)
