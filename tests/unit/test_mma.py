"""MMA (LaVIN) router adapters, the modality token, LaVIN's visual tokens, LoRA: on tiny models."""

from __future__ import annotations

import copy

import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from mmtrain.config import load_config
from mmtrain.config.schema import LLMConfig
from mmtrain.methods.lora.config import LoRAConfig
from mmtrain.methods.mma.config import AdapterConfig
from mmtrain.data.collate import collate
from mmtrain.models import build_vlm
from mmtrain.methods.lora.inject import attach_lora
from mmtrain.methods.mma.method import attach_llm_adapters
from mmtrain.models.llm import CausalLM, decoder_layers
from mmtrain.methods.mma.adapters import CHILD_NAME, RouterAdapter, attach_adapters, isolated_first_token_mask
from tests.conftest import TINY_LLM, tiny_config, write_config


def tiny_llm(model_type: str = "llama", attn: str = "sdpa") -> CausalLM:
    torch.manual_seed(0)
    params = dict(TINY_LLM)
    params.pop("model_type")
    config = AutoConfig.for_model(model_type, **params)
    return CausalLM(AutoModelForCausalLM.from_config(config, attn_implementation=attn)).eval()


def text_batch(batch: int = 3, length: int = 10):
    torch.manual_seed(1)
    ids = torch.randint(6, 512, (batch, length))
    mask = torch.ones(batch, length, dtype=torch.long)
    mask[1, length - 3:] = 0
    labels = ids.clone()
    labels[:, :3] = -100
    labels[mask == 0] = -100
    return ids, mask, labels


