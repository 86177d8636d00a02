"""VL-PET on frozen encoder-decoder LMs (T5, BART): granularity-controlled modules and value adapters.

Encoder: after self-attention and after the feed-forward network of every encoder layer, a VL-PET
module turns the frozen sub-layer's output H (input X) into

    H' = H + W_up GELU(concat_i W_down_i H)        (N_h heads, each d -> r / N_h)
    out = H' * G                                    (G broadcast to N x d)

before the layer's own dropout, residual and LayerNorm. The granularity-controlled matrix G:

    large     s * sigmoid(W_up' GELU(W_down' X))    N x d   (low rank `gate_rank`)
    middle_x  s * sigmoid(W (X + H'))               N x 1   (W: d -> 1)
    middle_y  1 + z                                 1 x d   (z: a learned d-vector, no sigmoid)
    small     s * mean_t sigmoid(W [X; H'])         1 x 1   (W: 2d -> 1; one value per sample)
    none      1

`small` averages over the sample's real tokens: the 2-D attention mask the encoder was called with
is recorded by a pre-hook on the encoder (the latest call's mask stays recorded, so activation
checkpointing recomputes with the same one); without a mask of the right shape it averages over
all positions, as the official code always does.

Decoder: only a parallel adapter on every cross-attention value projection,
`V = W_v E + W_up GELU(W_down E)` (rank r, no gate); the rest of the decoder and the LM head stay
frozen. The encoder LayerNorms are flagged trainable too (`train_encoder_norms`).

Placement (checked against the installed transformers):
    BART  X = input of `self_attn`, H = its output[0]; X = input of `fc1`, H = output of `fc2`
          (the FFN is inline in the layer's forward); value path `encoder_attn.v_proj`.
    T5    X = input of `layer[0].SelfAttention` (the normed hidden states), H = its output[0];
          X, H = input, output of `layer[-1].DenseReluDense`; value path `layer[1].EncDecAttention.v`.

Everything is attached with forward hooks / forward pre-hooks; nothing in transformers is edited.
The modules are registered as children of the blocks they act in (`vl_pet_attn`, `vl_pet_ffn` on
each encoder layer, `vl_pet_value` on each cross-attention), so ZeRO-3's module hooks gather their
parameters and checkpoints name them; `AttachedVLPET.remove()` removes hooks, children and flags,
leaving the model exactly as it was.

GELU is the tanh approximation (`gelu_new`), as in the official code. Initialisation follows the
official VL-PET scripts:
    BART  every new linear layer N(0, config.init_std) with zero bias (what BART's `_init_weights`
          did to the modules the official code builds inside the model); z ~ N(0, 0.02).
    T5    PyTorch's default init for the down projections (T5's `_init_weights` leaves plain linear
          layers alone), and zero for every layer whose output enters the residual path or the
          gate logits: the module's W_up, the large gate's W_up', the middle_x / small gate's W,
          the value adapter's W_up, and z (the scripts' `*_zero_init` flags). A T5 module therefore
          starts as H * G with G = s / 2 (large, middle_x, small) or G = 1 (middle_y).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.hooks import RemovableHandle

from mmtrain.methods.vl_pet.config import VLPETConfig
from mmtrain.models.trainability import ADAPTER_FLAG, mark_adapter

GATES = ("large", "middle_x", "middle_y", "small", "none")
BART_TYPES = frozenset({"bart"})
T5_TYPES = frozenset({"t5", "mt5"})
# (rank r, gate scale s) of the paper's BART-base and T5-base setups.
_DEFAULTS = {"bart": (96, 1.0), "t5": (192, 0.3)}
# The official scripts' (large gate's rank, value adapters' rank): BART-base 96 / 96, T5-base 192 / 96.
_GATE_AND_VALUE_RANKS = {"bart": (96, 96), "t5": (192, 96)}
MIDDLE_Y_STD = 0.02


def _family(model_type: str) -> str:
    if model_type in BART_TYPES:
        return "bart"
    if model_type in T5_TYPES:
        return "t5"
    supported = ", ".join(sorted(BART_TYPES | T5_TYPES))
    raise ValueError(f"VL-PET supports the encoder-decoder LMs {supported}; {model_type!r} is not one of them")


def vl_pet_defaults(model_type: str) -> tuple[int, float]:
    """The paper's (rank r, gate scale s) for a model type: (96, 1.0) for BART, (192, 0.3) for T5."""
    return _DEFAULTS[_family(model_type)]


