"""VPGTrans's speed-up over training from scratch (TFS), in epochs and in compute.

A run is a pipeline run folder (stage folders `NN-name/`) or a single training run folder. Its
learning curve is the validation records of every stage that trains with the final stage's LLM,
in stage order: epochs and compute accumulate across those stages, so a VPGTrans run's warm-up
stage is epoch 1. Stages with another LLM (the source VPG) come before the transfer; their compute
is reported separately ("with the source VPG"), since VPGTrans's premise is that it exists already.

The paper's definition, per metric: TFS reaches its best score p at epoch e_tfs; VPGTrans first
reaches p (or better) at epoch e_vt; speed-up = e_tfs / e_vt. In compute: TFS's compute up to e_tfs
over VPGTrans's up to e_vt, everything counted (model loading, the word converter's fit, the
warm-up stage, checkpoints; validation excluded). Compute is processes x wall seconds, i.e.
GPU-seconds on GPUs, and training FLOPs from the run's ledger, which do not depend on how busy the
machine was. The ledger is read by the caller's `compute_of(stage_folder)` (commands pass
`mmtrain.cost.curve.folder_compute`: accounting sits beside the methods, not below them); it
returns an object with `flops` (the stage's kept FLOPs) and `points` (validations with `step` and
cumulative `flops`), or None.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import yaml

from mmtrain.config.paths import CONFIG_FILE, METRICS_FILE
from mmtrain.errors import UserError

LOWER_IS_BETTER = ("loss", "ppl", "perplexity")
ComputeReader = Callable[[Path], Any]
"""A stage folder -> its ledger compute (`flops`, `points`), or None."""


class SpeedupError(UserError, ValueError):
    """A run folder cannot be read as a learning curve; the message says why."""


@dataclass
class CurvePoint:
    epoch: float
    compute_s: float
    """Cumulative process-seconds (wall) of the counted stages at this validation."""
    metrics: dict[str, float]
    stage: str
    cpu_s: float | None = None
    """The same in CPU seconds of the training processes (None if a stage did not record it)."""
    flops: float | None = None
    """Cumulative training FLOPs of the counted stages at this validation, from the ledger (None
    where the ledger has no validation record for it)."""


@dataclass
class Curve:
    """A run's validation metrics against epochs and compute, and what preceded it."""

    run: str
    llm: str
    points: list[CurvePoint]
    stages: list[str]
    prior_stages: list[str] = field(default_factory=list)
    """Stages on another LLM (the source VPG)."""
    prior_compute_s: float = 0.0
    prior_cpu_s: float | None = 0.0
    prior_flops: float | None = 0.0
    final_evals: dict[str, Any] = field(default_factory=dict)
    """The last stage's evaluation results (`eval/<name>.json` headlines)."""


def lower_is_better(metric: str) -> bool:
    return any(word in metric for word in LOWER_IS_BETTER)


def plateaued(values: list[float], patience: int, min_improvement: float, lower: bool = True) -> bool:
    """Whether a validation curve has plateaued: none of its last `patience` values improved on the
    best before it by more than `min_improvement` (relative, e.g. 0.005 = 0.5%).

    The speed-up is measured against training from scratch's best, so that run must reach it; this
    is the rule that says it has.
    """
    if patience < 1 or len(values) <= patience:
        return False
    best = values[0]
    since = 0
    for value in values[1:]:
        improved = value < best * (1 - min_improvement) if lower else value > best * (1 + min_improvement)
        if improved:
            since = 0
        else:
            since += 1
        best = min(best, value) if lower else max(best, value)
    return since >= patience


def _stage_folders(run: Path) -> list[Path]:
    if (run / METRICS_FILE).is_file() or (run / CONFIG_FILE).is_file():
        return [run]
    folders = sorted(p for p in run.iterdir() if p.is_dir() and p.name[:2].isdigit() and p.name[2:3] == "-")
    if not folders:
        raise SpeedupError(f"{run}: neither a training run (metrics.jsonl) nor a pipeline run (NN-stage folders)")
    return folders


def _read_config(folder: Path) -> dict[str, Any]:
    for name in ("stage_config.yaml", CONFIG_FILE):
        if (folder / name).is_file():
            return yaml.safe_load((folder / name).read_text()) or {}
    raise SpeedupError(f"{folder}: no stage_config.yaml or config.yaml")


def stage_records(folder: Path) -> list[dict[str, Any]]:
    path = folder / METRICS_FILE
    if not path.is_file():
        raise SpeedupError(f"{path}: missing; has the stage trained?")
    records = []
    for number, line in enumerate(path.read_text().splitlines(), start=1):
        if line.strip():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                raise SpeedupError(f"{path}:{number}: not a JSON object") from None
    return records


def stage_compute(records: list[dict[str, Any]], key: str = "compute_s") -> float | None:
    """Process-seconds of a whole stage (`compute_s`: wall; `cpu_s`: CPU): its last reading x processes."""
    world = next((int(r["world_size"]) for r in records if "world_size" in r), 1)
    readings = [float(r[key]) for r in records if key in r]
    return max(readings) * world if readings else None


