"""Load a trained VLM for evaluation: from a run folder (latest checkpoint) or one checkpoint folder.

The model is rebuilt from the run's resolved `config.yaml`, then the run's `init` weights (e.g. a
component inherited from an earlier pipeline stage, possibly frozen and so absent from the
checkpoint) and finally the checkpoint's trainable weights are loaded. Under a ZeRO-3 DeepSpeed
config the LLM is built partitioned and wrapped in a parameter-only DeepSpeed engine, so each
rank holds 1/N of it; otherwise every rank holds the whole model.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmtrain.config import RunConfig, load_config
from mmtrain.config.methods import with_hook
from mmtrain.config.paths import META_FILE, RunDir, latest_checkpoint
from mmtrain.config.schema import InitSource
from mmtrain.engine.placement import build_placed_vlm, plan
from mmtrain.errors import UserError


class EvalTargetError(UserError, ValueError):
    """The path given to `mmtrain eval` is neither a run folder nor a checkpoint."""


@dataclass
class EvalModel:
    """A model ready for evaluation on this rank."""

    model: Any
    """The VisionLanguageModel (the engine's module under ZeRO-3), in eval mode, on `device`."""
    tokenizer: Any
    cfg: RunConfig
    run_dir: Path
    checkpoint: Path
    step: int
    rank: int
    world_size: int
    zero3: bool
    device: torch.device
    keepalive: Any = None
    """The `Placement` (DeepSpeed engine, HfDeepSpeedConfig): it must outlive the model."""
    grafted: bool = False
    """The run's vision side on another LLM (`cfg.model.llm` is that LLM)."""


def resolve_target(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder (its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        run = path.parent.parent
        if not RunDir(run).config.is_file():
            raise EvalTargetError(f"{path} is a checkpoint but {RunDir(run).config} (its run's config) is missing")
        return run, path
    if RunDir(path).config.is_file():
        checkpoint = latest_checkpoint(path)
        if checkpoint is None:
            raise EvalTargetError(f"{path} is a run folder without a complete checkpoint; train it first")
        return path, checkpoint
    raise EvalTargetError(f"{path} is neither a run folder (with config.yaml) nor a checkpoint folder "
                          f"(with {META_FILE}); pass OUTPUT_DIR or OUTPUT_DIR/checkpoints/step_XXXXXXXX")


def load_for_eval(target: str | Path, deepspeed_json: str | None = None, overrides: list[str] | None = None,
                  graft_llm: str | None = None) -> EvalModel:
    """Rebuild the run's model with its trained weights on this rank (see the module docstring).

    Args:
        graft_llm: zero-shot grafting: build the model on this LLM instead of the run's, and load
            only the vision side of the run's weights (the grafting plug-in's `retarget` hook).
    """
    run, checkpoint = resolve_target(target)
    cfg = load_config(RunDir(run).config, overrides)
    trained = InitSource(path=str(checkpoint))
    if graft_llm:
        hooks = with_hook("retarget")
        if not hooks:
            raise EvalTargetError("--graft-llm needs the grafting method, which is not installed")
        _, retarget = hooks[0]
        cfg, trained = retarget(cfg, checkpoint, graft_llm)
    if deepspeed_json:
        cfg.deepspeed = deepspeed_json
    placement = plan(cfg, "eval")
    model = build_placed_vlm(placement, cfg, run, extra_sources=[trained])
    placement.wrap(model)
    step = int(json.loads((checkpoint / META_FILE).read_text()).get("global_step", 0))
    return EvalModel(model=placement.model, tokenizer=placement.tokenizer, cfg=cfg, run_dir=run,
                     checkpoint=checkpoint, step=step, rank=placement.rank, world_size=placement.world_size,
                     zero3=placement.zero3, device=placement.device, keepalive=placement, grafted=bool(graft_llm))
