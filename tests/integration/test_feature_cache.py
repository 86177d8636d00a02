"""The frozen-tower feature cache under the real launcher: the same losses as running the tower.

Two ranks, ZeRO-2 and ZeRO-3: a run that fills the cache and one that reads it train exactly like a
run without it (1e-6). One rank: a truncated shard is detected and rebuilt, and a changed tower
gets its own features, never the old ones.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, TINY_VISION, launch, tiny_config, write_config

pytestmark = pytest.mark.slow
COMPUTING = re.compile(r"feature cache (\S+): computing (\d+) of (\d+) images")


def distinct_images(tiny_assets) -> int:
    return len({json.loads(line)["image"] for split in ("train", "val")
                for line in Path(tiny_assets[split]).read_text().splitlines()})


def run(tiny_assets, out: Path, stage: str = "zero2", nprocs: int = 2, **extra) -> tuple[list[float], str]:
    cfg = tiny_config(tiny_assets, out / "run", deepspeed=str(REPO / "ds_configs" / f"{stage}.json"), max_steps=4,
                      **{"data.val": str(tiny_assets["val"]), "checkpoint.resume": "never",
                         "checkpoint.save_every": 0}, **extra)
    out.mkdir(parents=True, exist_ok=True)
    proc = launch(["-m", "mmtrain.train", str(write_config(cfg, out / "config.yaml"))], nprocs=nprocs)
    records = [json.loads(line) for line in (out / "run" / "metrics.jsonl").read_text().splitlines()]
    return [r["loss"] for r in records if "loss" in r] + [r["val_loss"] for r in records if "val_loss" in r], \
        proc.stdout + proc.stderr


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_cached_features_train_like_the_tower(tiny_assets, tmp_path, stage):
    cache = tmp_path / "cache"
    plain, _ = run(tiny_assets, tmp_path / "plain", stage)
    cold, log = run(tiny_assets, tmp_path / "cold", stage, **{"data.feature_cache": str(cache)})
    (folder, computed, wanted), = COMPUTING.findall(log)
    assert int(computed) == int(wanted) == distinct_images(tiny_assets)  # train + val, once across both ranks
    warm, log = run(tiny_assets, tmp_path / "warm", stage, **{"data.feature_cache": str(cache)})
    assert not COMPUTING.findall(log)
    assert len(plain) == 5
    torch.testing.assert_close(cold, plain, rtol=0, atol=1e-6)
    torch.testing.assert_close(warm, plain, rtol=0, atol=1e-6)
    index = json.loads((Path(folder) / "index.json").read_text())
    assert sum(len(shard["keys"]) for shard in index["shards"].values()) == distinct_images(tiny_assets)


def test_truncated_shard_is_rebuilt_and_a_changed_tower_never_reads_old_features(tiny_assets, tmp_path):
    from transformers import AutoConfig, AutoModel

    cache = tmp_path / "cache"
    plain, _ = run(tiny_assets, tmp_path / "plain", nprocs=1)
    _, log = run(tiny_assets, tmp_path / "cold", nprocs=1, **{"data.feature_cache": str(cache)})
    (folder, _, _), = COMPUTING.findall(log)
    shard = next(Path(folder).glob("shard-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:-100])
    rebuilt, log = run(tiny_assets, tmp_path / "rebuilt", nprocs=1, **{"data.feature_cache": str(cache)})
    assert "truncated" in log and COMPUTING.findall(log)
    torch.testing.assert_close(rebuilt, plain, rtol=0, atol=1e-6)
    assert not shard.exists()  # dropped from the index and deleted

    # The same tower folder with other weights: another cache key, its own features.
    torch.manual_seed(7)
    params = dict(TINY_VISION)
    other = AutoModel.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    other_dir = tmp_path / "other_vision"
    other.save_pretrained(other_dir)
    for name in ("preprocessor_config.json",):
        (other_dir / name).write_bytes((Path(tiny_assets["vision"]) / name).read_bytes())
    changed = {"model.vision.name_or_path": str(other_dir)}
    other_plain, _ = run(tiny_assets, tmp_path / "other_plain", nprocs=1, **changed)
    other_cached, log = run(tiny_assets, tmp_path / "other_cached", nprocs=1,
                            **{"data.feature_cache": str(cache)}, **changed)
    (other_folder, computed, _), = COMPUTING.findall(log)
    assert other_folder != folder and int(computed) == distinct_images(tiny_assets)
    torch.testing.assert_close(other_cached, other_plain, rtol=0, atol=1e-6)
    assert abs(other_plain[0] - plain[0]) > 1e-4


def test_a_trainable_tower_cannot_use_the_cache(tiny_assets, tmp_path):
    with pytest.raises(AssertionError, match="data.feature_cache needs a frozen vision tower"):
        run(tiny_assets, tmp_path / "trainable", nprocs=1,
            **{"data.feature_cache": str(tmp_path / "cache"), "model.vision.trainable": "full"})


def test_trainable_top_blocks_read_their_input_from_the_cache(tiny_assets, tmp_path):
    """trainable_top_k: the cache keeps the frozen blocks' output; the top block trains as without it."""
    top = {"model.vision.trainable_top_k": 1, "model.vision.feature_layer": -1}
    plain, _ = run(tiny_assets, tmp_path / "plain", **top)
    cached, log = run(tiny_assets, tmp_path / "cached", **top, **{"data.feature_cache": str(tmp_path / "cache")})
    (folder, _, _), = COMPUTING.findall(log)
    torch.testing.assert_close(cached, plain, rtol=0, atol=1e-6)
    index = json.loads((Path(folder) / "index.json").read_text())
    assert index["key"]["output_of"] == "block input 1"
    again, log = run(tiny_assets, tmp_path / "again", **top, **{"data.feature_cache": str(tmp_path / "cache")})
    assert not COMPUTING.findall(log)  # read back: the trainable top block is not part of the key
    torch.testing.assert_close(again, plain, rtol=0, atol=1e-6)
