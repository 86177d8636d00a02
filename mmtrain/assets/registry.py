"""Every asset `mmtrain assets prepare` knows, and `asset:NAME/...` references in configs.

A config may name a prepared asset instead of a cache path: `asset:smollm2-135m` is the model's
folder, `asset:tuxpaint/train.jsonl` a file inside the data asset's folder. The reference is
resolved when the config is loaded, so the run folder's `config.yaml` records the real path.
"""

from __future__ import annotations

from pathlib import Path

from mmtrain.assets import (
    captions_mix, debian_text, dinov2, easy_vqa, emoji, kgeography, mcqa, mnist, mobilenet, models, openclipart,
    prose, scratch_media, tuxpaint,
)
from mmtrain.assets.common import Asset, AssetError, asset_dir, install, is_complete

ASSET_PREFIX = "asset:"


def all_assets() -> dict[str, Asset]:
    """Name -> Asset for every known asset."""
    found: dict[str, Asset] = {}
    for module in (tuxpaint, scratch_media, openclipart, captions_mix, kgeography, emoji, mnist, mcqa, easy_vqa, prose,
                   debian_text, models, mobilenet, dinov2):
        for asset in module.ASSETS:
            found[asset.name] = asset
    return found


def get_asset(name: str) -> Asset:
    assets = all_assets()
    if name not in assets:
        raise AssetError(f"unknown asset {name!r}; known assets: {', '.join(sorted(assets))}")
    return assets[name]


def prepare(name: str, force: bool = False) -> Path:
    """The folder of asset `name`, preparing it (and what it requires) first if needed. Idempotent."""
    asset = get_asset(name)
    for needed in asset.requires:
        prepare(needed)
    if force or not is_complete(asset):
        install(asset)
    return asset_dir(asset)


def resolve_asset_reference(value: str, key: str = "") -> str:
    """`asset:NAME[/sub/path]` -> the path inside the prepared asset's folder; other strings unchanged.

    Raises:
        AssetError: unknown asset, or an asset that has not been prepared yet (says what to run).
    """
    if not value.startswith(ASSET_PREFIX):
        return value
    name, _, rest = value[len(ASSET_PREFIX):].partition("/")
    where = f"`{key}` = {value!r}: " if key else ""
    assets = all_assets()
    if name not in assets:
        raise AssetError(f"{where}unknown asset {name!r}; known assets: {', '.join(sorted(assets))}")
    asset = assets[name]
    if not is_complete(asset):
        raise AssetError(f"{where}asset {name!r} is not prepared yet; run `mmtrain assets prepare {name}`")
    path = asset_dir(asset) / rest if rest else asset_dir(asset)
    if rest and not path.exists():
        raise AssetError(f"{where}{path} does not exist in the prepared asset {name!r}")
    return str(path)
