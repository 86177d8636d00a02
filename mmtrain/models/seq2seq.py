"""Encoder-decoder LMs (T5, BART...) behind the VLM's language-model interface.

The VLM hands the LM one right-padded sequence per sample, `[bos?][image][prompt][target][eos]`,
with labels on the target positions only. `Seq2SeqLM` splits it: the encoder reads the positions
that are real tokens without a label (image and prompt), packed to the left with their own mask;
the decoder learns the labelled tokens, packed likewise and padded with -100, shifted right behind
`decoder_start_token_id` by the model itself. Interleaved conversations therefore become one
encoder input (every prompt turn) and one decoder target (every answer turn, in order).

`embed(input_ids)` returns exactly what the encoder computes from those ids: BART's encoder
embedding module scales by sqrt(d) itself when `scale_embedding` is set (it is called, not
bypassed), and encoders that scale looked-up ids in their forward (`embed_scale` on the encoder,
e.g. Marian, Pegasus) get the same factor here.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn
from transformers.modeling_outputs import Seq2SeqLMOutput

from mmtrain.config.schema import LLMConfig
from mmtrain.models.language_model import IGNORE_INDEX, LanguageModel

# Encoders that multiply given `inputs_embeds` by `embed_scale` as well: no extra factor in `embed`.
_SCALES_INPUTS_EMBEDS = frozenset({"fsmt"})

# Greedy decoding whatever the checkpoint's generation config asks for (BART's forced bos/eos,
# n-gram blocking, minimum lengths...).
_GREEDY = dict(do_sample=False, num_beams=1, temperature=None, top_p=None, top_k=None, repetition_penalty=None,
               no_repeat_ngram_size=None, encoder_no_repeat_ngram_size=None, bad_words_ids=None, min_length=None,
               min_new_tokens=None, forced_bos_token_id=None, forced_eos_token_id=None, suppress_tokens=None,
               begin_suppress_tokens=None, exponential_decay_length_penalty=None)


def pack(values: torch.Tensor, keep: torch.Tensor, fill: float | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Move the kept positions of each row to the front, in order, and pad the rest.

    Args:
        values: [B, T, ...].
        keep: [B, T] bool.
        fill: value of the padded slots.

    Returns:
        values [B, L, ...] with L = max kept per row (at least 1), and the mask of the filled
        slots [B, L] (long, 1 = kept).
    """
    counts = keep.sum(dim=1)
    length = max(int(counts.max()), 1) if counts.numel() else 1
    rows = torch.arange(keep.shape[0], device=keep.device).unsqueeze(1).expand_as(keep)[keep]
    cols = (keep.long().cumsum(dim=1) - 1)[keep]
    packed = values.new_full((keep.shape[0], length, *values.shape[2:]), fill)
    packed = packed.index_put((rows, cols), values[keep])
    mask = (torch.arange(length, device=keep.device).unsqueeze(0) < counts.unsqueeze(1)).long()
    return packed, mask


def _encoder_input_scale(model: nn.Module) -> float:
    """Factor the encoder applies to looked-up ids beyond its embedding module (1.0 if none)."""
    encoder = model.get_encoder()
    scale = getattr(encoder, "embed_scale", None)
    table = getattr(encoder, "embed_tokens", None)
    if not isinstance(scale, (int, float)) or hasattr(table, "embed_scale"):
        return 1.0
    if model.config.model_type in _SCALES_INPUTS_EMBEDS:
        return 1.0
    return float(scale)


