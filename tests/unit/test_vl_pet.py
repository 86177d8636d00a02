"""Encoder-decoder LMs behind the VLM interface (`Seq2SeqLM`) and VL-PET on T5 and BART.

Tiny random models built from configs (d 32, 2 + 2 layers, vocab 512; pad 2, eos 1, decoder start 2),
fed with embeddings directly.
"""

from __future__ import annotations

import pytest
import torch
from transformers import AutoConfig, AutoModelForSeq2SeqLM

from mmtrain.config.schema import LLMConfig
from mmtrain.methods.vl_pet.config import VLPETConfig
from mmtrain.methods.vl_pet.method import attach_to_llm
from mmtrain.models.seq2seq import Seq2SeqLM, build_seq2seq_llm, pack
from mmtrain.models.trainability import ADAPTER_FLAG, _adapter_parameters
from mmtrain.methods.vl_pet.modules import (
    GATES, LargeGate, MiddleXGate, MiddleYGate, SmallGate, ValueAdapter, VLPETModule, attach_vl_pet,
    gate_and_value_ranks, vl_pet_defaults,
)

PAD, EOS, START = 2, 1, 2
SIZES = {
    "t5": dict(d_model=32, d_ff=64, num_layers=2, num_decoder_layers=2, num_heads=4, d_kv=8, dropout_rate=0.0),
    "bart": dict(d_model=32, encoder_ffn_dim=64, decoder_ffn_dim=64, encoder_layers=2, decoder_layers=2,
                 encoder_attention_heads=4, decoder_attention_heads=4, scale_embedding=True,
                 max_position_embeddings=64, dropout=0.0, bos_token_id=0),
}
SMALL_PET = dict(rank=8, heads=4, gate_rank=8)


def tiny_config(model_type: str):
    return AutoConfig.for_model(model_type, vocab_size=512, pad_token_id=PAD, eos_token_id=EOS,
                                decoder_start_token_id=START, **SIZES[model_type])


def tiny_model(model_type: str, seed: int = 0):
    torch.manual_seed(seed)
    return AutoModelForSeq2SeqLM.from_config(tiny_config(model_type)).eval()


def randomise(model, std: float = 1.0) -> None:
    """Large random weights (norms untouched), so greedy decoding is not one repeated token."""
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" not in name:
                param.normal_(0, std)


def vlm_batch(seed: int = 0):
    """Two VLM-style right-padded rows: prompt (5 / 4 tokens) then target (3 / 2 tokens)."""
    gen = torch.Generator().manual_seed(seed)
    prompts = [torch.randint(3, 512, (5,), generator=gen), torch.randint(3, 512, (4,), generator=gen)]
    targets = [torch.tensor([7, 8, EOS]), torch.tensor([9, EOS])]
    input_ids = torch.full((2, 8), PAD)
    labels = torch.full((2, 8), -100)
    attention_mask = torch.zeros(2, 8, dtype=torch.long)
    for row, (prompt, target) in enumerate(zip(prompts, targets)):
        n, m = len(prompt), len(target)
        input_ids[row, :n + m] = torch.cat([prompt, target])
        labels[row, n:n + m] = target
        attention_mask[row, :n + m] = 1
    return input_ids, attention_mask, labels, prompts, targets


def right_padded(rows: list[torch.Tensor], fill: int):
    out = torch.full((len(rows), max(len(r) for r in rows)), fill)
    mask = torch.zeros_like(out)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
        mask[i, :len(r)] = 1
    return out, mask


def encoder_layers(model):
    encoder = model.get_encoder()
    return list(getattr(encoder, "layers", None) or encoder.block)


def cross_attentions(model):
    decoder = model.get_decoder()
    if model.config.model_type == "bart":
        return [layer.encoder_attn for layer in decoder.layers]
    return [block.layer[1].EncDecAttention for block in decoder.block]


# ----------------------------------------------------------------------------- gates and module


def test_gate_shapes():
    torch.manual_seed(0)
    x, h = torch.randn(3, 5, 16), torch.randn(3, 5, 16)
    mask = torch.ones(3, 5, dtype=torch.long)
    expected = {"large": (3, 5, 16), "middle_x": (3, 5, 1), "middle_y": (1, 1, 16), "small": (3, 1, 1)}
    for gate, shape in expected.items():
        module = VLPETModule(16, rank=8, heads=4, gate=gate, gate_rank=4, gate_scale=0.3)
        assert tuple(module.gate(x, h, mask).shape) == shape
        assert tuple(module(x, h, mask).shape) == (3, 5, 16)
    assert VLPETModule(16, 8, 4, "none", 4, 1.0).gate is None
    assert isinstance(VLPETModule(16, 8, 4, "large", 4, 1.0).gate, LargeGate)
    with pytest.raises(ValueError, match="divisible"):
        VLPETModule(16, rank=6, heads=4, gate="large", gate_rank=4, gate_scale=1.0)


