"""Numerical regression: a tiny seeded training run's per-step losses, pinned to stored values.

"Loss falls" tests let a silent numerical change through: a reordered init, a different loss
reduction, a changed LR schedule, a mask off by one. This test runs the tiny VLM (frozen CLIP tower
and Llama from the `tiny_assets` fixture, a trained Q-Former resampler + linear projector) for
`STEPS` optimizer steps as one process (`python -m mmtrain.train`, ZeRO-2, fp32, log_every 1) and
compares every step's `loss` in `<output_dir>/metrics.jsonl` with `regression_losses.json` next to
this file. Everything is fixed by seeds: the assets (fixture seeds), `model.init_seed`, the data
order and per-step RNG (`seed`); nothing depends on wall time.

Changed the numerics on purpose? Regenerate the stored values deliberately, then review the diff:

    MMTRAIN_UPDATE_REGRESSION=1 PYTHONPATH=. python -m pytest -q tests/integration/test_regression_losses.py

With the variable set the test rewrites the JSON file and then fails, saying so (an update run
never passes silently). Without it, a missing JSON file is a failure.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import REPO, tiny_config, write_config

EXPECTED_FILE = Path(__file__).with_name("regression_losses.json")
UPDATE_VARIABLE = "MMTRAIN_UPDATE_REGRESSION"
STEPS = 10
# Intra-op threads of the training process. Pinned so the result does not depend on the machine's
# core count; the tolerance below still covers a different thread count or CPU (see there).
THREADS = 2
# Tolerance per step: |actual - expected| <= ATOL + RTOL * |expected| (losses are ~6.1-6.2, so the
# bound is ~7e-6 absolute, ~15 float32 ulps). Measured with this run on an AMD EPYC (AVX-512), all
# 10 steps, relative to the stored 2-thread losses:
#   1 vs 2 intra-op threads (another reduction order):                 max 7.8e-8  (1 ulp, steps 3, 6)
#   AVX2-only kernels (ATEN_CPU_CAPABILITY=avx2, MKL_ENABLE_INSTRUCTIONS=AVX2, ONEDNN_MAX_CPU_ISA=AVX2):
#                                                                        max 7.8e-8
#   no SIMD (ATEN_CPU_CAPABILITY=default, MKL SSE4_2, oneDNN SSE41):    max 7.7e-8
#   same, assets also built without SIMD (their random init then differs by up to 2.4e-7):
#                                                                        max 7.8e-8
#   a second 2-thread run:                                               0 (bit-identical)
# RTOL = 1e-6 is ~13x the largest of these. Real changes it must catch, measured the same way:
# optim.lr 3e-3 -> 3.03e-3 (1 %) moves steps 2-10 by 6.7e-5..9.3e-5 relative; optim.eps
# 1e-8 -> 1e-6 by 3.1e-6..5.1e-6. The often-quoted rtol=1e-4 would let that 1 % LR change through.
RTOL = 1e-6
ATOL = 1e-6

# Everything that shapes the run, pinned here (not inherited from `tiny_config`'s defaults) so an
# edit elsewhere cannot silently change what the stored values mean. Stored with the losses too.
SETTINGS: dict[str, object] = {
    "deepspeed": "ds_configs/zero2.json",
    "precision": "fp32",
    "max_steps": STEPS,
    "seed": 0,
    "micro_batch_size": 4,
    "grad_accum_steps": 1,
    "grad_clip": 1.0,
    "log_every": 1,
    "eval_every": 0,
    "progress_bar": False,
    "model.init_seed": 0,
    "model.vision.trainable": "frozen",
    "model.resampler": {"kind": "qformer", "num_queries": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 4},
    "model.projector": {"kind": "linear"},
    "model.llm.trainable": "frozen",
    "data.template": "plain",
    "data.max_length": 64,
    "data.shuffle": True,
    "optim.name": "adamw",
    "optim.lr": 3e-3,
    "optim.betas": [0.9, 0.999],
    "optim.eps": 1e-8,
    "optim.weight_decay": 0.0,
    "optim.warmup_steps": 2,
    "optim.schedule": "cosine",
    "optim.min_lr_ratio": 0.1,
    "checkpoint.save_every": 0,
    "checkpoint.resume": "never",
}


def regression_config(assets, output_dir: Path) -> dict:
    overrides = dict(SETTINGS, deepspeed=str(REPO / SETTINGS["deepspeed"]))
    return tiny_config(assets, output_dir, **overrides)


def train_losses(assets, workdir: Path, threads: int = THREADS) -> list[tuple[int, float]]:
    """(step, loss) of every training record of one single-process run."""
    path = write_config(regression_config(assets, workdir / "run"), workdir / "config.yaml")
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-6000:]
    lines = (workdir / "run" / "metrics.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines if line.strip()]
    return [(r["step"], r["loss"]) for r in records if "loss" in r]


def _environment_note() -> dict[str, str]:
    import deepspeed
    import torch
    import transformers

    return {"python": platform.python_version(), "torch": torch.__version__, "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__, "machine": platform.machine(), "cpu": _cpu_model(),
            "threads": str(THREADS)}


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _write_expected(losses: list[tuple[int, float]]) -> None:
    payload = {
        "note": ("Per-step training losses of tests/integration/test_regression_losses.py: the tiny VLM from "
                 "tests/conftest.py's tiny_assets fixture (frozen CLIP tower + Llama, trained Q-Former resampler + "
                 "linear projector), one process via `python -m mmtrain.train`, ZeRO-2, fp32, with `settings`. "
                 f"Regenerate deliberately with {UPDATE_VARIABLE}=1 (see the test's docstring); "
                 "`produced_with` is informational only."),
        "produced_with": _environment_note(),
        "rtol": RTOL,
        "atol": ATOL,
        "settings": SETTINGS,
        # repr-exact floats: json writes the shortest string that round-trips the float64.
        "losses": [{"step": step, "loss": loss} for step, loss in losses],
    }
    EXPECTED_FILE.write_text(json.dumps(payload, indent=2) + "\n")


def _close(actual: float, expected: float) -> bool:
    return abs(actual - expected) <= ATOL + RTOL * abs(expected)


def test_training_losses_match_stored_values(tiny_assets, tmp_path):
    update = os.environ.get(UPDATE_VARIABLE) == "1"
    assert update or EXPECTED_FILE.exists(), (f"{EXPECTED_FILE} is missing: generate it deliberately with "
                                              f"{UPDATE_VARIABLE}=1 (see this test's docstring)")
    losses = train_losses(tiny_assets, tmp_path)
    assert [step for step, _ in losses] == list(range(1, STEPS + 1)), losses

    if update:
        _write_expected(losses)
        pytest.fail(f"{UPDATE_VARIABLE}=1: rewrote {EXPECTED_FILE} with {len(losses)} step losses; "
                    "review the diff, then rerun without the variable", pytrace=False)

    stored = json.loads(EXPECTED_FILE.read_text())
    assert stored.get("settings") == json.loads(json.dumps(SETTINGS)), (
        "the run's settings differ from those the stored losses were produced with; "
        f"if intended, regenerate with {UPDATE_VARIABLE}=1")
    expected = [(r["step"], r["loss"]) for r in stored["losses"]]
    assert [s for s, _ in expected] == [s for s, _ in losses]

    # Step 1's loss is taken before any update: it depends only on the initialisation and the data.
    (_, first), (_, first_expected) = losses[0], expected[0]
    assert _close(first, first_expected), (
        f"step 1 loss {first!r} != stored {first_expected!r} (rtol={RTOL}, atol={ATOL}): the initial model "
        "(assets, model.init_seed, resampler/projector init) or the first batch (data order, tokenisation, "
        "image preprocessing, loss masking) changed")

    bad = [(step, loss, want, abs(loss - want) / abs(want))
           for (step, loss), (_, want) in zip(losses, expected) if not _close(loss, want)]
    table = "\n".join(f"  step {s:2d}: got {got!r} expected {want!r} (rel {rel:.2e})" for s, got, want, rel in bad)
    assert not bad, (f"training losses drifted from {EXPECTED_FILE.name} (rtol={RTOL}, atol={ATOL}):\n{table}\n"
                     f"if the change is intended, regenerate with {UPDATE_VARIABLE}=1")
