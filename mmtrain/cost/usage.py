"""What one training process did in this attempt, for the ledger: steps, data, FLOPs and time split.

The trainer owns one `AttemptUsage`; counters start at zero in every process (a resumed job counts
only its own steps, so attempts add up without double counting), and the samples/tokens/images
are the global (all-rank) totals of each step.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any


@dataclass
class AttemptUsage:
    start_step: int
    step: int = -1
    samples: int = 0
    tokens: int = 0
    images: int = 0
    flops: float = 0.0
    train_s: float = 0.0
    """Seconds in the training loop, validation and checkpointing excluded: the productive time."""
    eval_s: float = 0.0
    checkpoint_s: float = 0.0
    startup_s: float = 0.0
    """Seconds from process start to the first step (imports, model build, engine, resume)."""
    loop_started: float | None = None
    process_started: float = field(default_factory=time.perf_counter)

    def __post_init__(self) -> None:
        if self.step < 0:
            self.step = self.start_step

    def begin_loop(self) -> None:
        self.loop_started = time.perf_counter()
        self.startup_s = self.loop_started - self.process_started

    def move_to_startup(self, seconds: float) -> None:
        """Count `seconds` spent inside the loop on one-off set-up (FLOP counting) as start-up."""
        if self.loop_started is not None:
            self.loop_started += seconds
            self.startup_s += seconds

    def end_step(self, step: int, samples: int, tokens: int, images: int, flops: float) -> None:
        self.step = step
        self.samples += samples
        self.tokens += tokens
        self.images += images
        self.flops += flops
        self._update_train_time()

    def _update_train_time(self) -> None:
        if self.loop_started is not None:
            self.train_s = time.perf_counter() - self.loop_started - self.eval_s - self.checkpoint_s

    def counters(self) -> dict[str, Any]:
        """Steps and data of this attempt so far (what a checkpoint written now keeps)."""
        self._update_train_time()
        return {"step_start": self.start_step, "step_end": self.step, "steps": self.step - self.start_step,
                "samples": self.samples, "tokens": self.tokens, "images": self.images, "flops": self.flops,
                "train_s": round(self.train_s, 3)}

    def times(self) -> dict[str, float]:
        self._update_train_time()
        return {"startup_s": round(self.startup_s, 3), "train_s": round(self.train_s, 3),
                "eval_s": round(self.eval_s, 3), "checkpoint_s": round(self.checkpoint_s, 3),
                "wall_s": round(time.perf_counter() - self.process_started, 3)}
