"""Language-model wrappers: one interface for the VLM, whatever the LM's architecture.

The VLM only needs `embed(input_ids)`, `forward(inputs_embeds, attention_mask, labels)`,
`hidden_size` and `is_encoder_decoder` (plus `has_image` when the LM has an MMA modality token).
Decoder-only causal LMs (Llama, Qwen2, OPT...) are `CausalLM`; encoder-decoder LMs (T5/BART: visual
tokens into the encoder input, text out of the decoder) are `Seq2SeqLM` (`mmtrain/models/seq2seq.py`).

Under ZeRO-3 the caller keeps a `HfDeepSpeedConfig` alive while this module is built, so
`from_pretrained`/`from_config` construct the weights inside `deepspeed.zero.Init` (partitioned
as they are created) with Hugging Face's initialisation intact.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import CausalLMOutputWithPast

from mmtrain.config.schema import LLMConfig
from mmtrain.models.attention import packed_attention_inputs
from mmtrain.models.language_model import IGNORE_INDEX, LanguageModel
from mmtrain.models.partitioned_load import buffers_only_init, checkpoint_files, fits, load_into_partitions
from mmtrain.models.quantization import keep_cpu_layout, quantization_kwargs
from mmtrain.models.seq2seq import build_seq2seq_llm

__all__ = ["IGNORE_INDEX", "CausalLM", "LanguageModel", "build_llm", "decoder_layers", "llm_hidden_size", "load_tokenizer",
           "resolve_llm_config"]

log = logging.getLogger("mmtrain")

# Architectures whose logits are exactly `lm_head(final hidden state)` (no soft-capping or scaling),
# for which the loss can be computed on the target positions only.
TARGET_ONLY_LOSS_TYPES = frozenset({"llama", "qwen2", "qwen3", "mistral"})


class CausalLM(LanguageModel):
    """A Hugging Face `AutoModelForCausalLM` fed with `inputs_embeds`.

    With labels, the LM head runs only on positions that have a target: image, prompt and padding
    positions (most of a VLM's sequence) never become [*, vocab] logits. Same loss as Hugging Face's
    (mean token cross-entropy), less compute, and no [B, T, vocab] tensor in memory.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hidden_size = model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        self.target_only_loss = model.config.model_type in TARGET_ONLY_LOSS_TYPES
        self.modality: nn.Module | None = None

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model.get_input_embeddings()(input_ids)

    def _inputs(self, inputs_embeds, attention_mask, labels, has_image,
                position_ids=None) -> tuple[dict, torch.Tensor | None]:
        """Model keyword arguments (the modality token prepended when there is one) and the labels.

        `position_ids` mark packed rows (restarting at 0 at every sample): the samples are kept apart.
        """
        if position_ids is not None:
            if self.modality is not None:
                raise ValueError("packed rows (position_ids) cannot keep samples apart around an MMA modality "
                                 "token: it is one per row, not per sample")
            implementation = self.model.config._attn_implementation
            return {"inputs_embeds": inputs_embeds,
                    **packed_attention_inputs(position_ids, attention_mask, implementation, inputs_embeds.dtype)}, labels
        if self.modality is None:
            return {"inputs_embeds": inputs_embeds, "attention_mask": attention_mask}, labels
        if has_image is None:  # the LLM used on its own (text perplexity): text-only inputs
            has_image = torch.zeros(inputs_embeds.shape[0], dtype=torch.bool, device=inputs_embeds.device)
        embeds, mask, positions, labels = self.modality.prepend(inputs_embeds, attention_mask, has_image, labels)
        return {"inputs_embeds": embeds, "attention_mask": mask, "position_ids": positions}, labels

    def forward(self, inputs_embeds, attention_mask, labels=None, has_image=None, position_ids=None):
        inputs, labels = self._inputs(inputs_embeds, attention_mask, labels, has_image, position_ids)
        if labels is None or not self.target_only_loss:
            return self.model(**inputs, labels=labels, use_cache=False)
        hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        logits = self.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        if logits.shape[0] == 0:  # no target in the batch: a zero loss that still spans the graph
            loss = hidden.sum() * 0.0
        else:
            loss = F.cross_entropy(logits, targets[keep])
        return CausalLMOutputWithPast(loss=loss, logits=None)

    def target_logprobs(self, inputs_embeds, attention_mask, labels, has_image=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the summed log-probability of its target tokens, and how many there are ([B], [B]).

        The LM head runs on target positions only, as in the training loss.
        """
        inputs, labels = self._inputs(inputs_embeds, attention_mask, labels, has_image)
        targets = labels[:, 1:]
        keep = targets != IGNORE_INDEX
        sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
        if self.target_only_loss:
            hidden = self.model.get_decoder()(**inputs, use_cache=False).last_hidden_state
            logits = self.model.get_output_embeddings()(hidden[:, :-1][keep]).float()
        else:  # architectures with logit soft-capping or scaling: the model's own logits
            out = self.model(**inputs, use_cache=False)
            logits = out.logits[:, :-1][keep].float()
        if logits.shape[0]:
            picked = torch.log_softmax(logits, dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
            rows = torch.arange(labels.shape[0], device=labels.device).unsqueeze(1).expand_as(targets)[keep]
            sums.index_add_(0, rows, picked.double())
        return sums, keep.sum(dim=1)

    def generate(self, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, synced_ranks=False,
                 has_image=None):
        if self.modality is not None:
            inputs, _ = self._inputs(inputs_embeds, attention_mask, None, has_image)
            return greedy_with_custom_mask(self.model, inputs, max_new_tokens, eos_token_id, pad_token_id, synced_ranks)
        # From embeddings, Hugging Face's generate returns only the new tokens.
        return self.model.generate(inputs_embeds=inputs_embeds, attention_mask=attention_mask, do_sample=False,
                                   max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                                   pad_token_id=pad_token_id, synced_gpus=synced_ranks, num_beams=1,
                                   temperature=None, top_p=None, top_k=None)


def resolve_llm_config(cfg: LLMConfig):
    """The transformers config of `cfg.name_or_path`, or one built from the `cfg.config` dict."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoConfig

    if cfg.name_or_path and cfg.config:
        raise ValueError("model.llm: set either `name_or_path` or `config`, not both")
    if cfg.name_or_path:
        return AutoConfig.from_pretrained(cfg.name_or_path, trust_remote_code=cfg.trust_remote_code)
    if cfg.config:
        params = dict(cfg.config)
        model_type = params.pop("model_type", None)
        if model_type is None:
            raise ValueError("model.llm.config needs a `model_type` (e.g. llama)")
        return AutoConfig.for_model(model_type, **params)
    raise ValueError("model.llm: set `name_or_path` (HF name or folder) or `config` (a dict)")


def build_llm(cfg: LLMConfig, attn_implementation: str, dtype: torch.dtype = torch.float32) -> LanguageModel:
    """Load the LM named by `cfg.name_or_path` (or build it randomly from `cfg.config`).

    Decoder-only LMs become `CausalLM`, encoder-decoder ones (T5, BART) `Seq2SeqLM`. The methods'
    modules (adapters, LoRA, VL-PET) are attached later by their plug-ins, outside any ZeRO-3
    construction context (`mmtrain.models.build`).
    """
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoModelForCausalLM

    config = resolve_llm_config(cfg)
    if getattr(config, "is_encoder_decoder", False):
        return build_seq2seq_llm(config, cfg, attn_implementation, dtype)
    kwargs = dict(attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    kwargs.update(quantization_kwargs(cfg, dtype))
    if cfg.name_or_path:
        model = _load_partitioned(cfg, config, kwargs) or AutoModelForCausalLM.from_pretrained(
            cfg.name_or_path, config=config, **kwargs)
    else:
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if cfg.quantization != "none":
        keep_cpu_layout(model)
    return CausalLM(model)


def _load_partitioned(cfg: LLMConfig, config, kwargs: dict) -> nn.Module | None:
    """Under ZeRO-3, a local safetensors checkpoint read straight into each rank's partition
    (`mmtrain.models.partitioned_load`): no rank holds the whole model. None where that does not apply
    (no ZeRO-3, quantised, a hub name, names that need the architecture's renaming)."""
    # heavy (seconds to import): only where a model is loaded
    from transformers import AutoModelForCausalLM, GenerationConfig
    from transformers.integrations import is_deepspeed_zero3_enabled

    if not (is_deepspeed_zero3_enabled() and cfg.quantization == "none" and dist.is_initialized()):
        return None
    files = checkpoint_files(cfg.name_or_path) if Path(cfg.name_or_path).is_dir() else None
    if files is None:
        return None
    with buffers_only_init():
        model = AutoModelForCausalLM.from_config(config, **kwargs)
    if fits(model, files):
        return None
    read = load_into_partitions(model, cfg.name_or_path, dist.get_rank(), dist.get_world_size())
    log.info("read %s into ZeRO-3 partitions: %s of its %s elements on this rank", cfg.name_or_path, f"{read:,}",
             f"{sum(int(getattr(p, 'ds_numel', p.numel())) for p in model.parameters()):,}")
    if (Path(cfg.name_or_path) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(cfg.name_or_path)
    model.eval()
    return model


def llm_is_encoder_decoder(cfg: LLMConfig) -> bool | None:
    """Whether the configured LLM is an encoder-decoder LM, from its config alone; None when its config
    cannot be read here (e.g. a model folder that exists only where the job runs)."""
    try:
        return bool(getattr(resolve_llm_config(cfg), "is_encoder_decoder", False))
    except (OSError, ValueError, KeyError):
        return None


def llm_hidden_size(cfg: LLMConfig) -> int:
    """The LLM's width, read from its config alone (no weights loaded)."""
    return resolve_llm_config(cfg).hidden_size


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder blocks of a Hugging Face causal LM (Llama/Qwen2/Mistral-style `model.layers`)."""
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else model
    layers = getattr(decoder, "layers", None)
    if not isinstance(layers, nn.ModuleList):
        raise ValueError(f"cannot find the decoder layers of {type(model).__name__} (expected `model.layers`)")
    return layers


def load_tokenizer(cfg: LLMConfig):
    """The LM's tokenizer (from `cfg.tokenizer`, else `cfg.name_or_path`), with a pad token set."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoTokenizer

    source = cfg.tokenizer or cfg.name_or_path
    if not source:
        raise ValueError("model.llm.tokenizer: a tokenizer folder is needed when the LLM is built from a config")
    tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=cfg.trust_remote_code)
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


@torch.no_grad()
def greedy_with_custom_mask(model: nn.Module, inputs: dict, max_new_tokens: int, eos_token_id: int | list[int],
                            pad_token_id: int, synced_ranks: bool = False) -> torch.Tensor:
    """Greedy decoding (KV cache) from prompt inputs that carry their own 4-D additive mask and
    position ids (Hugging Face's `generate` cannot extend a custom mask). Each new token sees what
    the prompt's last token saw, plus the tokens generated before it. Returns the new ids [B, n]."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import DynamicCache

    embeds, mask, positions = inputs["inputs_embeds"], inputs["attention_mask"], inputs["position_ids"]
    eos = torch.tensor(eos_token_id if isinstance(eos_token_id, list) else [eos_token_id], device=embeds.device)
    row = mask[:, :, -1:, :]
    position = positions[:, -1:]
    cache = DynamicCache()  # filled in place by each forward
    out = model(inputs_embeds=embeds, attention_mask=mask, position_ids=positions, cache=cache, use_cache=True,
                logits_to_keep=1)
    done = torch.zeros(embeds.shape[0], dtype=torch.bool, device=embeds.device)
    tokens: list[torch.Tensor] = []
    for _ in range(max_new_tokens):
        next_ids = torch.where(done, torch.full_like(done, pad_token_id, dtype=torch.long),
                               out.logits[:, -1].argmax(dim=-1))
        tokens.append(next_ids)
        done |= torch.isin(next_ids, eos)
        if _all_ranks_done(done, synced_ranks) or len(tokens) == max_new_tokens:
            break
        row = torch.cat([row, torch.zeros_like(row[..., :1])], dim=-1)
        position = position + 1
        out = model(inputs_embeds=model.get_input_embeddings()(next_ids).unsqueeze(1), attention_mask=row,
                    position_ids=position, cache=cache, use_cache=True)
    if not tokens:
        return torch.zeros(embeds.shape[0], 0, dtype=torch.long, device=embeds.device)
    return torch.stack(tokens, dim=1)


def _all_ranks_done(done: torch.Tensor, synced_ranks: bool) -> bool:
    """Whether every sample is finished, on every rank when ranks must step together (ZeRO-3)."""
    if not synced_ranks:
        return bool(done.all())

    pending = torch.tensor([0.0 if bool(done.all()) else 1.0], device=done.device)
    dist.all_reduce(pending)
    return pending.item() == 0.0
