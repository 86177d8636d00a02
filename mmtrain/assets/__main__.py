"""`python -m mmtrain.assets [NAME ...]`: prepare real assets (all when none are named), print their folders."""

import sys

from mmtrain.assets.models import ASSETS, AssetError, prepare

try:
    for name in sys.argv[1:] or sorted(ASSETS):
        print(prepare(name))
except AssetError as exc:
    sys.exit(f"error: {exc}")
