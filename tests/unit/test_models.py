"""The VLM: image-embedding placement, trainability, no-grad frozen prefix, text-only batches, weights files."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from mmtrain.config import ModelConfig, from_dict
from mmtrain.models import IncompatibleCheckpointError, build_vlm, load_trainable_weights, parameter_table
from mmtrain.models.attention import resolve_attn_implementation
from tests.conftest import TINY_LLM, TINY_VISION


def model_config(tokenizer, **overrides) -> ModelConfig:
    raw = {
        "vision": {"config": dict(TINY_VISION)},
        "resampler": {"num_queries": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 4},
        "llm": {"config": dict(TINY_LLM), "tokenizer": str(tokenizer)},
    }
    for dotted, value in overrides.items():
        section, key = dotted.split(".")
        raw[section][key] = value
    return from_dict(ModelConfig, raw)


@pytest.fixture
def vlm(tiny_assets):
    model, tokenizer, attn = build_vlm(model_config(tiny_assets["tokenizer"]))
    return model


def batch(model, has_image=(True, True), length=10):
    b, n = len(has_image), model.num_image_tokens
    image_mask = torch.zeros(b, length, dtype=torch.bool)
    for i, flag in enumerate(has_image):
        if flag:
            image_mask[i, 1:1 + n] = True
    labels = torch.randint(5, 100, (b, length))
    labels[image_mask] = -100
    return {"input_ids": torch.randint(5, 100, (b, length)), "attention_mask": torch.ones(b, length, dtype=torch.long),
            "pixel_values": torch.randn(b, 3, 32, 32), "has_image": torch.tensor(has_image), "image_mask": image_mask,
            "labels": labels}


def test_visual_embeddings_replace_marked_positions_only(vlm):
    seen = {}
    vlm.llm.register_forward_pre_hook(lambda m, a, kw: seen.update(kw), with_kwargs=True)
    inputs = batch(vlm, (True, False))
    vlm(**inputs)
    embeds = seen["inputs_embeds"]
    visual = vlm.encode_images(inputs["pixel_values"])
    text = vlm.llm.embed(inputs["input_ids"])
    mask = inputs["image_mask"]
    torch.testing.assert_close(embeds[0][mask[0]], visual[0])
    torch.testing.assert_close(embeds[0][~mask[0]], text[0][~mask[0]])
    torch.testing.assert_close(embeds[1], text[1])


def test_parameter_table_and_default_trainability(vlm):
    rows = {r["component"]: r for r in parameter_table(vlm)}
    assert rows["llm"]["trainable"] == 0 and rows["vision"]["trainable"] == 0
    assert rows["llm"]["frozen"] == sum(p.numel() for p in vlm.llm.parameters())
    assert rows["projector"]["trainable"] == 32 * 64 + 64
    assert rows["total"]["trainable"] == rows["resampler"]["trainable"] + rows["projector"]["trainable"]


def test_frozen_tower_builds_no_autograd_graph(vlm):
    out = {}
    vlm.vision.register_forward_hook(lambda m, a, o: out.update(v=o))
    vlm.train()
    loss = vlm(**batch(vlm)).loss
    assert out["v"].grad_fn is None and not out["v"].requires_grad
    assert not vlm.vision.training and not vlm.llm.training and vlm.resampler.training
    loss.backward()
    assert vlm.projector.weight.grad is not None and vlm.resampler.queries.grad is not None
    assert all(p.grad is None for p in vlm.llm.parameters())


def test_top_k_vision_blocks_train(tiny_assets):
    model, _, _ = build_vlm(model_config(tiny_assets["tokenizer"], **{"vision.trainable_top_k": 1}))
    blocks = model.vision.blocks()
    assert all(p.requires_grad for p in blocks[-1].parameters())
    assert not any(p.requires_grad for p in blocks[0].parameters())
    model(**batch(model)).loss.backward()
    assert all(p.grad is not None for p in blocks[-1].parameters())
    assert all(p.grad is None for p in blocks[0].parameters())


def test_text_only_batch_still_runs_the_visual_branch(vlm):
    loss = vlm(**batch(vlm, (False, False))).loss
    loss.backward()
    grad = vlm.projector.weight.grad
    assert grad is not None and torch.count_nonzero(grad) == 0


def test_mismatched_image_positions_fail_clearly(vlm):
    inputs = batch(vlm)
    inputs["image_mask"][0, 1] = False
    with pytest.raises(ValueError, match="num_image_tokens"):
        vlm(**inputs)


def test_adapters_mode_needs_adapters(tiny_assets):
    with pytest.raises(ValueError, match="model.llm.trainable=adapters"):
        build_vlm(model_config(tiny_assets["tokenizer"], **{"llm.trainable": "adapters"}))


def test_gradient_checkpointing_matches_plain_backward(tiny_assets, monkeypatch):
    inputs = batch(build_vlm(model_config(tiny_assets["tokenizer"]))[0])
    grads = []
    for checkpointing in (False, True):
        model, _, _ = build_vlm(model_config(tiny_assets["tokenizer"]))
        if checkpointing:
            model.llm.enable_gradient_checkpointing()
            model.keep_llm_in_train_mode = True
        model.train()
        calls = []
        mlp_class = type(model.llm.model.model.layers[0].mlp)
        original = mlp_class.forward
        monkeypatch.setattr(mlp_class, "forward", lambda self, *a, **k: calls.append(1) or original(self, *a, **k))
        model(**inputs).loss.backward()
        monkeypatch.undo()
        layers = len(model.llm.model.model.layers)
        assert len(calls) == layers * (2 if checkpointing else 1)  # recomputed in backward when checkpointing
        grads.append(model.projector.weight.grad.clone())
    torch.testing.assert_close(grads[0], grads[1])


def test_trainable_weights_round_trip_and_incompatibility(vlm, tiny_assets, tmp_path):
    state = {n: p.detach().clone() + 1 for n, p in vlm.named_parameters() if p.requires_grad}
    save_file(state, str(tmp_path / "trainable.safetensors"))
    fresh, _, _ = build_vlm(model_config(tiny_assets["tokenizer"]))
    assert load_trainable_weights(fresh, tmp_path) == sorted(state)
    torch.testing.assert_close(fresh.projector.weight, state["projector.weight"])
    save_file({"projector.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(IncompatibleCheckpointError, match="shape mismatch.*projector.weight"):
        load_trainable_weights(fresh, tmp_path / "bad.safetensors", strict=False)
    save_file({"adapter.x": torch.zeros(1)}, str(tmp_path / "alien.safetensors"))
    with pytest.raises(IncompatibleCheckpointError, match="unknown to the model: adapter.x"):
        load_trainable_weights(fresh, tmp_path / "alien.safetensors")


def test_attention_choice_on_cpu():
    assert resolve_attn_implementation("auto") == ("flash_attention_2" if torch.cuda.is_available() else "sdpa")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="flash-attn"):
            resolve_attn_implementation("flash_attention_2")


def test_target_only_loss_equals_full_logits_loss(vlm):
    inputs = batch(vlm, (True, False))
    inputs["labels"][:, :3] = -100
    assert vlm.llm.target_only_loss
    fast = vlm(**inputs).loss
    fast.backward()
    fast_grad = vlm.projector.weight.grad.clone()
    vlm.zero_grad()
    vlm.llm.target_only_loss = False
    full = vlm(**inputs)
    assert full.logits.shape[-1] == vlm.llm.vocab_size
    full.loss.backward()
    torch.testing.assert_close(fast, full.loss, rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(fast_grad, vlm.projector.weight.grad, rtol=1e-5, atol=1e-7)


def test_init_weights_select_modules_rename_and_fail_clearly(vlm, tiny_assets, tmp_path):
    from mmtrain.config.schema import InitSource
    from mmtrain.models import load_init_weights

    state = {n: p.detach().clone() + 1 for n, p in vlm.named_parameters() if p.requires_grad}
    save_file(state, str(tmp_path / "trainable.safetensors"))
    fresh, _, _ = build_vlm(model_config(tiny_assets["tokenizer"]))
    before = fresh.resampler.queries.detach().clone()
    loaded = load_init_weights(fresh, InitSource(path=str(tmp_path), modules=["projector"]))
    assert sorted(loaded) == ["projector.bias", "projector.weight"]
    torch.testing.assert_close(fresh.projector.weight, state["projector.weight"])
    torch.testing.assert_close(fresh.resampler.queries, before)  # not selected: untouched
    # A file whose names differ (e.g. weights of another architecture's VPG) maps through `rename`.
    save_file({"vpg.queries": state["resampler.queries"]}, str(tmp_path / "renamed.safetensors"))
    load_init_weights(fresh, InitSource(path=str(tmp_path / "renamed.safetensors"), rename={"vpg.": "resampler."}))
    torch.testing.assert_close(fresh.resampler.queries, state["resampler.queries"])
    with pytest.raises(IncompatibleCheckpointError, match="vpg.queries: not a parameter of the model"):
        load_init_weights(fresh, InitSource(path=str(tmp_path / "renamed.safetensors")))
    save_file({"projector.weight": torch.zeros(3, 3)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(IncompatibleCheckpointError, match=r"projector.weight: file \(3, 3\) vs model"):
        load_init_weights(fresh, InitSource(path=str(tmp_path / "bad.safetensors")))
    assert load_init_weights(fresh, InitSource(path=str(tmp_path / "bad.safetensors"), strict=False)) == []
    with pytest.raises(IncompatibleCheckpointError, match="no tensors under llm"):
        load_init_weights(fresh, InitSource(path=str(tmp_path), modules=["llm"]))
    with pytest.raises(FileNotFoundError, match="init: no weights file"):
        load_init_weights(fresh, InitSource(path=str(tmp_path / "nowhere")))
    # A run folder means its latest complete checkpoint (an incomplete one, without meta.json, is ignored).
    run = tmp_path / "run"
    for step, shift in ((4, 2.0), (8, 3.0), (12, 4.0)):
        folder = run / "checkpoints" / f"step_{step:08d}"
        folder.mkdir(parents=True)
        save_file({"projector.bias": state["projector.bias"] + shift}, str(folder / "trainable.safetensors"))
        if step != 12:
            (folder / "meta.json").write_text("{}")
    load_init_weights(fresh, InitSource(path=str(run)))
    torch.testing.assert_close(fresh.projector.bias, state["projector.bias"] + 3.0)
