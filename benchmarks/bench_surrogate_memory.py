"""Peak memory of the streamed surrogate build vs the size of the target checkpoint.

Generates two synthetic Llama-layout checkpoints with random bf16 weights and a 7B-like layer shape
(hidden 4096, intermediate 11008, 32 heads, vocab 32000), differing only in their number of layers:
a small one (~2 GB) and a large one (>= 8 GB in ~1 GB shards, so the target is several times larger
than any shard). Each is written shard by shard, tensor chunk by tensor chunk, so the generator stays
small. For each, `python -m mmtrain surrogate build TARGET --cut K --out DIR` runs in a fresh
subprocess; its peak RSS comes from wait4() on that process alone, started by a minimal forking
wrapper so that the benchmark's own memory does not leak into the number. For the small target the
naive in-memory build (safetensors.torch.load_file every shard into one dict, rename, save_file) runs the
same way for contrast. Before each run the target's pages are dropped from the page cache
(posix_fadvise DONTNEED on its files only), so reads come from disk.

    python benchmarks/bench_surrogate_memory.py [--scratch DIR] [--keep]
    # table + benchmarks/results/surrogate_memory.json
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, save_json  # noqa: E402
from mmtrain.methods.grafting.stream import encode_header, read_header  # noqa: E402

HIDDEN, INTERMEDIATE, HEADS, VOCAB = 4096, 11008, 32, 32000
GEN_CHUNK = 16 * 2**20

NAIVE = """
import json, re, sys
from pathlib import Path
from safetensors.torch import load_file, save_file
target, out, cut = Path(sys.argv[1]), Path(sys.argv[2]), int(sys.argv[3])
config = json.loads((target / "config.json").read_text())
total = config["num_hidden_layers"]
index = json.loads((target / "model.safetensors.index.json").read_text())
tensors = {}
for shard in sorted(set(index["weight_map"].values())):
    tensors.update(load_file(target / shard))
keep = {**{i: i for i in range(cut + 1)}, total - 1: cut + 1}
renamed = {}
for name, tensor in tensors.items():
    match = re.match(r"model\\.layers\\.(\\d+)\\.(.+)", name)
    if match is None:
        renamed[name] = tensor
    elif int(match.group(1)) in keep:
        renamed[f"model.layers.{keep[int(match.group(1))]}.{match.group(2)}"] = tensor
out.mkdir()
save_file(renamed, out / "model.safetensors", metadata={"format": "pt"})
(out / "config.json").write_text(json.dumps({**config, "num_hidden_layers": cut + 2}))
"""


MEASURE = """
import json, os, sys, time
start = time.monotonic()
pid = os.fork()
if pid == 0:
    os.execv(sys.argv[2], sys.argv[2:])
_, status, usage = os.wait4(pid, 0)
with open(sys.argv[1], "w") as report:
    json.dump({"exit_code": os.waitstatus_to_exitcode(status), "wall_s": time.monotonic() - start,
               "peak_rss_bytes": usage.ru_maxrss * 1024, "user_s": usage.ru_utime, "sys_s": usage.ru_stime,
               "disk_read_bytes": usage.ru_inblock * 512, "disk_write_bytes": usage.ru_oublock * 512}, report)
