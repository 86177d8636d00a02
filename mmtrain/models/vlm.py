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
        # Set by a feature cache: training batches carry `image_features`, which enter the tower at
        # `cached_from_block` (None: they are its output; k: the input of block k, the blocks from k on train).
        self.reads_cached_features = False
        self.cached_from_block: int | None = None

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

    def encode_images(self, pixel_values: torch.Tensor | None, image_features: torch.Tensor | None = None) -> torch.Tensor:
        """Pixels [B, C, H, W] -> visual embeddings [B, N, llm_hidden].

        A frozen prefix of the pipeline (nothing trainable before or in it) runs under no_grad, so
        no autograd graph or activations are kept for it. `image_features` [B, T, D] are the frozen
        tower's outputs read from a feature cache: the tower does not run.
        """
        if image_features is not None:
            x, modules = image_features, (self.resampler, self.projector)
            if self.cached_from_block is not None:
                x = self.vision.top(x, self.cached_from_block)
        else:
            x, modules = pixel_values, (self.vision, self.resampler, self.projector)
        for module in modules:
            grad = self._has_trainable(module) or x.requires_grad
            with contextlib.nullcontext() if grad else torch.no_grad():
                x = module(x)
        return x

    def embed_inputs(
        self,
        input_ids: torch.Tensor,
        pixel_values: torch.Tensor | None,
        has_image: torch.Tensor,
        image_mask: torch.Tensor,
        image_features: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Token embeddings [B, T, D] with the visual embeddings written where `image_mask` is set."""
        dtype = next(self.vision.parameters()).dtype
        if image_features is not None:
            visual = self.encode_images(None, image_features.to(dtype))
        else:
            visual = self.encode_images(pixel_values.to(dtype))
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
        pixel_values: torch.Tensor | None = None,
        has_image: torch.Tensor | None = None,
        image_mask: torch.Tensor | None = None,
        labels: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        image_features: torch.Tensor | None = None,
        **_: object,
    ):
        """Returns the LLM's output (`.loss` when labels are given, `.logits`).

        `position_ids` (restarting at 0 at every sample) mark a packed batch: several samples per row,
        `pixel_values`/`has_image` per sample, in the order the samples appear in the rows.
        `image_features` (a feature cache's frozen-tower outputs) stand in for `pixel_values`.
        """
        if has_image is None or image_mask is None or (pixel_values is None and image_features is None):
            raise TypeError("the VLM needs has_image, image_mask and pixel_values (or image_features)")
        embeds = self.embed_inputs(input_ids, pixel_values, has_image, image_mask, image_features)
        packed = {} if position_ids is None else {"position_ids": position_ids}
        return self.llm(inputs_embeds=embeds, attention_mask=attention_mask, labels=labels,
                        **self._modality(has_image), **packed)

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
