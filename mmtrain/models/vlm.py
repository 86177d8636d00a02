"""The vision-language model: vision tower -> resampler -> projector -> (frozen) LLM.

Visual embeddings replace the LLM input embeddings at the positions the data pipeline marked in
`image_mask` (where the `<image>` placeholder stood). Every rank runs every component on every
batch, text-only samples included (their visual output enters the graph multiplied by zero), so
ZeRO-3's parameter gathers and gradient reductions line up across ranks and nothing hangs.
"""

from __future__ import annotations

import contextlib

import torch
from torch import nn

COMPONENTS = ("vision", "resampler", "projector", "llm")


class VisionLanguageModel(nn.Module):
    """Composes the four components; see the module docstring for the data contract."""

    def __init__(self, vision: nn.Module, resampler: nn.Module, projector: nn.Module, llm: nn.Module) -> None:
        super().__init__()
        self.vision = vision
        self.resampler = resampler
        self.projector = projector
        self.llm = llm
        self.num_image_tokens = resampler.num_output_tokens(vision.num_tokens) + getattr(projector, "extra_tokens", 0)
        self.keep_llm_in_train_mode = False

    def components(self) -> dict[str, nn.Module]:
        return {name: getattr(self, name) for name in COMPONENTS}

    @staticmethod
    def _has_trainable(module: nn.Module) -> bool:
        return any(p.requires_grad for p in module.parameters())

    def train(self, mode: bool = True) -> "VisionLanguageModel":
        """Like nn.Module.train, but fully frozen components stay in eval mode (BatchNorm, dropout)."""
        super().train(mode)
        if mode:
            for name, module in self.components().items():
                if not self._has_trainable(module) and not (name == "llm" and self.keep_llm_in_train_mode):
                    module.eval()
        return self

    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """Pixels [B, C, H, W] -> visual embeddings [B, N, llm_hidden].

        A frozen prefix of the pipeline (nothing trainable before or in it) runs under no_grad, so
        no autograd graph or activations are kept for it.
        """
        x = pixel_values
        for module in (self.vision, self.resampler, self.projector):
            grad = self._has_trainable(module) or x.requires_grad
            with contextlib.nullcontext() if grad else torch.no_grad():
                x = module(x)
        return x

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        image_mask: torch.Tensor,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with the visual embeddings written where `image_mask` is set."""
        param = next(self.vision.parameters())
        visual = self.encode_images(pixel_values.to(param.dtype))
        embeds = self.llm.embed(input_ids)
        visual = visual.to(embeds.dtype)
        expected = int(has_image.sum()) * self.num_image_tokens
        if int(image_mask.sum()) != expected:
            raise ValueError(
                f"batch marks {int(image_mask.sum())} image positions but {int(has_image.sum())} images x "
                f"{self.num_image_tokens} visual tokens = {expected}; the data pipeline's num_image_tokens "
                "must match the model's"
            )
        if bool(has_image.any()):
            embeds = embeds.masked_scatter(image_mask.unsqueeze(-1), visual[has_image].reshape(-1, visual.shape[-1]))
        if not bool(has_image.all()):
            # Text-only samples: keep the visual branch in the graph with zero weight, so every rank
            # gathers and reduces the same parameters (the ZeRO-3 hang on text-only batches).
            embeds = embeds + visual[~has_image].sum() * 0.0
        return embeds

    def forward(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        image_mask: torch.Tensor,
        labels: torch.Tensor | None = None,
        **_: object,
    ):
        """Returns the LLM's output (`.loss` when labels are given, `.logits`)."""
        embeds = self.embed_inputs(input_ids, pixel_values, has_image, image_mask)
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels, **self._modality(has_image))

    def _modality(self, has_image: torch.Tensor) -> dict[str, torch.Tensor]:
        """`has_image` for an LLM with an MMA modality token (which it selects), else nothing."""
        return {"has_image": has_image} if getattr(self.llm, "modality", None) is not None else {}

    @torch.no_grad()
    def target_logprobs(self, input_ids, attention_mask, pixel_values, has_image, image_mask, labels, **_: object):
        """Per sample: summed log-probability of the target tokens and their count ([B], [B])."""
        embeds = self.embed_inputs(input_ids, pixel_values, has_image, image_mask)
        return self.llm.target_logprobs(embeds, attention_mask, labels, **self._modality(has_image))

    @torch.no_grad()
    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        pixel_values: torch.Tensor,
        has_image: torch.Tensor,
        image_mask: torch.Tensor,
        max_new_tokens: int,
        eos_token_id: int | list[int],
        pad_token_id: int,
        synced_ranks: bool = False,
    ) -> torch.Tensor:
        """Greedy continuation of LEFT-padded prompts; returns the new token ids [B, <= max_new_tokens].

        Args:
            synced_ranks: ZeRO-3 with several ranks: keep stepping until every rank is done, since
                each forward gathers parameters collectively.
        """
        embeds = self.embed_inputs(input_ids, pixel_values, has_image, image_mask)
        return self.llm.generate(embeds, attention_mask, max_new_tokens, eos_token_id, pad_token_id, synced_ranks,
                                 **self._modality(has_image))
