"""Method plug-ins: how the core finds them, the hooks it calls, and the settings they add to the run config.

A method (VPGTrans, grafting, MMA, VL-PET, LoRA, or a new one) is a package under `mmtrain/methods/`,
or any installed package named by a `mmtrain.methods` entry point, with two modules:

* `config.py`: its settings as plain dataclasses, and `SECTIONS = {HOST: {KEY: Dataclass}}`, where
  HOST is a place in the run config that takes method sections (`model.vision`, `model.llm`,
  `init`, `inherit`). `SECTIONS["model.llm"] = {"adapter": AdapterConfig}` makes `model.llm.adapter`
  a key of the run config, parsed, validated and written to `config.yaml` like every other key.
  This module is imported while the run config's schema is assembled, so it imports nothing of mmtrain.
* `method.py`: `METHOD = MethodSpec(...)`, the hooks below. Imported the first time a hook is needed.

The core never imports a method: it asks this registry, which imports the methods by name. A fifth
method is a new folder with these two modules (docs/architecture.md, "How to add a method").
"""

from __future__ import annotations

import dataclasses
import functools
import importlib
import importlib.metadata
import pkgutil
from dataclasses import dataclass
from typing import Any, Callable, Optional

BUILTIN_PACKAGE = "mmtrain.methods"
ENTRY_POINT_GROUP = "mmtrain.methods"
HOSTS = ("model.vision", "model.llm", "init", "inherit")
"""The places in a run config (and a recipe's `inherit` entries) that take method sections."""


@dataclass(frozen=True)
class MethodSpec:
    """What a method plugs into the core; every hook is optional.

    Attributes:
        name: the method's folder name (`vpgtrans`, `grafting`, `mma`, `vl_pet`, `lora`).
        summary: one line for docs and `--help`.
        attach_order: methods attach their modules in this order (then by name); it fixes how the
            seeded initialisation's random draws are shared out, so it must not change casually.
        check: `check(run_config, source)` when a config loads: cross-field rules that need no model;
            raises `ConfigError` naming the key.
        attach: `attach(model, model_config)` after the VLM is built (outside ZeRO-3's construction
            context, seeded) and before trainability is applied: add modules, flag them as adapters.
        load_init: `load_init(model, source, run_config, tokenizer, run_dir)` for one `init` entry:
            returns the names it loaded, or None when the entry is not this method's (then the next
            method, and finally the plain weight loader, is asked).
        retarget: `retarget(run_config, checkpoint_dir, llm)` for evaluation on another LLM (grafting):
            returns the changed config and the `InitSource` that loads the checkpoint's part.
        resolve_inherit: `resolve_inherit(name, section, stage, inherited_config, inherited_trained, key)`
            in a recipe, for each method section `name` of an `inherit` entry that reads stage `stage`:
            returns the section completed from that stage (e.g. VPGTrans's source LLM is the
            inherited stage's LLM); `inherited_trained` names the components that stage trains.
    """

    name: str
    summary: str
    attach_order: int = 100
    check: Optional[Callable[[Any, str], None]] = None
    attach: Optional[Callable[[Any, Any], None]] = None
    load_init: Optional[Callable[..., Optional[list]]] = None
    retarget: Optional[Callable[[Any, Any, str], tuple]] = None
    resolve_inherit: Optional[Callable[..., Any]] = None


def _entry_point_packages() -> list[str]:
    return sorted(ep.value for ep in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP))


@functools.lru_cache(maxsize=None)
def method_packages() -> tuple[str, ...]:
    """Every method package: the built-in ones (folders of `mmtrain/methods/`), then installed plug-ins."""
    builtin = importlib.import_module(BUILTIN_PACKAGE)
    names = [f"{BUILTIN_PACKAGE}.{info.name}" for info in pkgutil.iter_modules(builtin.__path__) if info.ispkg]
    return tuple(sorted(names)) + tuple(p for p in _entry_point_packages() if p not in names)


@functools.lru_cache(maxsize=None)
def sections(host: str) -> tuple[tuple[str, type, str], ...]:
    """(key, dataclass, package) of every method section at `host`, in method order."""
    if host not in HOSTS:
        raise KeyError(f"{host!r} takes no method sections; hosts: {', '.join(HOSTS)}")
    found: list[tuple[str, type, str]] = []
    owner: dict[str, str] = {}
    for package in method_packages():
        module = importlib.import_module(f"{package}.config")
        for key, schema in getattr(module, "SECTIONS", {}).get(host, {}).items():
            if key in owner:
                raise RuntimeError(f"methods {owner[key]} and {package} both declare `{host}.{key}`")
            owner[key] = package
            found.append((key, schema, package))
    return tuple(found)


def with_sections(core: type, host: str, name: str) -> type:
    """The dataclass `core` plus one optional field per method section declared at `host` (default None)."""
    extra = [(key, Optional[schema], dataclasses.field(default=None)) for key, schema, _ in sections(host)]
    cls = dataclasses.make_dataclass(name, extra, bases=(core,))
    cls.__doc__ = core.__doc__
    cls.__module__ = core.__module__
    cls.__qualname__ = name
    return cls


@functools.lru_cache(maxsize=None)
def methods() -> tuple[MethodSpec, ...]:
    """Every method's spec, in attach order (then by name)."""
    specs = [importlib.import_module(f"{package}.method").METHOD for package in method_packages()]
    return tuple(sorted(specs, key=lambda spec: (spec.attach_order, spec.name)))


def with_hook(hook: str) -> list[tuple[MethodSpec, Callable[..., Any]]]:
    """(spec, function) of every method that implements `hook`, in attach order."""
    if hook not in {f.name for f in dataclasses.fields(MethodSpec)}:
        raise AttributeError(f"MethodSpec has no hook {hook!r}")
    return [(spec, getattr(spec, hook)) for spec in methods() if getattr(spec, hook) is not None]


def get_method(name: str) -> MethodSpec:
    for spec in methods():
        if spec.name == name:
            return spec
    raise KeyError(f"unknown method {name!r}; installed: {', '.join(s.name for s in methods())}")
