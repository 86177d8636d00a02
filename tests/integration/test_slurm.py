"""`mmtrain submit` / `status` / `cost` against a REAL one-node SLURM cluster (tools/slurm/cluster-up.sh).

Every job is a real sbatch job running the pipeline runner, whose training processes are `srun`
steps of the allocation (2 tasks = a 2-rank DeepSpeed run); dependencies, arrays, requeues and
accounting are SLURM's own.
"""

from __future__ import annotations

import json
import subprocess
import time
from datetime import datetime

import pytest
import yaml

from tests.conftest import REPO
from tests.integration.slurm_cluster import ensure_cluster, losses, mmtrain, sacct, wait_final, write_recipe

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def slurm_cluster():
    """The local cluster, started by the project's own script when it is not up (CI starts it first)."""
    ensure_cluster()
    yield


def test_two_stages_chained_afterok_two_rank_srun_and_cost_report(slurm_cluster, tiny_assets, tmp_path):
    stages = [
        {"name": "align", "set": {"max_steps": 6, "deepspeed": str(REPO / "ds_configs" / "zero3.json")}},
        {"name": "finetune", "inherit": [{"from": "align", "modules": ["resampler", "projector"]}],
         "set": {"max_steps": 4, "model.projector.trainable": "frozen"}},
    ]
    recipe = write_recipe(tmp_path, tiny_assets, stages, {"time": "00:15:00", "gpu_type": "h100"}, nprocs=2)
    submitted = mmtrain("submit", str(recipe), "--partition", "debug")
    assert submitted.returncode == 0, submitted.stderr
    run = tmp_path / "run"
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    align_job, finetune_job = (s["job_id"] for s in jobs["stages"])
    assert f"submitted stage finetune: job {finetune_job} after align ({align_job})" in submitted.stdout
    assert jobs["stages"][1]["sbatch"][2] == f"--dependency=afterok:{align_job}"
    script = (run / "slurm" / "02-finetune.sbatch").read_text()
    for line in ("trainable:  resampler: ", "1 node(s) x 2 task(s)", "4 per rank x 1 accumulation x 2 ranks = 8",
                 "#SBATCH --partition=debug", "#SBATCH --time=00:15:00", "#SBATCH --gres=gpu:2",
                 "#SBATCH --signal=USR1@120", "--stage finetune --srun"):
        assert line in script, line

    code, status = wait_final(run)
    assert code == 0 and status["ok"], status
    rows = {r["job_id"]: r for r in sacct([align_job, finetune_job])}
    assert rows[align_job]["state"] == rows[finetune_job]["state"] == "COMPLETED"
    assert rows[finetune_job]["start"] >= rows[align_job]["end"], "finetune started before align ended"
    # Each job ran a real 2-rank DeepSpeed training as an srun step; ZeRO-3 partitioned the frozen LLM.
    for folder in (run / "01-align", run / "02-finetune"):
        info = json.loads((folder / "run_info.json").read_text())
        assert info["launcher"] == "srun" and info["world_size"] == 2
        assert json.loads((folder / "stage.json").read_text())["status"] == "done"
    rank_report = json.loads((run / "01-align" / "ranks" / "rank1.json").read_text())
    assert rank_report["zero_stage"] == 3
    llm = rank_report["parameters"]["llm"]
    assert llm["local_numel"] < 0.6 * llm["numel"]
    finetune_config = yaml.safe_load((run / "02-finetune" / "stage_config.yaml").read_text())
    assert finetune_config["init"][0]["path"].endswith("01-align/checkpoints/step_00000006")

    # The cost report's allocated GPU-hours equal sacct's ElapsedRaw x GPUs, job by job.
    report = mmtrain("cost", str(run), "--wait", "60", "--price-per-gpu-hour", "2.5")
    assert report.returncode == 0, report.stderr
    data = json.loads((run / "cost" / "report.json").read_text())
    by_job = {j["job_id"]: j for j in data["jobs"]}
    assert data["allocated_source"] == "sacct"
    for job_id in (align_job, finetune_job):
        assert rows[job_id]["gpus"] == 2
        assert by_job[job_id]["gpu_s"] == rows[job_id]["elapsed_s"] * 2
    stages_report = {s["stage"]: s for s in data["stages"]}
    for name, job_id in (("align", align_job), ("finetune", finetune_job)):
        assert stages_report[name]["allocated_gpu_hours"] == pytest.approx(rows[job_id]["elapsed_s"] * 2 / 3600)
        assert stages_report[name]["steps"] == {"align": 6, "finetune": 4}[name]
        assert stages_report[name]["flops"] > 0
    total = sum(r["elapsed_s"] * 2 for r in rows.values()) / 3600
    assert data["total"]["allocated_gpu_hours"] == pytest.approx(total)
    assert data["total"]["cost"] == pytest.approx(total * 2.5)
    assert (run / "cost" / "report.md").is_file() and (run / "cost" / "report.png").stat().st_size > 0


