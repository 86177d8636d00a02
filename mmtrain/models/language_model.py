"""The interface every language-model wrapper gives the VLM (`CausalLM`, `Seq2SeqLM`)."""

from __future__ import annotations

import torch
from torch import nn

IGNORE_INDEX = -100


class LanguageModel(nn.Module):
    """Interface the VLM relies on; subclasses wrap a Hugging Face model as `self.model`."""

    is_encoder_decoder: bool = False
    hidden_size: int
    vocab_size: int
    model: nn.Module
    # Instances may carry `modality`, an MMA `ModalityToken`; their forward methods then take `has_image`.

    def embed(self, input_ids: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, inputs_embeds, attention_mask, labels=None):
        raise NotImplementedError

    def enable_gradient_checkpointing(self) -> None:
        # Non-reentrant: works with a frozen LM whose inputs (the visual embeddings) need grads.
        kwargs = {"use_reentrant": False}
        if hasattr(self.model, "activation_checkpointing_enable"):  # transformers >= 5 name
            self.model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
        else:
            self.model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)

    def generate(self, inputs_embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, synced_ranks=False):
        """Greedy decoding from left-padded prompt embeddings; returns the new token ids."""
        raise NotImplementedError
