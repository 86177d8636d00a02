"""`UserError`: the one base class of every error that is the user's to fix.

A config key, a manifest line, a checkpoint, a recipe, an asset, a command-line value: whatever the
user gave that cannot work raises a subclass of `UserError` whose message names the file, line or
key and says what to do. Every entry point catches `UserError` the same way (`report_user_errors`):
it prints `error: MESSAGE` and exits with status 2, with no traceback. Anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

import functools
import sys
from typing import Callable, TypeVar

EXIT_USER_ERROR = 2
"""Exit status of a command stopped by a `UserError`."""

F = TypeVar("F", bound=Callable[..., int])


class UserError(Exception):
    """Something the user gave cannot work; the message names where it is and what to do."""


def report_user_errors(main: F) -> F:
    """Decorate a command's `main`: a `UserError` becomes `error: MESSAGE` on stderr and exit status 2."""

    @functools.wraps(main)
    def wrapper(*args, **kwargs) -> int:
        try:
            return main(*args, **kwargs)
        except UserError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return EXIT_USER_ERROR

    return wrapper  # type: ignore[return-value]