def test_gate_formulas():
    torch.manual_seed(0)
    x, h = torch.randn(2, 4, 8), torch.randn(2, 4, 8)
    gelu = torch.nn.GELU(approximate="tanh")
    large = LargeGate(8, 3, 0.3)
    assert torch.allclose(large(x, h), 0.3 * torch.sigmoid(large.up(gelu(large.down(x)))))
    middle_x = MiddleXGate(8, 0.5)
    assert torch.allclose(middle_x(x, h), 0.5 * torch.sigmoid(middle_x.proj(x + h)))
    middle_y = MiddleYGate(8)
    assert torch.equal(middle_y(x, h), (1 + middle_y.z).view(1, 1, 8))  # no sigmoid
    scaled = MiddleYGate(8, 0.3)  # the official code scales every gated output by s, middle_y's too
    assert torch.allclose(scaled(x, h), 0.3 * (1 + scaled.z).view(1, 1, 8))
    module = VLPETModule(8, 4, 2, "middle_y", 4, 1.0)
    h_prime = h + module.up(gelu(torch.cat([d(h) for d in module.down], dim=-1)))
    assert torch.allclose(module(x, h), h_prime * (1 + module.gate.z))


def test_small_gate_averages_over_real_tokens_only():
    torch.manual_seed(0)
    gate = SmallGate(8, 1.0)
    x, h = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    mask = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]])
    x2, h2 = x.clone(), h.clone()
    x2[0, 4:], h2[0, 4:] = 100.0, -100.0
    assert torch.equal(gate(x, h, mask), gate(x2, h2, mask))
    alone = gate(x[:1, :4], h[:1, :4])
    assert torch.allclose(gate(x, h, mask)[0], alone[0])


def test_value_adapter_is_swish():
    torch.manual_seed(0)
    adapter = ValueAdapter(8, 6, 4)
    e = torch.randn(2, 3, 8)
    assert torch.allclose(adapter(e), adapter.up(torch.nn.functional.silu(adapter.down(e))))


def test_defaults_per_model_type():
    assert vl_pet_defaults("bart") == (96, 1.0)
    assert vl_pet_defaults("t5") == (192, 0.3)
    assert gate_and_value_ranks("bart") == (96, 96) and gate_and_value_ranks("t5") == (192, 96)
    assert vl_pet_defaults("mt5") == (192, 0.3)
    with pytest.raises(ValueError, match="llama"):
        vl_pet_defaults("llama")


# ----------------------------------------------------------------------------- Seq2SeqLM


def test_pack_moves_kept_positions_left():
    values = torch.arange(12).view(2, 6)
    keep = torch.tensor([[0, 1, 1, 0, 1, 0], [1, 0, 0, 0, 0, 1]]).bool()
    packed, mask = pack(values, keep, fill=-1)
    assert packed.tolist() == [[1, 2, 4], [6, 11, -1]]
    assert mask.tolist() == [[1, 1, 1], [1, 1, 0]]


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_embed_is_what_the_encoder_computes_from_ids(model_type):
    model = tiny_model(model_type)
    llm = Seq2SeqLM(model)
    ids = torch.randint(3, 512, (2, 7))
    encoder = model.get_encoder()
    expected = encoder(input_ids=ids).last_hidden_state
    assert torch.equal(encoder(inputs_embeds=llm.embed(ids)).last_hidden_state, expected)
    if model_type == "bart":  # scale_embedding: the embedding module scales by sqrt(d) itself
        raw = model.get_input_embeddings().weight[ids]
        assert torch.allclose(llm.embed(ids), raw * 32 ** 0.5)


