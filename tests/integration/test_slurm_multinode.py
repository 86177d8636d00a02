"""Multi-node jobs on a REAL SLURM cluster whose nodes are network namespaces of this machine.

`tools/slurm/cluster-up.sh` with SLURM_NODES=3 adds nodes mmnode1..3 (partition `multi`), each with its own
hostname, address and slurmd; the filesystem is shared, as on a cluster. A stage submitted with
`slurm.nodes: 2` runs its ranks on two of them, talking over the nodes' bridge (gloo), and must train
exactly as the same recipe does on one node; when one of its nodes dies, SLURM requeues it onto the two
that are left (the spare), and it resumes from its last complete checkpoint. The deepspeed launcher's route
(slurm/train-deepspeed-hostfile.sbatch) starts the ranks over ssh through the nodes' sshd and must train the
same way, and leave nothing behind when cancelled or when one of its nodes dies; rerun, it resumes exactly.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config, write_config
from tests.integration.slurm_cluster import (
    MULTI_PARTITION,
    ensure_cluster,
    losses,
    mmtrain,
    sacct,
    wait_final,
    write_recipe,
)

pytestmark = pytest.mark.slow


NODES = 3
"""Two for a job, one spare for it when a node dies (a requeue onto the node that just came back can be
hit by the controller's delayed kill of the job's previous instance: same job id)."""


@pytest.fixture(scope="module")
def node_cluster():
    ensure_cluster(nodes=NODES)
    yield


def test_two_nodes_by_two_tasks_zero3_trains_as_one_node_of_four(node_cluster, tiny_assets, tmp_path):
    steps = 6
    stages = [{"name": "align", "set": {"max_steps": steps, "log_every": 1,
                                        "deepspeed": str(REPO / "ds_configs" / "zero3.json")}}]
    layouts = {"two-nodes": {"nodes": 2, "gpus_per_node": 2, "partition": MULTI_PARTITION},
               "one-node": {"nodes": 1, "gpus_per_node": 4, "partition": "debug"}}
    runs, jobs = {}, {}
    for name, slurm in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_recipe(folder, tiny_assets, stages, {"time": "00:15:00", **slurm}, nprocs=2)
        submitted = mmtrain("submit", str(recipe))
        assert submitted.returncode == 0, submitted.stderr
        runs[name] = folder / "run"
        jobs[name] = json.loads((runs[name] / "slurm" / "jobs.json").read_text())["stages"][0]["job_id"]
    script = (runs["two-nodes"] / "slurm" / "01-align.sbatch").read_text()
    for line in ("2 node(s) x 2 task(s)", "#SBATCH --nodes=2", "#SBATCH --ntasks-per-node=2", "#SBATCH --gres=gpu:2",
                 f"#SBATCH --partition={MULTI_PARTITION}"):
        assert line in script, line

    for run in runs.values():
        code, status = wait_final(run)
        assert code == 0 and status["ok"], status

    folder = runs["two-nodes"] / "01-align"
    info = json.loads((folder / "run_info.json").read_text())
    assert info["launcher"] == "srun" and info["world_size"] == 4
    assert_two_nodes_of_two_zero3_ranks(folder)

    two, one = losses(folder), losses(runs["one-node"] / "01-align")
    assert sorted(two) == list(range(1, steps + 1))
    assert two == one  # the same seed and batches: bit for bit, whichever node holds which rank

    rows = {r["job_id"]: r for r in sacct(list(jobs.values()))}
    two_nodes, one_node = rows[jobs["two-nodes"]], rows[jobs["one-node"]]
    assert (two_nodes["state"], two_nodes["nodes"], two_nodes["gpus"]) == ("COMPLETED", 2, 4)
    assert (one_node["nodes"], one_node["gpus"]) == (1, 4)

    report = mmtrain("cost", str(runs["two-nodes"]), "--wait", "60")
    assert report.returncode == 0, report.stderr
    data = json.loads((runs["two-nodes"] / "cost" / "report.json").read_text())
    job = next(j for j in data["jobs"] if j["job_id"] == jobs["two-nodes"])
    assert job["gpu_s"] == two_nodes["elapsed_s"] * 4  # both nodes' allocation
    assert data["stages"][0]["allocated_gpu_hours"] == pytest.approx(two_nodes["elapsed_s"] * 4 / 3600)


def test_the_deepspeed_launcher_starts_a_hostfile_of_two_nodes_over_ssh(node_cluster, tiny_assets, tmp_path):
    """slurm/train-deepspeed-hostfile.sbatch: one task per node; the launcher starts each node's ranks over
    ssh (pdsh, the nodes' sshd) and they train as the same script on one node of four does."""
    steps = 6
    layouts = {"two-nodes": ["--nodes=2", "--gres=gpu:2", f"--partition={MULTI_PARTITION}"],
               "one-node": ["--nodes=1", "--gres=gpu:4", "--partition=debug"]}
    jobs = {name: submit_hostfile_job(tmp_path / name, tiny_assets, resources, max_steps=steps)
            for name, resources in layouts.items()}

    from mmtrain.cost.sacct import wait_for_final

    rows = {r.job_id: r.as_dict() for instances in wait_for_final(list(jobs.values()), timeout_s=600,
                                                                  poll_s=2).values() for r in instances}
    for name, job in jobs.items():
        log = tmp_path / name / f"slurm-mmtrain-ds-{job}.out"
        assert rows[job]["state"] == "COMPLETED", f"{name}: {rows[job]}\n{log.read_text()[-4000:]}"
    assert rows[jobs["two-nodes"]]["nodes"] == 2

    two = tmp_path / "two-nodes" / "run"
    info = json.loads((two / "run_info.json").read_text())
    assert info["launcher"] == "deepspeed/torchrun" and info["world_size"] == 4
    hosts = assert_two_nodes_of_two_zero3_ranks(two)
    hostfile = (tmp_path / "two-nodes" / f"hostfile-{jobs['two-nodes']}").read_text().splitlines()
    assert hostfile == [f"{hosts[0]} slots=2", f"{hosts[2]} slots=2"]

    two_losses, one_losses = losses(two), losses(tmp_path / "one-node" / "run")
    assert sorted(two_losses) == list(range(1, steps + 1))
    assert two_losses == one_losses


def test_cancelling_a_hostfile_job_leaves_no_rank_behind_on_either_node(node_cluster, tiny_assets, tmp_path):
    """The ranks started over ssh are not the job's processes for SLURM: the launcher must stop them."""
    job = submit_hostfile_job(tmp_path, tiny_assets, ["--nodes=2", "--gres=gpu:2", f"--partition={MULTI_PARTITION}"],
                              max_steps=1000)
    metrics = tmp_path / "run" / "metrics.jsonl"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(losses_so_far(metrics)) < 2:
        time.sleep(0.5)
    nodes = job_nodes(job)
    assert len(losses_so_far(metrics)) >= 2 and len(nodes) == 2, (nodes, losses_so_far(metrics))
    assert all(rank_processes(node) for node in nodes), "no rank runs on one of the job's nodes"
    subprocess.run(["scancel", job], check=True, timeout=30)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and any(rank_processes(node) for node in nodes):
        time.sleep(0.5)
    assert not any(rank_processes(node) for node in nodes), {node: rank_processes(node) for node in nodes}


def test_losing_a_node_of_a_hostfile_job_ends_it_and_a_rerun_resumes_exactly(node_cluster, tiny_assets, tmp_path):
    """The hostfile route has no requeue of its own: a lost node must end the job (no rank left waiting on the
    node that survived), and rerunning the script resumes from the last complete checkpoint."""
    steps, save_every = 20, 5
    settings = {"max_steps": steps, "checkpoint.save_every": save_every, "collective_timeout_s": 120}
    two_nodes = ["--nodes=2", "--gres=gpu:2", f"--partition={MULTI_PARTITION}"]
    lost, straight = tmp_path / "node-lost", tmp_path / "straight"
    job = submit_hostfile_job(lost, tiny_assets, two_nodes, **settings)
    reference = submit_hostfile_job(straight, tiny_assets, ["--nodes=1", "--gres=gpu:4", "--partition=debug"],
                                    **settings)
    step_at_kill, first, _, killed_at = kill_a_node_after_two_checkpoints(job, lost / "run" / "metrics.jsonl",
                                                                          save_every, steps)
    ended_after = seconds_until_job_state(job, ("FAILED", "NODE_FAIL"), killed_at)
    # The ranks on the node left see their peers' connections close: they fail at once, before the controller
    # could declare the node dead (NODE_FAIL, which would requeue the job).
    assert sacct_now(job)[0]["state"] == "FAILED", sacct_now(job)
    lost_log = (lost / f"slurm-mmtrain-ds-{job}.out").read_text()
    assert re.search(rf"{first}: \[rank[01]\]: rank [01]: another rank's process ended, or its node was lost",
                     lost_log), lost_log[-4000:]
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and rank_processes(first):
        time.sleep(0.5)
    assert not rank_processes(first), f"ranks left on {first}, the node that survived"

    rerun = submit_hostfile_job(lost, tiny_assets, two_nodes, **settings)
    from mmtrain.cost.sacct import wait_for_final

    rows = {r.job_id: r.as_dict() for instances in wait_for_final([rerun, reference], timeout_s=600,
                                                                  poll_s=2).values() for r in instances}
    ensure_cluster(nodes=NODES)  # the dead node comes back for the tests after this one
    rerun_log = (lost / f"slurm-mmtrain-ds-{rerun}.out").read_text()
    for name, other in (("rerun", rerun), ("reference", reference)):
        assert rows[other]["state"] == "COMPLETED", f"{name}: {rows[other]}"
    resumed = re.search(r"resumed from \S+/step_(\d+) at step", rerun_log)
    assert resumed, rerun_log[-4000:]
    resumed_from = int(resumed.group(1))
    assert resumed_from % save_every == 0 and save_every * 2 <= resumed_from <= step_at_kill
    after, uninterrupted = losses(lost / "run"), losses(straight / "run")
    assert sorted(after) == list(range(1, steps + 1)) == sorted(uninterrupted)
    assert after == uninterrupted
    print(f"\nhostfile node loss: killed at step {step_at_kill}, job {job} ended FAILED {ended_after:.1f} s later; "
          f"the rerun resumed from step {resumed_from} "
          f"({step_at_kill - resumed_from} steps lost)")


def assert_two_nodes_of_two_zero3_ranks(folder: Path) -> list[str]:
    """Ranks 0-1 ran on one namespace node and 2-3 on another (block distribution), all meeting at the first,
    each holding about a quarter of the LLM under ZeRO-3; the ranks' hosts, in rank order."""
    reports = [json.loads((folder / "ranks" / f"rank{r}.json").read_text()) for r in range(4)]
    hosts = [r["host"] for r in reports]
    assert hosts[0] == hosts[1] != hosts[2] == hosts[3] and all(h.startswith("mmnode") for h in hosts), hosts
    assert {r["master"].split(":")[0] for r in reports} == {hosts[0]}
    for report in reports:
        llm = report["parameters"]["llm"]
        assert report["zero_stage"] == 3 and llm["local_numel"] < 0.3 * llm["numel"], report
    return hosts


def submit_hostfile_job(folder: Path, assets, resources: list[str], **overrides) -> str:
    """sbatch slurm/train-deepspeed-hostfile.sbatch with a tiny ZeRO-3 config, from `folder`; the job id."""
    folder.mkdir(exist_ok=True)
    config = tiny_config(assets, folder / "run", log_every=1, deepspeed=str(REPO / "ds_configs" / "zero3.json"),
                         **overrides)
    write_config(config, folder / "config.yaml")
    submitted = subprocess.run(
        ["sbatch", "--parsable", "--ntasks-per-node=1", "--time=00:15:00", *resources,
         str(REPO / "slurm" / "train-deepspeed-hostfile.sbatch"), "config.yaml"],
        cwd=folder, capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": sys.executable, "PYTHONPATH": str(REPO), "MMTRAIN_SLURM_DIR": str(REPO / "slurm")})
    assert submitted.returncode == 0, submitted.stderr
    return submitted.stdout.strip().split(";")[0]


def rank_processes(node: str) -> list[int]:
    """The processes of `node` that run the launcher or a rank (python -m deepspeed.launcher... / mmtrain.train)."""
    found = []
    for pid in node_pids(node):
        try:
            command = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ")
        except OSError:
            continue
        if b"mmtrain.train" in command or b"deepspeed.launcher" in command:
            found.append(int(pid))
    return found


def node_pids(name: str) -> list[int]:
    """Every process of a namespace node (they live in its network namespace)."""
    return [int(p) for p in subprocess.run(["ip", "netns", "pids", f"mmtrain-{name}"], capture_output=True,
                                           text=True, check=True).stdout.split()]


def kill_node(name: str) -> list[int]:
    """Every process of the node (its slurmd, the job's step daemons and ranks) gets SIGKILL: the node dies."""
    pids = node_pids(name)
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    return pids


def test_losing_a_node_mid_run_ends_the_instance_cleanly_requeues_and_resumes_exactly(node_cluster, tiny_assets,
                                                                                       tmp_path):
    steps, save_every = 40, 5
    base = {"log_every": 1, "checkpoint.save_every": save_every, "deepspeed": str(REPO / "ds_configs" / "zero3.json")}
    layouts = {"node-lost": {"nodes": 2, "gpus_per_node": 2, "partition": MULTI_PARTITION},
               "straight": {"nodes": 1, "gpus_per_node": 4, "partition": "debug"}}
    runs = {}
    for name, slurm in layouts.items():
        folder = tmp_path / name
        folder.mkdir()
        recipe = write_recipe(folder, tiny_assets, [{"name": "train", "set": {"max_steps": steps}}], slurm,
                              nprocs=2, **base)
        assert mmtrain("submit", str(recipe)).returncode == 0
        runs[name] = folder / "run"
    job = json.loads((runs["node-lost"] / "slurm" / "jobs.json").read_text())["stages"][0]["job_id"]
    step_at_kill, _, second, killed_at = kill_a_node_after_two_checkpoints(
        job, runs["node-lost"] / "01-train" / "metrics.jsonl", save_every, steps)
    # The instance must end (no rank left waiting in a collective), as NODE_FAIL, and be requeued.
    ended_after = seconds_until_job_state(job, ("NODE_FAIL",), killed_at)
    for run in runs.values():  # the requeued job runs on the node left and the spare
        code, status = wait_final(run, timeout=600)
        assert code == 0, status
    ensure_cluster(nodes=NODES)  # the dead node comes back (its slurmd restarts) for the tests after this one

    rows = sacct([job])
    assert [r["state"] for r in rows] == ["NODE_FAIL", "COMPLETED"], rows
    lost, straight = losses(runs["node-lost"] / "01-train"), losses(runs["straight"] / "01-train")
    assert sorted(lost) == list(range(1, steps + 1)) == sorted(straight)
    assert lost == straight  # resumed from the last complete checkpoint: every step's loss, bit for bit

    from mmtrain.cost.ledger import read_ledger

    ledger = read_ledger(runs["node-lost"] / "ledger.jsonl")
    ends = [r for r in ledger if r["event"] == "stage_end"]
    assert [r["outcome"] for r in ends] == ["node_lost", "done"], ends
    assert second in ends[0]["message"] and f"job {job}" in ends[0]["message"]
    resumed_from = ends[0]["step"]
    assert resumed_from % save_every == 0 and resumed_from <= step_at_kill
    starts = [r for r in ledger if r["event"] == "stage_start"]
    assert [r["step"] for r in starts] == [None, resumed_from]

    text = mmtrain("status", str(runs["node-lost"]))
    assert text.returncode == 0, text.stdout + text.stderr
    assert f"job {job} ended NODE_FAIL" in text.stdout and second in text.stdout, text.stdout
    report = mmtrain("cost", str(runs["node-lost"]), "--wait", "60")
    assert report.returncode == 0, report.stderr
    stage = json.loads((runs["node-lost"] / "cost" / "report.json").read_text())["stages"][0]
    assert stage["attempts"] == 2 and stage["steps"] == steps
    assert stage["wasted_gpu_hours"] > 0  # the steps after the last checkpoint, and the wait for the verdict
    assert stage["interrupted_gpu_hours"] == pytest.approx(rows[0]["elapsed_s"] * 4 / 3600)
    print(f"\nnode loss: killed at step {step_at_kill}, instance ended NODE_FAIL {ended_after:.0f} s later, "
          f"resumed from step {resumed_from} ({step_at_kill - resumed_from} steps lost)")


def kill_a_node_after_two_checkpoints(job: str, metrics: Path, save_every: int,
                                      steps: int) -> tuple[int, str, str, float]:
    """Once the run logged two checkpoints' worth of steps and two more, kill the second of the job's nodes;
    (the step logged last, the node left, the node killed, time.monotonic() at the kill)."""
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline and len(losses_so_far(metrics)) < 2 * save_every + 2:
        time.sleep(0.2)
    step_at_kill = max(losses_so_far(metrics), default=0)
    assert 2 * save_every < step_at_kill < steps, f"step {step_at_kill}: the kill would not land mid-run"
    first, second = job_nodes(job)
    assert kill_node(second), f"no process to kill on {second}"
    return step_at_kill, first, second, time.monotonic()


def seconds_until_job_state(job: str, states: tuple[str, ...], since: float, timeout: float = 180) -> float:
    """Seconds from `since` until sacct shows `job` in one of `states` (a node died at `since`)."""
    while time.monotonic() - since < timeout:
        rows = sacct_now(job)
        if rows and rows[0]["state"] in states:
            return time.monotonic() - since
        time.sleep(0.5)
    raise AssertionError(f"job {job} did not end after its node died: {sacct_now(job)}")


def losses_so_far(metrics: Path) -> dict[int, float]:
    """Step losses logged so far (a line being written is skipped)."""
    found = {}
    for line in (metrics.read_text().splitlines() if metrics.is_file() else []):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            found[record["step"]] = record["loss"]
    return found


def job_nodes(job: str) -> list[str]:
    """The nodes a running job holds, in order."""
    nodelist = subprocess.run(["squeue", "-h", "-j", job, "-o", "%N"], capture_output=True, text=True,
                              check=True).stdout.strip()
    return subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True,
                          check=True).stdout.split()


def sacct_now(job: str) -> list[dict]:
    from mmtrain.cost.sacct import query_jobs

    return [r.as_dict() for rows in query_jobs([job]).values() for r in rows]
