"""Pipeline recipes: a YAML file naming stages, each a run config plus what it inherits and evaluates.

`load_recipe` parses a recipe strictly (unknown keys fail naming the key, like the run config) and
resolves every stage into a complete `RunConfig`: the recipe's `defaults` (or the stage's own
`config`), the stage's `set` overrides, the command line's `--set` overrides, then what the
pipeline owns: `output_dir` (the stage folder `<output_dir>/<NN>-<name>`), `checkpoint.resume:
auto` and `init` filled from `inherit` with the inherited stages' final checkpoints. Nothing here
touches the disk beyond reading the recipe and its config files.
"""

from __future__ import annotations

import copy
import dataclasses
import difflib
import hashlib
import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from mmtrain.config.loader import ConfigError, assign_dotted, check_config, from_dict, read_yaml_mapping, to_dict
from mmtrain.config.methods import sections, with_hook, with_sections
from mmtrain.config.paths import RunDir
from mmtrain.config.schema import InitSource, RunConfig

STAGE_CONFIG_FILE = "stage_config.yaml"
COMPONENTS = ("vision", "resampler", "projector", "llm")
PIPELINE_KEYS = {
    "output_dir": "the pipeline sets it to the stage folder <output_dir>/<NN>-<name>",
    "checkpoint.resume": "the pipeline sets it to `auto` so that a rerun resumes the stage",
}
# Keys that change neither the weights nor the metrics a stage produces: changing them does not make
# a completed stage stale (see `config_hash`).
BOOKKEEPING_KEYS = ("output_dir", "progress_bar", "stop_after_steps", "log_every", "logging", "checkpoint")
_STAGE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_-]*$")
_EVAL_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_EVAL_OPTION = re.compile(r"^[A-Za-z][A-Za-z0-9_-]*$")
_RESERVED_EVAL_KEYS = {"out": "the pipeline writes each eval to <stage folder>/eval/<name>.json"}


# ---------------------------------------------------------------------------------------------- schema
@dataclass
class LaunchConfig:
    """How a stage's processes start."""

    nprocs: int = 1
    """1 = one plain `python -m mmtrain.train` process; N > 1 = N processes under `launcher` on this node."""
    launcher: Literal["deepspeed", "torchrun", "srun"] = "deepspeed"
    """`srun`: the processes are a step of the SLURM allocation the pipeline runs in (`mmtrain submit`
    sets it), even when nprocs is 1, so that the scheduler's signals reach them."""


@dataclass
class _InheritCore:
    """Weights a stage takes from an earlier stage's final checkpoint. YAML: `{from, modules, rename, strict}`."""

    stage: str
    """The earlier stage (YAML key `from`)."""
    modules: list[str] = field(default_factory=list)
    """Parameter-name prefixes (`resampler`, `projector`, ...); empty = every tensor of its checkpoint."""
    rename: dict[str, str] = field(default_factory=dict)
    strict: bool = True


InheritSpec = with_sections(_InheritCore, "inherit", "InheritSpec")
"""An inherit entry plus the method sections it takes (VPGTrans: `word_converter`, whose `source_llm`
defaults to the inherited stage's LLM)."""


@dataclass
class EvalSpec:
    """One evaluation after training: `mmtrain eval STAGE_DIR --data DATA --out ... [--option value ...]`."""

    name: str
    data: str
    options: dict[str, Any] = field(default_factory=dict)
    """Every other key of the recipe entry; each becomes a flag of `mmtrain eval`."""


@dataclass
class StageSpec:
    """One stage as written in the recipe (before resolution)."""

    name: str = ""
    config: str | None = None
    """A run config YAML that replaces the recipe's `defaults` for this stage."""
    set: dict[str, Any] = field(default_factory=dict)
    """Overrides over the run config: dotted keys (`optim.lr: 1e-3`) or nested mappings (merged)."""
    inherit: list[dict[str, Any]] = field(default_factory=list)
    evals: list[dict[str, Any]] = field(default_factory=list)
    launch: dict[str, Any] | None = None
    """Overrides of the recipe's `launch` for this stage, e.g. `{nprocs: 8}`."""
    slurm: dict[str, Any] | None = None
    """Overrides of the recipe's `slurm` options for this stage's job, e.g. `{time: "04:00:00", nodes: 2}`."""