@pytest.mark.parametrize("model_type", ["marian", "pegasus"])
def test_embed_matches_encoders_that_scale_in_forward(model_type):
    config = AutoConfig.for_model(model_type, vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32, scale_embedding=True,
                                  pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START)
    torch.manual_seed(0)
    model = AutoModelForSeq2SeqLM.from_config(config).eval()
    llm = Seq2SeqLM(model)
    ids = torch.randint(3, 128, (2, 5))
    encoder = model.get_encoder()
    assert torch.allclose(encoder(inputs_embeds=llm.embed(ids)).last_hidden_state,
                          encoder(input_ids=ids).last_hidden_state, atol=1e-6)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_split_equals_prompt_to_encoder_target_to_decoder(model_type):
    model = tiny_model(model_type)
    llm = Seq2SeqLM(model)
    input_ids, attention_mask, labels, prompts, targets = vlm_batch()
    loss = llm(llm.embed(input_ids), attention_mask, labels).loss
    source, source_mask = right_padded(prompts, PAD)
    target_labels, _ = right_padded(targets, -100)
    expected = model(input_ids=source, attention_mask=source_mask, labels=target_labels).loss
    assert abs(loss.item() - expected.item()) < 1e-6

    sums, counts = llm.target_logprobs(llm.embed(input_ids), attention_mask, labels)
    assert sums.dtype == torch.float64
    assert counts.tolist() == [3, 2]
    assert abs((-sums.sum() / counts.sum()).item() - loss.item()) < 1e-5


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_batch_without_targets_gives_a_zero_loss_in_the_graph(model_type):
    llm = Seq2SeqLM(tiny_model(model_type))
    input_ids, attention_mask, labels, _, _ = vlm_batch()
    embeds = llm.embed(input_ids).detach().requires_grad_(True)
    loss = llm(embeds, attention_mask, torch.full_like(labels, -100)).loss
    assert loss.item() == 0.0
    loss.backward()
    assert embeds.grad is not None and not embeds.grad.any()
    sums, counts = llm.target_logprobs(llm.embed(input_ids), attention_mask, torch.full_like(labels, -100))
    assert sums.tolist() == [0.0, 0.0] and counts.tolist() == [0, 0]


def greedy_reference(model, prompt: torch.Tensor, steps: int, eos: int) -> list[int]:
    """Argmax decoding by full forward passes (no cache), one unpadded prompt."""
    decoder = [START]
    for _ in range(steps):
        logits = model(input_ids=prompt[None], decoder_input_ids=torch.tensor([decoder])).logits[0, -1]
        decoder.append(int(logits.argmax()))
        if decoder[-1] == eos:
            break
    return decoder[1:]


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_generate_is_greedy_from_left_padded_prompts(model_type):
    model = tiny_model(model_type)
    randomise(model)
    llm = Seq2SeqLM(model)
    gen = torch.Generator().manual_seed(1)
    prompts = [torch.randint(3, 512, (n,), generator=gen) for n in (7, 5, 3)]
    left = torch.full((3, 7), PAD)
    mask = torch.zeros_like(left)
    for row, prompt in enumerate(prompts):
        left[row, 7 - len(prompt):] = prompt
        mask[row, 7 - len(prompt):] = 1
    first = llm.generate(llm.embed(left), mask, 6, EOS, PAD)
    eos = int(first[0, 2])  # a token sample 0 produces: decoding of that row stops early
    with torch.no_grad():
        out = llm.generate(llm.embed(left), mask, 6, eos, PAD)
    assert out.shape[0] == 3 and out.shape[1] <= 6
    for row, prompt in enumerate(prompts):
        expected = greedy_reference(model, prompt, 6, eos)
        assert out[row, :len(expected)].tolist() == expected
        assert (out[row, len(expected):] == PAD).all()
    source, source_mask = right_padded(prompts, PAD)
    hf = model.generate(input_ids=source, attention_mask=source_mask, max_new_tokens=6, eos_token_id=eos,
                        pad_token_id=PAD, do_sample=False, num_beams=1, forced_eos_token_id=None)
    assert torch.equal(out, hf[:, 1:])


