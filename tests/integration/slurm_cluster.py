"""Helpers of the SLURM tests: the local cluster (tools/slurm/cluster-up.sh), `mmtrain` as a subprocess,
recipes over the tiny assets, and what SLURM and the run folder say afterwards."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from tests.conftest import REPO, tiny_config

MULTI_PARTITION = "multi"
"""The partition of the namespace nodes mmnode1..N (SLURM_NODES of cluster-up.sh)."""


def partition_nodes(partition: str) -> list[str]:
    """The usable (idle, mixed or allocated) nodes of `partition`; [] without SLURM."""
    if shutil.which("sinfo") is None:
        return []
    out = subprocess.run(["sinfo", "-h", "-N", "-p", partition, "-o", "%N %T"], capture_output=True, text=True)
    return sorted({line.split()[0] for line in out.stdout.splitlines()
                   if line.split()[1].rstrip("*~#") in ("idle", "mixed", "allocated")})


def ensure_cluster(nodes: int = 0) -> None:
    """Start (or widen) the local cluster with the project's script unless it is up with `nodes` namespace
    nodes (CI starts it first, with the Makefile's NODES)."""
    if partition_nodes("debug") and len(partition_nodes(MULTI_PARTITION)) >= nodes:
        return
    env = {**os.environ}
    if nodes:
        env["SLURM_NODES"] = str(max(nodes, int(env.get("SLURM_NODES") or 0)))
    result = subprocess.run(["bash", str(REPO / "tools" / "slurm" / "cluster-up.sh")], capture_output=True,
                            text=True, timeout=600, env=env)
    assert result.returncode == 0, f"tools/slurm/cluster-up.sh failed:\n{result.stdout}\n{result.stderr}"
    assert partition_nodes("debug"), "the SLURM cluster is not up after tools/slurm/cluster-up.sh"
    assert len(partition_nodes(MULTI_PARTITION)) >= nodes, f"fewer than {nodes} nodes in partition multi"


def mmtrain(*args: str, timeout: int = 120) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "mmtrain", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, env={**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"})


def write_recipe(tmp_path: Path, assets, stages: list, slurm: dict, nprocs: int = 1, **base) -> Path:
    config = tiny_config(assets, tmp_path / "unused", **{"data.val": str(assets["val"]), **base})
    (tmp_path / "base.yaml").write_text(yaml.safe_dump(config))
    recipe = {"name": "tiny", "output_dir": str(tmp_path / "run"), "defaults": "base.yaml",
              "launch": {"nprocs": nprocs}, "slurm": {"gres_type": "", **slurm}, "stages": stages}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def wait_final(run: Path, timeout: int = 420) -> tuple[int, dict]:
    """`mmtrain status RUN --wait` until every job ended; (exit code, status JSON)."""
    result = mmtrain("status", str(run), "--wait", str(timeout), "--json", timeout=timeout + 60)
    assert result.returncode in (0, 1), f"status: {result.returncode}\n{result.stdout}\n{result.stderr}"
    return result.returncode, json.loads(result.stdout)


def sacct(job_ids: list[str]) -> list[dict]:
    from mmtrain.cost.sacct import wait_for_final

    rows = wait_for_final(job_ids, timeout_s=60, poll_s=1)
    return [r.as_dict() for instances in rows.values() for r in instances]


def losses(folder: Path) -> dict[int, float]:
    return {r["step"]: r["loss"] for r in map(json.loads, (folder / "metrics.jsonl").read_text().splitlines())
            if "loss" in r}