@dataclass
class RecipeSpec:
    """The recipe file's top level."""

    name: str = ""
    output_dir: str = ""
    defaults: str | dict[str, Any] | None = None
    """The run config every stage starts from: a YAML file (relative to the recipe) or an inline mapping."""
    launch: LaunchConfig = field(default_factory=LaunchConfig)
    slurm: dict[str, Any] = field(default_factory=dict)
    """Job options for `mmtrain submit` (mmtrain/slurm/options.py lists them): partition, account,
    qos, time, nodes, gpus_per_node, gpu_type, ..."""
    stages: list[dict[str, Any]] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------- resolved
@dataclass
class Stage:
    """A resolved stage: everything needed to run it, plan it or check it."""

    index: int
    """1-based position in the recipe."""
    name: str
    folder: Path
    config: RunConfig
    launch: LaunchConfig
    evals: list[EvalSpec]
    requires: list[str]
    """Stages whose final checkpoints this stage's `init` reads (directly, or through frozen modules)."""
    inherit: list[InheritSpec]
    slurm: dict[str, Any] = field(default_factory=dict)
    """The recipe's `slurm` options with this stage's merged over them (validated by mmtrain.slurm)."""

    @property
    def final_checkpoint(self) -> Path:
        """The checkpoint a complete stage ends with (the one saved at `max_steps`)."""
        return RunDir(self.folder).checkpoint(self.config.max_steps)

    @property
    def config_file(self) -> Path:
        return self.folder / STAGE_CONFIG_FILE

    def eval_output(self, spec: EvalSpec) -> Path:
        return self.folder / "eval" / f"{spec.name}.json"

    @property
    def config_hash(self) -> str:
        return config_hash(self.config, self.folder.parent)


@dataclass
class Pipeline:
    """A loaded recipe: its stages in order, resolved."""

    name: str
    recipe_path: Path
    recipe_text: str
    output_dir: Path
    stages: list[Stage]
    overrides: list[str]

    def stage(self, name: str) -> Stage:
        """The stage called `name`; ConfigError listing the stages otherwise."""
        for stage in self.stages:
            if stage.name == name:
                return stage
        raise ConfigError(f"{self.recipe_path}: no stage named {name!r}; stages: "
                          f"{', '.join(s.name for s in self.stages)}")


# ---------------------------------------------------------------------------------------------- loading
def load_recipe(path: str | Path, overrides: list[str] | None = None, output_dir: str | Path | None = None) -> Pipeline:
    """Read a recipe and resolve every stage's run config.

    Args:
        path: the recipe YAML.
        overrides: `KEY=VALUE` assignments (values parsed as YAML) applied to every stage, or to one
            stage when KEY starts with a stage name (`align.max_steps=5`).
        output_dir: run the pipeline in this folder instead of the recipe's `output_dir`.

    Raises:
        ConfigError: the message starts with the recipe file and names the key and what to do.
    """
    path = Path(path)
    raw = read_yaml_mapping(path, "recipe", "a mapping with name, output_dir, defaults, launch, stages")
    text = path.read_text()
    spec = from_dict(RecipeSpec, raw, source=str(path))
    for key in ("name", "output_dir"):
        if not getattr(spec, key):
            raise ConfigError(f"{path}: {key}: missing; set it at the top level of the recipe")
    if not spec.stages:
        raise ConfigError(f"{path}: stages: missing or empty; list at least one stage ({{name: ..., set: {{...}}}})")
    if spec.launch.nprocs < 1:
        raise ConfigError(f"{path}: launch.nprocs: must be at least 1, got {spec.launch.nprocs}")

    stage_specs = [_parse_stage(path, i, entry) for i, entry in enumerate(spec.stages)]
    names = [s.name for s in stage_specs]
    _check_unique_names(path, names)
    cli_global, cli_per_stage = _split_overrides(path, overrides or [], names)

    output_dir = Path(output_dir if output_dir is not None else spec.output_dir)
    defaults = _read_base(path, spec.defaults, "defaults") if spec.defaults is not None else ({}, str(path))
    stages: list[Stage] = []
    for index, stage_spec in enumerate(stage_specs, start=1):
        where = f"stages.{stage_spec.name}"
        base, base_source = (_read_base(path, stage_spec.config, f"{where}.config")
                             if stage_spec.config is not None else defaults)
        launch = spec.launch
        if stage_spec.launch is not None:
            launch = from_dict(LaunchConfig, {**dataclasses.asdict(spec.launch), **stage_spec.launch},
                               source=str(path), prefix=f"{where}.launch.")
            if launch.nprocs < 1:
                raise ConfigError(f"{path}: {where}.launch.nprocs: must be at least 1, got {launch.nprocs}")
        folder = output_dir / f"{index:02d}-{stage_spec.name}"
        config = _resolve_config(path, where, base, base_source, stage_spec.set,
                                 cli_global + cli_per_stage.get(stage_spec.name, []), folder)
        inherits = [_parse_inherit(path, f"{where}.inherit[{i}]", entry) for i, entry in enumerate(stage_spec.inherit)]
        init, requires = _inherited_init(path, where, inherits, stages, names)
        config.init = config.init + init
        evals = _parse_evals(path, where, stage_spec.evals)
        slurm = {**spec.slurm, **(stage_spec.slurm or {})}
        stages.append(Stage(index=index, name=stage_spec.name, folder=folder, config=config, launch=launch,
                            evals=evals, requires=requires, inherit=inherits, slurm=slurm))
    return Pipeline(name=spec.name, recipe_path=path, recipe_text=text, output_dir=output_dir, stages=stages,
                    overrides=list(overrides or []))


