"""Show what an mmtrain checkpoint holds: its step, and every trainable tensor with shape and dtype.

    python tools/show_checkpoint.py runs/tiny/checkpoints/step_00000030
    python tools/show_checkpoint.py runs/tiny            # the latest complete checkpoint of a run

Reads only `meta.json` and the safetensors header; needs no DeepSpeed and loads no weights.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mmtrain.engine.checkpoint import META_FILE, latest_checkpoint  # noqa: E402
from mmtrain.models.weights import TRAINABLE_FILE  # noqa: E402


def describe(path: Path) -> str:
    """A text summary of the checkpoint folder (or of a run folder's latest checkpoint)."""
    from safetensors import safe_open

    if not (path / META_FILE).is_file():
        found = latest_checkpoint(path)
        if found is None:
            raise FileNotFoundError(f"{path}: neither a complete checkpoint nor a run folder with one")
        path = found
    meta = json.loads((path / META_FILE).read_text())
    lines = [f"checkpoint {path}", f"step {meta.get('step')}  samples {meta.get('samples_seen')}  "
                                   f"tokens {meta.get('tokens_seen')}"]
    total = 0
    with safe_open(str(path / TRAINABLE_FILE), framework="pt") as handle:
        for name in sorted(handle.keys()):
            tensor = handle.get_slice(name)
            shape = tensor.get_shape()
            count = 1
            for dim in shape:
                count *= dim
            total += count
            lines.append(f"  {name:<60} {str(tuple(shape)):<20} {tensor.get_dtype()}")
    lines.append(f"{total:,} trainable parameters")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("path", type=Path, help="checkpoint folder or run folder")
    args = parser.parse_args(argv)
    try:
        print(describe(args.path))
    except FileNotFoundError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
