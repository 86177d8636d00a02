"""Graceful stop on a scheduler's warning: finish the step, checkpoint, exit with EXIT_REQUEUE.

SLURM sends SIGUSR1 before the time limit when the job asked for it (`#SBATCH --signal=USR1@120`),
`scancel --signal=USR1 JOB` sends it by hand, and a preempting scheduler or the time limit itself
sends SIGTERM (followed by SIGKILL after the grace time). Either only sets a flag here; the training
loop reads it after each optimizer step, agrees on it across ranks (one rank may be signalled a
moment before another; the flag rides on the step's existing all-reduce), saves a checkpoint and
exits with EXIT_REQUEUE, which the pipeline runner turns into `scontrol requeue`.
"""

from __future__ import annotations

import signal

EXIT_REQUEUE = 75
"""Exit status of a training process that stopped on a signal after checkpointing (EX_TEMPFAIL)."""
STOP_SIGNALS = (signal.SIGUSR1, signal.SIGTERM)


class StopRequest:
    """Records the first stop signal received; install() once per process, in the main thread."""

    def __init__(self) -> None:
        self.signum: int | None = None
        self._previous: dict[int, object] = {}

    def install(self) -> "StopRequest":
        for signum in STOP_SIGNALS:
            self._previous[signum] = signal.signal(signum, self._handle)
        return self

    def uninstall(self) -> None:
        for signum, handler in self._previous.items():
            signal.signal(signum, handler)
        self._previous.clear()

    def _handle(self, signum: int, frame) -> None:
        if self.signum is None:
            self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name if self.signum is not None else ""
