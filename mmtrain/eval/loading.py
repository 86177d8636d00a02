"""Load a trained VLM for evaluation: from a run folder (latest checkpoint) or one checkpoint folder.

The model is rebuilt from the run's resolved `config.yaml`, then the run's `init` weights (e.g. a
component inherited from an earlier pipeline stage, possibly frozen and so absent from the
checkpoint) and finally the checkpoint's trainable weights are loaded. Under a ZeRO-3 DeepSpeed
config the LLM is built partitioned and wrapped in a parameter-only DeepSpeed engine, so each
rank holds 1/N of it; otherwise every rank holds the whole model.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from mmtrain.errors import UserError
from mmtrain.config import RunConfig, load_config
from mmtrain.config.schema import InitSource
from mmtrain.engine.checkpoint import META_FILE, latest_checkpoint


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
    """Objects that must outlive the model (the DeepSpeed engine, HfDeepSpeedConfig)."""
    grafted: bool = False
    """The run's vision side on another LLM (`cfg.model.llm` is that LLM)."""


def resolve_target(path: str | Path) -> tuple[Path, Path]:
    """(run folder, checkpoint folder) for a run folder (its latest checkpoint) or a checkpoint folder."""
    path = Path(path)
    if (path / META_FILE).is_file():
        run = path.parent.parent
        if not (run / "config.yaml").is_file():
            raise EvalTargetError(f"{path} is a checkpoint but {run / 'config.yaml'} (its run's config) is missing")
        return run, path
    if (path / "config.yaml").is_file():
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
            only the vision side of the run's weights (`mmtrain.methods.grafting.graft`).
    """
    import json

    from mmtrain.engine.accelerator import move_buffers, on_cpu, release_large_frees_to_os
    from mmtrain.engine.distributed import init_distributed
    from mmtrain.engine.ds_config import fill_ds_config, load_ds_json, zero_stage
    from mmtrain.engine.trainer import DTYPES, _llm_hidden_size
    from mmtrain.models import build_vlm, load_init_weights

    run, checkpoint = resolve_target(target)
    cfg = load_config(run / "config.yaml", overrides)
    trained = InitSource(path=str(checkpoint))
    if graft_llm:
        from mmtrain.methods.grafting.graft import checkpoint_source, graft_config

        cfg = graft_config(cfg, graft_llm)
        trained = checkpoint_source(checkpoint)
    if deepspeed_json:
        cfg.deepspeed = deepspeed_json
    if on_cpu():
        release_large_frees_to_os()
    dist = init_distributed()
    ds = fill_ds_config(load_ds_json(cfg.deepspeed), cfg, dist.world_size, _llm_hidden_size(cfg),
                        source=cfg.deepspeed)
    ds.pop("optimizer", None)  # parameters only: nothing trains here
    zero3 = zero_stage(ds) == 3
    keepalive: list[Any] = []

    @contextlib.contextmanager
    def partitioned_llm():
        # Created only around the LLM's construction (the vision side stays ordinary modules), and
        # kept alive with the model: transformers consults it for ZeRO-3-aware calls like generate.
        from transformers.integrations import HfDeepSpeedConfig

        keepalive.append(HfDeepSpeedConfig(ds))
        yield

    model, tokenizer, _ = build_vlm(cfg.model, DTYPES[cfg.precision],
                                    partitioned_llm() if zero3 else contextlib.nullcontext())
    for source in cfg.init:
        if source.word_converter is not None:  # VPGTrans: the converter fitted (and cached) by the run
            from mmtrain.methods.vpgtrans.init import load_converted_init

            load_converted_init(model, source, cfg, tokenizer, run)
        else:
            load_init_weights(model, source)
    load_init_weights(model, trained)
    model.requires_grad_(False)
    if zero3:
        import deepspeed

        if not on_cpu():
            move_buffers(model, torch.device("cuda", dist.local_rank))

        engine, *_ = deepspeed.initialize(model=model, config=ds)
        keepalive.insert(0, engine)
        model, device = engine.module, engine.device
    else:
        device = torch.device("cpu") if on_cpu() else torch.device("cuda", dist.local_rank)
        model = model.to(device)
    model.eval()
    step = int(json.loads((checkpoint / META_FILE).read_text()).get("global_step", 0))
    return EvalModel(model=model, tokenizer=tokenizer, cfg=cfg, run_dir=run, checkpoint=checkpoint, step=step,
                     rank=dist.rank, world_size=dist.world_size, zero3=zero3, device=device, keepalive=keepalive,
                     grafted=bool(graft_llm))
