"""Data pipeline: manifests, image loading, prompt templates, dataset, batching and sampling.

The synthetic-data and manifest-check helpers are imported on first use, so
that ``python -m mmtrain.data.synthetic`` and ``mmtrain data check`` run their
modules without importing them twice.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from mmtrain.data.collate import Collator, collate
from mmtrain.data.dataset import BAD_SAMPLE_POLICIES, VLMDataset
from mmtrain.data.errors import BadSampleError, ManifestError
from mmtrain.data.images import ImageLoadError, load_image
from mmtrain.data.manifest import Sample, read_manifest, scan_manifest
from mmtrain.data.sampler import StepSampler
from mmtrain.data.templates import (
    IGNORE_INDEX,
    TEMPLATES,
    ChatMLTemplate,
    ChatTemplate,
    Encoded,
    PlainTemplate,
    PromptTemplate,
    get_template,
    validate_sample,
)

if TYPE_CHECKING:
    from mmtrain.data.check import CheckReport, check_manifest
    from mmtrain.data.synthetic import make_caption_dataset, make_tiny_tokenizer

_LAZY = {
    "CheckReport": "mmtrain.data.check",
    "check_manifest": "mmtrain.data.check",
    "make_caption_dataset": "mmtrain.data.synthetic",
    "make_tiny_tokenizer": "mmtrain.data.synthetic",
}

__all__ = [
    "BAD_SAMPLE_POLICIES",
    "IGNORE_INDEX",
    "TEMPLATES",
    "BadSampleError",
    "ChatMLTemplate",
    "ChatTemplate",
    "CheckReport",
    "Collator",
    "Encoded",
    "ImageLoadError",
    "ManifestError",
    "PlainTemplate",
    "PromptTemplate",
    "Sample",
    "StepSampler",
    "VLMDataset",
    "check_manifest",
    "collate",
    "get_template",
    "load_image",
    "make_caption_dataset",
    "make_tiny_tokenizer",
    "read_manifest",
    "scan_manifest",
    "validate_sample",
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
