"""The cost ledger: whole lines under concurrent appends from many processes, SLURM job fields, FLOPs rule."""

from __future__ import annotations

import json
import multiprocessing
import os
import signal

import pytest
import torch

from mmtrain.cost.flops import pass_multipliers
from mmtrain.cost.ledger import Ledger, append_record, read_ledger, slurm_job
from mmtrain.engine.preemption import StopRequest

WRITERS = 8
RECORDS = 150


def _append_many(path: str, writer: int) -> None:
    ledger = Ledger(path=path, run="run", stage="s", attempt=f"a{writer}")
    for i in range(RECORDS):
        # Larger than PIPE_BUF (4 KiB): O_APPEND alone would not promise an unbroken line.
        ledger.write("process_end", rank=writer, index=i, padding="x" * (5000 + 37 * writer))


def test_concurrent_appends_from_many_processes_stay_whole(tmp_path):
    path = tmp_path / "ledger.jsonl"
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=_append_many, args=(str(path), w)) for w in range(WRITERS)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join(120)
        assert worker.exitcode == 0
    lines = path.read_text().splitlines()
    assert len(lines) == WRITERS * RECORDS
    records = [json.loads(line) for line in lines]  # every line is one complete JSON object
    seen = sorted((r["rank"], r["index"]) for r in records)
    assert seen == [(w, i) for w in range(WRITERS) for i in range(RECORDS)]
    assert all(len(r["padding"]) == 5000 + 37 * r["rank"] for r in records)


def test_reader_skips_a_line_cut_by_a_kill(tmp_path):
    path = tmp_path / "ledger.jsonl"
    append_record(path, {"event": "stage_start", "attempt": "a"})
    with open(path, "a") as handle:
        handle.write('{"event": "stage_end", "attem')  # the writer died mid-line
    append_record(path, {"event": "stage_start", "attempt": "b"})
    assert [r["attempt"] for r in read_ledger(path)] == ["a", "b"]


def test_job_block_from_slurm_environment():
    env = {"SLURM_JOB_ID": "42", "SLURM_ARRAY_JOB_ID": "40", "SLURM_ARRAY_TASK_ID": "2", "SLURM_RESTART_COUNT": "1",
           "SLURM_JOB_NUM_NODES": "2", "SLURM_GPUS_ON_NODE": "4", "MMTRAIN_GPU_TYPE": "h100"}
    job = slurm_job(env)
    assert (job["job_id"], job["array_task_id"], job["restart_count"], job["nodes"], job["gpus"], job["gpu_type"]) \
        == ("42", "2", 1, 2, 8, "h100")
    first_run = slurm_job({"SLURM_JOB_ID": "7", "SLURM_JOB_GPUS": "0,1"})  # SLURM_RESTART_COUNT unset
    assert first_run["restart_count"] == 0 and first_run["gpus"] == 2
    assert slurm_job({})["job_id"] is None and slurm_job({})["gpus"] is None


def test_ledger_environment_names_the_same_attempt(tmp_path, monkeypatch):
    ledger = Ledger(path=tmp_path / "ledger.jsonl", run="r", stage="align", attempt="abc", variant="seed=1")
    for key, value in ledger.environment().items():
        monkeypatch.setenv(key, value)
    child = Ledger.from_env(tmp_path / "elsewhere.jsonl", default_stage="other")
    assert (child.path, child.stage, child.attempt, child.variant) == (ledger.path, "align", "abc", "seed=1")


def test_pass_multipliers_follow_the_frozen_aware_rule(tiny_assets):
    from mmtrain.config import load_config
    from mmtrain.models import build_vlm
    from tests.conftest import tiny_config, write_config

    cfg = load_config(write_config(tiny_config(tiny_assets, tiny_assets["root"] / "x"), tiny_assets["root"] / "m.yaml"))
    model, _, _ = build_vlm(cfg.model)
    # frozen tower first: forward only; trainable resampler/projector: 3x; frozen LLM after them: 2x
    assert pass_multipliers(model) == {"vision": 1.0, "resampler": 3.0, "projector": 3.0, "llm": 2.0}
    assert pass_multipliers(model, gradient_checkpointing=True)["llm"] == 3.0
    for p in model.llm.parameters():
        p.requires_grad_(True)
    assert pass_multipliers(model)["llm"] == 3.0
    for name in ("resampler", "projector", "llm"):
        for p in getattr(model, name).parameters():
            p.requires_grad_(False)
    assert set(pass_multipliers(model).values()) == {1.0}


def test_stop_request_records_the_first_signal_and_restores_handlers():
    before = signal.getsignal(signal.SIGUSR1)
    request = StopRequest().install()
    try:
        assert not request.requested
        os.kill(os.getpid(), signal.SIGUSR1)
        os.kill(os.getpid(), signal.SIGTERM)
        assert request.requested and request.name == "SIGUSR1"
    finally:
        request.uninstall()
    assert signal.getsignal(signal.SIGUSR1) == before


@pytest.mark.parametrize("length", [8, 32])
def test_counted_llm_flops_grow_with_the_sequence(tiny_assets, length):
    from mmtrain.config import load_config
    from mmtrain.cost.flops import count_forward_flops
    from mmtrain.models import build_vlm
    from tests.conftest import tiny_config, write_config

    cfg = load_config(write_config(tiny_config(tiny_assets, tiny_assets["root"] / "x"), tiny_assets["root"] / "m.yaml"))
    model, _, _ = build_vlm(cfg.model)
    flops = count_forward_flops(model, length)
    matmul_params = sum(p.numel() for n, p in model.llm.named_parameters() if "embed" not in n)
    # at least 2 FLOPs per weight per token (matmuls), plus attention that grows with the length
    assert flops["llm"] >= 2 * matmul_params * 0.95
    assert all(p.requires_grad for p in model.projector.parameters())  # restored after counting
    assert count_forward_flops(model, length * 4)["llm"] > flops["llm"]
    assert torch.is_grad_enabled()


def test_llm_backward_starts_at_its_first_trainable_layer(tiny_assets):
    """A surrogate's translator deep in a frozen LLM, nothing trainable before it: the backward
    covers the forward FLOPs from that layer on, not the whole LLM."""
    from mmtrain.config import load_config
    from mmtrain.cost.flops import step_flops_model
    from mmtrain.models import build_vlm
    from mmtrain.models.llm import decoder_layers
    from tests.conftest import tiny_config, write_config

    cfg = load_config(write_config(tiny_config(tiny_assets, tiny_assets["root"] / "x"), tiny_assets["root"] / "m.yaml"))
    model, _, _ = build_vlm(cfg.model)
    for p in model.parameters():
        p.requires_grad_(False)
    last = decoder_layers(model.llm.model)[-1]  # the tiny LLM has 2 layers
    for p in last.parameters():
        p.requires_grad_(True)
    flops = step_flops_model(model, 16)
    share = sum(p.numel() for p in last.parameters()) / sum(p.numel() for p in model.llm.parameters())
    backward = flops.multipliers["llm"] - 1.0 - share
    assert 0.2 < backward < 0.8 and any("first trainable decoder layer" in n for n in flops.notes)
    # With the projector trainable the gradient flows through the whole LLM again.
    for p in model.projector.parameters():
        p.requires_grad_(True)
    assert step_flops_model(model, 16).multipliers["llm"] == pytest.approx(2.0 + share)