def _parse_stage(path: Path, position: int, entry: Any) -> StageSpec:
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: stages[{position}]: must be a mapping with at least `name`, got {entry!r}")
    name = entry.get("name")
    where = f"stages.{name}" if isinstance(name, str) and name else f"stages[{position}]"
    spec = from_dict(StageSpec, entry, source=str(path), prefix=f"{where}.")
    if not spec.name:
        raise ConfigError(f"{path}: {where}.name: missing; give every stage a name (letters, digits, - and _)")
    if not _STAGE_NAME.match(spec.name):
        raise ConfigError(f"{path}: {where}.name: {spec.name!r} is not a valid stage name; use letters, digits, "
                          "- and _ (it names the stage folder and prefixes `--set STAGE.key=value`)")
    if spec.name in {f.name for f in dataclasses.fields(RunConfig)}:
        raise ConfigError(f"{path}: {where}.name: {spec.name!r} is also a run-config key, which would make "
                          f"`--set {spec.name}.…` ambiguous; rename the stage")
    return spec


def _check_unique_names(path: Path, names: list[str]) -> None:
    seen: set[str] = set()
    for name in names:
        if name in seen:
            raise ConfigError(f"{path}: stages.{name}.name: two stages are called {name!r}; stage names must be unique")
        seen.add(name)


def _split_overrides(path: Path, overrides: list[str], names: list[str]) -> tuple[list[str], dict[str, list[str]]]:
    """Split `--set` assignments into those for every stage and those for one named stage."""
    run_keys = {f.name for f in dataclasses.fields(RunConfig)}
    every: list[str] = []
    per_stage: dict[str, list[str]] = {}
    for assignment in overrides:
        key, sep, value = assignment.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigError(f"--set {assignment!r}: expected KEY=VALUE, e.g. --set optim.lr=1e-3 "
                              "or --set STAGE.max_steps=5")
        head, dot, rest = key.partition(".")
        if head in names and dot and rest:
            per_stage.setdefault(head, []).append(f"{rest}={value}")
        elif head in names:
            raise ConfigError(f"--set {assignment!r}: name a key after the stage, e.g. --set {head}.max_steps=5")
        elif head not in run_keys:
            close = difflib.get_close_matches(head, sorted(run_keys) + names, n=3)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"--set {assignment!r}: `{head}` is neither a run-config key nor a stage of "
                              f"{path} (stages: {', '.join(names)}).{hint}")
        else:
            every.append(f"{key}={value}")
    return every, per_stage


