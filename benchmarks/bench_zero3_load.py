"""Per-rank memory while 2 ranks load a sharded Llama-layout target under ZeRO-3 (a 70B target's load, scaled).

Two synthetic multi-shard targets with random bf16 weights and a 7B-like layer shape (the surrogate memory
benchmark's generator): ~2 GB and ~8.6 GB in ~1 GB shards. For each, 2 ranks under the `deepspeed`
launcher build the frozen LLM in bf16 inside ZeRO-3, two ways, one after the other:
- `from_pretrained`: Hugging Face's ZeRO-3 path (rank 0 reads every shard into one state dict, then
  hands each module's values over);
- `partitioned`: mmtrain's (`mmtrain.models.partitioned_load`: each rank reads only the rows
  covering its own partition), what `build_llm` does under ZeRO-3.
A thread in each rank samples its anonymous RSS (`RssAnon`) and PSS (`smaps_rollup`) every 50 ms; the
page cache of the mapped shards is not counted. Before each run the target's pages are evicted.
Goal: each rank's peak bounded by its partition plus one shard, not growing with the whole target.

    python benchmarks/bench_zero3_load.py [--scratch DIR] [--large-layers 20]
    # table + benchmarks/results/zero3_load.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_surrogate_memory import (  # noqa: E402
    add_target_arguments,
    evict,
    fresh_scratch,
    generate_target,
    machine,
)
from benchmarks.common import REPO, save_json  # noqa: E402

LOADERS = ("from_pretrained", "partitioned")
GIB = 2**30


def memory_now() -> dict[str, int]:
    """This process's anonymous RSS and PSS (total and anonymous), in bytes."""
    found = {}
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("RssAnon:"):
                found["rss_anon"] = int(line.split()[1]) * 1024
    with open("/proc/self/smaps_rollup") as rollup:
        for line in rollup:
            key = line.split(":")[0]
            if key in ("Pss", "Pss_Anon"):
                found[key.lower()] = int(line.split()[1]) * 1024
    return found


class PeakSampler(threading.Thread):
    """Samples memory_now() every `period` seconds and keeps each value's peak."""

    def __init__(self, period: float = 0.05) -> None:
        super().__init__(daemon=True)
        self.period, self.peak, self.stopped = period, {}, threading.Event()

    def run(self) -> None:
        while not self.stopped.is_set():
            for key, value in memory_now().items():
                self.peak[key] = max(self.peak.get(key, 0), value)
            time.sleep(self.period)

    def stop(self) -> dict[str, int]:
        self.stopped.set()
        self.join()
        return self.peak


def rank_worker(target: str, loader: str, out: str) -> None:
    """One rank: build the frozen LLM in ZeRO-3 with `loader`, write its peaks to `out`.RANK.json."""
    sampler = PeakSampler()
    sampler.start()
    import torch
    from transformers import AutoModelForCausalLM
    from transformers.integrations import HfDeepSpeedConfig

    from mmtrain.config import LLMConfig
    from mmtrain.engine.distributed import init_distributed
    from mmtrain.models.llm import build_llm

    dist = init_distributed()
    ds_config = {"train_micro_batch_size_per_gpu": 1, "bf16": {"enabled": True},
                 "zero_optimization": {"stage": 3, "stage3_param_persistence_threshold": 0}}
    keep = HfDeepSpeedConfig(ds_config)  # noqa: F841 (ZeRO-3 construction while it lives)
    before = memory_now()
    started = time.monotonic()
    if loader == "from_pretrained":
        model = AutoModelForCausalLM.from_pretrained(target, dtype=torch.bfloat16, attn_implementation="sdpa")
    else:
        model = build_llm(LLMConfig(name_or_path=target), "sdpa", torch.bfloat16).model
    wall = time.monotonic() - started
    peak = sampler.stop()
    local = sum(p.ds_tensor.numel() * p.ds_tensor.element_size() for p in model.parameters())
    total = sum(int(p.ds_numel) * p.ds_tensor.element_size() for p in model.parameters())
    Path(f"{out}.{dist.rank}.json").write_text(json.dumps({
        "rank": dist.rank, "loader": loader, "wall_s": wall, "partition_bytes": local, "model_bytes": total,
        "before": before, "peak": peak}))


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def measure(target: Path, loader: str, logs: Path) -> list[dict]:
    evict(target)
    out = logs / f"{target.name}-{loader}"
    cmd = [str(Path(sys.executable).parent / "deepspeed"), "--num_gpus", "2", "--master_port", str(free_port()),
           "--no_local_rank", __file__, "--rank-worker", str(target), loader, str(out)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    with open(out.with_suffix(".log"), "w") as log:
        proc = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT, env=env)
    if proc.returncode != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{out.with_suffix('.log').read_text()[-4000:]}")
    return [json.loads(Path(f"{out}.{rank}.json").read_text()) for rank in range(2)]


def table(rows: list[dict]) -> str:
    header = ("target", "loader", "rank", "partition GiB", "peak anon RSS GiB", "peak PSS GiB",
              "peak anon / (partition + shard)", "load s")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        bound = r["partition_bytes"] + r["largest_shard_bytes"]
        lines.append(f"| {r['target_gib']:.1f} GiB ({r['shards']} shards) | {r['loader']} | {r['rank']} | "
                     f"{r['partition_bytes'] / GIB:.2f} | {r['peak']['rss_anon'] / GIB:.2f} | "
                     f"{r['peak'].get('pss', 0) / GIB:.2f} | {r['peak']['rss_anon'] / bound:.2f} | {r['wall_s']:.0f} |")
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) == 5 and sys.argv[1] == "--rank-worker":
        rank_worker(*sys.argv[2:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser, Path("/tmp/mmtrain-bench-zero3-load"))
    args = parser.parse_args()
    logs = fresh_scratch(args.scratch)
    rows, targets = [], {}
    try:
        for size, layers in (("small", args.small_layers), ("large", args.large_layers)):
            target = args.scratch / f"target-{size}"
            info = generate_target(target, layers, args.shard_bytes)
            targets[size] = info
            print(f"generated {target}: {info['disk_bytes'] / GIB:.1f} GiB, {info['shards']} shards", flush=True)
            for loader in LOADERS:
                for r in measure(target, loader, logs):
                    rows.append({**r, "target": size, "target_gib": info["disk_bytes"] / GIB,
                                 "shards": info["shards"], "largest_shard_bytes": info["largest_shard_bytes"]})
                    print(f"  {loader} rank {r['rank']}: peak anon RSS {r['peak']['rss_anon'] / GIB:.2f} GiB, "
                          f"partition {r['partition_bytes'] / GIB:.2f} GiB, {r['wall_s']:.0f} s", flush=True)
            shutil.rmtree(target)
    finally:
        shutil.rmtree(args.scratch, ignore_errors=True)
    print()
    print(table(rows))
    path = save_json({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(), "targets": targets, "runs": rows, "table": table(rows).splitlines(),
        "notes": "peaks sampled every 50 ms in each rank (RssAnon; smaps_rollup Pss and Pss_Anon); target pages "
                 "evicted before each run; bf16 model inside ZeRO-3 (persistence threshold 0), 2 ranks on gloo",
    }, "zero3_load.json")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
