"""`mmtrain submit --dry-run`: options, rendered scripts, dependencies, arrays; status summaries; srun commands.

No cluster needed: sbatch is never called here (tests/integration/test_slurm.py submits for real).
"""

from __future__ import annotations

import json
import subprocess

import pytest

from mmtrain.config import ConfigError
from mmtrain.cost.sacct import parse_sacct
from mmtrain.pipeline import load_recipe
from mmtrain.pipeline.cli import main as run_main
from mmtrain.pipeline.commands import rendezvous_port, train_command
from mmtrain.pipeline.recipe import LaunchConfig
from mmtrain.slurm.cli import submit_main
from mmtrain.slurm.options import resolve_options
from mmtrain.slurm.render import parse_array_over, variants
from mmtrain.slurm.status import format_status, summarise
from mmtrain.slurm.submit import dependents, plan, sbatch_command
from tests.unit.test_recipe import TWO_STAGES, write_recipe

SLURM = {"partition": "gpu", "account": "proj1", "time": "02:00:00", "gpus_per_node": 4, "gpu_type": "a100",
         "env": {"NCCL_DEBUG": "WARN"}, "setup": ["module load cuda/12.4"]}


def dry_run(tmp_path, capsys, *extra: str, **top) -> tuple[int, str, str]:
    recipe = write_recipe(tmp_path, TWO_STAGES, slurm=SLURM, **top)
    code = submit_main([str(recipe), "--dry-run", *extra])
    out = capsys.readouterr()
    return code, out.out, out.err


def test_dry_run_renders_documented_scripts_with_afterok_chain(tmp_path, capsys):
    code, out, _ = dry_run(tmp_path, capsys, "--qos", "high", "--time", "01:30:00", "--nodes", "2")
    assert code == 0
    folder = tmp_path / "runs" / "demo" / "slurm"
    assert "[dry run] sbatch --parsable " + str(folder / "01-align.sbatch") in out
    assert "--dependency=afterok:<align>" in out and "nothing submitted" in out
    script = (folder / "02-finetune.sbatch").read_text()
    header = script.split("#SBATCH", 1)[0]
    for fact in ('stage 2/2 "finetune" of recipe "demo"', "2 node(s) x 4 task(s), one rank per GPU = 8 ranks",
                 "GRES gpu:a100:4", "per rank x 1 accumulation x 8 ranks", "lr 0.0005 (cosine",
                 "inherits:   resampler, projector from align"):
        assert fact in header, fact
    for option in ("--partition=gpu", "--account=proj1", "--qos=high", "--time=01:30:00", "--nodes=2",
                   "--ntasks-per-node=4", "--gres=gpu:a100:4", "--signal=USR1@120", "--requeue", "--open-mode=append"):
        assert f"#SBATCH {option}\n" in script, option
    assert "module load cuda/12.4\n" in script and "export NCCL_DEBUG=WARN" in script
    assert "export MMTRAIN_GPU_TYPE=a100" in script
    assert "-m mmtrain run " in script and "--stage finetune --srun" in script
    assert subprocess.run(["bash", "-n", str(folder / "02-finetune.sbatch")]).returncode == 0
    record = json.loads((folder / "dry-run.json").read_text())
    assert [s["depends_on"] for s in record["stages"]] == [[], ["align"]]
    assert not (folder / "jobs.json").exists()


def test_site_values_come_only_from_recipe_or_command_line(tmp_path, capsys):
    recipe = write_recipe(tmp_path, TWO_STAGES)
    assert submit_main([str(recipe), "--dry-run"]) == 0
    script = (tmp_path / "runs" / "demo" / "slurm" / "01-align.sbatch").read_text()
    for absent in ("--partition", "--account", "--qos", "--time="):
        assert absent not in script


def test_array_over_makes_throttled_arrays_chained_task_by_task(tmp_path, capsys):
    code, out, _ = dry_run(tmp_path, capsys, "--array-over", "seed=1,2,3", "--throttle", "2")
    assert code == 0
    assert "--array=0-2%2" in out and "--dependency=aftercorr:<align>" in out
    script = (tmp_path / "runs" / "demo" / "slurm" / "01-align.sbatch").read_text()
    assert "%A_%a.out" in script and 'case "${SLURM_ARRAY_TASK_ID:?' in script
    assert "2) VARIANT_ARGS=(--set seed=3 --output-dir" in script and "variants/2-seed-3" in script
    assert subprocess.run(["bash", "-n", str(tmp_path / "runs" / "demo" / "slurm" / "01-align.sbatch")]).returncode == 0