"""


def tensor_shapes(num_layers: int) -> list[tuple[str, tuple[int, ...]]]:
    """(name, shape) of a Llama-7B-like checkpoint with `num_layers` layers, in save order."""
    shapes = [("model.embed_tokens.weight", (VOCAB, HIDDEN))]
    for i in range(num_layers):
        p = f"model.layers.{i}."
        shapes += [(p + "input_layernorm.weight", (HIDDEN,)),
                   (p + "self_attn.q_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.k_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "self_attn.v_proj.weight", (HIDDEN, HIDDEN)), (p + "self_attn.o_proj.weight", (HIDDEN, HIDDEN)),
                   (p + "post_attention_layernorm.weight", (HIDDEN,)),
                   (p + "mlp.gate_proj.weight", (INTERMEDIATE, HIDDEN)), (p + "mlp.up_proj.weight", (INTERMEDIATE, HIDDEN)),
                   (p + "mlp.down_proj.weight", (HIDDEN, INTERMEDIATE))]
    return shapes + [("model.norm.weight", (HIDDEN,)), ("lm_head.weight", (VOCAB, HIDDEN))]


def group_shards(shapes: list[tuple[str, tuple[int, ...]]], shard_bytes: int) -> list[list[tuple[str, tuple[int, ...]]]]:
    shards: list[list[tuple[str, tuple[int, ...]]]] = [[]]
    size = 0
    for name, shape in shapes:
        nbytes = 2 * math.prod(shape)
        if shards[-1] and size + nbytes > shard_bytes:
            shards.append([])
            size = 0
        shards[-1].append((name, shape))
        size += nbytes
    return shards


def write_random_shard(path: Path, tensors: list[tuple[str, tuple[int, ...]]], seed: int) -> None:
    import torch

    generator = torch.Generator().manual_seed(seed)
    with open(path, "wb") as handle:
        handle.write(encode_header((name, "BF16", shape, 2 * math.prod(shape)) for name, shape in tensors))
        for _, shape in tensors:
            remaining = math.prod(shape)
            while remaining:
                n = min(remaining, GEN_CHUNK)
                chunk = torch.randn(n, dtype=torch.bfloat16, generator=generator).mul_(0.02)
                handle.write(chunk.view(torch.uint8).numpy())
                remaining -= n
        handle.flush()
        os.fsync(handle.fileno())


def generate_target(folder: Path, num_layers: int, shard_bytes: int) -> dict:
    """A synthetic sharded Llama checkpoint (config, index, shards); returns its description."""
    start = time.monotonic()
    folder.mkdir(parents=True)
    shards = group_shards(tensor_shapes(num_layers), shard_bytes)
    names = [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    for seed, (name, tensors) in enumerate(zip(names, shards)):
        write_random_shard(folder / name, tensors, seed)
    weight_map = {tensor: name for name, shard in zip(names, shards) for tensor, _ in shard}
    sizes = [2 * math.prod(shape) for shard in shards for _, shape in shard]
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {"total_size": sum(sizes)}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_size": HIDDEN,
              "intermediate_size": INTERMEDIATE, "num_attention_heads": HEADS, "num_key_value_heads": HEADS,
              "num_hidden_layers": num_layers, "vocab_size": VOCAB, "max_position_embeddings": 4096,
              "rms_norm_eps": 1e-5, "hidden_act": "silu", "tie_word_embeddings": False, "dtype": "bfloat16"}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    (folder / "generation_config.json").write_text(json.dumps({"bos_token_id": 1, "eos_token_id": 2}))
    return {"layers": num_layers, "shards": len(shards), "disk_bytes": folder_bytes(folder),
            "largest_tensor_bytes": max(sizes), "largest_shard_bytes": max((folder / n).stat().st_size for n in names),
            "generate_s": time.monotonic() - start}


def add_target_arguments(parser: argparse.ArgumentParser, scratch: Path) -> None:
    """--scratch and the two synthetic targets' sizes, shared by the benchmarks that generate them."""
    parser.add_argument("--scratch", type=Path, default=scratch)
    parser.add_argument("--small-layers", type=int, default=4, help="layers of the small target (~2 GB)")
    parser.add_argument("--large-layers", type=int, default=20, help="layers of the large target (>= 8 GB)")
    parser.add_argument("--shard-bytes", type=int, default=10**9, help="largest shard of the generated targets")


def fresh_scratch(scratch: Path) -> Path:
    """Create `scratch` (refusing one that exists) and its logs folder; returns the logs folder."""
    if scratch.exists():
        sys.exit(f"{scratch} exists; remove it or pass another --scratch")
    logs = scratch / "logs"
    logs.mkdir(parents=True)
    return logs


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


def evict(folder: Path) -> None:
    """Drop the folder's files from the page cache (this process's files only, not the whole machine's)."""
    for path in folder.iterdir():
        if path.is_file():
            fd = os.open(path, os.O_RDONLY)
            try:
                os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
            finally:
                os.close(fd)


def run_measured(cmd: list[str], log: Path) -> dict:
    """Run `cmd` under a minimal forking wrapper; wall time and, from wait4() on the command alone, peak RSS.

    The wrapper keeps this (torch-importing) process's memory out of the number: on Linux a child's
    ru_maxrss starts from the RSS of the process it was forked from.
    """
    report = log.with_suffix(".json")
    with open(log, "w") as out:
        proc = subprocess.run([sys.executable, "-S", "-c", MEASURE, str(report), *cmd], cwd=REPO, stdout=out,
                              stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(REPO)})
    result = json.loads(report.read_text()) if report.is_file() else {}
    if proc.returncode != 0 or result.get("exit_code") != 0:
        sys.exit(f"{' '.join(cmd)} failed:\n{log.read_text()[-4000:]}")
    return {"command": cmd, **result, "output": log.read_text()}


def surrogate_tensor_bytes(out: Path) -> int:
    return sum(t.nbytes for path in out.glob("*.safetensors") for t in read_header(path).tensors.values())


