"""Fault tolerance: a disk that fills up during a checkpoint, and kill -9 at random moments.

- Full disk, 2 ranks (ZeRO-2, the real deepspeed launcher): output_dir lies on a small tmpfs that a
  filler file leaves room for two checkpoints only. The third save stops both ranks together (no
  hang) with an error naming the folder and the space needed; the second checkpoint stays the one a
  resume picks, no `.tmp` folder remains, metrics.jsonl and the ledger stay whole lines. Once the
  filler is gone, the resumed run ends with the uninterrupted run's losses.
- Full disk while writing (one process): an earlier, smaller checkpoint in the folder makes the
  estimate too low, so the disk fills up in the middle of the save; the unfinished folder is removed
  and the error names the folder.
- kill -9 anywhere (one process, a checkpoint every step): 20 kills at moments drawn from a seeded RNG,
  in start-up, in steps and in saves. After each, every complete checkpoint loads and the next run
  resumes from the newest (never a `.tmp`); the run finished last has the uninterrupted run's losses,
  bit for bit.
- A rank that stops responding (2 ranks, ZeRO-3, the deepspeed launcher): rank 1 is frozen (SIGSTOP: a
  hung device or a partitioned node sends its peers no error). Rank 0 fails after the run config's
  `collective_timeout_s`, saying what happened and what to do, and the launcher stops the frozen rank.

The tmpfs needs root (`mount`); without it these tests are skipped.
"""

from __future__ import annotations

import errno
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from mmtrain.config.paths import CHECKPOINT_PATTERN, complete_checkpoints, latest_checkpoint
from mmtrain.engine.checkpoint import estimate_checkpoint_bytes, resolve_resume
from mmtrain.engine.distributed import remove_shm_allreduce_buffers
from mmtrain.errors import EXIT_USER_ERROR
from tests.conftest import REPO, free_port, launch, launcher_command, tiny_config, write_config