def gate_and_value_ranks(model_type: str) -> tuple[int, int]:
    """The official scripts' (gate rank, value-adapter rank): (96, 96) for BART, (192, 96) for T5."""
    return _GATE_AND_VALUE_RANKS[_family(model_type)]


def _gelu(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


class LargeGate(nn.Module):
    """G = s * sigmoid(W_up' GELU(W_down' X)): one value per token and channel ([B, N, d])."""

    def __init__(self, dim: int, rank: int, scale: float) -> None:
        super().__init__()
        self.down = nn.Linear(dim, rank)
        self.up = nn.Linear(rank, dim)
        self.scale = scale

    def forward(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.up(_gelu(self.down(x))))

    def output_layers(self) -> list[nn.Linear]:
        return [self.up]


class MiddleXGate(nn.Module):
    """G = s * sigmoid(W (X + H')): one value per token ([B, N, 1])."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * torch.sigmoid(self.proj(x + h))

    def output_layers(self) -> list[nn.Linear]:
        return [self.proj]


class MiddleYGate(nn.Module):
    """G = s * (1 + z): one value per channel, shared by all tokens and samples ([1, 1, d]).

    No sigmoid (the paper's figure has one, the official code does not); the official code scales
    every gated output by s, this one included (s = 1 on BART, 0.3 on T5).
    """

    def __init__(self, dim: int, scale: float = 1.0) -> None:
        super().__init__()
        self.z = nn.Parameter(torch.empty(dim))
        nn.init.normal_(self.z, std=MIDDLE_Y_STD)
        self.scale = scale

    def forward(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        return self.scale * (1 + self.z).view(1, 1, -1)

    def output_layers(self) -> list[nn.Linear]:
        return []


class SmallGate(nn.Module):
    """G = s * mean over the sample's tokens of sigmoid(W [X; H']): one value per sample ([B, 1, 1])."""

    def __init__(self, dim: int, scale: float) -> None:
        super().__init__()
        self.proj = nn.Linear(2 * dim, 1)
        self.scale = scale

    def forward(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        scores = torch.sigmoid(self.proj(torch.cat([x, h], dim=-1)))  # [B, N, 1]
        if mask is None:
            mean = scores.mean(dim=1, keepdim=True)
        else:
            weights = mask.to(scores.dtype).unsqueeze(-1)
            mean = (scores * weights).sum(dim=1, keepdim=True) / weights.sum(dim=1, keepdim=True).clamp(min=1)
        return self.scale * mean

    def output_layers(self) -> list[nn.Linear]:
        return [self.proj]


def build_gate(kind: str, dim: int, gate_rank: int, scale: float) -> nn.Module | None:
    """The gate module of a granularity (`none` -> None: G = 1)."""
    if kind == "large":
        return LargeGate(dim, gate_rank, scale)
    if kind == "middle_x":
        return MiddleXGate(dim, scale)
    if kind == "middle_y":
        return MiddleYGate(dim, scale)
    if kind == "small":
        return SmallGate(dim, scale)
    if kind == "none":
        return None
    raise ValueError(f"VL-PET gate {kind!r}: choose one of {', '.join(GATES)}")


class VLPETModule(nn.Module):
    """A VL-PET module on a frozen sub-layer: `(H + W_up GELU(concat_i W_down_i H)) * G(X, H')`.

    The N_h down heads (each d -> r / N_h) concatenated equal one d -> r projection; they are kept
    as separate heads to match the paper's parameterisation.
    """

    def __init__(self, dim: int, rank: int, heads: int, gate: str, gate_rank: int, gate_scale: float) -> None:
        super().__init__()
        if rank % heads:
            raise ValueError(f"VL-PET rank {rank} is not divisible by its {heads} heads")
        self.down = nn.ModuleList([nn.Linear(dim, rank // heads) for _ in range(heads)])
        self.up = nn.Linear(rank, dim)
        self.gate = build_gate(gate, dim, gate_rank, gate_scale)

    def forward(self, x: torch.Tensor, h: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        h = h + self.up(_gelu(torch.cat([down(h) for down in self.down], dim=-1)))
        if self.gate is None:
            return h
        return h * self.gate(x, h, mask)

    def output_layers(self) -> list[nn.Linear]:
        return [self.up] + (self.gate.output_layers() if self.gate is not None else [])


class ValueAdapter(nn.Module):
    """The parallel adapter of a cross-attention value projection: returns `W_up SiLU(W_down E)`.

    SiLU ("swish"): the official code builds these adapters with its plain adapter class, whose
    non-linearity is swish, not the modules' GELU.
    """

    def __init__(self, in_dim: int, out_dim: int, rank: int) -> None:
        super().__init__()
        self.down = nn.Linear(in_dim, rank)
        self.up = nn.Linear(rank, out_dim)

    def forward(self, e: torch.Tensor) -> torch.Tensor:
        return self.up(F.silu(self.down(e)))

    def output_layers(self) -> list[nn.Linear]:
        return [self.up]


def _init_bart(modules: list[nn.Module], std: float) -> None:
    for module in modules:
        for sub in module.modules():
            if isinstance(sub, nn.Linear):
                nn.init.normal_(sub.weight, std=std)
                nn.init.zeros_(sub.bias)


def _init_t5(modules: list[nn.Module]) -> None:
    for module in modules:
        for layer in module.output_layers():
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)
        for sub in module.modules():
            if isinstance(sub, MiddleYGate):
                nn.init.zeros_(sub.z)


class _EncoderMask:
    """The 2-D attention mask of the latest encoder call, for the `small` gate's mean over tokens."""

    def __init__(self) -> None:
        self.mask: torch.Tensor | None = None

    def record(self, _module: nn.Module, args: tuple, kwargs: dict) -> None:
        mask = kwargs.get("attention_mask", args[1] if len(args) > 1 else None)
        self.mask = mask if isinstance(mask, torch.Tensor) and mask.dim() == 2 else None

    def matching(self, h: torch.Tensor) -> torch.Tensor | None:
        if self.mask is None or tuple(self.mask.shape) != tuple(h.shape[:2]):
            return None
        return self.mask


