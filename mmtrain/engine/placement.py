"""Model placement: the one place that puts a model on the launched ranks, for training, evaluation or the lens.

Every purpose goes through the same steps, in this order:
1. the DeepSpeed JSON is filled (`fill_ds_config` for training; parameter-only for evaluation and
   the logit lens, whose engines train nothing);
2. under ZeRO-3, a `HfDeepSpeedConfig` is created just before the LLM is constructed, so
   `from_pretrained` builds it inside `deepspeed.zero.Init` (each rank holds only its partition), and
   it is kept referenced by the `Placement` for the model's life (transformers consults it weakly,
   also later for ZeRO-3-aware calls such as generation);
3. for a VLM: the model is built (`build_vlm`), then its `init` sources are loaded, each by the method
   plug-in that claims it (VPGTrans's word converter) or by the plain weight loader;
4. buffers are moved to the rank's device (DeepSpeed places parameters, never buffers) and
   `deepspeed.initialize` wraps the model: with the optimizer and LR schedule for training, with
   parameters only for evaluation (ZeRO-3) or not at all (the model is moved to the device).

`HfDeepSpeedConfig` and `deepspeed.initialize` appear in this module only.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator, Literal

import torch
from torch import nn

from mmtrain.config.methods import with_hook
from mmtrain.config.schema import InitSource, RunConfig
from mmtrain.engine.accelerator import move_buffers, on_cpu, release_large_frees_to_os
from mmtrain.engine.distributed import DistEnv, init_distributed
from mmtrain.engine.ds_config import fill_ds_config, fill_parameter_only_ds_config, load_ds_json, zero_stage
from mmtrain.models import build_vlm, load_init_weights
from mmtrain.models.llm import llm_hidden_size

Purpose = Literal["train", "eval", "lens"]
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class Placement:
    """One model placed on this rank. Keep it referenced for as long as the model is used."""

    purpose: Purpose
    dist: DistEnv
    ds_config: dict[str, Any]
    model: Any = None
    """The model: the engine's module once wrapped under ZeRO-3 (or for training)."""
    tokenizer: Any = None
    attn_implementation: str | None = None
    engine: Any = None
    optimizer: Any = None
    scheduler: Any = None
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))
    _hf_deepspeed_config: Any = field(default=None, repr=False)

    @property
    def zero_stage(self) -> int:
        return zero_stage(self.ds_config)

    @property
    def zero3(self) -> bool:
        return self.zero_stage == 3

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world_size(self) -> int:
        return self.dist.world_size

    @contextlib.contextmanager
    def construction(self) -> Iterator[None]:
        """Wrap the LLM's construction: under ZeRO-3 it is built partitioned (the vision side, built
        before, stays ordinary modules that `deepspeed.initialize` partitions)."""
        if self.zero3 and self._hf_deepspeed_config is None:
            # heavy (seconds to import): only where a model or tokenizer is loaded
            from transformers.integrations import HfDeepSpeedConfig

            self._hf_deepspeed_config = HfDeepSpeedConfig(self.ds_config)
        yield

    def wrap(self, model: nn.Module, **initialize: Any) -> nn.Module:
        """Put `model` on this rank's device and, for training or ZeRO-3, in a DeepSpeed engine.

        Args:
            initialize: training only: `deepspeed.initialize`'s optimizer arguments
                (`model_parameters`/`optimizer`, `lr_scheduler`).
        """
        # heavy; imported where used, once the accelerator is chosen
        import deepspeed

        if self.purpose != "train":
            model.requires_grad_(False)
        if not on_cpu():
            move_buffers(model, torch.device("cuda", self.dist.local_rank))
        if self.purpose == "train" or self.zero3:
            self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
                model=model, config=self.ds_config, **initialize)
            self.model, self.device = self.engine.module, self.engine.device
        else:
            self.device = torch.device("cpu") if on_cpu() else torch.device("cuda", self.dist.local_rank)
            self.model = model.to(self.device)
        if self.purpose != "train":
            self.model.eval()
        return self.model


def plan(cfg: RunConfig, purpose: Purpose) -> Placement:
    """Join (or start) the process group and fill the DeepSpeed JSON `cfg.deepspeed` for `purpose`."""
    if on_cpu():
        release_large_frees_to_os()
    dist = init_distributed(cfg.collective_timeout_s)
    raw = load_ds_json(cfg.deepspeed)
    hidden = llm_hidden_size(cfg.model.llm)
    if purpose == "train":
        ds = fill_ds_config(raw, cfg, dist.world_size, hidden, source=cfg.deepspeed)
    else:
        ds = fill_parameter_only_ds_config(raw, cfg.micro_batch_size, cfg.precision, dist.world_size, hidden,
                                           source=cfg.deepspeed)
    return Placement(purpose=purpose, dist=dist, ds_config=ds)


def build_placed_vlm(placement: Placement, cfg: RunConfig, run_dir: Path,
                     extra_sources: list[InitSource] = ()) -> nn.Module:
    """Build the run's VLM for `placement` and load its `init` sources, then `extra_sources` (not yet wrapped).

    Each source is loaded by the first method plug-in that claims it (`MethodSpec.load_init`), else
    by `load_init_weights`. `run_dir` is where a method may cache what it fits (the word converter).
    """
    model, placement.tokenizer, placement.attn_implementation = build_vlm(
        cfg.model, DTYPES[cfg.precision], placement.construction())
    for source in [*cfg.init, *extra_sources]:
        load_init_source(model, source, cfg, placement.tokenizer, run_dir)
    placement.model = model
    return model


def load_init_source(model: nn.Module, source: InitSource, cfg: RunConfig, tokenizer: Any, run_dir: Path) -> list[str]:
    """Load one init source into `model` (see `build_placed_vlm`); returns the names written."""
    for _, load in with_hook("load_init"):
        names = load(model, source, cfg, tokenizer, run_dir)
        if names is not None:
            return names
    return load_init_weights(model, source)


def place_pretrained(build: Callable[[], nn.Module], ds_json: str | None, micro_batch_size: int, precision: str,
                     hidden_size: int) -> Placement:
    """A plain pretrained model (the logit lens's causal LM) for inference on the launched ranks.

    Without `ds_json` the whole model lives in this one process (on CUDA when there is one);
    with a ZeRO-3 JSON each rank holds its partition; with another stage every rank holds it all.
    `build()` constructs the model (e.g. `from_pretrained`) inside the ZeRO-3 construction context;
    `hidden_size` (its width) sizes the ZeRO-3 buckets.
    """
    if ds_json is None:
        device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
        dist = DistEnv(rank=0, local_rank=0, world_size=1, launcher="none")
        placement = Placement(purpose="lens", dist=dist, ds_config={}, device=device)
        placement.model = build().to(device).eval()
        return placement
    raw = load_ds_json(ds_json)
    if on_cpu():
        release_large_frees_to_os()
    dist = init_distributed()
    ds = fill_parameter_only_ds_config(raw, micro_batch_size, precision, dist.world_size, hidden_size, source=ds_json)
    placement = Placement(purpose="lens", dist=dist, ds_config=ds)
    with placement.construction():
        model = build()
    placement.wrap(model)
    return placement
