"""`ConfigError`: a run config, recipe or command-line setting that cannot work."""

from __future__ import annotations

from mmtrain.errors import UserError


class ConfigError(UserError, ValueError):
    """A configuration problem; the message names the key and what to do."""