def randomise_adapters(module: torch.nn.Module, seed: int = 5) -> None:
    """Non-zero up-projections and routers: what a trained adapter looks like."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if CHILD_NAME in name or "modality" in name:
                p.copy_(torch.randn(p.shape, generator=generator) * 0.3)


def vlm_config(tiny_assets, tmp_path, **overrides):
    cfg = tiny_config(tiny_assets, tmp_path / "run", **overrides)
    return load_config(write_config(cfg, tmp_path / "cfg.yaml"))


def mixed_batch(model, tokenizer, tiny_assets, cfg):
    """Two image captions and one text-only sample, encoded as in training."""
    import dataclasses

    from mmtrain.data import VLMDataset
    from mmtrain.data.manifest import read_manifest
    from mmtrain.data.templates import get_template

    samples = read_manifest(tiny_assets["train"])[:3]
    samples[1] = dataclasses.replace(samples[1], image=None)
    dataset = VLMDataset(samples, tokenizer, model.vision.image_transform, tuple(model.vision.image_shape),
                         get_template(cfg.data.template), model.num_image_tokens, cfg.data.max_length,
                         no_image_text=cfg.data.no_image_text)
    return collate([dataset.load(i) for i in range(3)], tokenizer.pad_token_id)


@pytest.mark.parametrize("model_type", ["llama", "qwen2"])
def test_zero_initialised_adapters_and_modality_token_leave_outputs_unchanged(model_type):
    llm = tiny_llm(model_type)
    reference = copy.deepcopy(llm)
    attach_llm_adapters(llm, LLMConfig(adapter=AdapterConfig()))
    assert llm.modality is not None and len(llm.adapters.adapters()) == len(decoder_layers(llm.model))
    llm.eval()
    ids, mask, labels = text_batch()
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        ours = llm(llm.embed(ids), mask, labels, has_image=has_image).loss
        theirs = reference(reference.embed(ids), mask, labels).loss
        ours_lp, ours_n = llm.target_logprobs(llm.embed(ids), mask, labels, has_image=has_image)
        ref_lp, ref_n = reference.target_logprobs(reference.embed(ids), mask, labels)
    assert torch.allclose(ours, theirs, atol=1e-5)
    assert torch.allclose(ours_lp, ref_lp, atol=1e-4) and torch.equal(ours_n, ref_n)


def test_modality_token_receives_no_attention():
    llm = tiny_llm(attn="eager")
    attach_llm_adapters(llm, LLMConfig(adapter=AdapterConfig()))
    randomise_adapters(llm)
    llm.eval()
    ids, mask, _ = text_batch()
    embeds, mask4d, positions, _ = llm.modality.prepend(llm.embed(ids), mask, torch.tensor([True, False, True]))
    with torch.no_grad():
        out = llm.model(inputs_embeds=embeds, attention_mask=mask4d, position_ids=positions, output_attentions=True)
    for layer in out.attentions:
        assert float(layer[:, :, 1:, 0].abs().max()) == 0.0  # nobody attends to position 0
        assert torch.allclose(layer[:, :, 0, 0], torch.ones_like(layer[:, :, 0, 0]))  # it sees only itself
    # Position 0's input only drives the routers: with both experts equal, routing is moot and
    # changing the modality embedding changes nothing downstream.
    for adapter in llm.adapters.adapters():
        adapter.up_alt.load_state_dict(adapter.up.state_dict())
    has_image = torch.tensor([True, False, True])
    with torch.no_grad():
        before = llm.model.get_decoder()(**llm._inputs(llm.embed(ids), mask, None, has_image)[0]).last_hidden_state
        llm.modality.embedding.weight.mul_(-3.0).add_(1.0)
        after = llm.model.get_decoder()(**llm._inputs(llm.embed(ids), mask, None, has_image)[0]).last_hidden_state
    assert torch.allclose(before[:, 1:], after[:, 1:], atol=1e-6)
    assert not torch.allclose(before[:, 0], after[:, 0])


def test_isolated_first_token_mask_keeps_padded_rows_finite():
    valid = torch.tensor([[True, False, True, True], [True, True, True, False]])
    allowed = isolated_first_token_mask(valid, torch.float32)[:, 0] == 0
    assert allowed[0, 2].tolist() == [False, False, True, False]
    assert allowed[1, 3].tolist() == [False, True, True, True]  # a pad query sees itself, never nothing
    assert allowed.any(dim=-1).all()


def test_routing_is_per_sample_not_the_first_samples():
    adapter = RouterAdapter(16, AdapterConfig(dropout=0.0))
    torch.nn.init.normal_(adapter.router.weight)
    x = torch.randn(4, 5, 16)
    together = adapter.routing_weights(x)
    alone = torch.cat([adapter.routing_weights(x[i:i + 1]) for i in range(4)])
    assert torch.allclose(together, alone)
    assert not torch.allclose(together[0], together[1])
    torch.nn.init.normal_(adapter.up.weight)
    torch.nn.init.normal_(adapter.up_alt.weight)
    batched = adapter(x)
    assert torch.allclose(batched, torch.cat([adapter(x[i:i + 1]) for i in range(4)]), atol=1e-6)


def test_llm_routing_follows_each_samples_modality():
    llm = tiny_llm()
    attach_llm_adapters(llm, LLMConfig(adapter=AdapterConfig(dropout=0.0)))
    randomise_adapters(llm)
    llm.eval()
    seen = []
    first = llm.adapters.adapters()[0]
    handle = first.router.register_forward_hook(lambda m, i, o: seen.append(torch.softmax(o / first.temperature, -1)))
    ids, mask, labels = text_batch()
    with torch.no_grad():
        llm(llm.embed(ids), mask, labels, has_image=torch.tensor([True, False, True]))
    handle.remove()
    weights = seen[0]
    assert torch.allclose(weights[0], weights[2])  # same modality, same first-layer routing
    assert not torch.allclose(weights[0], weights[1])


def test_adapter_parameter_layout_matches_lavin():
    d = 64
    router = RouterAdapter(d, AdapterConfig())
    plain = RouterAdapter(d, AdapterConfig(kind="plain"), router=False)
    assert sum(p.numel() for p in router.parameters()) == 20 * d + 10
    assert sum(p.numel() for p in plain.parameters()) == (8 * d + 8) + (4 * d + d)
    assert router.up.weight.shape == (d, 4, 1) and not router.up.weight.any() and not router.up_alt.weight.any()
    with pytest.raises(ValueError, match="divisible"):
        RouterAdapter(d, AdapterConfig(bottleneck=7))


def test_adapters_are_removable_and_the_model_is_then_bit_identical():
    llm = tiny_llm()
    original = {k: v.clone() for k, v in llm.state_dict().items()}
    ids, mask, labels = text_batch()
    with torch.no_grad():
        expected = llm.model(input_ids=ids, attention_mask=mask).logits
    attached = attach_adapters(decoder_layers(llm.model), llm.hidden_size, AdapterConfig(dropout=0.0))
    randomise_adapters(llm)
    with torch.no_grad():
        changed = llm.model(input_ids=ids, attention_mask=mask).logits
    assert not torch.allclose(changed, expected)
    attached.remove()
    state = llm.state_dict()
    assert state.keys() == original.keys()
    assert all(torch.equal(state[k], original[k]) for k in original)
    with torch.no_grad():
        assert torch.equal(llm.model(input_ids=ids, attention_mask=mask).logits, expected)


def test_generation_with_modality_token_is_greedy_over_full_recomputation():
    llm = tiny_llm()
    attach_llm_adapters(llm, LLMConfig(adapter=AdapterConfig(dropout=0.0)))
    randomise_adapters(llm)
    llm.eval()
    ids, _, _ = text_batch(length=6)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0  # left padding, as in evaluation
    has_image = torch.tensor([True, False, True])
    fast = llm.generate(llm.embed(ids), mask, 5, eos_token_id=1, pad_token_id=2, has_image=has_image)
    current, current_mask = ids, mask
    slow = []
    with torch.no_grad():
        for _ in range(5):
            inputs, _ = llm._inputs(llm.embed(current), current_mask, None, has_image)
            step = llm.model(**inputs).logits[:, -1].argmax(-1)
            slow.append(step)
            current = torch.cat([current, step[:, None]], 1)
            current_mask = torch.cat([current_mask, torch.ones_like(step[:, None])], 1)
    reference = torch.stack(slow, 1)
    finished = torch.zeros(3, dtype=torch.bool)
    for column in range(reference.shape[1]):  # after eos our loop writes pad
        reference[finished, column] = 2
        finished |= reference[:, column] == 1
    assert torch.equal(fast, reference[:, :fast.shape[1]])


def test_vlm_with_router_adapters_in_tower_and_llm(tiny_assets, tmp_path):
    plain_cfg = vlm_config(tiny_assets, tmp_path)
    cfg = vlm_config(tiny_assets, tmp_path, **{
        "model.llm.adapter": {"kind": "router"}, "model.llm.trainable": "adapters",
        "model.vision.adapter": {"kind": "router"}, "model.vision.trainable": "adapters",
        "data.no_image_text": "Image: N/A\n"})
    model, tokenizer, _ = build_vlm(cfg.model)
    reference, _, _ = build_vlm(plain_cfg.model)
    model.eval()
    reference.eval()
    assert sum(isinstance(m, RouterAdapter) for m in model.vision.modules()) == len(model.vision.blocks())
    assert sum(isinstance(m, RouterAdapter) for m in model.llm.modules()) == len(decoder_layers(model.llm.model))
    batch = mixed_batch(model, tokenizer, tiny_assets, cfg)
    assert batch["has_image"].tolist() == [True, False, True]
    with torch.no_grad():
        ours = model(**batch).loss
        theirs = reference(**batch).loss
    assert torch.allclose(ours, theirs, atol=1e-5)  # zero-initialised: the same model at step 0

    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all(CHILD_NAME in n or n.startswith(("llm.modality", "resampler", "projector"))
                             for n in trainable)
    assert any(n.startswith("vision.") for n in trainable) and "llm.modality.embedding.weight" in trainable
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.train()
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    losses = []
    for _ in range(4):
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(float(loss.detach()))
    changed = {n for n, p in model.named_parameters() if not torch.equal(p, before[n])}
    assert changed <= trainable
    assert any(CHILD_NAME in n and n.startswith("vision.") for n in changed)
    assert any(CHILD_NAME in n and n.startswith("llm.") for n in changed)
    assert losses[-1] < losses[0]


def test_no_image_text_stands_in_for_the_image(tiny_assets):
    from transformers import AutoTokenizer

    from mmtrain.data.manifest import Sample
    from mmtrain.data.templates import get_template

    tokenizer = AutoTokenizer.from_pretrained(tiny_assets["tokenizer"])
    sample = Sample(manifest="m.jsonl", line=1, image=None, text=None,
                    conversations=[("human", "Hi?"), ("gpt", "Yes.")], category=None)
    template = get_template("plain")
    plain = template.encode(sample, tokenizer, 4)
    prefixed = template.encode(sample, tokenizer, 4, no_image_text="Image: N/A\n")
    prefix = tokenizer.encode("Image: N/A\n", add_special_tokens=False)
    start = 1 if tokenizer.bos_token_id is not None else 0
    assert prefixed.input_ids[start:start + len(prefix)] == prefix
    assert prefixed.input_ids[start + len(prefix):] == plain.input_ids[start:]
    assert prefixed.labels[start:start + len(prefix)] == [-100] * len(prefix)
    with_image = Sample(manifest="m.jsonl", line=1, image="x.png", text="A cat.", conversations=None, category=None)
    assert template.encode(with_image, tokenizer, 4, no_image_text="Image: N/A\n").input_ids == \
        template.encode(with_image, tokenizer, 4).input_ids


def test_lavin_visual_tokens_are_the_cls_after_every_kth_block(tiny_assets, tmp_path):
    cfg = vlm_config(tiny_assets, tmp_path, **{
        "model.vision.cls_every": 1, "model.resampler": {"kind": "identity"},
        "model.projector": {"kind": "mlp", "hidden_size": 16, "activation": "silu"}})
    model, _, _ = build_vlm(cfg.model)
    tower = model.vision
    pixels = torch.randn(2, *tower.image_shape)
    with torch.no_grad():
        tokens = tower(pixels)
        states = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
    assert tokens.shape == (2, len(tower.blocks()), tower.out_dim) and model.num_image_tokens == len(tower.blocks())
    for k in range(len(tower.blocks())):
        assert torch.equal(tokens[:, k], states[k + 1][:, 0])
    assert isinstance(model.projector[1], torch.nn.SiLU) and model.projector[0].out_features == 16
    with pytest.raises(ValueError, match="cls_every"):
        build_vlm(vlm_config(tiny_assets, tmp_path, **{"model.vision.cls_every": 5}).model)


def test_adapters_need_transformer_blocks():
    from mmtrain.methods.mma.method import attach_vision_adapters

    tower = torch.nn.Identity()
    with pytest.raises(ValueError, match="transformer blocks"):
        attach_vision_adapters(tower, AdapterConfig())
    with pytest.raises(ValueError, match="pre-attention norm"):
        attach_adapters([torch.nn.Linear(4, 4)], 4, AdapterConfig())
    with pytest.raises(ValueError, match="not both"):
        attach_llm_adapters(tiny_llm(), LLMConfig(adapter=AdapterConfig(), lora=LoRAConfig()))


def test_lora_trains_only_its_matrices_and_starts_as_the_model():
    llm = tiny_llm()
    ids, mask, labels = text_batch()
    with torch.no_grad():
        expected = llm(llm.embed(ids), mask, labels).loss
    attach_lora(llm.model, LoRAConfig(r=4, alpha=8, dropout=0.0))
    from mmtrain.models.trainability import _adapter_parameters

    names = {n for n, p in llm.named_parameters() if any(p is q for q in _adapter_parameters(llm))}
    assert names and all(".lora_A." in n or ".lora_B." in n for n in names)
    assert {n.split(".lora_")[0].rsplit(".", 1)[-1] for n in names} == {"q_proj", "v_proj"}
    with torch.no_grad():
        assert torch.allclose(llm(llm.embed(ids), mask, labels).loss, expected, atol=1e-6)
    with pytest.raises(ValueError, match="not found in the LLM"):
        attach_lora(tiny_llm().model, LoRAConfig(target_modules=["query"]))


def test_lavin_visual_mlp_starts_xavier_with_zero_biases():
    import math

    from mmtrain.config.schema import ProjectorConfig
    from mmtrain.models.projector import build_projector

    torch.manual_seed(0)
    projector = build_projector(1024, 512, ProjectorConfig(kind="mlp", hidden_size=128, activation="silu",
                                                           init="xavier"))
    for layer in (projector[0], projector[2]):
        fan_out, fan_in = layer.weight.shape
        bound = math.sqrt(6 / (fan_in + fan_out))
        assert float(layer.weight.abs().max()) <= bound and float(layer.weight.abs().max()) > 0.95 * bound
        assert not layer.bias.any()
    assert isinstance(projector[1], torch.nn.SiLU)
    # The recipes that train LaVIN's visual MLP ask for it.
    for recipe in ("configs/mma/base.yaml", "configs/mma/vit_base.yaml"):
        assert "init: xavier" in open(recipe).read()
