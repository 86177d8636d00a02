"""Strict YAML -> dataclass loading with `--set key=value` overrides.

Every key is checked against the dataclass fields: an unknown key fails naming it, the close
matches and the valid keys; a wrong type or an invalid choice fails naming the key and the choices.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import types
import typing
from pathlib import Path
from typing import Any, Literal, TypeVar, Union

import yaml

from mmtrain.config.errors import ConfigError
from mmtrain.config.methods import with_hook
from mmtrain.config.references import resolve_references
from mmtrain.config.rules import check_values
from mmtrain.config.schema import RunConfig
from mmtrain.utils.io import atomic_write_text

__all__ = ["ConfigError", "assign_dotted", "check_config", "dump_config", "from_dict", "load_config",
           "read_yaml_mapping", "resolve_asset_references", "to_dict"]

T = TypeVar("T")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Read a YAML run config, apply `key=value` overrides, return a validated RunConfig.

    Args:
        path: YAML file, or None to start from the defaults.
        overrides: dotted assignments such as `optim.lr=1e-3` (values parsed as YAML).

    Raises:
        ConfigError: unreadable file, unknown key, wrong type or invalid choice.
    """
    raw: dict[str, Any] = {}
    source = "defaults"
    if path is not None:
        source = str(path)
        raw = read_yaml_mapping(path, "config file", "a mapping of keys")
    for assignment in overrides or []:
        key, sep, value = assignment.partition("=")
        if not sep or not key:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3")
        assign_dotted(raw, key.strip(), yaml.safe_load(value) if value != "" else None)
    config = from_dict(RunConfig, raw, source=source)
    resolve_references(config, source)
    check_config(config, source)
    return config


def check_config(config: RunConfig, source: str = "config") -> None:
    """The rules a loaded config must keep: values (`mmtrain.config.rules`), then each method's cross-field rules.

    Raises:
        ConfigError: naming the key and what to do.
    """
    check_values(config, source)
    for _, check in with_hook("check"):
        check(config, source)


def read_yaml_mapping(path: str | Path, what: str, expected: str) -> dict[str, Any]:
    """A YAML file whose top level is a mapping (an empty file is an empty mapping).

    Raises:
        ConfigError: unreadable file (naming `what`), invalid YAML, or a top level that is not
            `expected` (named in the message).
    """
    try:
        text = Path(path).read_text()
    except OSError as exc:
        raise ConfigError(f"cannot read {what} {path}: {exc.strerror}") from None
    try:
        loaded = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: the top level must be {expected}, got {type(loaded).__name__}")
    return loaded


def resolve_asset_references(config: Any, source: str = "config", prefix: str = "") -> None:
    """Replace every `asset:NAME/...` string in a config (dataclasses, lists, dicts) by its cache path."""
    resolve_references(config, source, prefix)


def assign_dotted(tree: dict[str, Any], dotted: str, value: Any, merge: bool = False) -> None:
    """Set `a.b.c` in a nested mapping (creating levels); with `merge`, a mapping value merges into
    an existing mapping instead of replacing it."""
    parts = dotted.split(".")
    node = tree
    for part in parts[:-1]:
        child = node.get(part)
        if not isinstance(child, dict):
            child = {}
            node[part] = child
        node = child
    leaf = parts[-1]
    if merge and isinstance(value, dict) and isinstance(node.get(leaf), dict):
        for key, item in value.items():
            assign_dotted(node[leaf], str(key), item, merge=True)
    else:
        node[leaf] = copy.deepcopy(value) if merge else value


def from_dict(cls: type[T], raw: dict[str, Any], source: str = "config", prefix: str = "") -> T:
    """Build dataclass `cls` from a mapping, checking every key and value type."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: `{prefix.rstrip('.') or 'config'}` must be a mapping, got {raw!r}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    kwargs: dict[str, Any] = {}
    for key, value in raw.items():
        full = f"{prefix}{key}"
        if key not in fields:
            close = difflib.get_close_matches(str(key), list(fields), n=3)
            hint = f" Did you mean {', '.join(prefix + c for c in close)}?" if close else ""
            raise ConfigError(
                f"{source}: unknown key `{full}`.{hint} Valid keys here: {', '.join(sorted(fields))}"
            )
        kwargs[key] = _coerce(hints[key], value, full, source)
    return cls(**kwargs)


def _coerce(tp: Any, value: Any, key: str, source: str) -> Any:
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value if value is not None else {}, source, prefix=f"{key}.")
    if origin in (Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(arg, value, key, source)
            except ConfigError as exc:
                errors.append(exc)
        raise errors[0] if len(errors) == 1 else ConfigError(
            f"{source}: `{key}` = {value!r} does not fit {_describe(tp)}")
    if origin is Literal:
        if value not in args:
            choices = ", ".join(str(a) for a in args)
            raise ConfigError(f"{source}: `{key}` = {value!r} is not a valid choice; choose one of: {choices}")
        return value
    if tp is Any:
        return value
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: `{key}` must be true or false, got {value!r}")
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
        raise ConfigError(f"{source}: `{key}` must be an integer, got {value!r}")
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str):
            try:  # YAML 1.1 reads `1e-4` (no dot) as a string
                return float(value)
            except ValueError:
                pass
        raise ConfigError(f"{source}: `{key}` must be a number, got {value!r}")
    if tp is str:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{source}: `{key}` must be a string, got {value!r}")
    if origin is tuple:
        if not isinstance(value, (list, tuple)) or len(value) != len(args):
            raise ConfigError(f"{source}: `{key}` must be a list of {len(args)} values, got {value!r}")
        return tuple(_coerce(a, v, f"{key}[{i}]", source) for i, (a, v) in enumerate(zip(args, value)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{source}: `{key}` must be a list, got {value!r}")
        return [_coerce(args[0], v, f"{key}[{i}]", source) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{source}: `{key}` must be a mapping, got {value!r}")
        return {k: _coerce(args[1], v, f"{key}.{k}", source) for k, v in value.items()}
    raise ConfigError(f"{source}: `{key}` has an unsupported type {tp!r}")


def _describe(tp: Any) -> str:
    return " or ".join("null" if a is type(None) else getattr(a, "__name__", str(a)) for a in typing.get_args(tp))


def to_dict(config: Any) -> dict[str, Any]:
    """The config as plain YAML-able data (tuples become lists)."""

    def plain(value: Any) -> Any:
        if isinstance(value, tuple):
            return [plain(v) for v in value]
        if isinstance(value, list):
            return [plain(v) for v in value]
        if isinstance(value, dict):
            return {k: plain(v) for k, v in value.items()}
        return value

    return plain(dataclasses.asdict(config))


def dump_config(config: RunConfig, path: Path) -> None:
    """Write the resolved config as YAML (atomically)."""
    atomic_write_text(path, yaml.safe_dump(to_dict(config), sort_keys=False))
