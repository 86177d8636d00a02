"""The cost package's listener on the training loop: usage, FLOPs and the ledger records of one process.

The command that starts training (`mmtrain train`, the pipeline's stages) attaches a `CostRecorder`
to the trainer's events; the engine itself knows nothing of costs. Per process it writes
`process_start`, `checkpoint` (rank 0, after each complete checkpoint) and `process_end` to the
run's ledger (`mmtrain.cost.ledger`), with the attempt's usage (`AttemptUsage`) and the FLOPs
model counted on the first batch (`mmtrain.cost.flops`).
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

from mmtrain.config.paths import RunDir
from mmtrain.cost.flops import StepFlops, step_flops_model
from mmtrain.cost.ledger import Ledger
from mmtrain.cost.usage import AttemptUsage
from mmtrain.engine.events import (
    CheckpointSaved,
    EvaluationEnd,
    Event,
    FirstBatch,
    LoopStart,
    ProcessEnd,
    ProcessStart,
    StepEnd,
)

log = logging.getLogger("mmtrain")


class CostRecorder:
    """Counts this process's usage from the loop's events and writes its ledger records."""

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger
        self.usage = AttemptUsage(start_step=0)
        self.flops_model: StepFlops | None | bool = None
        """The FLOPs model once counted; False when counting failed (the ledger then records 0 FLOPs)."""
        self._rank = 0
        self._world_size = 1
        self._engine = None
        self._gradient_checkpointing = False

    @classmethod
    def for_run(cls, output_dir: str | Path) -> "CostRecorder":
        """The ledger the pipeline runner named in the environment, or `<output_dir>/ledger.jsonl` when run alone."""
        run = RunDir(output_dir)
        return cls(Ledger.from_env(run.ledger, default_stage=run.root.name))

    def handle(self, event: Event) -> None:
        if isinstance(event, ProcessStart):
            self._rank, self._world_size = event.rank, event.world_size
            self.ledger.write("process_start", kind=event.kind, rank=event.rank, world_size=event.world_size,
                              output_dir=event.output_dir)
        elif isinstance(event, LoopStart):
            self.usage.start_step = self.usage.step = event.step
            self._engine, self._gradient_checkpointing = event.engine, event.gradient_checkpointing
            self.usage.begin_loop()
        elif isinstance(event, FirstBatch):
            started = time.perf_counter()
            self.flops_model = self._count_flops(event.batch)
            self.usage.move_to_startup(time.perf_counter() - started)
        elif isinstance(event, StepEnd):
            flops = self.flops_model.step(float(event.tokens), float(event.images)) if self.flops_model else 0.0
            self.usage.end_step(event.step, event.samples, event.tokens, event.images, flops)
        elif isinstance(event, EvaluationEnd):
            self.usage.eval_s += event.seconds
            if self._rank == 0:
                # Learning curves against compute read these (mmtrain.cost.curve).
                metrics = {k: v for k, v in event.record.items() if k.startswith("val_")}
                self.ledger.write("validation", rank=self._rank, world_size=self._world_size, step=event.step,
                                  epoch=event.record.get("epoch"), metrics=metrics, **self.usage.counters())
        elif isinstance(event, CheckpointSaved):
            self.usage.checkpoint_s += event.seconds
            if self._rank == 0:
                self.ledger.write("checkpoint", rank=self._rank, world_size=self._world_size, step=event.step,
                                  checkpoint_s=round(self.usage.checkpoint_s, 3), **self.usage.counters())
        elif isinstance(event, ProcessEnd):
            self.ledger.write("process_end", kind="train", rank=self._rank, world_size=self._world_size,
                              outcome=event.outcome, signal=event.signal, max_steps=event.max_steps,
                              precision=event.precision, zero_stage=event.zero_stage,
                              flops_model=self.flops_model.as_dict() if self.flops_model else None,
                              **self.usage.counters(), timing=self.usage.times(), memory=event.memory)

    def close(self) -> None:
        pass

    def _count_flops(self, batch) -> StepFlops | bool:
        """The FLOPs model of this VLM at the first batch's mean sample length (collective under ZeRO-3).

        Per sample, not per row: a packed row holds several samples (`has_image` has one entry each).
        """
        engine = self._engine
        length = int(batch["attention_mask"].sum()) // max(int(batch["has_image"].shape[0]), 1)
        engine.eval()  # no dropout draws, no BatchNorm statistics updated: training is unaffected
        try:
            flops = step_flops_model(engine.module, length, self._gradient_checkpointing, device=engine.device)
        except Exception as exc:  # an estimate must never stop training
            log.warning("could not count the model's FLOPs (%s: %s); the ledger records 0 FLOPs",
                        type(exc).__name__, exc)
            return False
        finally:
            engine.train()
        if self._rank == 0:
            log.info("FLOPs per image %s, per token %.4g (multipliers %s)",
                     {k: f"{v:.4g}" for k, v in flops.forward.items() if k != "llm"}, flops.forward["llm"],
                     flops.multipliers)
        return flops