class Seq2SeqLM(LanguageModel):
    """A Hugging Face `AutoModelForSeq2SeqLM`: image + prompt into the encoder, the target out of the decoder.

    The loss is the mean token cross-entropy over the targets, in float32.
    """

    is_encoder_decoder = True

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model
        self.hidden_size = getattr(model.config, "d_model", None) or model.config.hidden_size
        self.vocab_size = model.config.vocab_size
        self.embed_scale = _encoder_input_scale(model)

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        encoder = self.model.get_encoder()
        table = getattr(encoder, "embed_tokens", None)
        if table is None:
            table = self.model.get_input_embeddings()
        embeds = table(input_ids)
        return embeds * self.embed_scale if self.embed_scale != 1.0 else embeds

    def split(self, inputs_embeds, attention_mask, labels) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(encoder embeddings, encoder mask, decoder labels) of a VLM sequence; see the module docstring."""
        valid = attention_mask.bool()
        source = valid & (labels == IGNORE_INDEX)
        target = valid & (labels != IGNORE_INDEX)
        embeds, mask = pack(inputs_embeds, source)
        targets, _ = pack(labels, target, fill=IGNORE_INDEX)
        return embeds, mask, targets

    def _decoder_inputs(self, targets: torch.Tensor) -> torch.Tensor:
        if hasattr(self.model, "prepare_decoder_input_ids_from_labels"):
            return self.model.prepare_decoder_input_ids_from_labels(labels=targets)
        # heavy (seconds to import): only where a model or tokenizer is loaded
        from transformers.models.bart.modeling_bart import shift_tokens_right

        config = self.model.config
        return shift_tokens_right(targets, config.pad_token_id, config.decoder_start_token_id)

    def _target_logits(self, inputs_embeds, attention_mask, labels):
        embeds, mask, targets = self.split(inputs_embeds, attention_mask, labels)
        out = self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=self._decoder_inputs(targets),
                         use_cache=False)
        return out.logits, targets

    def forward(self, inputs_embeds, attention_mask, labels=None, has_image=None):
        if labels is None:  # the whole sequence is the source; the decoder sees its start token only
            embeds, mask = pack(inputs_embeds, attention_mask.bool())
            start = torch.full((embeds.shape[0], 1), self.model.config.decoder_start_token_id,
                               dtype=torch.long, device=embeds.device)
            return self.model(inputs_embeds=embeds, attention_mask=mask, decoder_input_ids=start, use_cache=False)
        logits, targets = self._target_logits(inputs_embeds, attention_mask, labels)
        keep = targets != IGNORE_INDEX
        picked = logits[keep].float()
        if picked.shape[0] == 0:  # no target in the batch: a zero loss that still spans the graph
            loss = logits.sum() * 0.0
        else:
            loss = F.cross_entropy(picked, targets[keep])
        return Seq2SeqLMOutput(loss=loss, logits=None)

    def target_logprobs(self, inputs_embeds, attention_mask, labels,
                        has_image=None) -> tuple[torch.Tensor, torch.Tensor]:
        """Per sample: the summed log-probability of its target tokens, and how many there are ([B], [B])."""
        logits, targets = self._target_logits(inputs_embeds, attention_mask, labels)
        keep = targets != IGNORE_INDEX
        sums = torch.zeros(labels.shape[0], dtype=torch.float64, device=labels.device)
        if keep.any():
            picked = torch.log_softmax(logits[keep].float(), dim=-1).gather(1, targets[keep].unsqueeze(1)).squeeze(1)
            rows = torch.arange(targets.shape[0], device=targets.device).unsqueeze(1).expand_as(targets)[keep]
            sums.index_add_(0, rows, picked.double())
        return sums, keep.sum(dim=1)

    def generate(self, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, synced_ranks=False,
                 has_image=None):
        """Greedy decoding; the (left-padded) prompts are re-packed to the left for the encoder.

        Returns only the new tokens [B, <= max_new_tokens], without the decoder start token.
        """
        embeds, mask = pack(inputs_embeds, attention_mask.bool())
        out = self.model.generate(inputs_embeds=embeds, attention_mask=mask, max_new_tokens=max_new_tokens,
                                  eos_token_id=eos_token_id, pad_token_id=pad_token_id, synced_gpus=synced_ranks,
                                  **_GREEDY)
        return out[:, 1:]


def build_seq2seq_llm(config, cfg: LLMConfig, attn_implementation: str,
                      dtype: torch.dtype = torch.float32) -> Seq2SeqLM:
    """Load `cfg.name_or_path` (or build randomly from the resolved `config`) as a `Seq2SeqLM`.

    VL-PET, when the config asks for it, is attached afterwards by its plug-in (`mmtrain.methods.vl_pet`).
    `auto` attention falls back to SDPA for models without flash-attn support (T5).
    """
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoModelForSeq2SeqLM

    if cfg.quantization != "none":
        raise ValueError(f"model.llm.quantization={cfg.quantization} is for decoder-only LMs; load "
                         f"{config.model_type} unquantised")
    if attn_implementation == "flash_attention_2" and cfg.attn_implementation == "auto":
        model_class = AutoModelForSeq2SeqLM._model_mapping.get(type(config), None)
        if model_class is not None and not getattr(model_class, "_supports_flash_attn", False):
            attn_implementation = "sdpa"
    kwargs = dict(attn_implementation=attn_implementation, dtype=dtype, trust_remote_code=cfg.trust_remote_code)
    if cfg.name_or_path:
        model = AutoModelForSeq2SeqLM.from_pretrained(cfg.name_or_path, config=config, **kwargs)
    else:
        model = AutoModelForSeq2SeqLM.from_config(config, **kwargs)
    return Seq2SeqLM(model)