def test_array_over_product_and_bad_flags():
    tasks = variants(parse_array_over(["seed=1,2", "model.llm.name_or_path=/m/a,/m/b"]), __import__("pathlib").Path("r"))
    assert [t.label for t in tasks] == ["seed=1,model.llm.name_or_path=/m/a", "seed=1,model.llm.name_or_path=/m/b",
                                        "seed=2,model.llm.name_or_path=/m/a", "seed=2,model.llm.name_or_path=/m/b"]
    assert tasks[1].output_dir.name == "1-seed-1_name_or_path-b"
    for bad in ("seed", "seed=", "=1,2", "seed=1,,2"):
        with pytest.raises(ValueError, match="KEY=V1,V2"):
            parse_array_over([bad])


def test_bad_options_name_the_key(tmp_path, capsys):
    for slurm, message in (({"partiton": "gpu"}, "partiton"), ({"time": "2 hours"}, "slurm.time"),
                           ({"nodes": 0}, "slurm.nodes"), ({"extra": ["exclusive"]}, "slurm.extra")):
        recipe = write_recipe(tmp_path, TWO_STAGES, slurm=slurm)
        assert submit_main([str(recipe), "--dry-run"]) == 2
        assert message in capsys.readouterr().err
    with pytest.raises(ConfigError, match="Did you mean slurm.partition"):
        resolve_options({"partiton": "x"}, "recipe.yaml")


def test_stage_overrides_and_done_stages_are_not_submitted(tmp_path):
    stages = [dict(TWO_STAGES[0], slurm={"time": "10:00:00", "nodes": 4}), TWO_STAGES[1]]
    pipeline = load_recipe(write_recipe(tmp_path, stages, slurm=SLURM))
    jobs, _ = plan(pipeline, {"account": "other"}, [], [])
    assert [(j.options.time, j.options.nodes, j.options.account) for j in jobs] == \
        [("10:00:00", 4, "other"), ("02:00:00", 1, "other")]
    align = pipeline.stages[0]
    align.folder.mkdir(parents=True)
    (align.folder / "stage.json").write_text(json.dumps({"status": "done", "config_hash": align.config_hash}))
    jobs, _ = plan(pipeline, {}, [], [])  # done, but its eval has no result (added after it ran): submitted
    assert [j.stage.name for j in jobs] == ["align", "finetune"]
    for spec in align.evals:
        align.eval_output(spec).parent.mkdir(parents=True, exist_ok=True)
        align.eval_output(spec).write_text("{}")
    jobs, _ = plan(pipeline, {}, [], [])
    assert [j.stage.name for j in jobs] == ["finetune"] and jobs[0].depends_on == []
    assert sbatch_command(jobs[0], {}) == ["sbatch", "--parsable", str(jobs[0].script)]


def test_srun_launcher_command_and_run_flag(tmp_path, monkeypatch, capsys):
    pipeline = load_recipe(write_recipe(tmp_path, TWO_STAGES))
    stage = pipeline.stages[0]
    stage.launch = LaunchConfig(nprocs=4, launcher="srun")
    command = train_command(stage, port=29555, python="py")
    assert command[:4] == ["srun", "--ntasks=4", "--kill-on-bad-exit=1", "--export=ALL,MASTER_PORT=29555"]
    assert command[4:] == ["py", "-m", "mmtrain.train", str(stage.config_file)] and rendezvous_port(command) == "29555"
    monkeypatch.delenv("SLURM_NTASKS", raising=False)
    assert run_main([str(pipeline.recipe_path), "--srun", "--plan"]) == 2
    assert "not inside a SLURM job" in capsys.readouterr().err
    monkeypatch.setenv("SLURM_NTASKS", "8")
    assert run_main([str(pipeline.recipe_path), "--srun", "--plan"]) == 0
    assert "srun --ntasks=8" in capsys.readouterr().out


