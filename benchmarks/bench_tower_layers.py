"""Which layer of a frozen vision tower says most about what a picture shows: a 1-nearest-neighbour
probe of every DINOv2-S layer (CLS token and mean of the patch tokens) against MobileNetV2's pooled
features, on real Tux Paint photos labelled by their category.

The DINOv2-S asset was fine-tuned for saliency as a whole (see the asset's docstring), so its top
layers may have drifted from DINOv2's semantic features; `model.vision.feature_layer` picks another.
Leave-one-out 1-NN accuracy by cosine similarity, next to the majority category's share.

    python benchmarks/bench_tower_layers.py

Writes benchmarks/results/tower_layers.json.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import environment, run_mmtrain, save_json
from mmtrain.assets.registry import resolve_asset_reference
from mmtrain.config.schema import VisionConfig
from mmtrain.data.images import load_image
from mmtrain.data.manifest import read_manifest
from mmtrain.models.vision import build_vision_tower

ASSETS = ["tuxpaint", "mobilenetv2", "dinov2-small"]
SPLITS = ("train", "val", "test")
BATCH = 16


def nearest_neighbour_accuracy(features: torch.Tensor, labels: list[str]) -> float:
    """Leave-one-out 1-NN accuracy of `labels` under cosine similarity of `features` [N, D]."""
    normed = torch.nn.functional.normalize(features.float(), dim=-1)
    similarity = normed @ normed.T
    similarity.fill_diagonal_(-2.0)
    nearest = similarity.argmax(dim=1).tolist()
    return sum(labels[i] == labels[j] for i, j in enumerate(nearest)) / len(labels)


@torch.no_grad()
def dinov2_layer_features(images: list[Path]) -> dict[str, list[torch.Tensor]]:
    """Per hidden state (embeddings = 0, block k = k): the CLS tokens and the patch-token means."""
    tower = build_vision_tower(VisionConfig(kind="hf", name_or_path=resolve_asset_reference("asset:dinov2-small")), "sdpa").eval()
    cls: list[list[torch.Tensor]] = []
    mean: list[list[torch.Tensor]] = []
    for start in range(0, len(images), BATCH):
        pixels = torch.stack([tower.image_transform(load_image(p)) for p in images[start:start + BATCH]])
        states = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        if not cls:
            cls, mean = [[] for _ in states], [[] for _ in states]
        for k, state in enumerate(states):
            cls[k].append(state[:, 0])
            mean[k].append(state[:, 1:].mean(dim=1))
    return {"cls": [torch.cat(c) for c in cls], "mean": [torch.cat(m) for m in mean]}


@torch.no_grad()
def mobilenet_features(images: list[Path]) -> torch.Tensor:
    """MobileNetV2's final feature map, averaged over its 5 x 5 positions."""
    tower = build_vision_tower(VisionConfig(kind="mobilenetv2", name_or_path=resolve_asset_reference("asset:mobilenetv2")), "sdpa").eval()
    chunks = []
    for start in range(0, len(images), BATCH):
        pixels = torch.stack([tower.image_transform(load_image(p)) for p in images[start:start + BATCH]])
        chunks.append(tower(pixels).mean(dim=1))
    return torch.cat(chunks)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.parse_args()
    run_mmtrain(["assets", "prepare", *ASSETS])
    samples = [s for split in SPLITS for s in read_manifest(resolve_asset_reference(f"asset:tuxpaint/{split}.jsonl"))]
    images = [Path(s.image) for s in samples]
    labels = [s.category for s in samples]
    dinov2 = dinov2_layer_features(images)
    layers = [{"layer": k, "cls": nearest_neighbour_accuracy(dinov2["cls"][k], labels),
               "patch_mean": nearest_neighbour_accuracy(dinov2["mean"][k], labels)}
              for k in range(len(dinov2["cls"]))]
    result = {"command": "python benchmarks/bench_tower_layers.py", "images": len(images),
              "categories": len(set(labels)), "majority": max(labels.count(c) for c in set(labels)) / len(labels),
              "dinov2_layers": layers, "mobilenetv2_pooled": nearest_neighbour_accuracy(mobilenet_features(images), labels),
              "environment": environment()}
    save_json(result, "tower_layers.json")
    depth = len(layers) - 1
    print(f"1-NN category accuracy on {len(images)} Tux Paint photos ({result['categories']} categories; "
          f"majority {result['majority']:.3f})")
    print(f"{'DINOv2-S layer':<16} {'feature_layer':>13} {'CLS':>6} {'patch mean':>10}")
    for row in layers:
        print(f"{row['layer']:<16} {row['layer'] - depth - 1:>13} {row['cls']:>6.3f} {row['patch_mean']:>10.3f}")
    print(f"MobileNetV2 (pooled 5x5 map): {result['mobilenetv2_pooled']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