def _read_base(recipe: Path, value: str | dict[str, Any], key: str) -> tuple[dict[str, Any], str]:
    """The run config a stage starts from, as a raw mapping, and where it came from (for messages)."""
    if isinstance(value, dict):
        _build_run_config(value, f"{recipe}: {key}")
        return copy.deepcopy(value), f"{recipe}: {key}"
    config_path = Path(value)
    if not config_path.is_absolute():
        config_path = recipe.parent / config_path
    if not config_path.is_file():
        raise ConfigError(f"{recipe}: {key}: cannot read {config_path} (no such file); paths are relative "
                          "to the recipe's folder")
    loaded = read_yaml_mapping(config_path, "run config", "a mapping of run-config keys")
    _build_run_config(loaded, str(config_path))  # errors name the file the bad key is in
    return loaded, str(config_path)


def _resolve_config(recipe: Path, where: str, base: dict[str, Any], base_source: str, stage_set: dict[str, Any],
                    cli_overrides: list[str], folder: Path) -> RunConfig:
    raw = copy.deepcopy(base)
    for key in _flat_keys(stage_set):
        _refuse_pipeline_key(key, f"{recipe}: {where}.set.{key}")
    apply_overrides(raw, stage_set)
    _build_run_config(raw, f"{recipe}: {where}.set")
    for assignment in cli_overrides:
        key, _, value = assignment.partition("=")
        _refuse_pipeline_key(key.strip(), f"--set {assignment}")
        assign_dotted(raw, key.strip(), yaml.safe_load(value) if value != "" else None)
    source = f"--set (stage {where.split('.', 1)[1]})" if cli_overrides else base_source
    config = _build_run_config(raw, source)
    check_config(config, source)
    config.output_dir = str(folder)
    config.checkpoint.resume = "auto"
    return config


def _build_run_config(raw: dict[str, Any], source: str) -> RunConfig:
    try:
        return from_dict(RunConfig, raw, source=source)
    except TypeError as exc:  # a dataclass without a default for a key that is absent (e.g. init[].path)
        raise ConfigError(f"{source}: a required key is missing ({exc}); see mmtrain/config/schema.py") from None


def _refuse_pipeline_key(key: str, where: str) -> None:
    for owned, why in PIPELINE_KEYS.items():
        if key == owned or key.startswith(owned + "."):
            raise ConfigError(f"{where}: {why}; remove this override")


def apply_overrides(tree: dict[str, Any], overrides: dict[str, Any]) -> None:
    """Apply a stage's `set` onto a raw run config: dotted keys address nested keys; mappings merge."""
    for key, value in overrides.items():
        assign_dotted(tree, str(key), value, merge=True)


def _flat_keys(mapping: dict[str, Any], prefix: str = "") -> list[str]:
    keys = []
    for key, value in mapping.items():
        full = f"{prefix}{key}"
        keys.append(full)
        if isinstance(value, dict):
            keys += _flat_keys(value, full + ".")
    return keys


def _parse_inherit(path: Path, where: str, entry: Any) -> InheritSpec:
    allowed = ("from", "modules", "rename", "strict", *(name for name, _, _ in sections("inherit")))
    if not isinstance(entry, dict):
        raise ConfigError(f"{path}: {where}: must be a mapping like {{from: STAGE, modules: [projector]}}, "
                          f"got {entry!r}")
    for key in entry:
        if key not in allowed:
            close = difflib.get_close_matches(str(key), allowed, n=2)
            hint = f" Did you mean {', '.join(close)}?" if close else ""
            raise ConfigError(f"{path}: {where}.{key}: unknown key.{hint} Valid keys here: {', '.join(allowed)}")
    if not isinstance(entry.get("from"), str) or not entry["from"]:
        raise ConfigError(f"{path}: {where}.from: missing; name the earlier stage to take weights from")
    rest = {k: v for k, v in entry.items() if k != "from"}
    return from_dict(InheritSpec, {"stage": entry["from"], **rest}, source=str(path), prefix=f"{where}.")