# ----------------------------------------------------------------------------- VL-PET attached


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_modules_sit_after_self_attention_and_ffn_and_on_every_cross_attention_value(model_type):
    model = tiny_model(model_type)
    seen: dict[str, list] = {}

    def record(key):
        def hook(_m, args, kwargs, output):
            x = args[0] if args else kwargs["hidden_states"]
            seen.setdefault(key, []).append((x, output[0] if isinstance(output, tuple) else output))
        return hook

    def record_input(key):
        def hook(_m, args):
            seen.setdefault(key, []).append(args[0])
        return hook

    # Registered before VL-PET's hooks, so they see the frozen sub-layers' own outputs.
    for layer in encoder_layers(model):
        if model_type == "bart":
            layer.self_attn.register_forward_hook(record("attn"), with_kwargs=True)
            layer.fc1.register_forward_pre_hook(record_input("fc1_in"))
            layer.fc2.register_forward_hook(record("fc2"), with_kwargs=True)
        else:  # T5: the gates read the un-normed residual stream entering the layer wrapper
            layer.layer[0].register_forward_pre_hook(record_input("attn_in"))
            layer.layer[-1].register_forward_pre_hook(record_input("ffn_in"))
            layer.layer[0].SelfAttention.register_forward_hook(record("attn"), with_kwargs=True)
            layer.layer[-1].DenseReluDense.register_forward_hook(record("ffn"), with_kwargs=True)
    for cross in cross_attentions(model):
        proj = cross.v_proj if model_type == "bart" else cross.v
        proj.register_forward_hook(record("v"), with_kwargs=True)

    handle = attach_vl_pet(model, VLPETConfig(gate="large", **SMALL_PET))
    calls: dict[str, list] = {}
    for layer in encoder_layers(model):
        assert isinstance(layer.vl_pet_attn, VLPETModule) and isinstance(layer.vl_pet_ffn, VLPETModule)
        for name in ("vl_pet_attn", "vl_pet_ffn"):
            getattr(layer, name).register_forward_pre_hook(
                lambda _m, args, name=name: calls.setdefault(name, []).append(args[:2]))
    for cross in cross_attentions(model):
        assert isinstance(cross.vl_pet_value, ValueAdapter)
        cross.vl_pet_value.register_forward_pre_hook(lambda _m, args: calls.setdefault("value", []).append(args[0]))
    assert len(handle.encoder_modules()) == 4 and len(handle.value_adapters()) == 2

    input_ids, attention_mask, labels, _, _ = vlm_batch()
    llm = Seq2SeqLM(model)
    llm(llm.embed(input_ids), attention_mask, labels)
    assert len(calls["vl_pet_attn"]) == len(calls["vl_pet_ffn"]) == 2 and len(calls["value"]) == 2
    if model_type == "bart":
        attn = seen["attn"]
        ffn = list(zip(seen["fc1_in"], [h for _, h in seen["fc2"]]))
    else:
        attn = list(zip(seen["attn_in"], [h for _, h in seen["attn"]]))
        ffn = list(zip(seen["ffn_in"], [h for _, h in seen["ffn"]]))
        assert not torch.equal(seen["attn_in"][0], seen["attn"][0][0])  # the wrapper's input, not the normed one
    for (x, h), (mx, mh) in zip(attn, calls["vl_pet_attn"]):
        assert x is mx and torch.equal(h, mh)
    for (x, h), (mx, mh) in zip(ffn, calls["vl_pet_ffn"]):
        assert x is mx and torch.equal(h, mh)
    for (e, _), me in zip(seen["v"], calls["value"]):
        assert e is me  # the adapter reads the value projection's input (the encoder output)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_value_adapter_adds_to_the_value_projection(model_type):
    model = tiny_model(model_type)
    attach_vl_pet(model, VLPETConfig(gate="none", **SMALL_PET))
    cross = cross_attentions(model)[0]
    proj = cross.v_proj if model_type == "bart" else cross.v
    with torch.no_grad():
        cross.vl_pet_value.up.weight.normal_()
    e = torch.randn(2, 5, 32)
    expected = torch.nn.functional.linear(e, proj.weight, proj.bias) + cross.vl_pet_value(e)
    assert torch.allclose(proj(e), expected)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_only_vl_pet_and_encoder_norms_are_adapters(model_type):
    model = tiny_model(model_type)
    handle = attach_vl_pet(model, VLPETConfig(gate="large", **SMALL_PET))
    llm = Seq2SeqLM(model)
    llm.requires_grad_(False)  # what `trainable: adapters` does to the LLM component
    for param in _adapter_parameters(llm):
        param.requires_grad_(True)
    trainable = {name for name, p in llm.named_parameters() if p.requires_grad}
    assert {id(p) for p in llm.parameters() if p.requires_grad} == {id(p) for p in handle.trainable_parameters()}
    norms = {f"model.{name}" for name, _ in model.named_parameters()
             if ".encoder." in f".{name}" and ("layer_norm" in name or "layernorm" in name)}
    vl_pet = {name for name in trainable if "vl_pet" in name}
    assert norms and trainable == norms | vl_pet
    assert all(".encoder." in f".{n}" for n in vl_pet if "vl_pet_value" not in n)
    assert all("vl_pet_value" in n for n in trainable if ".decoder." in n)  # decoder: value adapters only
    frozen = ("shared.weight", "embed_tokens.weight", "embed_positions.weight", "lm_head.weight")
    assert not any(n.endswith(frozen) for n in trainable)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_no_encoder_norms_when_asked(model_type):
    model = tiny_model(model_type)
    handle = attach_vl_pet(model, VLPETConfig(gate="small", train_encoder_norms=False, **SMALL_PET))
    assert not handle.flagged
    assert all("vl_pet" in name for name, p in model.named_parameters()
               if any(p is q for q in _adapter_parameters(model)))


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_remove_restores_the_model_exactly(model_type):
    model = tiny_model(model_type)
    input_ids, attention_mask, labels, _, _ = vlm_batch()
    llm = Seq2SeqLM(model)
    before_state = {k: v.clone() for k, v in model.state_dict().items()}
    before = llm(llm.embed(input_ids), attention_mask, labels).loss
    for gate in GATES:
        handle = attach_vl_pet(model, VLPETConfig(gate=gate, **SMALL_PET))
        assert any("vl_pet" in k for k in model.state_dict())
        llm(llm.embed(input_ids), attention_mask, labels)
        handle.remove()
        state = model.state_dict()
        assert state.keys() == before_state.keys()
        assert all(torch.equal(state[k], v) for k, v in before_state.items())
        assert not any(getattr(m, ADAPTER_FLAG, False) for m in model.modules())
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
        assert torch.equal(llm(llm.embed(input_ids), attention_mask, labels).loss, before)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_training_moves_only_adapters_and_lowers_the_loss(model_type):
    model = tiny_model(model_type)
    handle = attach_vl_pet(model, VLPETConfig(gate="large", **SMALL_PET))
    llm = Seq2SeqLM(model).train()
    llm.requires_grad_(False)
    params = _adapter_parameters(llm)
    for param in params:
        param.requires_grad_(True)
    before = {name: p.detach().clone() for name, p in llm.named_parameters()}
    optimizer = torch.optim.AdamW(params, lr=3e-2)
    input_ids, attention_mask, labels, _, _ = vlm_batch()
    losses = []
    for _ in range(10):
        loss = llm(llm.embed(input_ids), attention_mask, labels).loss
        losses.append(loss.item())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    assert losses[-1] < losses[0] - 0.1
    trainable = {id(p) for p in handle.trainable_parameters()}
    for name, p in llm.named_parameters():
        if id(p) not in trainable:
            assert torch.equal(p, before[name]), name
    changed = [name for name, p in llm.named_parameters() if not torch.equal(p, before[name])]
    assert any("vl_pet_attn" in n for n in changed) and any("vl_pet_value" in n for n in changed)


