"""`mmtrain cost`: sacct parsing and the report's arithmetic on hand-written ledgers (no SLURM needed).

Every expected number is worked out by hand in the comments next to it.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

import pytest

from mmtrain.cost import sacct
from mmtrain.cost.cli import main as cost_main
from mmtrain.cost.report import build_report, format_markdown, write_report

H100_BF16 = 989.4e12
T0 = datetime(2024, 5, 1, 10, 0, 0).timestamp()  # sacct prints local times; the ledger has Unix times
GRES2 = "billing=1,cpu=1,gres/gpu=2,mem=100M,node=1"

# Job 123 preempted and requeued (two rows with -D), 124 failed, 125 cancelled (killed).
SACCT_TEXT = f"""\
123|123|REQUEUED|400|{GRES2}|2024-05-01T10:00:00|2024-05-01T10:06:40|0:0
123|123|COMPLETED|1000|{GRES2}|2024-05-01T10:07:00|2024-05-01T10:23:40|0:0
124|124|FAILED|300|billing=1,cpu=1,gres/gpu:h100=2,node=1|2024-05-01T10:33:20|2024-05-01T10:38:20|1:0
125|125|CANCELLED by 0|500|{GRES2}|2024-05-01T10:50:00|2024-05-01T10:58:20|0:15
"""


def job(job_id: str | None, restart: int = 0, gpus: int | None = 2, gpu_type: str | None = "h100") -> dict:
    return {"job_id": job_id, "array_job_id": None, "array_task_id": None, "restart_count": restart,
            "nodes": 1, "gpus": gpus, "gpu_type": gpu_type, "host": "node1"}


def rec(event: str, at: float, attempt: str, block: dict, stage: str = "align", variant: str | None = None,
        **fields) -> dict:
    return {"v": 1, "event": event, "time": at, "run": "r", "stage": stage, "variant": variant,
            "attempt": attempt, "job": block, **fields}


def counters(steps: int, samples: int, tokens: int, flops: float, train_s: float) -> dict:
    return {"step_start": 0, "step_end": steps, "steps": steps, "samples": samples, "tokens": tokens,
            "images": samples, "flops": flops, "train_s": train_s}


def process_end(at: float, attempt: str, block: dict, outcome: str, rank: int, times: dict, memory: float,
                stage: str = "align", **kept) -> dict:
    return rec("process_end", at, attempt, block, stage, kind="train", rank=rank, world_size=2, outcome=outcome,
               precision="bf16", **kept, timing=times, memory={"peak_cuda_mib": memory, "peak_rss_mib": 4000.0})


def shift(records: list[dict], base: float = T0) -> list[dict]:
    """The records with `base` added to their times."""
    return [{**r, "time": r["time"] + base} for r in records]


def write_ledger(folder: Path, records: list[dict]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = "".join(json.dumps(r) + "\n" for r in records)
    (folder / "ledger.jsonl").write_text(text + '{"event": "cut sho')  # a line cut by a kill is skipped
    return folder


def slurm_ledger() -> list[dict]:
    j0, j1 = job("123", 0), job("123", 1)
    j124, j125 = job("124", gpu_type=None), job("125")
    a1_kept = counters(38, 608, 77824, 1.9e15, 330.0)
    a2_kept = counters(62, 992, 126976, 3.1e15, 900.0)
    # Times in seconds after T0 - 1000 (so t=1000 is 10:00:00, when sacct says job 123 started).
    return shift(base=T0 - 1000.0, records=[
        # a1: preempted; it checkpointed on the signal at t=1390, 390 s after its start.
        rec("stage_start", 1000.0, "a1", j0),
        rec("process_start", 1010.0, "a1", j0, kind="train", rank=0, world_size=2),
        rec("process_start", 1010.0, "a1", j0, kind="train", rank=1, world_size=2),
        rec("checkpoint", 1200.0, "a1", j0, rank=0, world_size=2, step=20, checkpoint_s=5.0,
            **counters(20, 320, 40960, 1.0e15, 150.0)),
        rec("checkpoint", 1390.0, "a1", j0, rank=0, world_size=2, step=38, checkpoint_s=10.0, **a1_kept),
        process_end(1392.0, "a1", j0, "preempted", 0, {"startup_s": 10.0, "train_s": 330.0, "eval_s": 0.0,
                                                      "checkpoint_s": 10.0, "wall_s": 382.0}, 30000.0, **a1_kept),
        process_end(1392.0, "a1", j0, "preempted", 1, {"startup_s": 10.0, "train_s": 330.0, "eval_s": 0.0,
                                                      "checkpoint_s": 10.0, "wall_s": 382.0}, 31000.0, **a1_kept),
        rec("stage_end", 1395.0, "a1", j0, outcome="preempted", wall_s=395.0, message="SIGTERM"),
        # a2: the requeued instance 1 finishes the stage, then evaluates.
        rec("stage_start", 1420.0, "a2", j1),
        rec("checkpoint", 2390.0, "a2", j1, rank=0, world_size=2, step=100, checkpoint_s=8.0, **a2_kept),
        process_end(2400.0, "a2", j1, "completed", 0, {"startup_s": 12.0, "train_s": 900.0, "eval_s": 30.0,
                                                      "checkpoint_s": 8.0, "wall_s": 980.0}, 30500.0, **a2_kept),
        rec("task", 2402.0, "a2", j1, kind="train", wall_s=982.0, nprocs=2, returncode=0),
        rec("task", 2415.0, "a2", j1, kind="eval:captions", wall_s=10.0, nprocs=2, returncode=0),
        rec("stage_end", 2420.0, "a2", j1, outcome="done", wall_s=1000.0, message=None),
        # a3: failed 150 s after its last checkpoint (t=3100); no GPU type in the job block (sacct has h100).
        rec("stage_start", 3000.0, "a3", j124, "finetune"),
        rec("checkpoint", 3100.0, "a3", j124, "finetune", rank=0, world_size=2, step=10, checkpoint_s=4.0,
            **counters(10, 160, 20480, 4.0e14, 80.0)),
        process_end(3250.0, "a3", j124, "failed", 0, {"startup_s": 8.0, "train_s": 120.0, "eval_s": 0.0,
                                                     "checkpoint_s": 4.0, "wall_s": 245.0}, 20000.0, "finetune",
                    **counters(15, 240, 30720, 6.0e14, 120.0)),
        rec("stage_end", 3260.0, "a3", j124, "finetune", outcome="failed", wall_s=260.0, message="exit 1"),
        # a4: killed (no process_end, no stage_end); its last checkpoint at t=4200.
        rec("stage_start", 4000.0, "a4", j125, "finetune"),
        rec("process_start", 4010.0, "a4", j125, "finetune", kind="train", rank=0, world_size=2),
        rec("checkpoint", 4200.0, "a4", j125, "finetune", rank=0, world_size=2, step=30, checkpoint_s=6.0,
            **counters(30, 480, 61440, 1.2e15, 180.0)),
    ])


def fake_query(text: str):
    calls = []

    def query(job_ids):
        calls.append(list(job_ids))
        return sacct.parse_sacct(text)
    query.calls = calls
    return query


@pytest.fixture
def slurm_run(tmp_path: Path) -> Path:
    return write_ledger(tmp_path / "vpgtrans", slurm_ledger())


def attempts_by_id(report: dict) -> dict:
    return {a["attempt"]: a for a in report["attempts"]}


# ---------------------------------------------------------------------------------------------- sacct
def test_parse_sacct_requeued_job_typed_gres_and_states():
    text = SACCT_TEXT + ("126|126|RUNNING|12|billing=1,cpu=1,node=1|2024-05-01T13:00:00|Unknown|0:0\n"
                         "127|127|COMPLETED|60|billing=4,cpu=4,gres/gpu=4,node=2|2024-05-01T13:00:00|"
                         "2024-05-01T13:01:00|0:0\n"
                         "130|129_1|PENDING|0||Unknown|Unknown|0:0\n")
    jobs = sacct.parse_sacct(text)
    assert sorted(jobs) == ["123", "124", "125", "126", "127", "130"]
    first, second = jobs["123"]
    assert (first.state, first.elapsed_s, first.gpus, first.start) == ("REQUEUED", 400, 2, "2024-05-01T10:00:00")
    assert (second.state, second.elapsed_s, second.gpus) == ("COMPLETED", 1000, 2)
    assert (jobs["124"][0].gpus, jobs["124"][0].gpu_type, jobs["124"][0].exit_code) == (2, "h100", "1:0")
    assert jobs["125"][0].state == "CANCELLED"
    assert (jobs["126"][0].gpus, jobs["126"][0].end) == (0, None)
    assert (jobs["130"][0].job_id, jobs["130"][0].start, jobs["130"][0].state) == ("129_1", None, "PENDING")
    assert (jobs["127"][0].nodes, jobs["127"][0].gpus, jobs["126"][0].nodes, jobs["130"][0].nodes) == (2, 4, 1, 0)


def test_parse_sacct_sorts_instances_by_start():
    lines = SACCT_TEXT.splitlines()
    jobs = sacct.parse_sacct("\n".join([lines[1], lines[0]]))  # sacct's order is not guaranteed
    assert [r.state for r in jobs["123"]] == ["REQUEUED", "COMPLETED"]


def test_wait_for_final_polls_until_records_are_final():
    answers = [
        "",  # the job's record has not reached slurmdbd yet
        f"123|123|RUNNING|5|{GRES2}|2024-05-01T10:00:00|Unknown|0:0",
        f"123|123|REQUEUED|400|{GRES2}|2024-05-01T10:00:00|2024-05-01T10:06:40|0:0",  # next instance not there yet
        SACCT_TEXT.splitlines()[0] + "\n" + SACCT_TEXT.splitlines()[1],
    ]
    seen, sleeps = [], []

    def query(ids):
        seen.append(ids)
        return sacct.parse_sacct(answers[len(seen) - 1])
    jobs = sacct.wait_for_final(["123"], timeout_s=60, poll_s=0.01, query=query, sleep=sleeps.append)
    assert len(seen) == 4 and len(sleeps) == 3
    assert [r.state for r in jobs["123"]] == ["REQUEUED", "COMPLETED"]
    assert sacct.is_final(jobs, ["123"]) and not sacct.is_final(jobs, ["123", "999"])


def test_query_jobs_reports_a_missing_sacct(monkeypatch):
    monkeypatch.setenv("PATH", "/nonexistent")
    with pytest.raises(sacct.SacctUnavailable, match="not installed"):
        sacct.query_jobs(["1"])


# ---------------------------------------------------------------------------------------------- attempts
def test_preempted_attempt_wastes_almost_nothing_but_is_interrupted(slurm_run):
    report = build_report(slurm_run, query=fake_query(SACCT_TEXT))
    a1 = attempts_by_id(report)["a1"]
    assert a1["outcome"] == "preempted" and a1["allocated_source"] == "sacct"
    assert a1["allocated_gpu_s"] == pytest.approx(800.0)     # instance 0: ElapsedRaw 400 x 2 GPUs
    assert a1["kept_from"] == "process_end"
    assert a1["productive_gpu_s"] == pytest.approx(660.0)    # train_s 330 x world size 2
    assert a1["wasted_gpu_s"] == pytest.approx(20.0)         # 800 - (1390 - 1000) x 2
    assert a1["interrupted_gpu_s"] == pytest.approx(800.0)   # the whole allocation
    assert a1["overhead_gpu_s"] == pytest.approx(120.0)      # 800 - 660 - 20
    assert a1["overhead_parts_gpu_s"] == pytest.approx(
        {"startup": 20.0, "checkpoint": 20.0, "eval": 0.0, "other": 80.0})  # 10 x 2, 10 x 2, rest
    assert a1["mfu"] == pytest.approx(1.9e15 / (660.0 * H100_BF16))
    assert a1["peak_memory_mib"] == 31000.0 and a1["peak_memory_kind"] == "gpu"  # max over the ranks


def test_requeued_instance_and_eval_tasks(slurm_run):
    a2 = attempts_by_id(build_report(slurm_run, query=fake_query(SACCT_TEXT)))["a2"]
    assert a2["outcome"] == "done" and (a2["job_id"], a2["restart_count"]) == ("123", 1)
    assert a2["allocated_gpu_s"] == pytest.approx(2000.0)    # instance 1: 1000 x 2
    assert a2["productive_gpu_s"] == pytest.approx(1800.0)   # 900 x 2
    assert a2["wasted_gpu_s"] == 0.0 and a2["interrupted_gpu_s"] == 0.0
    assert a2["overhead_gpu_s"] == pytest.approx(200.0)
    # startup 12 x 2; checkpoint 8 x 2; eval 30 x 2 in training + the eval task's 10 s x 2 processes
    assert a2["overhead_parts_gpu_s"] == pytest.approx({"startup": 24.0, "checkpoint": 16.0, "eval": 80.0,
                                                        "other": 80.0})


def test_failed_attempt_keeps_its_last_checkpoint(slurm_run):
    a3 = attempts_by_id(build_report(slurm_run, query=fake_query(SACCT_TEXT)))["a3"]
    assert a3["outcome"] == "failed" and a3["kept_from"] == "checkpoint"
    assert a3["allocated_gpu_s"] == pytest.approx(600.0)     # 300 x 2 (gres/gpu:h100=2)
    assert (a3["steps"], a3["tokens"]) == (10, 20480)        # the checkpoint's, not the process_end's 15 steps
    assert a3["productive_gpu_s"] == pytest.approx(160.0)    # 80 x 2
    assert a3["wasted_gpu_s"] == pytest.approx(400.0)        # 600 - (3100 - 3000) x 2
    assert a3["overhead_gpu_s"] == pytest.approx(40.0)       # 600 - 160 - 400
    assert a3["gpu_type"] == "h100"                          # from sacct's typed gres
    assert a3["mfu"] == pytest.approx(4.0e14 / (160.0 * H100_BF16))


def test_killed_attempt_wastes_the_allocation_after_its_last_checkpoint(slurm_run):
    a4 = attempts_by_id(build_report(slurm_run, query=fake_query(SACCT_TEXT)))["a4"]
    assert a4["outcome"] == "killed" and a4["kept_from"] == "checkpoint"
    assert a4["allocated_gpu_s"] == pytest.approx(1000.0)    # 500 x 2
    assert a4["productive_gpu_s"] == pytest.approx(360.0)    # 180 x 2
    assert a4["wasted_gpu_s"] == pytest.approx(600.0)        # 1000 - (4200 - 4000) x 2
    assert a4["interrupted_gpu_s"] == pytest.approx(1000.0)
    assert a4["overhead_parts_gpu_s"] == pytest.approx({"startup": 0.0, "checkpoint": 12.0, "eval": 0.0,
                                                        "other": 28.0})  # 1000 - 360 - 600 = 40
    assert a4["precision"] == "bf16"                         # borrowed from the stage's failed attempt
    assert a4["mfu"] == pytest.approx(1.2e15 / (360.0 * H100_BF16))


def test_stage_and_total_sums_and_cost(slurm_run):
    query = fake_query(SACCT_TEXT)
    report = build_report(slurm_run, price_per_gpu_hour=2.5, query=query)
    assert query.calls == [["123", "124", "125"]]
    assert report["allocated_source"] == "sacct" and report["sacct"]["used"]
    align, finetune = report["stages"]
    assert align["stage"] == "align" and finetune["stage"] == "finetune"
    assert align["allocated_gpu_hours"] == pytest.approx(2800 / 3600)     # 800 + 2000
    assert align["productive_gpu_hours"] == pytest.approx(2460 / 3600)    # 660 + 1800
    assert align["wasted_gpu_hours"] == pytest.approx(20 / 3600)
    assert align["interrupted_gpu_hours"] == pytest.approx(800 / 3600)
    assert (align["attempts"], align["preempted"], align["failed"], align["killed"]) == (2, 1, 0, 0)
    assert (align["steps"], align["tokens"]) == (100, 204800)             # 38 + 62; 77824 + 126976
    assert align["tokens_per_gpu_s"] == pytest.approx(204800 / 2460)
    assert align["mfu"] == pytest.approx(5.0e15 / (2460 * H100_BF16))
    assert align["peak_memory_mib"] == 31000.0
    assert (finetune["attempts"], finetune["failed"], finetune["killed"]) == (2, 1, 1)
    assert finetune["wasted_gpu_hours"] == pytest.approx(1000 / 3600)     # 400 + 600
    total = report["total"]
    assert total["allocated_gpu_hours"] == pytest.approx(4400 / 3600)     # 2800 + 600 + 1000
    assert total["productive_gpu_hours"] == pytest.approx(2980 / 3600)    # 2460 + 160 + 360
    assert total["overhead_gpu_hours"] == pytest.approx(400 / 3600)       # 120 + 200 + 40 + 40
    assert total["interrupted_gpu_hours"] == pytest.approx(2400 / 3600)   # 800 + 600 + 1000
    assert total["flops"] == pytest.approx(5.0e15 + 4.0e14 + 1.2e15)
    assert total["cost"] == pytest.approx(4400 / 3600 * 2.5)
    parts = total["overhead_parts_gpu_hours"]
    assert sum(parts.values()) == pytest.approx(total["overhead_gpu_hours"])
    # allocated = productive + overhead + wasted, per stage and in total
    for row in (align, finetune, total):
        assert row["allocated_gpu_hours"] == pytest.approx(
            row["productive_gpu_hours"] + row["overhead_gpu_hours"] + row["wasted_gpu_hours"])


def test_jobs_table_lets_a_reader_check_elapsed_times_gpus(slurm_run):
    jobs = build_report(slurm_run, query=fake_query(SACCT_TEXT))["jobs"]
    assert [(j["job_id"], j["instance"], j["elapsed_s"], j["gpus"], j["gpu_s"], j["state"]) for j in jobs] == [
        ("123", 0, 400, 2, 800, "REQUEUED"), ("123", 1, 1000, 2, 2000, "COMPLETED"),
        ("124", 0, 300, 2, 600, "FAILED"), ("125", 0, 500, 2, 1000, "CANCELLED")]
    assert jobs[0]["attempts"] == ["a1"]


def test_sacct_unavailable_falls_back_to_the_ledger(slurm_run):
    def broken(ids):
        raise sacct.SacctUnavailable("sacct failed (exit 1): slurmdbd down")
    report = build_report(slurm_run, query=broken)
    a1 = attempts_by_id(report)["a1"]
    assert report["allocated_source"] == "ledger" and report["sacct"]["error"]
    assert a1["allocated_gpu_s"] == pytest.approx(790.0)     # stage_end wall_s 395 x job.gpus 2
    a4 = attempts_by_id(report)["a4"]
    assert a4["allocated_gpu_s"] == pytest.approx(400.0)     # no end: (4200 - 4000) x 2
    assert any("unavailable" in n for n in report["notes"])
    assert "sacct unavailable" in format_markdown(report)


def test_missing_gres_uses_the_ledger_gpu_count_and_says_so(tmp_path):
    block = job("77", gpus=4)
    run = write_ledger(tmp_path / "r", shift([rec("stage_start", 0.0, "x", block),
                                              rec("stage_end", 90.0, "x", block, outcome="done", wall_s=90.0)]))
    text = "77|77|COMPLETED|100|billing=1,cpu=1,node=1|2024-05-01T10:00:00|2024-05-01T10:01:40|0:0\n"
    report = build_report(run, query=fake_query(text))
    assert report["attempts"][0]["allocated_gpu_s"] == pytest.approx(400.0)  # 100 s x 4 GPUs of the ledger
    assert any("no gres/gpu" in n for n in report["notes"])


def test_one_job_running_two_stages_is_split_by_wall_time(tmp_path):
    block = job("200", gpus=1)
    run = write_ledger(tmp_path / "r", shift([
        rec("stage_start", 0.0, "s1", block, "align"), rec("stage_end", 100.0, "s1", block, "align", outcome="done",
                                                           wall_s=100.0),
        rec("stage_start", 100.0, "s2", block, "finetune"),
        rec("stage_end", 300.0, "s2", block, "finetune", outcome="done", wall_s=200.0)]))
    text = "200|200|COMPLETED|330|billing=1,cpu=1,gres/gpu=1,node=1|2024-05-01T10:00:00|2024-05-01T10:05:30|0:0\n"
    report = build_report(run, query=fake_query(text))
    by_id = attempts_by_id(report)
    assert by_id["s1"]["allocated_gpu_s"] == pytest.approx(110.0)   # 330 x 100/300
    assert by_id["s2"]["allocated_gpu_s"] == pytest.approx(220.0)   # 330 x 200/300
    assert report["total"]["allocated_gpu_hours"] == pytest.approx(330 / 3600)


def test_job_instance_missing_from_the_ledger_counts_as_wasted(tmp_path):
    block = job("300", restart=1, gpus=4)
    run = write_ledger(tmp_path / "r", shift([rec("stage_start", 60.0, "b", block),
                                              rec("stage_end", 160.0, "b", block, outcome="done", wall_s=100.0)]))
    text = ("300|300|NODE_FAIL|50|billing=1,gres/gpu=4,node=1|2024-05-01T10:00:00|2024-05-01T10:00:50|0:0\n"
            "300|300|COMPLETED|100|billing=1,gres/gpu=4,node=1|2024-05-01T10:01:00|2024-05-01T10:02:40|0:0\n")
    report = build_report(run, query=fake_query(text))
    lost = attempts_by_id(report)["300.0"]
    assert lost["outcome"] == "unrecorded" and lost["wasted_gpu_s"] == pytest.approx(200.0)  # 50 x 4
    assert report["total"]["allocated_gpu_hours"] == pytest.approx(600 / 3600)  # 200 + 100 x 4
    assert report["total"]["killed"] == 1


def test_wait_rereads_the_ledger_a_requeued_instance_wrote_meanwhile(tmp_path):
    first, second = job("123", 0), job("123", 1)
    run = write_ledger(tmp_path / "r", shift([rec("stage_start", 0.0, "i0", first)]))

    def query(ids):
        if not (run / "late").exists():  # instance 1 runs while `--wait` polls
            (run / "late").touch()
            with open(run / "ledger.jsonl", "a") as handle:
                for record in shift([rec("stage_start", 420.0, "i1", second),
                                     rec("stage_end", 1400.0, "i1", second, outcome="done", wall_s=980.0)]):
                    handle.write("\n" + json.dumps(record) + "\n")
        return sacct.parse_sacct("\n".join(SACCT_TEXT.splitlines()[:2]))
    report = build_report(run, wait_s=30, query=query)
    by_id = attempts_by_id(report)
    assert sorted(by_id) == ["i0", "i1"] and by_id["i1"]["allocated_gpu_s"] == pytest.approx(2000.0)
    assert by_id["i0"]["outcome"] == "killed" and by_id["i0"]["wasted_gpu_s"] == pytest.approx(800.0)


def test_a_reused_job_id_is_not_matched(tmp_path):
    block = job("77", gpus=4)
    ten_days = 10 * 86400.0
    run = write_ledger(tmp_path / "r", shift([rec("stage_start", ten_days, "x", block),
                                              rec("stage_end", ten_days + 90, "x", block, outcome="done",
                                                  wall_s=90.0)]))
    text = "77|77|COMPLETED|100|billing=1,gres/gpu=4,node=1|2024-05-01T10:00:00|2024-05-01T10:01:40|0:0\n"
    report = build_report(run, query=fake_query(text))
    attempt = report["attempts"][0]
    assert attempt["allocated_source"] == "ledger" and attempt["allocated_gpu_s"] == pytest.approx(360.0)  # 90 x 4
    assert any("reused job id" in n for n in report["notes"]) and report["jobs"] == []


# ---------------------------------------------------------------------------------------------- local runs
def local_ledger(train_s: float = 50.0, flops: float = 5.0e13) -> list[dict]:
    block = job(None, gpus=None, gpu_type=None)
    kept = counters(10, 40, 5120, flops, train_s)
    return [
        rec("stage_start", 100.0, "l1", block),
        rec("process_start", 101.0, "l1", block, kind="train", rank=0, world_size=2),
        rec("checkpoint", 170.0, "l1", block, rank=0, world_size=2, step=10, checkpoint_s=2.0, **kept),
        rec("process_end", 172.0, "l1", block, kind="train", rank=0, world_size=2, outcome="completed",
            precision="fp32", **kept, timing={"startup_s": 5.0, "train_s": train_s, "eval_s": 0.0,
                                            "checkpoint_s": 2.0, "wall_s": 71.0}, memory={"peak_rss_mib": 900.0}),
        rec("stage_end", 180.0, "l1", block, outcome="done", wall_s=80.0),
    ]


def test_local_run_allocated_from_the_ledger(tmp_path):
    run = write_ledger(tmp_path / "local", local_ledger())

    def no_sacct(ids):
        raise AssertionError("a local run must not query sacct")
    report = build_report(run, peak_tflops=1.0, query=no_sacct)
    a = report["attempts"][0]
    assert report["allocated_source"] == "ledger" and a["job_id"] is None
    assert a["gpus"] == 2                                    # no job.gpus: the processes' world size
    assert a["allocated_gpu_s"] == pytest.approx(160.0)      # wall_s 80 x 2
    assert a["productive_gpu_s"] == pytest.approx(100.0)     # 50 x 2
    assert a["overhead_gpu_s"] == pytest.approx(60.0)
    assert a["mfu"] == pytest.approx(0.5)                    # 5e13 / (100 GPU-s x 1e12 FLOP/s)
    assert report["total"]["mfu"] == pytest.approx(0.5)
    assert a["peak_memory_mib"] == 900.0 and a["peak_memory_kind"] == "rss"


def test_runner_stopped_by_a_signal_is_interrupted(tmp_path):
    records = local_ledger()
    records[-1] = {**records[-1], "outcome": "interrupted"}  # stage_end after Ctrl-C, checkpoint at t=170
    report = build_report(write_ledger(tmp_path / "local", records))
    a = report["attempts"][0]
    assert a["wasted_gpu_s"] == pytest.approx(20.0)         # 160 - (170 - 100) x 2
    assert a["interrupted_gpu_s"] == pytest.approx(160.0) and report["total"]["killed"] == 1


def test_mfu_is_unknown_without_gpu_type_or_peak(tmp_path):
    report = build_report(write_ledger(tmp_path / "local", local_ledger()))
    assert report["attempts"][0]["mfu"] is None and report["total"]["mfu"] is None
    assert "| - |" in format_markdown(report)


def test_plain_train_process_without_runner_is_its_own_attempt(tmp_path):
    block = job(None, gpus=None, gpu_type=None)
    kept = counters(5, 10, 640, 1e12, 20.0)
    run = write_ledger(tmp_path / "t", [
        rec("process_start", 0.0, "p1", block, "t", kind="train", rank=0, world_size=1),
        rec("process_end", 30.0, "p1", block, "t", kind="train", rank=0, world_size=1, outcome="completed",
            precision="fp32", **kept, timing={"startup_s": 4.0, "train_s": 20.0, "eval_s": 0.0, "checkpoint_s": 1.0,
                                            "wall_s": 30.0}, memory={"peak_rss_mib": 500.0})])
    a = build_report(run)["attempts"][0]
    assert (a["outcome"], a["allocated_gpu_s"], a["productive_gpu_s"]) == ("done", 30.0, 20.0)


def test_variants_are_reported_within_their_stage(tmp_path):
    block = job(None, gpus=1, gpu_type=None)
    records = []
    for i, (variant, wall) in enumerate((("lora", 40.0), ("mma", 60.0))):
        records += [rec("stage_start", 100.0 * i, f"v{i}", block, "peft", variant),
                    rec("stage_end", 100.0 * i + wall, f"v{i}", block, "peft", variant, outcome="done", wall_s=wall)]
    stage = build_report(write_ledger(tmp_path / "v", records))["stages"][0]
    assert [(v["variant"], v["allocated_gpu_hours"] * 3600) for v in stage["variants"]] == [
        ("lora", pytest.approx(40.0)), ("mma", pytest.approx(60.0))]
    assert stage["allocated_gpu_hours"] == pytest.approx(100 / 3600)


# ---------------------------------------------------------------------------------------------- baseline, outputs
def test_baseline_ratios(slurm_run, tmp_path):
    base = write_ledger(tmp_path / "scratch", local_ledger())
    report = build_report(slurm_run, price_per_gpu_hour=3.0, baseline=base, query=fake_query(SACCT_TEXT))
    ratios = report["baseline"]["ratios"]
    assert report["baseline"]["total"]["allocated_gpu_hours"] == pytest.approx(160 / 3600)
    assert ratios["allocated_gpu_hours"] == pytest.approx(4400 / 160)
    assert ratios["productive_gpu_hours"] == pytest.approx(2980 / 100)
    assert ratios["flops"] == pytest.approx(6.6e15 / 5.0e13)
    assert ratios["cost"] == pytest.approx(4400 / 160)      # same price: the GPU-hour ratio
    assert "Against the baseline" in format_markdown(report)


def test_predicted_vs_actual(slurm_run):
    estimate = {"stages": [{"name": "align", "gpu_hours": 0.5, "flops": 4.0e15,
                            "memory_per_gpu_gib": {"activations": 20.0, "total": 28.0}},
                           {"name": "extra", "gpu_hours": 1.0, "memory_per_gpu_gib": 10.0}]}
    (slurm_run / "cost_estimate.json").write_text(json.dumps(estimate))
    predicted = build_report(slurm_run, query=fake_query(SACCT_TEXT))["predicted"]
    assert predicted[0]["predicted_gpu_hours"] == 0.5
    assert predicted[0]["allocated_gpu_hours"] == pytest.approx(2800 / 3600)
    assert predicted[0]["peak_memory_gib"] == pytest.approx(31000 / 1024, abs=1e-3)
    assert predicted[0]["predicted_memory_per_gpu_gib"] == 28.0
    assert (predicted[0]["predicted_flops"], predicted[0]["flops"]) == (4.0e15, pytest.approx(5.0e15))
    assert predicted[1]["allocated_gpu_hours"] is None


REPORT_KEYS = {"schema_version", "run", "ledger", "generated_at", "allocated_source", "sacct", "price_per_gpu_hour",
               "peak_tflops", "total", "stages", "attempts", "jobs", "predicted", "notes", "baseline"}
SUMMARY_KEYS = {"allocated_gpu_hours", "productive_gpu_hours", "overhead_gpu_hours", "overhead_parts_gpu_hours",
                "wasted_gpu_hours", "interrupted_gpu_hours", "attempts", "preempted", "failed", "killed", "steps",
                "samples", "tokens", "flops", "tokens_per_gpu_s", "mfu", "peak_memory_mib", "peak_memory_kind", "cost"}
ATTEMPT_KEYS = {"attempt", "stage", "variant", "job_id", "restart_count", "host", "start", "wall_s", "outcome", "gpus",
                "world_size", "gpu_type", "precision", "peak_flops_per_gpu", "allocated_source", "allocated_gpu_s",
                "productive_gpu_s", "overhead_gpu_s", "overhead_parts_gpu_s", "wasted_gpu_s", "interrupted_gpu_s",
                "kept_from", "steps", "samples", "tokens", "flops", "train_s", "mfu", "peak_memory_mib",
                "peak_memory_kind", "notes"}
JOB_KEYS = {"job_id", "sacct_job_id", "instance", "elapsed_s", "gpus", "gpu_s", "state", "start", "end", "exit_code",
            "stage", "attempts"}


def test_report_files_and_documented_json_keys(slurm_run, tmp_path):
    report = build_report(slurm_run, price_per_gpu_hour=2.0, query=fake_query(SACCT_TEXT),
                          baseline=write_ledger(tmp_path / "scratch", local_ledger()))
    paths = write_report(report, slurm_run / "cost")
    assert paths["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    data = json.loads(paths["json"].read_text())
    assert set(data) == REPORT_KEYS
    assert set(data["total"]) == SUMMARY_KEYS
    assert set(data["stages"][0]) == SUMMARY_KEYS | {"stage", "variants"}
    assert set(data["attempts"][0]) == ATTEMPT_KEYS
    assert set(data["jobs"][0]) == JOB_KEYS
    assert set(data["baseline"]) == {"run", "allocated_source", "sacct", "total", "stages", "notes", "ratios"}
    markdown = paths["md"].read_text()
    assert "| align |" in markdown and "## SLURM jobs" in markdown and "MFU" in markdown
    docs = (Path(__file__).resolve().parents[2] / "docs" / "cost.md").read_text()
    for key in REPORT_KEYS | SUMMARY_KEYS | ATTEMPT_KEYS | JOB_KEYS:
        assert f"`{key}`" in docs, f"docs/cost.md does not document report.json's {key!r}"


# ---------------------------------------------------------------------------------------------- CLI
def test_cli_without_ledger_exits_2(tmp_path, capsys):
    assert cost_main([str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "ledger.jsonl" in err and "mmtrain run" in err and "Traceback" not in err


def test_cli_writes_the_report_and_prints_markdown(tmp_path, capsys):
    run = write_ledger(tmp_path / "local", local_ledger())
    out = tmp_path / "elsewhere"
    assert cost_main([str(run), "--peak-tflops", "1", "--price-per-gpu-hour", "4", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert printed == (out / "report.md").read_text()
    assert "50.0%" in printed                                # the MFU of 0.5
    assert (out / "report.png").is_file() and not (run / "cost").exists()
    assert json.loads((out / "report.json").read_text())["total"]["cost"] == pytest.approx(160 / 3600 * 4)


def test_cli_rejects_bad_numbers(tmp_path, capsys):
    with pytest.raises(SystemExit) as exc:
        cost_main([str(tmp_path), "--peak-tflops", "-3"])
    assert exc.value.code == 2