def trained_components(config: RunConfig) -> set[str]:
    """Model components with trainable parameters under `config` (so present in its checkpoints)."""
    trained = set()
    for name in COMPONENTS:
        part = getattr(config.model, name)
        if part.trainable != "frozen" or getattr(part, "trainable_top_k", 0) > 0:
            trained.add(name)
    return trained


def _method_sections(spec: InheritSpec, source: Stage, key: str) -> dict[str, Any]:
    """The method sections of an inherit entry, each completed by its method from the inherited stage."""
    trained = trained_components(source.config)
    out: dict[str, Any] = {}
    for name, _, _ in sections("inherit"):
        value = getattr(spec, name)
        if value is None:
            continue
        for _, resolve in with_hook("resolve_inherit"):
            value = resolve(name, value, spec.stage, source.config, trained, f"{key}.{name}")
        out[name] = value
    return out


def _inherited_init(path: Path, where: str, inherits: list[InheritSpec], earlier: list[Stage],
                    names: list[str]) -> tuple[list[InitSource], list[str]]:
    """Init sources for a stage's `inherit` entries, and the stages they read from.

    A module that the inherited stage trained is read from its final checkpoint. A module it kept
    frozen is not in that checkpoint: its values are the ones the inherited stage itself started
    from, so the matching sources of that stage's own `init` are carried over instead.
    """
    by_name = {s.name: s for s in earlier}
    stage_of_checkpoint = {str(s.final_checkpoint): s.name for s in earlier}
    sources: list[InitSource] = []
    for i, spec in enumerate(inherits):
        key = f"{path}: {where}.inherit[{i}]"
        if spec.stage not in by_name:
            this = where.split(".", 1)[1]
            if spec.stage == this:
                raise ConfigError(f"{key}.from: a stage cannot inherit from itself; name an earlier stage")
            if spec.stage in names:
                raise ConfigError(f"{key}.from: stage `{spec.stage}` comes after `{this}` in the recipe; a stage can "
                                  f"only inherit from an earlier one: move `{spec.stage}` above `{this}`")
            raise ConfigError(f"{key}.from: no stage named {spec.stage!r}; earlier stages: "
                              f"{', '.join(by_name) or '(none: the first stage cannot inherit)'}")
        source = by_name[spec.stage]
        final = str(source.final_checkpoint)
        extra = _method_sections(spec, source, key)
        if not spec.modules:
            sources.append(InitSource(path=final, modules=[], rename=dict(spec.rename), strict=spec.strict, **extra))
            continue
        trained = trained_components(source.config)
        from_checkpoint = [m for m in spec.modules if m.split(".")[0] not in COMPONENTS or m.split(".")[0] in trained]
        for module in (m for m in spec.modules if m not in from_checkpoint):
            carried = [s for s in source.config.init if _covers(s, module)]
            if not carried:
                raise ConfigError(
                    f"{key}.modules: `{module}` is frozen in stage `{spec.stage}` and that stage did not inherit it "
                    f"either, so its checkpoint has no `{module}` weights and no stage trained them; inherit "
                    f"`{module}` from the stage that trained it, or drop it from the list")
            if spec.rename:
                raise ConfigError(
                    f"{key}.rename: `{module}` is frozen in stage `{spec.stage}` (its weights come from that stage's "
                    "own init), and rename is only supported for modules read from its checkpoint; inherit "
                    f"`{module}` in a separate entry without rename, from the stage that trained it")
            for carried_source in carried:
                sources.append(InitSource(path=carried_source.path, modules=_narrow(carried_source.modules, module),
                                          rename=dict(carried_source.rename),
                                          strict=spec.strict and carried_source.strict))
        if from_checkpoint:
            sources.append(InitSource(path=final, modules=from_checkpoint, rename=dict(spec.rename),
                                      strict=spec.strict, **extra))
    requires = []
    for source in sources:
        name = stage_of_checkpoint.get(source.path)
        if name is not None and name not in requires:
            requires.append(name)
    return sources, requires


def _covers(source: InitSource, module: str) -> bool:
    if not source.modules:
        return True
    return any(module == m or module.startswith(m + ".") or m.startswith(module + ".") for m in source.modules)


