"""Shared fixtures: tiny real models saved as Hugging Face folders, generated images, run configs.

Everything here is random-weight and tiny so the suite runs on a 2-core CPU; the models are saved
and reloaded through the same `from_pretrained` paths users take.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("DS_ACCELERATOR", "cpu")

TINY_LLM = dict(model_type="llama", vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128)
TINY_VISION = dict(model_type="clip_vision_model", hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                   num_attention_heads=4, image_size=32, patch_size=8)


@pytest.fixture(autouse=True)
def _restore_environment():
    """In-process runs set RANK/MASTER_PORT...; keep them from leaking into later tests' subprocesses."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def tiny_assets(tmp_path_factory) -> dict[str, Path]:
    """Generated captioned images + tokenizer + tiny CLIP tower and Llama saved as HF folders."""
    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    from mmtrain.data.synthetic import make_caption_dataset, make_tiny_tokenizer
    from mmtrain.models.vision import _default_processor

    root = tmp_path_factory.mktemp("tiny_assets")
    train = make_caption_dataset(root / "data", num_images=64, image_size=32, seed=0)
    texts = [line for line in (root / "data" / "train.jsonl").read_text().splitlines()]
    tokenizer_dir = make_tiny_tokenizer(texts, root / "tokenizer", vocab_size=512)
    torch.manual_seed(123)
    params = dict(TINY_VISION)
    vision = AutoModel.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    vision.save_pretrained(root / "vision")
    _default_processor(vision.config).save_pretrained(root / "vision")
    params = dict(TINY_LLM)
    llm = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    llm.save_pretrained(root / "llm")
    return {"root": root, "train": train, "val": root / "data" / "val.jsonl", "tokenizer": tokenizer_dir,
            "vision": root / "vision", "llm": root / "llm"}


def tiny_config(assets: dict[str, Path], output_dir: Path, **overrides) -> dict:
    """A run config (as a dict) for the tiny assets; `overrides` use dotted keys."""
    cfg = {
        "deepspeed": str(REPO / "ds_configs" / "zero2.json"),
        "output_dir": str(output_dir),
        "max_steps": 8,
        "seed": 0,
        "micro_batch_size": 4,
        "progress_bar": False,
        "model": {
            "vision": {"name_or_path": str(assets["vision"]), "trainable": "frozen"},
            "resampler": {"kind": "qformer", "num_queries": 4, "num_layers": 1, "hidden_size": 32, "num_heads": 4},
            "projector": {"kind": "linear"},
            "llm": {"name_or_path": str(assets["llm"]), "tokenizer": str(assets["tokenizer"]), "trainable": "frozen"},
        },
        "data": {"train": str(assets["train"]), "max_length": 64},
        "optim": {"lr": 3e-3, "warmup_steps": 2},
        "checkpoint": {"save_every": 4},
    }
    for dotted, value in overrides.items():
        node = cfg
        parts = dotted.split(".")
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return cfg


def write_config(cfg: dict, path: Path) -> Path:
    path.write_text(yaml.safe_dump(cfg))
    return path


def launcher_command(args: list[str], nprocs: int, launcher: str, port: str) -> list[str]:
    """The command line that starts `args` (a module or script plus its arguments) as `nprocs` local ranks
    under `launcher` (deepspeed or torchrun), meeting at `port`."""
    bindir = Path(sys.executable).parent
    if launcher == "deepspeed":
        cmd = [str(bindir / "deepspeed"), "--num_gpus", str(nprocs), "--master_port", port]
        return cmd + (["--module", *args[1:]] if args[0] == "-m" else args)
    if launcher == "torchrun":
        return [str(bindir / "torchrun"), "--nproc_per_node", str(nprocs), "--master_port", port, *args]
    raise ValueError(launcher)


def launch(args: list[str], nprocs: int, launcher: str = "deepspeed", timeout: int = 600,
           env: dict[str, str] | None = None, check: bool = True) -> subprocess.CompletedProcess:
    """Run `args` (a module or script plus its arguments) under the real multi-process launcher.

    A nonzero exit fails the test unless `check` is off (the caller then inspects the returned process);
    a run past `timeout` always does.
    """
    port = str(free_port())
    cmd = launcher_command(args, nprocs, launcher, port)
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    # Its own process group, so a timeout stops the ranks too (killing the launcher alone leaves
    # them spinning in a collective, loading the machine for every later test).
    with subprocess.Popen(cmd, cwd=REPO, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                          start_new_session=True) as popen:
        try:
            stdout, stderr = popen.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            os.killpg(popen.pid, signal.SIGKILL)
            stdout, stderr = popen.communicate()
            raise AssertionError(f"{' '.join(cmd)} timed out after {timeout} s; its process group was killed:\n"
                                 f"{stdout[-6000:]}\n{stderr[-6000:]}") from None
    from mmtrain.engine.distributed import remove_shm_allreduce_buffers

    remove_shm_allreduce_buffers(port)
    proc = subprocess.CompletedProcess(cmd, popen.returncode, stdout, stderr)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} failed ({proc.returncode}):\n{proc.stdout[-6000:]}\n{proc.stderr[-6000:]}")
    return proc
