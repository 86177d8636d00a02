"""The trajectory on 2 ranks under the real launcher equals the single-process one.

ZeRO-3: the model partitioned across the ranks; ZeRO-2: replicated, only the texts split.
"""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from tests.conftest import REPO, launch

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tiny_target(tmp_path_factory) -> tuple[Path, Path]:
    """A 6-layer Llama with tied embeddings (the LM head is the embedding table) + tokenizer + 9 texts."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from mmtrain.data.synthetic import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("trajectory_zero3")
    texts = [f"a {w} {v} walks past {n} little houses by the river" + " again" * (n % 4)
             for n, (w, v) in enumerate(zip(["red", "big", "old"] * 3, ["dog", "cat", "fox", "owl", "pig"] * 2))]
    (root / "texts.txt").write_text("\n".join(texts) + "\n")
    make_tiny_tokenizer(texts, root / "model", vocab_size=300)
    torch.manual_seed(5)
    config = AutoConfig.for_model("llama", vocab_size=300, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
                                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                  initializer_range=0.2, tie_word_embeddings=True)
    AutoModelForCausalLM.from_config(config).save_pretrained(root / "model")
    return root / "model", root / "texts.txt"


@pytest.fixture(scope="module")
def single(tiny_target, tmp_path_factory) -> dict:
    from mmtrain.methods.grafting.trajectory import run_trajectory

    model, texts = tiny_target
    return run_trajectory(Namespace(model=str(model), texts=[str(texts)], out=str(tmp_path_factory.mktemp("single")),
                                    num_texts=300, max_length=24, batch_size=2, threshold=0.05, deepspeed=None,
                                    precision="fp32"))


def _launch_two_ranks(tiny_target, out: Path, ds_json: str) -> dict:
    model, texts = tiny_target
    # 9 texts, batches of 2: rank 0 gets 5 texts (3 batches), rank 1 gets 4 (2 batches + 1 dummy batch).
    launch(["-m", "mmtrain", "surrogate", "trajectory", str(model), "--texts", str(texts), "--batch-size", "2",
            "--max-length", "24", "--threshold", "0.05", "--out", str(out),
            "--deepspeed", str(REPO / "ds_configs" / ds_json)], nprocs=2, timeout=240, env={"OMP_NUM_THREADS": "1"})
    return json.loads((out / "trajectory.json").read_text())


def _same_curves(sharded: dict, single: dict) -> None:
    assert (sharded["texts"], sharded["positions"]) == (single["texts"], single["positions"]) and single["texts"] == 9
    assert min(single["kl"][:-1]) > 0.01
    assert sharded["kl"] == pytest.approx(single["kl"], rel=1e-5, abs=1e-9)
    assert sharded["kl_true_token"] == pytest.approx(single["kl_true_token"], rel=1e-5, abs=1e-9)
    assert sharded["true_token_prob"] == pytest.approx(single["true_token_prob"], rel=1e-5)
    assert sharded["output_true_token_prob"] == pytest.approx(single["output_true_token_prob"], rel=1e-5)
    assert (sharded["transition_layer"], sharded["cut"]) == (single["transition_layer"], single["cut"])


def test_zero3_two_ranks_equal_single_process(tiny_target, single, tmp_path):
    sharded = _launch_two_ranks(tiny_target, tmp_path / "zero3", "zero3.json")
    assert (tmp_path / "zero3" / "trajectory.png").is_file()

    assert sharded["world_size"] == 2 and sharded["zero3"] is True
    assert sharded["params_total"] == single["params_total"]
    # Really partitioned: each rank held well under the whole model.
    assert len(sharded["params_local_per_rank"]) == 2
    assert all(n < 0.6 * sharded["params_total"] for n in sharded["params_local_per_rank"])
    _same_curves(sharded, single)


def test_zero2_two_ranks_split_the_texts_only(tiny_target, single, tmp_path):
    sharded = _launch_two_ranks(tiny_target, tmp_path / "zero2", "zero2.json")
    assert sharded["world_size"] == 2 and sharded["zero3"] is False
    assert sharded["params_local_per_rank"] == [single["params_total"]] * 2  # replicated
    _same_curves(sharded, single)
