"""The training loop's events, and the sinks that listen to them.

The loop says what happened (a process started, a step ended, an evaluation or a checkpoint
finished, the process ended) and knows nothing of who listens: the metrics file, TensorBoard and
the cost ledger (`mmtrain.cost.recorder`, attached by the command that starts training) are sinks.
Every rank emits every event; a sink decides what its rank writes. A sink must not raise for
bookkeeping failures that should not stop training.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class ProcessStart:
    """A training process (one rank) starts, before the model is built."""

    kind: str
    rank: int
    world_size: int
    output_dir: str


@dataclass(frozen=True)
class LoopStart:
    """The model, data and engine are ready; the loop starts at `step` (a resumed run: after it)."""

    step: int
    engine: Any
    """The DeepSpeed engine (its `.module` is the VLM)."""
    gradient_checkpointing: bool


@dataclass(frozen=True)
class FirstBatch:
    """The first micro-batch of this process is about to run (host tensors; collective listeners may use the engine)."""

    batch: dict[str, Any]


@dataclass(frozen=True)
class StepEnd:
    """An optimizer step ended. Counts are global (all ranks); `record` is the logged metrics record,
    or None on steps that are not logged (`log_every`)."""

    step: int
    samples: int
    tokens: int
    images: int
    record: dict[str, Any] | None = None


@dataclass(frozen=True)
class EvaluationEnd:
    """A validation pass ended; `record` is its metrics record, `seconds` its wall time."""

    step: int
    record: dict[str, Any]
    seconds: float


@dataclass(frozen=True)
class CheckpointSaved:
    """A checkpoint is complete on disk (every rank returns from the collective save)."""

    step: int
    path: str
    seconds: float


@dataclass(frozen=True)
class ProcessEnd:
    """The process leaves the loop: `outcome` is completed, stopped, preempted or failed."""

    outcome: str
    signal: str | None
    max_steps: int
    precision: str
    zero_stage: int
    memory: dict[str, float] = field(default_factory=dict)


Event = ProcessStart | LoopStart | FirstBatch | StepEnd | EvaluationEnd | CheckpointSaved | ProcessEnd


class EventSink(Protocol):
    def handle(self, event: Event) -> None: ...

    def close(self) -> None: ...


class EventBus:
    """Delivers every event to every sink, in the order the sinks were added."""

    def __init__(self, sinks: list[EventSink] | None = None) -> None:
        self.sinks: list[EventSink] = list(sinks or [])

    def add(self, sink: EventSink) -> None:
        self.sinks.append(sink)

    def emit(self, event: Event) -> None:
        for sink in self.sinks:
            sink.handle(event)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
