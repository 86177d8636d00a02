"""Exceptions raised while reading manifests and turning samples into training examples.

Both errors point at a line of a manifest so a user can find and fix the
record that caused them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, ClassVar

from mmtrain.errors import UserError


class _ManifestLineError(UserError, ValueError):
    """Base for errors that point at one line of a manifest file."""

    default_hint: ClassVar[str] = ""

    def __init__(
        self, manifest: str | Path, line: int | None = None, reason: str | None = None, hint: str | None = None
    ) -> None:
        """Creates the error.

        Args:
            manifest: The manifest file.
            line: 1-based line number (0 for the file as a whole).
            reason: What is wrong.
            hint: What to do about it; defaults to the class's hint.

        Called with a message only, the message is kept as is: this is how a
        DataLoader re-raises a worker's error in the main process, and it keeps
        the error's type across that boundary.
        """
        self._message: str | None = None
        if line is None or reason is None:
            self._message = str(manifest)
            manifest, line, reason, hint = Path(), 0, str(manifest), ""
        self.manifest = Path(manifest)
        self.line = line
        self.reason = reason
        self.hint = self.default_hint if hint is None else hint
        super().__init__(self.manifest, line, reason)

    def __str__(self) -> str:
        if self._message is not None:
            return self._message
        located = f"{self.manifest}:{self.line}: {self.reason}"
        return f"{located} ({self.hint})" if self.hint else located

    def __reduce__(self) -> tuple[Any, ...]:
        # Keeps the error picklable, e.g. when raised inside a DataLoader worker.
        if self._message is not None:
            return (type(self), (self._message,))
        return (type(self), (self.manifest, self.line, self.reason, self.hint))


class ManifestError(_ManifestLineError):
    """The manifest file itself is broken (unreadable, bad JSON, wrong keys or types).

    Always fatal: a broken manifest means the data is not what the user thinks it is.
    """

    default_hint = "fix the manifest: one JSON object per line"


class BadSampleError(_ManifestLineError):
    """One sample is unusable (missing or corrupt image, empty or too long text, ...)."""

    default_hint = "fix or remove the line, or set data.bad_samples=skip to skip such samples"
