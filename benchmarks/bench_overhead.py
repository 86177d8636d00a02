"""What a training step spends outside the tower and the LLM, at LLaVA-1.5-7B's shapes, on this CPU.

The model has LLaVA-1.5-7B's widths with few layers so it fits here: a CLIP ViT-L/14-336-shaped tower
(1024 wide, 16 heads, 576 patch tokens at 336 px, penultimate layer, CLS dropped), LLaVA-1.5's MLP
projector, and a Llama-shaped LLM 4096 wide, 32 heads, FFN 11008 (random weights: the same work as
pretrained ones; the vocabulary is SmolLM2's, whose tokenizer it uses). Samples are real Tux Paint
pictures with ~100 tokens of real prose each, as LLaVA's instruction data has. The real trainer runs
(`mmtrain.engine.trainer.Trainer`, ZeRO-2, inline data loading); hooks time, in each step, the
tower's forward, the LLM's forward and its backward (until the gradient reaches the visual tokens).
Everything else is the overhead this reports as a share of the step, split into the projector's
forward and backward (with DeepSpeed's gradient hooks) and the rest (data loading, loss bookkeeping,
optimizer step, metrics). Since the LLM and tower are cut to a few layers and the projector is not,
the share is also given with the LLM's and tower's measured times scaled to their full depth.

    python benchmarks/bench_overhead.py [--layers 2] [--steps 6]

Writes benchmarks/results/overhead.json.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.common import environment, run_mmtrain, save_json, write_yaml  # noqa: E402

ASSETS = ["tuxpaint", "prose", "smollm2-135m"]
CLIP_L_336 = {"model_type": "clip_vision_model", "hidden_size": 1024, "intermediate_size": 4096,
              "num_attention_heads": 16, "image_size": 336, "patch_size": 14}
FULL_LLM_LAYERS, FULL_TOWER_LAYERS = 32, 24
LLAMA_7B = {"model_type": "llama", "hidden_size": 4096, "intermediate_size": 11008, "num_attention_heads": 32,
            "num_key_value_heads": 32, "max_position_embeddings": 4096, "rms_norm_eps": 1e-5}


def llava_manifest(workdir: Path) -> Path:
    """Each Tux Paint picture with a prose continuation as its conversation (~100 text tokens)."""
    from mmtrain.assets.registry import resolve_asset_reference

    out = workdir / "llava_like.jsonl"
    if out.is_file():
        return out
    pictures = Path(resolve_asset_reference("asset:tuxpaint/train.jsonl"))
    prose = Path(resolve_asset_reference("asset:prose/train.jsonl")).read_text().splitlines()
    lines = []
    for i, line in enumerate(pictures.read_text().splitlines()[:200]):
        record = json.loads(line)
        turns = json.loads(prose[i % len(prose)])["conversations"]
        lines.append(json.dumps({"id": f"llava-like-{i}", "image": str((pictures.parent / record["image"]).resolve()),
                                 "conversations": [{"from": "human", "value": "<image>\n" + turns[0]["value"]},
                                                   turns[1]]}))
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")
    return out


def config(workdir: Path, layers: int, vision_layers: int, steps: int, micro_batch: int) -> dict:
    from mmtrain.assets.registry import resolve_asset_reference

    tokenizer = resolve_asset_reference("asset:smollm2-135m")
    return {"deepspeed": str(REPO / "ds_configs" / "zero2.json"), "precision": "fp32", "seed": 0, "max_steps": steps,
            "log_every": 1, "progress_bar": False, "micro_batch_size": micro_batch, "output_dir": str(workdir / "run"),
            "model": {"vision": {"config": {**CLIP_L_336, "num_hidden_layers": vision_layers}, "trainable": "frozen",
                                 "feature_layer": -2, "drop_cls": True},
                      "resampler": {"kind": "identity"}, "projector": {"kind": "mlp"},
                      "llm": {"config": {**LLAMA_7B, "num_hidden_layers": layers, "vocab_size": 49152},
                              "tokenizer": tokenizer, "trainable": "frozen"}},
            "data": {"train": str(llava_manifest(workdir)), "template": "chatml", "max_length": 1024},
            "optim": {"lr": 2e-5, "warmup_steps": 1}, "checkpoint": {"save_every": 0, "resume": "never"}}


class StepTimer:
    """Times the tower's forward, the LLM's forward and the LLM's backward inside each training step."""

    def __init__(self, trainer) -> None:
        self.trainer = trainer
        self.current = {"tower_s": 0.0, "llm_forward_s": 0.0, "llm_backward_s": 0.0, "projector_forward_s": 0.0,
                        "projector_backward_s": 0.0}
        self.steps: list[dict] = []
        self._started: dict[str, float] = {}
        model = trainer.model
        for name, module in (("tower_s", model.vision), ("llm_forward_s", model.llm),
                             ("projector_forward_s", model.projector)):
            module.register_forward_pre_hook(lambda *_, key=name: self._start(key))
            module.register_forward_hook(lambda *_, key=name: self._stop(key))
        model.projector.register_forward_hook(self._watch_visual_gradient)
        backward = trainer.engine.backward

        def timed_backward(loss, *args, **kwargs):
            self._start("llm_backward_s")
            out = backward(loss, *args, **kwargs)
            self._stop("projector_backward_s")
            return out

        trainer.engine.backward = timed_backward

    def _start(self, key: str) -> None:
        self._started[key] = time.perf_counter()

    def _stop(self, key: str) -> None:
        self.current[key] += time.perf_counter() - self._started.pop(key)

    def _watch_visual_gradient(self, _module, _inputs, output) -> None:
        if output.requires_grad:  # the LLM's backward ends when the gradient reaches the visual tokens
            output.register_hook(self._visual_gradient_arrived)

    def _visual_gradient_arrived(self, _grad) -> None:
        self._stop("llm_backward_s")
        self._start("projector_backward_s")

    def handle(self, event) -> None:
        from mmtrain.engine.events import StepEnd

        if isinstance(event, StepEnd) and event.record:
            self.steps.append({**self.current, "step_s": event.record["step_time_s"],
                               "tokens": event.tokens, "samples": event.samples})
            self.current = dict.fromkeys(self.current, 0.0)

    def close(self) -> None:
        pass


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=2, help="LLM decoder layers (32 in LLaVA-1.5-7B)")
    parser.add_argument("--vision-layers", type=int, default=2, help="tower blocks (24 in CLIP ViT-L)")
    parser.add_argument("--steps", type=int, default=6)
    parser.add_argument("--skip", type=int, default=2)
    parser.add_argument("--micro-batch", type=int, default=2)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_overhead")
    args = parser.parse_args()
    run_mmtrain(["assets", "prepare", *ASSETS])
    import mmtrain.engine  # noqa: F401  (chooses the accelerator before DeepSpeed loads)
    from mmtrain.config import load_config
    from mmtrain.engine.trainer import Trainer

    path = write_yaml(config(args.workdir, args.layers, args.vision_layers, args.steps, args.micro_batch),
                      args.workdir / "config.yaml")
    trainer = Trainer(load_config(str(path)))
    timer = StepTimer(trainer)
    trainer.events.add(timer)
    trainer.fit()
    kept = timer.steps[args.skip:]
    rows = []
    depth_scale = FULL_LLM_LAYERS / args.layers, FULL_TOWER_LAYERS / args.vision_layers
    for s in kept:
        llm = s["llm_forward_s"] + s["llm_backward_s"]
        projector = s["projector_forward_s"] + s["projector_backward_s"]
        core = s["tower_s"] + llm
        rest = s["step_s"] - core - projector
        full_step = s["step_s"] + (depth_scale[0] - 1) * llm + (depth_scale[1] - 1) * s["tower_s"]
        rows.append({**s, "overhead_s": s["step_s"] - core, "overhead_share": 1 - core / s["step_s"],
                     "projector_share": projector / s["step_s"], "rest_s": rest, "rest_share": rest / s["step_s"],
                     "full_depth_overhead_share": (projector + rest) / full_step})
    share = statistics.median(r["overhead_share"] for r in rows)
    full_share = statistics.median(r["full_depth_overhead_share"] for r in rows)
    print(f"\n{'step s':>7} {'tower':>6} {'LLM fwd':>8} {'LLM bwd':>8} {'proj f+b':>8} {'rest':>6} {'share':>6} "
          f"{'of which proj':>13} {'tokens':>7}")
    for r in rows:
        print(f"{r['step_s']:>7.2f} {r['tower_s']:>6.2f} {r['llm_forward_s']:>8.2f} {r['llm_backward_s']:>8.2f} "
              f"{r['projector_forward_s'] + r['projector_backward_s']:>8.2f} {r['rest_s']:>6.2f} "
              f"{100 * r['overhead_share']:>5.1f}% {100 * r['projector_share']:>12.1f}% {r['tokens']:>7}")
    print(f"median share of the step outside the tower and the LLM: {100 * share:.1f}% at {args.layers} LLM / "
          f"{args.vision_layers} tower layers; {100 * full_share:.2f}% with the LLM and tower times scaled to "
          f"{FULL_LLM_LAYERS} / {FULL_TOWER_LAYERS} layers (goal <= 5%)")
    out = save_json({"command": "python benchmarks/bench_overhead.py " + " ".join(sys.argv[1:]),
                     "llm_layers": args.layers, "vision_layers": args.vision_layers, "micro_batch": args.micro_batch,
                     "steps": rows, "median_overhead_share": share, "median_full_depth_overhead_share": full_share,
                     "environment": environment()}, "overhead.json")
    print(f"results: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