def _add(a: float | None, b: float | None) -> float | None:
    return None if a is None or b is None else a + b


def _eval_headlines(folder: Path) -> dict[str, Any]:
    out = {}
    for path in sorted((folder / "eval").glob("*.json")) if (folder / "eval").is_dir() else []:
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        out[path.stem] = data.get("headline", {})
    return out


def read_curve(run: str | Path, compute_of: ComputeReader | None = None) -> Curve:
    """The validation curve of a run folder (see the module docstring for what counts; FLOPs need `compute_of`)."""
    run = Path(run)
    if not run.is_dir():
        raise SpeedupError(f"{run}: no such run folder")
    folders = _stage_folders(run)
    llms = [(_read_config(f).get("model", {}).get("llm", {}) or {}).get("name_or_path") for f in folders]
    target = llms[-1]
    first_target = next(i for i, llm in enumerate(llms) if llm == target)
    prior = folders[:first_target]
    if any(llm != target for llm in llms[first_target:]):
        raise SpeedupError(f"{run}: stages switch LLMs after the first stage on {target}; cannot tell the transfer "
                           "from its preparation")
    epochs_before = compute_before = 0.0
    cpu_before: float | None = 0.0
    flops_before: float | None = 0.0
    points: list[CurvePoint] = []
    for folder in folders[first_target:]:
        records = stage_records(folder)
        ledger = compute_of(folder) if compute_of else None
        flops_at = {p.step: p.flops for p in ledger.points} if ledger else {}
        train_size = None
        for record in records:
            if "val_loss" not in record:
                continue
            if "epoch" not in record or "compute_s" not in record:
                raise SpeedupError(f"{folder / METRICS_FILE}: validation records without epoch/compute_s (written "
                                   "by an older mmtrain); rerun the stage")
            if record.get("samples"):
                train_size = record["samples"] / record["epoch"]
            metrics = {k: float(v) for k, v in record.items() if k.startswith("val_") and k != "val_tokens"}
            world = int(record.get("world_size", 1))
            cpu = record.get("cpu_s")
            points.append(CurvePoint(epoch=epochs_before + float(record["epoch"]),
                                     compute_s=compute_before + float(record["compute_s"]) * world,
                                     metrics=metrics, stage=folder.name,
                                     cpu_s=_add(cpu_before, None if cpu is None else float(cpu) * world),
                                     flops=_add(flops_before, flops_at.get(int(record.get("step", -1))))))
        last_train = [r for r in records if "samples" in r and "val_loss" not in r]
        if train_size and last_train:
            epochs_before += last_train[-1]["samples"] / train_size
        elif points and points[-1].stage == folder.name:
            epochs_before = points[-1].epoch
        compute_before += stage_compute(records) or 0.0
        cpu_before = _add(cpu_before, stage_compute(records, "cpu_s"))
        flops_before = _add(flops_before, ledger.flops if ledger else None)
    if not points:
        raise SpeedupError(f"{run}: no validation records; set data.val and eval_every (one epoch's steps)")
    return Curve(run=str(run), llm=str(target), points=points, stages=[f.name for f in folders[first_target:]],
                 prior_stages=[f.name for f in prior],
                 prior_compute_s=sum(stage_compute(stage_records(f)) or 0.0 for f in prior),
                 prior_cpu_s=_sum_or_none([stage_compute(stage_records(f), "cpu_s") for f in prior]),
                 prior_flops=_sum_or_none([_kept_flops(f, compute_of) for f in prior]),
                 final_evals=_eval_headlines(folders[-1]))


def _kept_flops(folder: Path, compute_of: ComputeReader | None) -> float | None:
    compute = compute_of(folder) if compute_of else None
    return compute.flops if compute else None


def _sum_or_none(values: list[float | None]) -> float | None:
    return None if any(v is None for v in values) else sum(values)  # type: ignore[arg-type]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def _better_or_equal(value: float, target: float, lower: bool) -> bool:
    return value <= target if lower else value >= target


@dataclass
class MetricSpeedup:
    """One metric's comparison; None fields mean VPGTrans never reached TFS's best."""

    metric: str
    lower_is_better: bool
    tfs_best: float
    tfs_best_epoch: float
    tfs_compute_s: float
    vt_epoch: float | None
    vt_compute_s: float | None
    speedup_epochs: float | None
    speedup_compute: float | None
    speedup_compute_with_source: float | None
    speedup_cpu: float | None
    """The compute speed-up in CPU seconds instead of wall seconds (steadier on a shared CPU)."""
    speedup_cpu_with_source: float | None
    tfs_cpu_s: float | None
    vt_cpu_s: float | None
    tfs_flops: float | None
    vt_flops: float | None
    speedup_flops: float | None
    """The compute speed-up in training FLOPs from the ledgers (None where a ledger lacks them)."""
    speedup_flops_with_source: float | None
    tfs_final: float
    vt_final: float
    vt_best: float


