"""Offline real assets (pretrained weights shipped inside registry packages), verified and cached."""

from mmtrain.assets.models import ASSETS, cache_dir, prepare

__all__ = ["ASSETS", "cache_dir", "prepare"]
