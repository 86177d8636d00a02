"""Per-rank memory under ZeRO-3 with 1 vs 2 ranks, a frozen real LLM dominating the model.

Default LLM: Qwen2.5-Coder-0.5B-Instruct (2.4 GiB of fp32 parameters), prepared offline by
`mmtrain.assets`; `--llm smollm2-135m` for a quicker run.

Runs mmtrain for a few steps under `deepspeed --num_gpus N` for N = 1 and 2 and reads each rank's
report (`ranks/rankK.json`): the bytes of the frozen LLM's parameters the rank holds (its ZeRO-3
partition plus the small tensors kept whole) and the process's peak RSS.

    python benchmarks/bench_zero3_memory.py        # table + benchmarks/results/zero3_memory.json
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, bench_config, environment, save_json, write_yaml  # noqa: E402


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--llm", default="qwen2.5-coder-0.5b", help="asset name (mmtrain.assets.ASSETS)")
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_zero3_memory")
    args = parser.parse_args()

    from mmtrain.assets import prepare

    llm_dir = prepare(args.llm)
    rows = []
    for ranks in (1, 2):
        work = args.workdir / f"ranks{ranks}"
        cfg = bench_config(args.workdir, llm_dir, ds_json="zero3.json", max_steps=args.steps, micro_batch_size=2)
        cfg["output_dir"] = str(work / "run")
        cfg_path = write_yaml(cfg, work / "config.yaml")
        deepspeed = str(Path(sys.executable).parent / "deepspeed")
        cmd = [deepspeed, "--num_gpus", str(ranks), "--master_port", str(free_port()), "--module", "mmtrain.train",
               str(cfg_path)]
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, env={**os.environ, "PYTHONPATH": str(REPO)})
        if proc.returncode != 0:
            sys.exit(f"{' '.join(cmd)} failed:\n{proc.stderr[-4000:]}")
        for rank in range(ranks):
            rep = json.loads((work / "run" / "ranks" / f"rank{rank}.json").read_text())
            llm = rep["parameters"]["llm"]
            rows.append({"ranks": ranks, "rank": rank, "llm_numel": llm["numel"], "llm_local_mib": llm["local_bytes"] / 2**20,
                         "model_local_mib": sum(c["local_bytes"] for c in rep["parameters"].values()) / 2**20,
                         "peak_rss_mib": rep["peak_rss_mib"], "rss_mib": rep.get("rss_mib"),
                         "pss_mib": rep.get("pss_mib")})
    one = [r for r in rows if r["ranks"] == 1][0]
    two = [r for r in rows if r["ranks"] == 2]
    report = {
        "benchmark": "ZeRO-3 per-rank memory, 1 vs 2 ranks", "date": time.strftime("%Y-%m-%d"),
        "environment": environment(), "setup": {"llm": f"{args.llm} (real, frozen, fp32)",
                                                "deepspeed": "ds_configs/zero3.json", "steps": args.steps},
        "rows": rows,
        "ratios": {"llm_params_per_rank_2_vs_1": max(r["llm_local_mib"] for r in two) / one["llm_local_mib"],
                   "peak_rss_per_rank_2_vs_1": max(r["peak_rss_mib"] for r in two) / one["peak_rss_mib"],
                   "pss_at_end_per_rank_2_vs_1": max(r["pss_mib"] for r in two) / one["pss_mib"]},
    }
    path = save_json(report, "zero3_memory.json")
    print(f"{'ranks':>5} {'rank':>4} {'LLM params held (MiB)':>22} {'all params held (MiB)':>22} "
          f"{'peak RSS':>9} {'RSS at end':>11} {'PSS at end':>11}")
    for r in rows:
        print(f"{r['ranks']:>5} {r['rank']:>4} {r['llm_local_mib']:>22.1f} {r['model_local_mib']:>22.1f} "
              f"{r['peak_rss_mib']:>9.0f} {r['rss_mib']:>11.0f} {r['pss_mib']:>11.0f}")
    print(f"\nLLM parameter memory per rank, 2 ranks / 1 rank: {report['ratios']['llm_params_per_rank_2_vs_1']:.3f}")
    print(f"peak RSS per rank, 2 ranks / 1 rank: {report['ratios']['peak_rss_per_rank_2_vs_1']:.3f}")
    print(f"PSS at the end per rank, 2 ranks / 1 rank: {report['ratios']['pss_at_end_per_rank_2_vs_1']:.3f}")
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
