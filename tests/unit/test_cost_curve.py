"""Learning curves against FLOPs from the ledger (`mmtrain.cost.curve`): resumed attempts add up, a
repeated validation counts once, failed attempts keep only what they checkpointed."""

from __future__ import annotations

import pytest

from mmtrain.cost.curve import folder_compute, stage_compute
from mmtrain.cost.ledger import Ledger, read_ledger


def _attempt(path, stage: str, attempt: str, start: int, events: list[tuple], world: int = 2,
             output_dir: str = "/runs/x/01-a") -> None:
    """Write one attempt: `events` are (event, step, flops so far, train_s so far, extra fields)."""
    ledger = Ledger(path=path, run="x", stage=stage, attempt=attempt, job={"job_id": None})
    ledger.write("process_start", kind="train", rank=0, world_size=world, output_dir=output_dir)
    for event, step, flops, train_s, extra in events:
        counters = {"step_start": start, "step_end": step, "steps": step - start, "samples": 0, "tokens": 0,
                    "images": 0, "flops": flops, "train_s": train_s}
        if event == "validation":
            ledger.write("validation", rank=0, world_size=world, step=step, epoch=step / 10,
                         metrics={"val_loss": extra}, **counters)
        elif event == "checkpoint":
            ledger.write("checkpoint", rank=0, world_size=world, step=step, checkpoint_s=1.0, **counters)
        else:
            ledger.write("process_end", kind="train", rank=0, world_size=world, outcome=extra, **counters)


def test_resumed_attempts_add_up_and_repeated_validations_count_once(tmp_path):
    path = tmp_path / "ledger.jsonl"
    # Attempt 1: validates at 10 and 20, checkpoints at 10 and 20, validates at 30 and is killed (no end).
    _attempt(path, "a", "one", 0, [("validation", 10, 100.0, 5.0, 3.0), ("checkpoint", 10, 100.0, 5.0, None),
                                   ("validation", 20, 200.0, 10.0, 2.5), ("checkpoint", 20, 200.0, 10.0, None),
                                   ("validation", 30, 300.0, 15.0, 2.2)])
    # Attempt 2 resumes at 20: its counters start at zero.
    _attempt(path, "a", "two", 20, [("validation", 30, 110.0, 6.0, 2.1), ("checkpoint", 30, 110.0, 6.0, None),
                                    ("process_end", 30, 110.0, 6.0, "completed")])
    _attempt(path, "b", "three", 0, [("validation", 5, 7.0, 1.0, 9.0), ("process_end", 5, 7.0, 1.0, "completed")],
             world=1, output_dir=str(tmp_path / "02-b"))
    records = read_ledger(path)
    a = stage_compute(records, "a")
    assert [p.step for p in a.points] == [10, 20, 30]
    assert [p.flops for p in a.points] == [100.0, 200.0, 310.0]  # step 30 as the resumed attempt kept it
    assert [p.gpu_s for p in a.points] == [10.0, 20.0, 32.0]  # train_s x 2 ranks
    assert a.points[-1].metrics == {"val_loss": 2.1} and a.points[0].epoch == 1.0
    assert (a.flops, a.gpu_s, a.steps) == (310.0, 32.0, 30)
    assert stage_compute(records, "b").flops == 7.0
    assert stage_compute(records, "missing").points == [] and stage_compute(records, "missing").flops == 0.0
    # A stage folder finds its records through its pipeline's ledger and its process_start.
    (tmp_path / "02-b").mkdir()
    assert folder_compute(tmp_path / "02-b").points[0].metrics == {"val_loss": 9.0}
    assert folder_compute(tmp_path / "elsewhere") is None


def test_a_failed_attempt_keeps_only_its_checkpoint(tmp_path):
    path = tmp_path / "ledger.jsonl"
    _attempt(path, "a", "one", 0, [("checkpoint", 10, 100.0, 5.0, None), ("validation", 15, 150.0, 7.0, 2.0),
                                   ("process_end", 15, 150.0, 7.0, "failed")])
    _attempt(path, "a", "two", 10, [("validation", 15, 60.0, 3.0, 1.9), ("process_end", 20, 120.0, 6.0, "completed")])
    a = stage_compute(read_ledger(path), "a")
    assert [(p.step, p.flops) for p in a.points] == [(15, 160.0)]
    assert a.flops == pytest.approx(220.0) and a.steps == 20