@pytest.mark.parametrize("model_type", ["t5", "bart"])
def test_padding_does_not_change_a_sample(model_type):
    """With the per-sample `small` gate, a padded sample's encoding equals its unpadded one."""
    model = tiny_model(model_type)
    attach_vl_pet(model, VLPETConfig(gate="small", **SMALL_PET))
    with torch.no_grad():  # make the gate depend on its input
        for layer in encoder_layers(model):
            layer.vl_pet_attn.gate.proj.weight.normal_()
    ids = torch.randint(3, 512, (2, 7))
    mask = torch.ones_like(ids)
    mask[0, 4:] = 0
    encoder = model.get_encoder()
    batched = encoder(input_ids=ids, attention_mask=mask).last_hidden_state[0, :4]
    alone = encoder(input_ids=ids[:1, :4]).last_hidden_state[0]
    assert torch.allclose(batched, alone, atol=1e-5)


def test_gradient_checkpointing_recomputes_the_same_forward():
    model = tiny_model("t5")
    attach_vl_pet(model, VLPETConfig(gate="small", **SMALL_PET))
    llm = Seq2SeqLM(model).train()
    input_ids, attention_mask, labels, _, _ = vlm_batch()
    calls = []
    encoder_layers(model)[0].vl_pet_attn.register_forward_hook(lambda *_: calls.append(1))

    def grads():
        calls.clear()
        llm.zero_grad()
        llm(llm.embed(input_ids), attention_mask, labels).loss.backward()
        return {n: p.grad.clone() for n, p in llm.named_parameters() if "vl_pet" in n and p.grad is not None}

    plain = grads()
    assert len(calls) == 1
    llm.enable_gradient_checkpointing()
    checkpointed = grads()
    assert len(calls) == 2  # the layer was recomputed in the backward pass
    assert plain.keys() == checkpointed.keys() and plain
    assert all(torch.allclose(plain[n], checkpointed[n], atol=1e-6) for n in plain)