@dataclass
class AttachedVLPET:
    """What `attach_vl_pet` added to a model; `remove()` takes all of it away."""

    children: list[tuple[nn.Module, str]] = field(default_factory=list)
    flagged: list[nn.Module] = field(default_factory=list)
    handles: list[RemovableHandle] = field(default_factory=list)

    def modules(self) -> list[nn.Module]:
        """The VL-PET modules and value adapters, in attachment order."""
        return [getattr(parent, name) for parent, name in self.children]

    def encoder_modules(self) -> list[VLPETModule]:
        return [m for m in self.modules() if isinstance(m, VLPETModule)]

    def value_adapters(self) -> list[ValueAdapter]:
        return [m for m in self.modules() if isinstance(m, ValueAdapter)]

    def trainable_parameters(self) -> list[nn.Parameter]:
        """The parameters VL-PET trains: its modules' and the flagged encoder norms'."""
        params = [p for m in self.modules() for p in m.parameters()]
        return params + [p for m in self.flagged for p in m.parameters()]

    def remove(self) -> None:
        for handle in self.handles:
            handle.remove()
        for parent, name in self.children:
            delattr(parent, name)
        for module in self.flagged:
            delattr(module, ADAPTER_FLAG)
        self.handles.clear()
        self.children.clear()
        self.flagged.clear()