def _narrow(modules: list[str], module: str) -> list[str]:
    """The part of `modules` (an init source's selection) that lies within `module`."""
    if not modules or any(module == m or module.startswith(m + ".") for m in modules):
        return [module]
    return [m for m in modules if m.startswith(module + ".")]


def _parse_evals(path: Path, where: str, entries: list[Any]) -> list[EvalSpec]:
    evals: list[EvalSpec] = []
    for i, entry in enumerate(entries):
        key = f"{path}: {where}.evals[{i}]"
        if not isinstance(entry, dict):
            raise ConfigError(f"{key}: must be a mapping like {{name: test, data: MANIFEST.jsonl}}, got {entry!r}")
        for required in ("name", "data"):
            if not isinstance(entry.get(required), str) or not entry[required]:
                raise ConfigError(f"{key}.{required}: missing; every eval needs a name and a data manifest")
        name = entry["name"]
        if not _EVAL_NAME.match(name):
            raise ConfigError(f"{key}.name: {name!r} is not a valid eval name (it names the file eval/<name>.json); "
                              "use letters, digits, ., - and _")
        if any(e.name == name for e in evals):
            raise ConfigError(f"{key}.name: two evals of stage {where.split('.', 1)[1]} are called {name!r}; "
                              "eval names must be unique within a stage")
        options = {k: v for k, v in entry.items() if k not in ("name", "data")}
        for option, value in options.items():
            if option in _RESERVED_EVAL_KEYS:
                raise ConfigError(f"{key}.{option}: {_RESERVED_EVAL_KEYS[option]}; remove it")
            if not _EVAL_OPTION.match(str(option)):
                raise ConfigError(f"{key}.{option}: not a valid option name; use the name of an `mmtrain eval` "
                                  "flag with _ or - (max_new_tokens -> --max-new-tokens)")
            _check_option_value(f"{key}.{option}", value)
        evals.append(EvalSpec(name=name, data=entry["data"], options=options))
    return evals


def _check_option_value(key: str, value: Any) -> None:
    scalar = (str, int, float, bool, type(None))
    if isinstance(value, scalar):
        return
    if isinstance(value, list) and all(isinstance(v, (str, int, float)) for v in value):
        return
    if isinstance(value, dict) and all(isinstance(v, scalar) for v in value.values()):
        return
    raise ConfigError(f"{key}: {value!r} cannot be passed as a command-line flag; use a scalar, a list of "
                      "scalars (comma-joined) or a mapping of scalars (KEY=VALUE arguments)")


# ---------------------------------------------------------------------------------------------- hashing
def config_hash(config: RunConfig, output_dir: str | Path) -> str:
    """A short hash of what a stage computes: its resolved config without the bookkeeping keys.

    Paths inside the recipe's output folder (inherited checkpoints) are hashed relative to it, so
    the hash does not change when the whole run folder moves.
    """
    payload = hashable_config(config, output_dir)
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


def hashable_config(config: RunConfig, output_dir: str | Path) -> dict[str, Any]:
    """The resolved config as compared between runs (see `config_hash`)."""
    data = to_dict(config)
    for key in BOOKKEEPING_KEYS:
        data.pop(key, None)
    # Absolute on both sides: a run started with `--output-dir runs/x` and resumed with the absolute
    # path (or the other way round) is the same run.
    root = os.path.abspath(output_dir) + os.sep
    for source in data.get("init", []):
        path = os.path.abspath(source["path"])
        if path.startswith(root):
            source["path"] = "<output_dir>/" + path[len(root):]
    return data


def config_differences(old: dict[str, Any], new: dict[str, Any], limit: int = 8) -> list[str]:
    """`key: old -> new` lines for the leaves that differ between two hashable configs."""
    flat_old, flat_new = _flatten(old), _flatten(new)
    lines = []
    for key in sorted(set(flat_old) | set(flat_new)):
        a, b = flat_old.get(key, "(absent)"), flat_new.get(key, "(absent)")
        if a != b:
            lines.append(f"{key}: {a!r} -> {b!r}")
    return lines[:limit] + ([f"... and {len(lines) - limit} more"] if len(lines) > limit else [])


def _flatten(value: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(value, dict) and value:
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix.rstrip("."): value}