def measure(method: str, target: Path, info: dict, cut: int, out: Path, logs: Path) -> dict:
    evict(target)
    if method == "streaming":
        cmd = [sys.executable, "-m", "mmtrain", "surrogate", "build", str(target), "--cut", str(cut), "--out", str(out)]
    else:
        cmd = [sys.executable, "-c", NAIVE, str(target), str(out), str(cut)]
    result = run_measured(cmd, logs / f"{target.name}-{method}.log")
    result.update(method=method, target_layers=info["layers"], target_disk_bytes=info["disk_bytes"],
                  target_shards=info["shards"], largest_tensor_bytes=info["largest_tensor_bytes"], cut=cut,
                  surrogate_layers=cut + 2, surrogate_disk_bytes=folder_bytes(out),
                  surrogate_files=len([p for p in out.iterdir() if p.suffix == ".safetensors"]),
                  bytes_read=surrogate_tensor_bytes(out), bytes_written=folder_bytes(out))
    result["peak_rss_over_target"] = result["peak_rss_bytes"] / info["disk_bytes"]
    return result


def baseline(logs: Path) -> dict:
    """The same command's interpreter and imports alone (`--help`), for scale."""
    cmd = [sys.executable, "-m", "mmtrain", "surrogate", "build", "--help"]
    return run_measured(cmd, logs / "baseline.log")


def machine() -> dict:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    return {"node": platform.node(), "platform": platform.platform(), "python": platform.python_version(),
            "cpus": os.cpu_count(), "mem_total": meminfo["MemTotal"].strip()}


def gb(nbytes: int) -> str:
    return f"{nbytes / 1e9:.2f} GB"


def mb(nbytes: int) -> str:
    return f"{nbytes / 2**20:.0f} MiB"


def table(rows: list[dict], base: dict) -> str:
    header = ("target on disk", "layers", "shards", "largest tensor", "method", "cut", "surrogate", "peak RSS",
              "RSS/target", "wall s")
    lines = [header]
    for r in rows:
        lines.append((gb(r["target_disk_bytes"]), str(r["target_layers"]), str(r["target_shards"]),
                      mb(r["largest_tensor_bytes"]), r["method"], str(r["cut"]),
                      f"{gb(r['surrogate_disk_bytes'])} ({r['surrogate_layers']} layers)", mb(r["peak_rss_bytes"]),
                      f"{r['peak_rss_over_target']:.3f}", f"{r['wall_s']:.1f}"))
    widths = [max(len(line[i]) for line in lines) for i in range(len(header))]
    text = ["  ".join(cell.ljust(w) for cell, w in zip(line, widths)) for line in lines]
    text.insert(1, "  ".join("-" * w for w in widths))
    text.append(f"(interpreter + imports alone, `mmtrain surrogate build --help`: peak RSS {mb(base['peak_rss_bytes'])})")
    return "\n".join(text)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_target_arguments(parser, Path("/tmp/mmtrain-bench-surrogate"))
    parser.add_argument("--keep", action="store_true", help="keep the generated checkpoints and surrogates")
    args = parser.parse_args()

    logs = fresh_scratch(args.scratch)
    rows, targets = [], {}
    try:
        base = baseline(logs)
        for size, layers in (("small", args.small_layers), ("large", args.large_layers)):
            target = args.scratch / f"target-{size}"
            info = generate_target(target, layers, args.shard_bytes)
            targets[size] = info
            print(f"generated {target}: {gb(info['disk_bytes'])}, {info['shards']} shards, "
                  f"in {info['generate_s']:.0f} s", flush=True)
            cut = max(1, layers // 2 - 1)
            methods = ("streaming", "naive in-memory") if size == "small" else ("streaming",)
            for method in methods:
                out = args.scratch / f"surrogate-{size}-{method.split()[0]}"
                rows.append({"size": size, **measure(method, target, info, cut, out, logs)})
                print(f"  {method}: peak RSS {mb(rows[-1]['peak_rss_bytes'])}, {rows[-1]['wall_s']:.1f} s", flush=True)
                if not args.keep:
                    shutil.rmtree(out)
            if not args.keep:
                shutil.rmtree(target)
    finally:
        if not args.keep:
            shutil.rmtree(args.scratch, ignore_errors=True)

    print()
    print(table(rows, base))
    path = save_json({
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "machine": machine(),
        "notes": "peak RSS from wait4() on each build process alone (ru_maxrss); target files evicted from the "
                 "page cache before each run; bytes_read = tensor bytes copied, bytes_written = surrogate folder size",
        "baseline_help": {k: base[k] for k in ("peak_rss_bytes", "wall_s")},
        "targets": targets,
        "runs": [{k: v for k, v in r.items() if k != "output"} | {"summary": r["output"].strip().splitlines()}
                 for r in rows],
        "table": table(rows, base).splitlines(),
    }, "surrogate_memory.json")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
