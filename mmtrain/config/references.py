"""References in config values: `asset:NAME/...` stands for a path inside a prepared asset.

A config may name a prepared asset instead of a cache path; the reference is replaced by the real
path when the config loads, so the run folder's `config.yaml` records it. The assets package is
above the config layer, so it is reached as a provider named here, imported on first use (the way
method plug-ins are found): the config layer imports nothing of it.
"""

from __future__ import annotations

import dataclasses
import importlib
from typing import Any, Callable

from mmtrain.config.errors import ConfigError
from mmtrain.errors import UserError

PROVIDERS = {"asset:": "mmtrain.assets.registry"}
"""Prefix -> module whose `resolve_asset_reference(value, key) -> str` resolves it."""


def _resolver(prefix: str) -> Callable[[str, str], str]:
    return importlib.import_module(PROVIDERS[prefix]).resolve_asset_reference


def resolve_references(config: Any, source: str = "config", prefix: str = "") -> None:
    """Replace every reference string in a config (dataclasses, lists, dicts) by what it stands for."""

    def resolve(value: Any, key: str) -> Any:
        if isinstance(value, str):
            for start in PROVIDERS:
                if value.startswith(start):
                    try:
                        return _resolver(start)(value, key)
                    except UserError as exc:
                        raise ConfigError(f"{source}: {exc}") from None
        if dataclasses.is_dataclass(value):
            resolve_references(value, source, f"{key}.")
        elif isinstance(value, list):
            return [resolve(v, f"{key}[{i}]") for i, v in enumerate(value)]
        elif isinstance(value, dict):
            return {k: resolve(v, f"{key}.{k}") for k, v in value.items()}
        return value

    for f in dataclasses.fields(config):
        setattr(config, f.name, resolve(getattr(config, f.name), f"{prefix}{f.name}"))