def test_t5_initialisation_starts_from_the_scaled_frozen_sublayers():
    """T5 (official scripts): zero up-projections, so each module starts as H * s / 2 (large gate)."""
    model = tiny_model("t5")
    handle = attach_vl_pet(model, VLPETConfig(gate="large", **SMALL_PET))
    for module in handle.encoder_modules():
        assert not module.up.weight.any() and not module.gate.up.weight.any()
        x, h = torch.randn(1, 3, 32), torch.randn(1, 3, 32)
        assert torch.allclose(module(x, h), h * 0.15)
    assert all(not a.up.weight.any() for a in handle.value_adapters())
    bart = attach_vl_pet(tiny_model("bart"), VLPETConfig(gate="middle_y", **SMALL_PET))
    assert all(m.up.weight.std() > 0 for m in bart.encoder_modules())
    assert all(not m.up.bias.any() for m in bart.encoder_modules())


def test_unsupported_model_type_errors_clearly():
    config = AutoConfig.for_model("pegasus", vocab_size=128, d_model=16, encoder_layers=1, decoder_layers=1,
                                  encoder_attention_heads=2, decoder_attention_heads=2, encoder_ffn_dim=32,
                                  decoder_ffn_dim=32, max_position_embeddings=32)
    model = AutoModelForSeq2SeqLM.from_config(config)
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="pegasus"):
        attach_vl_pet(model, VLPETConfig())
    assert set(model.state_dict()) == keys


def test_attaching_twice_errors_and_leaves_the_first():
    model = tiny_model("bart")
    attach_vl_pet(model, VLPETConfig(**SMALL_PET))
    keys = set(model.state_dict())
    with pytest.raises(ValueError, match="attached twice"):
        attach_vl_pet(model, VLPETConfig(**SMALL_PET))
    assert set(model.state_dict()) == keys


def test_attach_on_meta_device_counts_bart_base():
    config = AutoConfig.for_model("bart", vocab_size=50265, d_model=768, encoder_layers=6, decoder_layers=6,
                                  encoder_attention_heads=12, decoder_attention_heads=12, encoder_ffn_dim=3072,
                                  decoder_ffn_dim=3072)
    with torch.device("meta"):
        model = AutoModelForSeq2SeqLM.from_config(config)
    handle = attach_vl_pet(model, VLPETConfig(gate="large"))
    assert all(p.is_meta for p in handle.trainable_parameters())
    module = 2 * (768 * 96 + 96 + 96 * 768 + 768)  # adapter + large gate, r = gate rank = 96
    value = 768 * 96 + 96 + 96 * 768 + 768
    norms = 6 * 2 * 2 * 768 + 2 * 768  # two LayerNorms per layer and the embedding LayerNorm
    assert sum(p.numel() for p in handle.trainable_parameters()) == 12 * module + 6 * value + norms


def test_builder_attaches_and_flags_vl_pet():
    params = dict(SIZES["t5"], vocab_size=512, pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=START)
    cfg = LLMConfig(config={"model_type": "t5", **params}, vl_pet=VLPETConfig(gate="middle_x", **SMALL_PET))
    llm = build_seq2seq_llm(tiny_config("t5"), cfg, "sdpa", torch.float32)
    attach_to_llm(llm, cfg.vl_pet)  # what the VL-PET plug-in does when build_vlm builds the model
    assert isinstance(llm, Seq2SeqLM) and llm.is_encoder_decoder and llm.hidden_size == 32
    assert llm.vl_pet is not None and len(llm.vl_pet.encoder_modules()) == 4
    assert {id(p) for p in _adapter_parameters(llm)} == {id(p) for p in llm.vl_pet.trainable_parameters()}
    plain = build_seq2seq_llm(tiny_config("t5"), LLMConfig(config=cfg.config), "sdpa", torch.float32)
    assert getattr(plain, "vl_pet", None) is None and not _adapter_parameters(plain)