def metric_speedup(vt: Curve, tfs: Curve, metric: str) -> MetricSpeedup:
    """The paper's speed-up for one metric (see the module docstring)."""
    lower = lower_is_better(metric)
    tfs_points = [p for p in tfs.points if metric in p.metrics]
    vt_points = [p for p in vt.points if metric in p.metrics]
    if not tfs_points or not vt_points:
        raise SpeedupError(f"metric {metric}: not recorded in both runs")
    pick = min if lower else max
    best_value = pick(p.metrics[metric] for p in tfs_points)
    best = next(p for p in tfs_points if p.metrics[metric] == best_value)  # the first epoch it is reached
    reached = next((p for p in vt_points if _better_or_equal(p.metrics[metric], best_value, lower)), None)
    vt_best = pick(p.metrics[metric] for p in vt_points)
    finals = (tfs_points[-1].metrics[metric], vt_points[-1].metrics[metric], vt_best)
    if reached is None:
        return MetricSpeedup(metric, lower, best_value, best.epoch, best.compute_s, None, None, None, None, None,
                             None, None, best.cpu_s, None, best.flops, None, None, None, *finals)
    return MetricSpeedup(
        metric, lower, best_value, best.epoch, best.compute_s, reached.epoch, reached.compute_s,
        best.epoch / reached.epoch, _ratio(best.compute_s, reached.compute_s),
        _ratio(best.compute_s, reached.compute_s + vt.prior_compute_s),
        _ratio(best.cpu_s, reached.cpu_s), _ratio(best.cpu_s, _add(reached.cpu_s, vt.prior_cpu_s)), best.cpu_s,
        reached.cpu_s, best.flops, reached.flops, _ratio(best.flops, reached.flops),
        _ratio(best.flops, _add(reached.flops, vt.prior_flops)), *finals)


def speedup_report(vt_run: str | Path, tfs_run: str | Path, metrics: list[str] | None = None,
                   compute_of: ComputeReader | None = None) -> dict[str, Any]:
    """Speed-ups for every metric both runs record (or `metrics`), plus both curves and final evals."""
    vt, tfs = read_curve(vt_run, compute_of), read_curve(tfs_run, compute_of)
    if vt.llm != tfs.llm:
        raise SpeedupError(f"the runs train different LLMs ({vt.llm} vs {tfs.llm}); compare runs on the same target")
    names = metrics or sorted(set(vt.points[0].metrics) & set(tfs.points[0].metrics))
    return {
        "vpgtrans": asdict(vt), "tfs": asdict(tfs),
        "speedups": [asdict(metric_speedup(vt, tfs, m)) for m in names],
    }


def _times(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def format_report(report: dict[str, Any]) -> str:
    """The report as a terminal table."""
    vt, tfs = report["vpgtrans"], report["tfs"]
    lines = [f"VPGTrans {vt['run']} (stages {', '.join(vt['stages'])}; source VPG: "
             f"{', '.join(vt['prior_stages']) or 'not in this folder'}, {vt['prior_compute_s'] / 3600:.3f} h)",
             f"TFS      {tfs['run']} (stages {', '.join(tfs['stages'])}); target LLM {vt['llm']}", ""]
    header = (f"{'metric':<10} {'TFS best':>9} {'@epoch':>7} {'VT reaches':>10} {'speed-up':>9} "
              f"{'compute':>8} {'+source':>8} {'cpu':>7} {'+source':>8} {'FLOPs':>7} {'+source':>8} "
              f"{'TFS final':>10} {'VT final':>9}")
    lines += [header, "-" * len(header)]
    for s in report["speedups"]:
        reached = "never" if s["vt_epoch"] is None else f"{s['vt_epoch']:.2f}"
        lines.append(
            f"{s['metric']:<10} {s['tfs_best']:>9.4f} {s['tfs_best_epoch']:>7.2f} {reached:>10} "
            f"{_times(s['speedup_epochs']):>9} {_times(s['speedup_compute']):>8} "
            f"{_times(s['speedup_compute_with_source']):>8} {_times(s['speedup_cpu']):>7} "
            f"{_times(s['speedup_cpu_with_source']):>8} {_times(s['speedup_flops']):>7} "
            f"{_times(s['speedup_flops_with_source']):>8} {s['tfs_final']:>10.4f} {s['vt_final']:>9.4f}")
    lines.append("")
    lines.append("speed-up = TFS's epochs to its best / VPGTrans's epochs to reach it; compute = the same ratio in "
                 "processes x wall seconds of training (GPU-hours on GPUs; validation excluded), cpu = in CPU "
                 "seconds, FLOPs = in training FLOPs from the ledgers; '+source' adds the source VPG's training "
                 "to VPGTrans")
    for name in sorted(set(vt["final_evals"]) & set(tfs["final_evals"])):
        keys = sorted(set(vt["final_evals"][name]) & set(tfs["final_evals"][name]))
        for key in keys:
            a, b = tfs["final_evals"][name][key], vt["final_evals"][name][key]
            if isinstance(a, (int, float)) and isinstance(b, (int, float)):
                lines.append(f"final {name}.{key}: TFS {a:.4f}  VPGTrans {b:.4f}")
    return "\n".join(lines)
