"""Rank/world discovery for the single-process, launcher and srun cases."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from mmtrain.engine.distributed import setup_dist_env


def test_single_process_without_launcher():
    env = {}
    d = setup_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (0, 1, 0, "single-process")
    assert env["MASTER_ADDR"] == "127.0.0.1" and int(env["MASTER_PORT"]) > 0


def test_launcher_variables_are_kept():
    env = {"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1", "MASTER_ADDR": "h", "MASTER_PORT": "9"}
    d = setup_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank) == (3, 4, 1) and env["MASTER_ADDR"] == "h"


def test_srun_step_variables_give_ranks():
    env = {"SLURM_PROCID": "5", "SLURM_STEP_NUM_TASKS": "8", "SLURM_LOCALID": "1", "SLURM_JOB_ID": "1234",
           "SLURM_STEP_NODELIST": "127.0.0.1"}
    d = setup_dist_env(env)
    assert (d.rank, d.world_size, d.local_rank, d.launcher) == (5, 8, 1, "srun")
    assert env["RANK"] == "5" and env["WORLD_SIZE"] == "8" and env["MASTER_PORT"] == str(20000 + 1234)


def test_batch_script_without_srun_is_single_process():
    # Inside an sbatch script SLURM_PROCID/SLURM_NTASKS exist but no step: one process, not rank 0 of N.
    env = {"SLURM_PROCID": "0", "SLURM_NTASKS": "2", "SLURM_JOB_ID": "7"}
    assert setup_dist_env(env).world_size == 1


def test_shm_allreduce_buffers_of_one_job_are_removed(tmp_path, monkeypatch):
    from mmtrain.engine import distributed

    monkeypatch.setattr(distributed, "SHM_DIR", tmp_path)
    for name in ("deepspeed_allreduce_buffer_0_127.0.0.1_29500_0", "deepspeed_allreduce_buffer_0_127.0.0.1_29500_1",
                 "deepspeed_allreduce_buffer_0_127.0.0.1_29501_0", "other_29500_0"):
        (tmp_path / name).write_bytes(b"x")
    assert distributed.remove_shm_allreduce_buffers(29500) == 2
    assert sorted(p.name for p in tmp_path.iterdir()) == ["deepspeed_allreduce_buffer_0_127.0.0.1_29501_0",
                                                          "other_29500_0"]


def test_a_clean_end_leaves_the_process_group_and_a_failed_one_does_not():
    """Every command's entry point leaves the group after a clean end (0 or the requeue exit); a group left
    to interpreter exit can abort a rank of a finished run. After an error the barrier could wait forever."""
    script = textwrap.dedent("""
        import torch.distributed as dist
        from mmtrain.engine.distributed import leave_distributed, setup_dist_env
        from mmtrain.engine.preemption import EXIT_REQUEUE

        for code, stays in ((2, True), (1, True), (0, False), (EXIT_REQUEUE, False)):
            setup_dist_env()
            if not dist.is_initialized():
                dist.init_process_group("gloo")
            assert leave_distributed(code) == code
            assert dist.is_initialized() == stays, code
        print("ok")
    """)
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_PORT")}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120, env=env,
                            cwd=Path(__file__).resolve().parents[2])
    assert result.returncode == 0 and result.stdout.strip() == "ok", result.stderr[-3000:]


def test_the_retired_timeout_variable_is_an_error_naming_the_config_key(monkeypatch):
    from mmtrain.engine.distributed import init_distributed
    from mmtrain.errors import UserError

    monkeypatch.setenv("MMTRAIN_DIST_TIMEOUT_S", "600")
    with pytest.raises(UserError, match=r"MMTRAIN_DIST_TIMEOUT_S is no longer read: set `collective_timeout_s: 600`"):
        init_distributed(60)


def test_gloo_failures_caused_by_another_rank_get_a_note_saying_what_to_do(monkeypatch):
    from mmtrain.engine.distributed import explain_collective_failure

    monkeypatch.setenv("RANK", "3")
    timeout = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/unbound_buffer.cc:78] "
                           "Timed out waiting 30000ms for recv operation to complete")
    explain_collective_failure(timeout, 30)
    assert timeout.__notes__[0].startswith("rank 3: a collective waited collective_timeout_s = 30 s for the other "
                                           "ranks")
    assert "raise collective_timeout_s in the run config" in timeout.__notes__[0]
    closed = RuntimeError("[/pytorch/third_party/gloo/gloo/transport/tcp/pair.cc:553] Connection closed by peer "
                          "[10.0.0.2]:694. This is typically caused by a remote worker crashing.")
    explain_collective_failure(closed, 30)
    assert closed.__notes__[0].startswith("rank 3: another rank's process ended, or its node was lost")
    for unrelated in (RuntimeError("CUDA out of memory"), ValueError(str(timeout)),
                      RuntimeError("gloo: unsupported reduction")):
        explain_collective_failure(unrelated, 30)
        assert not getattr(unrelated, "__notes__", None)