def test_array_of_three_with_throttle(slurm_cluster, tiny_assets, tmp_path):
    recipe = write_recipe(tmp_path, tiny_assets, [{"name": "sweep", "set": {"max_steps": 3}}],
                          {"throttle": 2, "gpus_per_node": 1})
    submitted = mmtrain("submit", str(recipe), "--array-over", "seed=11,12,13")
    assert submitted.returncode == 0, submitted.stderr
    run = tmp_path / "run"
    job = json.loads((run / "slurm" / "jobs.json").read_text())["stages"][0]
    assert job["array"] == "0-2%2" and job["sbatch"][2] == "--array=0-2%2"
    code, status = wait_final(run)
    assert code == 0, status
    rows = [r for r in sacct([job["job_id"]]) if "_" in r["job_id"]]
    assert sorted(r["job_id"] for r in rows) == [f"{job['job_id']}_{i}" for i in range(3)]
    assert all(r["state"] == "COMPLETED" for r in rows)
    spans = [(datetime.fromisoformat(r["start"]), datetime.fromisoformat(r["end"])) for r in rows]
    most_at_once = max(sum(1 for s, e in spans if s <= start < e) for start, _ in spans)
    assert most_at_once <= 2, f"the throttle %2 was not respected: {spans}"
    seeds = []
    for folder in sorted((run / "variants").iterdir()):
        stage = folder / "01-sweep"
        assert json.loads((stage / "stage.json").read_text())["status"] == "done"
        seeds.append(yaml.safe_load((stage / "stage_config.yaml").read_text())["seed"])
    assert sorted(seeds) == [11, 12, 13]
    from mmtrain.cost.ledger import read_ledger

    ends = [r for r in read_ledger(run / "ledger.jsonl") if r["event"] == "stage_end"]
    assert sorted(r["variant"] for r in ends) == ["seed=11", "seed=12", "seed=13"]


def test_failed_stage_cancels_dependents_and_status_names_it(slurm_cluster, tiny_assets, tmp_path):
    stages = [
        {"name": "align", "set": {"max_steps": 3, "data.train": str(tmp_path / "missing.jsonl")}},
        {"name": "finetune", "inherit": [{"from": "align", "modules": ["projector"]}], "set": {"max_steps": 3}},
        {"name": "again", "inherit": [{"from": "finetune", "modules": ["projector"]}], "set": {"max_steps": 3}},
    ]
    recipe = write_recipe(tmp_path, tiny_assets, stages, {})
    assert mmtrain("submit", str(recipe)).returncode == 0
    run = tmp_path / "run"
    code, status = wait_final(run)
    assert code == 1 and status["failed"] == ["align"]
    states = {s["name"]: s["states"] for s in status["stages"]}
    assert states == {"align": ["FAILED"], "finetune": ["CANCELLED"], "again": ["CANCELLED"]}
    message = next(s["message"] for s in status["stages"] if s["name"] == "align")
    assert "stage align failed" in message and "01-align-" in message and "logs/train.log" in message
    assert "finetune" in message and "missing.jsonl" in (run / "01-align" / "logs" / "train.log").read_text()
    assert not (run / "02-finetune").exists() and not (run / "03-again").exists()
    text = mmtrain("status", str(run))
    assert text.returncode == 1 and "error: stage align failed" in text.stdout


def test_preempted_job_checkpoints_requeues_resumes_and_matches_uninterrupted(slurm_cluster, tiny_assets, tmp_path):
    steps = 160
    base = {"log_every": 1, "checkpoint.save_every": 0}
    runs = {}
    for name in ("preempted", "straight"):
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_recipe(folder, tiny_assets, [{"name": "train", "set": {"max_steps": steps}}],
                              {"gpus_per_node": 2}, nprocs=2, **base)
        submitted = mmtrain("submit", str(recipe))
        assert submitted.returncode == 0, submitted.stderr
        runs[name] = folder / "run"
    job = json.loads((runs["preempted"] / "slurm" / "jobs.json").read_text())["stages"][0]["job_id"]
    metrics = runs["preempted"] / "01-train" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
        time.sleep(0.5)
    assert metrics.is_file(), "the training did not start"
    subprocess.run(["scancel", "--signal=USR1", job], check=True)

    for run in runs.values():
        code, status = wait_final(run, timeout=600)
        assert code == 0, status
    rows = sacct([job])
    assert [r["state"] for r in rows] == ["REQUEUED", "COMPLETED"], rows
    preempted, straight = losses(runs["preempted"] / "01-train"), losses(runs["straight"] / "01-train")
    assert sorted(preempted) == list(range(1, steps + 1)) == sorted(straight)
    assert preempted == straight  # every step's loss, bit for bit

    from mmtrain.cost.ledger import read_ledger

    ledger = read_ledger(runs["preempted"] / "ledger.jsonl")
    ends = [r for r in ledger if r["event"] == "stage_end"]
    assert [r["outcome"] for r in ends] == ["preempted", "done"]
    assert [r["job"]["restart_count"] for r in ends] == [0, 1]
    kept = [r for r in ledger if r["event"] == "process_end" and r["rank"] == 0]
    assert [r["outcome"] for r in kept] == ["preempted", "completed"]
    stop_step = kept[0]["step_end"]
    assert 20 <= stop_step < steps and kept[1]["step_start"] == stop_step
    assert sum(r["steps"] for r in kept) == steps  # no step lost or counted twice
    assert sum(r["samples"] for r in kept) == steps * 8
    log = "".join(p.read_text() for p in (runs["preempted"] / "slurm" / "logs").iterdir())
    assert "stop signal (SIGUSR1) received" in log and f"requeueing job {job}" in log
    assert "(restart 1)" in log

    report = mmtrain("cost", str(runs["preempted"]), "--wait", "60")
    assert report.returncode == 0, report.stderr
    report_data = json.loads((runs["preempted"] / "cost" / "report.json").read_text())
    stage = report_data["stages"][0]
    assert stage["attempts"] == 2 and stage["steps"] == steps
    assert stage["interrupted_gpu_hours"] > 0
    assert stage["allocated_gpu_hours"] == pytest.approx(sum(r["elapsed_s"] * 2 for r in rows) / 3600)
    instances = [j for j in report_data["jobs"] if j["job_id"] == job]
    assert [(j["instance"], j["gpu_s"]) for j in instances] == [(i, r["elapsed_s"] * 2) for i, r in enumerate(rows)]
