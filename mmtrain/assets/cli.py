"""`mmtrain assets list` and `mmtrain assets prepare [NAME ...] [--force]`."""

from __future__ import annotations

import argparse
import sys
import time

from mmtrain.errors import report_user_errors


@report_user_errors
def main(argv: list[str] | None = None, prog: str = "mmtrain assets") -> int:
    # dispatch: import only what this command runs
    from mmtrain.assets.common import AssetError, cache_dir, is_complete
    from mmtrain.assets.registry import all_assets, prepare

    parser = argparse.ArgumentParser(prog=prog, description="Offline real assets (weights and captioned images).")
    sub = parser.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="known assets and whether they are prepared")
    prep = sub.add_parser("prepare", help="fetch, verify, convert and cache assets (all when none are named)")
    prep.add_argument("names", nargs="*", metavar="NAME")
    prep.add_argument("--force", action="store_true", help="rebuild even when already prepared")
    args = parser.parse_args(argv)

    assets = all_assets()
    if args.command == "list":
        print(f"cache: {cache_dir()}")
        for name, asset in sorted(assets.items(), key=lambda kv: (kv[1].kind, kv[0])):
            state = "ready" if is_complete(asset) else "-"
            print(f"  {name:22s} {asset.kind:6s} {state:6s} {asset.description}")
        return 0
    unknown = [n for n in args.names if n not in assets]
    if unknown:  # reported by report_user_errors: `error: ...`, exit 2
        raise AssetError(f"unknown asset(s) {', '.join(unknown)}; known: {', '.join(sorted(assets))}")
    for name in args.names or sorted(assets):
        already = is_complete(assets[name]) and not args.force
        start = time.perf_counter()
        try:
            path = prepare(name, force=args.force)
        except AssetError as exc:  # fetching, verifying or building failed: exit 1, naming the asset
            print(f"error: asset {name}: {exc}", file=sys.stderr)
            return 1
        note = "already prepared" if already else f"prepared in {time.perf_counter() - start:.0f} s"
        print(f"{name}: {path} ({note})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