pytestmark = pytest.mark.slow
PAGE = 4096
DISK_SIZE = "32m"
KILLS = 20
KILL_SEED = 20
KILLED_RUN_STEPS = 150
KILL_PHASES = {"start-up": 6, "training": 8, "save": 6}
"""Where each kill is aimed: a random moment of start-up (imports, model, resume; cut short when training
begins), a random moment of the step after 1 to 8 new ones, or just after the 1st to 4th save has begun."""
SIZE = re.compile(r"([\d.]+) (B|KiB|MiB|GiB)")
UNITS = {"B": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


# ----------------------------------------------------------------------------------------------- helpers
@pytest.fixture
def small_disk(tmp_path):
    """A tmpfs of DISK_SIZE mounted for the test, unmounted after it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={DISK_SIZE}", "tmpfs", str(mount)],
                             capture_output=True, text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs (needs root): {mounted.stderr.strip()}")
    try:
        yield mount
    finally:
        subprocess.run(["umount", str(mount)], check=True)


def leave_free(disk: Path, room: int) -> Path:
    """Fill `disk` with a file so that only `room` bytes (rounded down to whole pages) stay free."""
    filler = disk / "filler"
    size = shutil.disk_usage(disk).free - room // PAGE * PAGE
    with open(filler, "wb") as handle:
        os.posix_fallocate(handle.fileno(), 0, size)
    return filler


def files(path: Path) -> list[Path]:
    """`path` itself if it is a file, else the files under it."""
    return [path] if path.is_file() else [f for f in path.rglob("*") if f.is_file()]


def pages(path: Path) -> int:
    """Bytes a file, or the files under a folder, take on a tmpfs (whole pages)."""
    return sum(-(-f.stat().st_size // PAGE) * PAGE for f in files(path))


def apparent_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in files(path))


def parse_size(text: str) -> int:
    """Bytes of a size as the error messages print it ("485.4 KiB")."""
    number, unit = SIZE.fullmatch(text).groups()
    return int(float(number) * UNITS[unit])


def jsonl_records(path: Path) -> list[dict]:
    """Every line of a JSONL file as an object; fails on any line that does not parse."""
    records = []
    for number, line in enumerate(path.read_text().splitlines(), 1):
        try:
            records.append(json.loads(line))
        except ValueError:
            raise AssertionError(f"{path}:{number} is not JSON: {line!r}") from None
    return records


def losses(run: Path) -> list[tuple[int, float]]:
    return [(r["step"], r["loss"]) for r in jsonl_records(run / "metrics.jsonl") if "loss" in r]


def build_model(config: Path):
    from mmtrain.config import load_config
    from mmtrain.models import build_vlm

    model, _, _ = build_vlm(load_config(config).model)
    return model


def check_loads(model, checkpoint: Path) -> int:
    """Load a checkpoint's trainable weights into `model` and its DeepSpeed files; returns its step."""
    from mmtrain.models import load_trainable_weights

    step = int(CHECKPOINT_PATTERN.match(checkpoint.name).group(1))
    meta = json.loads((checkpoint / "meta.json").read_text())
    assert meta["step"] == meta["global_step"] == step, (checkpoint, meta)
    assert load_trainable_weights(model, checkpoint) == meta["trainable"]
    ds_files = sorted((checkpoint / "ds").iterdir())
    assert ds_files, f"{checkpoint}/ds is empty"
    for path in ds_files:
        torch.load(path, map_location="cpu", weights_only=False)
    return step


def check_every_complete_checkpoint(model, run: Path) -> int:
    """`check_loads` on each complete checkpoint of `run`; returns the newest one's step (0 if none)."""
    steps = [check_loads(model, checkpoint) for checkpoint in complete_checkpoints(run)]
    return steps[-1] if steps else 0


def start_training(config: Path, log: Path) -> subprocess.Popen:
    """`python -m mmtrain.train CONFIG` in its own process group, output into `log`."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "-m", "mmtrain.train", str(config)], cwd=REPO, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)


def stage_reached(log: Path) -> str:
    """How far a run's start-up got, from its log: imports, the model and data, or training."""
    text = log.read_text()
    if "mmtrain] parameters:" not in text:
        return "imports"
    return "training" if "FLOPs per image" in text else "model and data"


def resumed_from(log: Path) -> str | None:
    found = re.search(r"resumed from (\S+) at step", log.read_text())
    return found.group(1) if found else None


# ----------------------------------------------------------------------------------- full disk, 2 ranks
def full_disk_config(assets, output_dir: Path) -> dict:
    return tiny_config(assets, output_dir, max_steps=8, **{"checkpoint.save_every": 2, "checkpoint.keep_last": 0})


def assert_stopped_with_a_clear_message(failed: subprocess.CompletedProcess, run: Path, reference: Path) -> None:
    """The launcher exited with the user-error status and the message names the folder, the space needed
    and free (both true of the uninterrupted run's checkpoint 6), and the checkpoint a resume takes."""
    output = failed.stdout + failed.stderr
    assert failed.returncode == EXIT_USER_ERROR, output[-6000:]
    assert "Traceback" not in output, output[-6000:]
    message = re.search(r"error: not enough disk space for checkpoint step_00000006 in (\S+): it needs about "
                        r"([\d.]+ \w+) and the file system has ([\d.]+ \w+) free\. Free at least ([\d.]+ \w+) "
                        r"there .* point output_dir at it\. Nothing of this checkpoint was written; the last "
                        r"complete checkpoint, step_00000004, is intact", output)
    assert message, output[-6000:]
    folder, need, free, _ = message.groups()
    assert folder == str(run / "checkpoints")
    assert parse_size(need) >= apparent_bytes(reference / "checkpoints" / "step_00000006")
    assert parse_size(free) < apparent_bytes(reference / "checkpoints" / "step_00000006")


def test_full_disk_stops_every_rank_and_the_resume_matches(tiny_assets, tmp_path, small_disk):
    """Room for 2.4 checkpoints (and 128 KiB for the logs): checkpoints 2 and 4 fit, 6 cannot (keep_last=0)."""
    reference = tmp_path / "reference"
    launch(["-m", "mmtrain.train", str(write_config(full_disk_config(tiny_assets, reference),
                                                    tmp_path / "reference.yaml"))], nprocs=2)
    one_checkpoint = pages(reference / "checkpoints" / "step_00000002")
    run = small_disk / "run"
    config = write_config(full_disk_config(tiny_assets, run), tmp_path / "run.yaml")
    filler = leave_free(small_disk, int(2.4 * one_checkpoint) + 128 * 1024)

    failed = launch(["-m", "mmtrain.train", str(config)], nprocs=2, check=False, timeout=300)
    exited = time.time()
    assert_stopped_with_a_clear_message(failed, run, reference)
    ends = [r for r in jsonl_records(run / "ledger.jsonl") if r["event"] == "process_end"]
    assert sorted((r["rank"], r["outcome"]) for r in ends) == [(0, "failed"), (1, "failed")]
    print(f"\nfull disk: {exited - min(r['time'] for r in ends):.2f} s from the failed check to the launcher's exit")
    assert exited - min(r["time"] for r in ends) < 30

    assert [p.name for p in sorted((run / "checkpoints").iterdir())] == ["step_00000002", "step_00000004"]
    assert resolve_resume("auto", run) == run / "checkpoints" / "step_00000004"
    model = build_model(config)
    assert check_loads(model, run / "checkpoints" / "step_00000004") == 4
    first_estimate = estimate_checkpoint_bytes(model, tmp_path / "no-checkpoints-yet")
    assert apparent_bytes(reference / "checkpoints" / "step_00000002") <= first_estimate
    assert first_estimate <= 2 * apparent_bytes(reference / "checkpoints" / "step_00000002")
    kept = load_file(str(run / "checkpoints" / "step_00000004" / "trainable.safetensors"))
    expected = load_file(str(reference / "checkpoints" / "step_00000004" / "trainable.safetensors"))
    assert kept.keys() == expected.keys() and all(torch.equal(kept[k], expected[k]) for k in kept)
    assert [step for step, _ in losses(run)] == [1, 2, 3, 4, 5, 6]

    filler.unlink()
    launch(["-m", "mmtrain.train", str(config)], nprocs=2, timeout=300)
    assert json.loads((run / "run_info.json").read_text())["resumed_from"] == str(run / "checkpoints" / "step_00000004")
    assert losses(run) == losses(reference)
    jsonl_records(run / "ledger.jsonl")
    assert not list((run / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------------------------------ appends, full disk
def test_appends_on_a_full_disk_leave_whole_lines(small_disk):
    """A metrics or ledger line that the disk cannot hold is cut back off (the kernel writes part of it)."""
    from mmtrain.cost.ledger import append_record
    from mmtrain.engine.disk import OutOfSpaceError
    from mmtrain.engine.metrics import MetricsLog

    metrics, ledger = MetricsLog(small_disk, enabled=True), small_disk / "ledger.jsonl"
    metrics.log({"step": 1, "loss": 1.0})
    append_record(ledger, {"event": "process_start"})
    leave_free(small_disk, 2 * PAGE)
    too_long = "x" * 3 * PAGE
    with pytest.raises(OutOfSpaceError, match=re.escape(f"no disk space left to append to {metrics.path}")):
        metrics.log({"step": 2, "note": too_long})
    with pytest.raises(OSError) as caught:
        append_record(ledger, {"event": "checkpoint", "note": too_long})
    assert caught.value.errno == errno.ENOSPC
    assert jsonl_records(metrics.path) == [{"step": 1, "loss": 1.0}]
    assert jsonl_records(ledger) == [{"event": "process_start"}]
    metrics.log({"step": 2, "loss": 0.5})
    append_record(ledger, {"event": "checkpoint"})
    assert jsonl_records(metrics.path) == [{"step": 1, "loss": 1.0}, {"step": 2, "loss": 0.5}]
    assert jsonl_records(ledger) == [{"event": "process_start"}, {"event": "checkpoint"}]


# ------------------------------------------------------------------------------- one process: references
@pytest.fixture(scope="module")
def single_reference(tiny_assets, tmp_path_factory) -> dict:
    """An uninterrupted one-process run saving every step: its losses, checkpoint sizes and start-up time."""
    out = tmp_path_factory.mktemp("single_reference")
    config = write_config(single_config(tiny_assets, out / "run"), out / "config.yaml")
    started = time.monotonic()
    proc = start_training(config, out / "train.log")
    metrics = out / "run" / "metrics.jsonl"
    while proc.poll() is None and not (metrics.exists() and metrics.stat().st_size):
        time.sleep(0.01)
    startup_s = time.monotonic() - started
    assert proc.wait(timeout=300) == 0, (out / "train.log").read_text()[-6000:]
    return {"run": out / "run", "config": config, "startup_s": startup_s, "losses": losses(out / "run")}


def single_config(assets, output_dir: Path, **overrides) -> dict:
    return tiny_config(assets, output_dir, **{"max_steps": KILLED_RUN_STEPS, "checkpoint.save_every": 1, **overrides})


# ------------------------------------------------------------------------------- full disk while writing
@pytest.mark.parametrize("room_for", ["part of DeepSpeed's files", "DeepSpeed's files only"])
def test_disk_filling_up_while_writing_removes_the_unfinished_folder(tiny_assets, tmp_path, small_disk,
                                                                     single_reference, room_for):
    reference_checkpoint = single_reference["run"] / "checkpoints" / f"step_{KILLED_RUN_STEPS:08d}"
    deepspeed_part = pages(reference_checkpoint) - pages(reference_checkpoint / "trainable.safetensors")
    room = 160 * 1024 if room_for == "part of DeepSpeed's files" else deepspeed_part + 64 * 1024
    run = small_disk / "run"
    earlier = run / "checkpoints" / "step_00000000"
    (earlier / "ds").mkdir(parents=True)
    (earlier / "meta.json").write_text(json.dumps({"step": 0, "global_step": 0, "trainable": []}))
    config = write_config(single_config(tiny_assets, run, max_steps=2, **{"checkpoint.resume": "never"}),
                          tmp_path / "config.yaml")
    leave_free(small_disk, room)
    free_before = shutil.disk_usage(small_disk).free

    proc = start_training(config, tmp_path / "train.log")
    assert proc.wait(timeout=300) == EXIT_USER_ERROR
    output = (tmp_path / "train.log").read_text()
    assert "Traceback" not in output, output[-6000:]
    message = re.search(rf"error: ran out of disk space writing checkpoint step_00000001 in {re.escape(str(run))}"
                        r"/checkpoints after ([\d.]+ \w+) \(it was expected to need about [\d.]+ \w+; [\d.]+ \w+ are "
                        r"free now that its unfinished folder is removed\)\. Free more space there", output)
    assert message, output[-6000:]
    written = parse_size(message.group(1))
    deepspeed_bytes = (apparent_bytes(reference_checkpoint) - apparent_bytes(reference_checkpoint / "meta.json")
                       - apparent_bytes(reference_checkpoint / "trainable.safetensors"))
    if room_for == "DeepSpeed's files only":
        assert written >= deepspeed_bytes - 128  # the message rounds to 0.1 KiB
    else:
        assert written < deepspeed_bytes
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["step_00000000"]
    assert shutil.disk_usage(small_disk).free > free_before - 64 * 1024, "the failed save still holds space"
    jsonl_records(run / "metrics.jsonl")
    jsonl_records(run / "ledger.jsonl")


# ----------------------------------------------------------------------------------------- kill -9 anywhere
def max_logged_step(run: Path) -> int:
    path = run / "metrics.jsonl"
    return max((r["step"] for r in jsonl_records(path)), default=0) if path.exists() else 0


def tmp_folders_since(run: Path, moment: float) -> list[str]:
    """`.tmp` checkpoint folders created or written to since `moment` (a time.time())."""
    root = run / "checkpoints"
    if not root.is_dir():
        return []
    names = []
    for folder in root.glob("*.tmp"):
        try:
            written = folder.stat().st_mtime
        except FileNotFoundError:  # the save finished (renamed) between the listing and the stat
            continue
        if written >= moment:
            names.append(folder.name)
    return sorted(names)


def wait_for(condition, proc: subprocess.Popen, log: Path, timeout: float = 120.0) -> None:
    """Poll `condition` every millisecond until it holds; fail if the run exits or `timeout` passes first."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert proc.poll() is None, f"the run ended ({proc.returncode}) before the kill:\n{log.read_text()[-6000:]}"
        assert time.monotonic() < deadline, f"timed out waiting:\n{log.read_text()[-6000:]}"
        time.sleep(0.001)


def aim_kill(phase: str, rng: random.Random, run: Path, proc: subprocess.Popen, log: Path, startup_s: float,
             logged_before: int, launched: float) -> None:
    """Wait for the moment a kill of `phase` lands at; each phase lets the run gain a few steps at most, so
    that KILLS kills never see it finish."""
    if phase == "start-up":
        delay = rng.uniform(0.3, 1.2) * startup_s
        wait_for(lambda: time.time() - launched >= delay or max_logged_step(run) > logged_before, proc, log)
    elif phase == "training":
        steps = rng.randint(1, 8)
        wait_for(lambda: max_logged_step(run) >= logged_before + steps, proc, log)
        time.sleep(rng.uniform(0.0, 0.03))
    else:
        saves_to_skip = rng.randrange(4)
        seen: set[str] = set()

        def save_begun() -> bool:
            seen.update(tmp_folders_since(run, launched))
            return len(seen) > saves_to_skip

        wait_for(save_begun, proc, log)
        time.sleep(rng.uniform(0.0, 0.004))


def test_kill_9_anywhere_then_resume_gives_the_same_losses(tiny_assets, tmp_path, single_reference):
    run = tmp_path / "run"
    config = write_config(single_config(tiny_assets, run), tmp_path / "config.yaml")
    model = build_model(config)
    rng = random.Random(KILL_SEED)
    phases = [phase for phase, count in KILL_PHASES.items() for _ in range(count)]
    rng.shuffle(phases)
    assert len(phases) == KILLS
    newest_at_kill: Path | None = None
    mid_save = lost = 0
    for kill, phase in enumerate(phases):
        log = tmp_path / f"train-{kill:02d}.log"
        logged_before = max_logged_step(run)
        launched = time.time()
        proc = start_training(config, log)
        aim_kill(phase, rng, run, proc, log, single_reference["startup_s"], logged_before, launched)
        assert proc.poll() is None, f"the run exited ({proc.returncode}) before the kill:\n{log.read_text()[-6000:]}"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()

        if resumed_from(log) is not None:
            assert resumed_from(log) == str(newest_at_kill), log.read_text()[-3000:]
        during_save = tmp_folders_since(run, launched)
        mid_save += bool(during_save)
        newest_at_kill = latest_checkpoint(run)
        kept = check_every_complete_checkpoint(model, run)
        logged = max_logged_step(run)
        if (run / "metrics.jsonl").exists() and (run / "metrics.jsonl").stat().st_mtime >= launched:
            lost += logged - kept
        if (run / "ledger.jsonl").exists():
            jsonl_records(run / "ledger.jsonl")
        print(f"kill {kill + 1:2d} aimed at {phase:8s}: reached {stage_reached(log):14s} last logged step {logged:3d}, "
              f"newest checkpoint {kept:3d}" + (f", {during_save[0]} under way" if during_save else ""))

    log = tmp_path / "train-final.log"
    proc = start_training(config, log)
    assert proc.wait(timeout=300) == 0, log.read_text()[-6000:]
    assert resumed_from(log) == (str(newest_at_kill) if newest_at_kill else None)
    print(f"kill -9: {KILLS} kills survived, {mid_save} during a save, {lost} logged steps lost in all")
    assert mid_save >= 1
    assert losses(run) == single_reference["losses"]
    assert [step for step, _ in losses(run)] == list(range(1, KILLED_RUN_STEPS + 1))
    jsonl_records(run / "ledger.jsonl")
    assert not list((run / "checkpoints").glob("*.tmp"))


# ------------------------------------------------------------------------------ a rank stops responding
SILENT_TIMEOUT_S = 30
"""collective_timeout_s of the frozen-rank test: far above a tiny step, below a CI-friendly wait."""


def rank_pid(session: int, rank: int) -> int | None:
    """The training process of `rank` among the processes of session `session` (from its RANK variable)."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if os.getsid(int(entry.name)) != session:
                continue
            command = (entry / "cmdline").read_bytes().split(b"\0")
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:  # ended meanwhile (ProcessLookupError is one)
            continue
        if b"mmtrain.train" in command and f"RANK={rank}".encode() in environ:
            return int(entry.name)
    return None


def gone(pid: int) -> bool:
    """Whether process `pid` has ended (reaped, or a zombie waiting for it)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return True


def test_a_rank_that_stops_responding_fails_the_run_after_collective_timeout_s(tiny_assets, tmp_path):
    run = tmp_path / "run"
    config = write_config(tiny_config(tiny_assets, run, max_steps=100_000, log_every=1,
                                      collective_timeout_s=SILENT_TIMEOUT_S,
                                      deepspeed=str(REPO / "ds_configs" / "zero3.json")), tmp_path / "config.yaml")
    port = str(free_port())
    log = tmp_path / "launcher.log"
    with open(log, "w") as out:
        proc = subprocess.Popen(launcher_command(["-m", "mmtrain.train", str(config)], 2, "deepspeed", port),
                                cwd=REPO, env={**os.environ, "PYTHONPATH": str(REPO)}, stdout=out,
                                stderr=subprocess.STDOUT, start_new_session=True)
    frozen = None
    try:
        deadline = time.monotonic() + 300
        while max_logged_step(run) < 3:
            assert proc.poll() is None and time.monotonic() < deadline, log.read_text()[-6000:]
            time.sleep(0.1)
        frozen = rank_pid(proc.pid, 1)
        assert frozen, f"rank 1's process is not among the launcher's:\n{log.read_text()[-3000:]}"
        os.kill(frozen, signal.SIGSTOP)
        frozen_at, step_at_freeze = time.monotonic(), max_logged_step(run)
        code = proc.wait(timeout=SILENT_TIMEOUT_S + 240)
        ended_after = time.monotonic() - frozen_at
        deadline = time.monotonic() + 30
        while not gone(frozen) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert gone(frozen), "the frozen rank outlived its launcher"
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
        if frozen and not gone(frozen):
            os.kill(frozen, signal.SIGKILL)
        remove_shm_allreduce_buffers(port)
    output = log.read_text()
    assert code != 0, output[-6000:]
    # gloo's own words carry the timeout the process group was given: the config's value, in ms
    assert f"Timed out waiting {SILENT_TIMEOUT_S * 1000}ms" in output, output[-6000:]
    assert (f"rank 0: a collective waited collective_timeout_s = {SILENT_TIMEOUT_S} s for the other ranks"
            in output), output[-6000:]
    assert max_logged_step(run) <= step_at_freeze + 1  # nothing trained on without rank 1
    assert ended_after < SILENT_TIMEOUT_S + 120, ended_after
    print(f"\nrank 1 frozen at step {step_at_freeze}: rank 0 failed and the launcher exited {code} "
          f"{ended_after:.0f} s later (collective_timeout_s = {SILENT_TIMEOUT_S})")
