"""Multimodal packing and grouped batches under the real launcher.

Two ranks, ZeRO-2 and ZeRO-3: packed rows give the same per-rank loss and the same gradients of
every trainable parameter as the same samples padded (1e-5, fp32), with image-text and text-only
samples sharing rows. Packed and modality-grouped training resumed from a checkpoint matches the
uninterrupted run, padding fractions included.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.conftest import REPO, launch, tiny_config, write_config

pytestmark = pytest.mark.slow
HARNESS = str(REPO / "tests" / "launch" / "packed_step.py")


@pytest.fixture(scope="module")
def mixed_train(tiny_assets, tmp_path_factory) -> list[str]:
    """The tiny captions plus text-only samples of other lengths."""
    text_only = tmp_path_factory.mktemp("text_only") / "text.jsonl"
    words = "a red square on a blue background near the green circle".split()
    text_only.write_text("".join(json.dumps({"id": f"t{i}", "conversations": [
        {"from": "human", "value": "describe"}, {"from": "gpt", "value": " ".join(words[: 3 + i % 9])}]}) + "\n"
        for i in range(16)))
    return [str(tiny_assets["train"]), str(text_only)]


def packing_config(tiny_assets, mixed_train, out: Path, stage: str, **extra) -> Path:
    cfg = tiny_config(tiny_assets, out / "run", deepspeed=str(REPO / "ds_configs" / f"{stage}.json"),
                      **{"data.train": mixed_train, "checkpoint.resume": "never"}, **extra)
    out.mkdir(parents=True, exist_ok=True)
    return write_config(cfg, out / "config.yaml")


@pytest.mark.parametrize("stage", ["zero2", "zero3"])
def test_packed_rows_give_the_padded_loss_and_gradients(tiny_assets, mixed_train, tmp_path, stage):
    path = packing_config(tiny_assets, mixed_train, tmp_path, stage)
    dumps = {}
    for mode in ("padded", "packed"):
        launch([HARNESS, str(path), mode, str(tmp_path / f"{mode}.safetensors")], nprocs=2)
        dumps[mode] = load_file(str(tmp_path / f"{mode}.safetensors"))
    padded, packed = dumps["padded"], dumps["packed"]
    assert int(packed["rows"][0]) < int(padded["rows"][0])  # fewer rows: samples shared them
    torch.testing.assert_close(packed["losses"], padded["losses"], rtol=0, atol=1e-5)
    grads = [name for name in padded if name.startswith("grad.")]
    assert any(n.startswith("grad.projector") for n in grads) and any(n.startswith("grad.resampler") for n in grads)
    for name in grads:
        assert padded[name].abs().max() > 0, f"{name}: no gradient, the comparison would be empty"
        torch.testing.assert_close(packed[name], padded[name], rtol=1e-5, atol=1e-5, msg=name)


def _metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines() if "loss" in line]


@pytest.mark.parametrize(("stage", "data"), [("zero3", {"data.packing": True}),
                                           ("zero2", {"data.group_by": "modality"})], ids=["packing", "modality"])
def test_training_resumes_exactly_and_records_padding(tiny_assets, mixed_train, tmp_path, stage, data):
    common = {**data, "micro_batch_size": 2, "max_steps": 6, "checkpoint.save_every": 3}
    straight = packing_config(tiny_assets, mixed_train, tmp_path / "straight", stage, **common)
    launch(["-m", "mmtrain.train", str(straight)], nprocs=2)
    records = _metrics(tmp_path / "straight" / "run")
    assert [r["step"] for r in records] == list(range(1, 7))
    if "data.packing" in data:
        assert all(0 <= r["padding_fraction"] < 0.5 for r in records)

    resumed = packing_config(tiny_assets, mixed_train, tmp_path / "resumed", stage, stop_after_steps=3, **common)
    launch(["-m", "mmtrain.train", str(resumed)], nprocs=2)
    launch(["-m", "mmtrain.train", str(resumed), "--set", "stop_after_steps=null", "checkpoint.resume=auto"],
           nprocs=2)
    again = _metrics(tmp_path / "resumed" / "run")
    assert [r["loss"] for r in again] == [r["loss"] for r in records]
    assert [r["padding_fraction"] for r in again] == [r["padding_fraction"] for r in records]


def test_a_modality_token_refuses_packing_by_name(tiny_assets, mixed_train, tmp_path):
    path = packing_config(tiny_assets, mixed_train, tmp_path, "zero2", **{
        "data.packing": True, "model.llm.adapter": {"kind": "router"}, "model.llm.trainable": "adapters"})
    with pytest.raises(AssertionError, match=r"data.packing cannot keep packed samples apart around an MMA "
                                             r"modality token.*model.llm.adapter.modality_token: false"):
        launch(["-m", "mmtrain.train", str(path)], nprocs=1)