def _sublayer_hook(module: VLPETModule, masks: _EncoderMask):
    """Forward hook on a frozen sub-layer: replace its output H (or output[0]) by the module's."""

    def hook(_sub: nn.Module, args: tuple, kwargs: dict, output):
        x = args[0] if args else kwargs["hidden_states"]
        h = output[0] if isinstance(output, tuple) else output
        out = module(x, h, masks.matching(h))
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return hook


def _residual_input_hooks(module: VLPETModule, masks: _EncoderMask):
    """T5: the gate's X is the un-normed residual stream entering the layer wrapper (T5LayerSelfAttention,
    T5LayerFF; recorded by a pre-hook on it), as in the official code; H is the sub-layer's output."""
    seen: dict[str, torch.Tensor] = {}

    def before_wrapper(_wrapper: nn.Module, args: tuple, kwargs: dict) -> None:
        seen["x"] = args[0] if args else kwargs["hidden_states"]

    def after_sublayer(_sub: nn.Module, _args: tuple, _kwargs: dict, output):
        h = output[0] if isinstance(output, tuple) else output
        out = module(seen.pop("x"), h, masks.matching(h))
        return (out, *output[1:]) if isinstance(output, tuple) else out

    return before_wrapper, after_sublayer


def _split_ffn_hooks(module: VLPETModule, masks: _EncoderMask):
    """BART's FFN is inline: X is recorded when `fc1` starts, H replaced when `fc2` returns."""
    seen: dict[str, torch.Tensor] = {}

    def before_fc1(_sub: nn.Module, args: tuple) -> None:
        seen["x"] = args[0]

    def after_fc2(_sub: nn.Module, _args: tuple, h: torch.Tensor) -> torch.Tensor:
        return module(seen.pop("x"), h, masks.matching(h))

    return before_fc1, after_fc2