def test_status_names_the_failed_stage_its_log_and_cancelled_dependents(tmp_path):
    record = {"output_dir": str(tmp_path), "recipe": "r.yaml", "submitted_at": "t", "stages": [
        {"name": "align", "job_id": "10", "array": None, "depends_on": [], "script": "/x/01-align.sbatch",
         "log": "/x/logs", "stage_folders": [str(tmp_path / "01-align")]},
        {"name": "finetune", "job_id": "11", "array": None, "depends_on": ["align"], "script": "/x/02-finetune.sbatch",
         "log": "/x/logs", "stage_folders": [str(tmp_path / "02-finetune")]},
        {"name": "eval", "job_id": "12", "array": None, "depends_on": ["finetune"], "script": "/x/03-eval.sbatch",
         "log": "/x/logs", "stage_folders": [str(tmp_path / "03-eval")]}]}
    (tmp_path / "01-align").mkdir()
    (tmp_path / "01-align" / "stage.json").write_text(json.dumps(
        {"status": "failed", "message": "stage align failed: training exited with code 2; log: L/train.log"}))
    rows = parse_sacct("10|10|FAILED|31|billing=1,gres/gpu=4|2026-01-01T10:00:00|2026-01-01T10:00:31|1:0\n"
                       "11|11|CANCELLED by 0|0||None|2026-01-01T10:00:33|0:0\n"
                       "12|12|CANCELLED by 0|0||None|2026-01-01T10:00:33|0:0\n")
    jobs = {"align": rows["10"], "finetune": rows["11"], "eval": rows["12"]}
    summary = summarise(record, jobs, {})
    assert summary["final"] and not summary["ok"] and summary["failed"] == ["align"]
    message = summary["stages"][0]["message"]
    assert "stage align failed (job 10: FAILED)" in message and "/x/logs/01-align-10.out" in message
    assert "L/train.log" in message and "finetune (job 11: CANCELLED)" in message and "eval (job 12" in message
    assert [d["name"] for d in dependents(record, "align")] == ["finetune", "eval"]


def test_status_of_requeued_and_array_jobs():
    record = {"output_dir": "o", "recipe": "r", "submitted_at": "t", "stages": [
        {"name": "train", "job_id": "20", "array": "0-1%1", "depends_on": [], "script": "/x/01-train.sbatch",
         "log": "/x/logs", "stage_folders": []}]}
    rows = parse_sacct("21|20_0|REQUEUED|40|gres/gpu=1|2026-01-01T10:00:00|2026-01-01T10:00:40|0:0\n"
                       "21|20_0|COMPLETED|50|gres/gpu=1|2026-01-01T10:00:52|2026-01-01T10:01:42|0:0\n"
                       "20|20_1|RUNNING|5|gres/gpu=1|2026-01-01T10:01:43|Unknown|0:0\n")
    summary = summarise(record, {"train": [r for rs in rows.values() for r in rs]}, {})
    stage = summary["stages"][0]
    assert stage["tasks"] == {"20_0": "COMPLETED", "20_1": "RUNNING"} and stage["restarts"] == 1
    assert not summary["final"]


def test_status_of_a_job_requeued_after_a_node_failure_names_the_lost_node():
    record = {"output_dir": "o", "recipe": "r", "submitted_at": "t", "stages": [
        {"name": "train", "job_id": "30", "array": None, "depends_on": [], "script": "/x/01-train.sbatch",
         "log": "/x/logs", "stage_folders": []}]}
    lost = {"event": "stage_end", "stage": "train", "outcome": "node_lost", "job": {"job_id": "30", "restart_count": 0},
            "message": "stage train lost a node: job 30: node(s) n2 (down*) down or not responding"}
    ended = "30|30|NODE_FAIL|134|billing=4,gres/gpu=4,node=2|2026-01-01T10:00:00|2026-01-01T10:02:14|0:0\n"
    # sacct may not list the requeued instance yet: squeue's PENDING wins over the ended one
    summary = summarise(record, {"train": parse_sacct(ended)["30"]}, {"30": ("PENDING", "BeginTime")}, [lost])
    stage = summary["stages"][0]
    assert stage["states"] == ["PENDING"] and stage["reason"] == "BeginTime" and stage["restarts"] == 1
    assert not summary["final"] and summary["failed"] == []
    assert stage["notes"] == ["job 30 ended NODE_FAIL after 134 s and was requeued: " + lost["message"]]
    # once the new instance runs, sacct lists both
    rows = parse_sacct(ended + "30|30|RUNNING|20|billing=4,gres/gpu=4,node=2|2026-01-01T10:02:30|Unknown|0:0\n")
    stage = summarise(record, {"train": rows["30"]}, {"30": ("RUNNING", None)}, [lost])["stages"][0]
    assert stage["states"] == ["RUNNING"] and stage["restarts"] == 1 and "n2 (down*)" in stage["notes"][0]
    assert "note: stage train: job 30 ended NODE_FAIL" in format_status(
        summarise(record, {"train": rows["30"]}, {}, [lost]))


def test_node_states_that_mean_a_lost_node():
    from mmtrain.slurm.health import is_lost, lost_nodes

    assert [is_lost(s) for s in ("down*", "idle*", "mixed*", "down", "down~", "fail", "failing")] == [True] * 7
    assert [is_lost(s) for s in ("idle", "mixed", "allocated", "completing", "draining")] == [False] * 5
    assert lost_nodes({}) == {}  # outside a job: nothing to ask