def _value_hook(adapter: ValueAdapter):
    def hook(_proj: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
        return output + adapter(args[0])

    return hook


def _like(module: nn.Module, reference: nn.Module) -> nn.Module:
    """`module` on the device and in the dtype of `reference`'s weights (meta models stay meta)."""
    weight = next(reference.parameters())
    return module.to(device=weight.device, dtype=weight.dtype)


def _require(owner: nn.Module, path: str, model_type: str) -> nn.Module:
    node = owner
    for part in path.split("."):
        node = node[int(part)] if part.lstrip("-").isdigit() else getattr(node, part, None)
        if not isinstance(node, nn.Module):
            raise ValueError(f"VL-PET on {model_type}: {type(owner).__name__} has no `{path}`; this transformers "
                             "version lays the model out differently than VL-PET expects")
    return node


def _encoder_layers(model: nn.Module, family: str) -> list[nn.Module]:
    encoder = model.get_encoder()
    return list(encoder.layers if family == "bart" else encoder.block)


def _decoder_layers(model: nn.Module, family: str) -> list[nn.Module]:
    decoder = model.get_decoder()
    return list(decoder.layers if family == "bart" else decoder.block)


def _is_norm(module: nn.Module) -> bool:
    return isinstance(module, nn.LayerNorm) or type(module).__name__.endswith("LayerNorm")


def attach_vl_pet(model: nn.Module, cfg: VLPETConfig) -> AttachedVLPET:
    """Attach VL-PET to a Hugging Face T5 / BART seq2seq LM and flag what it trains.

    Args:
        model: e.g. `T5ForConditionalGeneration` or `BartForConditionalGeneration`.
        cfg: granularity, rank, value-adapter rank, heads, gate rank and scale (None: the official
            setting for the model type).

    Returns:
        The handle; its modules are flagged with `mark_adapter` (as are the encoder LayerNorms
        when `cfg.train_encoder_norms`), so `trainable: adapters` trains exactly them.
    """
    model_type = model.config.model_type
    family = _family(model_type)
    default_rank, default_scale = vl_pet_defaults(model_type)
    rank = cfg.rank if cfg.rank is not None else default_rank
    scale = cfg.gate_scale if cfg.gate_scale is not None else default_scale
    default_gate_rank, default_value_rank = gate_and_value_ranks(model_type)
    gate_rank = cfg.gate_rank if cfg.gate_rank is not None else default_gate_rank
    value_rank = cfg.value_rank if cfg.value_rank is not None else default_value_rank
    if cfg.gate not in GATES:
        raise ValueError(f"model.llm.vl_pet.gate={cfg.gate!r}: choose one of {', '.join(GATES)}")
    dim = model.config.d_model
    masks = _EncoderMask()
    attached = AttachedVLPET()

    def new_module(reference: nn.Module) -> VLPETModule:
        return _like(VLPETModule(dim, rank, cfg.heads, cfg.gate, gate_rank, scale), reference)

    def add(parent: nn.Module, name: str, module: nn.Module) -> None:
        if hasattr(parent, name):
            raise ValueError(f"{type(parent).__name__} already has `{name}`: VL-PET is attached twice")
        parent.add_module(name, mark_adapter(module))
        attached.children.append((parent, name))

    try:
        encoder = model.get_encoder()
        attached.handles.append(encoder.register_forward_pre_hook(masks.record, with_kwargs=True))
        for layer in _encoder_layers(model, family):
            if family == "bart":
                attn = _require(layer, "self_attn", model_type)
                fc1, fc2 = _require(layer, "fc1", model_type), _require(layer, "fc2", model_type)
                add(layer, "vl_pet_attn", new_module(attn))
                add(layer, "vl_pet_ffn", new_module(fc2))
                before_fc1, after_fc2 = _split_ffn_hooks(layer.vl_pet_ffn, masks)
                attached.handles.append(fc1.register_forward_pre_hook(before_fc1))
                attached.handles.append(fc2.register_forward_hook(after_fc2))
                attached.handles.append(attn.register_forward_hook(_sublayer_hook(layer.vl_pet_attn, masks),
                                                                   with_kwargs=True))
            else:
                attn = _require(layer, "layer.0.SelfAttention", model_type)
                ffn = _require(layer, "layer.-1.DenseReluDense", model_type)
                add(layer, "vl_pet_attn", new_module(attn))
                add(layer, "vl_pet_ffn", new_module(ffn))
                for wrapper, sublayer, module in ((layer.layer[0], attn, layer.vl_pet_attn),
                                                  (layer.layer[-1], ffn, layer.vl_pet_ffn)):
                    before, after = _residual_input_hooks(module, masks)
                    attached.handles.append(wrapper.register_forward_pre_hook(before, with_kwargs=True))
                    attached.handles.append(sublayer.register_forward_hook(after, with_kwargs=True))
        for layer in _decoder_layers(model, family):
            cross = _require(layer, "encoder_attn" if family == "bart" else "layer.1.EncDecAttention", model_type)
            proj = _require(cross, "v_proj" if family == "bart" else "v", model_type)
            adapter = _like(ValueAdapter(proj.in_features, proj.out_features, value_rank), proj)
            add(cross, "vl_pet_value", adapter)
            attached.handles.append(proj.register_forward_hook(_value_hook(adapter)))
        if cfg.train_encoder_norms:
            for module in encoder.modules():
                if _is_norm(module) and not getattr(module, ADAPTER_FLAG, False):
                    attached.flagged.append(mark_adapter(module))
    except Exception:
        attached.remove()
        raise
    with torch.no_grad():
        if family == "bart":
            _init_bart(attached.modules(), model.config.init_std)
        else:
            _init_t5(attached.modules())
    return attached
