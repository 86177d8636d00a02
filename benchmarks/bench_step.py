"""Training-step time: mmtrain vs a minimal hand-written PyTorch loop vs the Hugging Face Trainer.

All three train the same VLM (frozen real SmolLM2-135M, frozen ViT, trainable Q-Former resampler +
projector) on the same batches, fp32, one process. mmtrain and the HF Trainer drive the same
DeepSpeed JSON (ds_configs/zero2.json); the hand-written loop is plain PyTorch + torch AdamW.
The hand-written loop runs mmtrain's model code (target-only loss), so (a) isolates the engine's
overhead; the HF Trainer arm computes the loss as Hugging Face models do (full logits), as in the
LLaVA stack.
Each arm runs in its own process; rounds interleave the arms to spread machine noise.

    python benchmarks/bench_step.py                 # table + benchmarks/results/step.json
    python benchmarks/bench_step.py --steps 40 --rounds 4

Step time = wall time from fetching a batch to the end of the optimizer step, over all steps after
the first `--skip` of each run. This machine is shared: other tenants' load bursts only ever add
time, so the 25th percentile (p25) is reported beside the median as the less disturbed estimate.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import REPO, bench_config, environment, save_json, summarize, write_yaml  # noqa: E402

ARMS = ("mmtrain", "torch_loop", "hf_trainer")


def run_mmtrain(cfg_path: Path) -> list[float]:
    import mmtrain.engine  # noqa: F401
    from mmtrain.config import load_config
    from mmtrain.engine.metrics import read_metrics
    from mmtrain.engine.trainer import Trainer

    cfg = load_config(cfg_path)
    Trainer(cfg).fit()
    return [m["step_time_s"] for m in read_metrics(cfg.output_dir)]


def run_torch_loop(cfg_path: Path) -> list[float]:
    import torch
    from torch.utils.data import DataLoader

    from mmtrain.config import load_config
    from mmtrain.data import Collator, StepSampler, VLMDataset
    from mmtrain.engine.optim import build_param_groups, lr_factor
    from mmtrain.models import build_vlm

    cfg = load_config(cfg_path)
    model, tokenizer, _ = build_vlm(cfg.model)
    dataset = VLMDataset.for_model(cfg.data.train, model, tokenizer, cfg.data)
    loader = DataLoader(dataset, batch_sampler=StepSampler(len(dataset), cfg.micro_batch_size, 0, 1, cfg.seed),
                        collate_fn=Collator(tokenizer.pad_token_id))
    optimizer = torch.optim.AdamW(build_param_groups(model, cfg.optim), betas=cfg.optim.betas, eps=cfg.optim.eps)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, cfg.optim, cfg.max_steps))
    trainable = [p for p in model.parameters() if p.requires_grad]
    model.train()
    batches = iter(loader)
    times = []
    for _ in range(cfg.max_steps):
        t0 = time.perf_counter()
        batch = next(batches)
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, cfg.grad_clip)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
    return times


def run_hf_trainer(cfg_path: Path) -> list[float]:
    import mmtrain.engine  # noqa: F401
    from torch.utils.data import DataLoader
    from transformers import Trainer, TrainerCallback, TrainingArguments

    from mmtrain.config import load_config
    from mmtrain.data import Collator, StepSampler, VLMDataset
    from mmtrain.engine.ds_config import load_ds_json
    from mmtrain.models import build_vlm

    cfg = load_config(cfg_path)
    for key, value in {"RANK": "0", "WORLD_SIZE": "1", "LOCAL_RANK": "0", "MASTER_ADDR": "127.0.0.1",
                       "MASTER_PORT": str(29500 + os.getpid() % 1000)}.items():
        os.environ.setdefault(key, value)
    ds = load_ds_json(cfg.deepspeed)
    # The same JSON; only mmtrain's own "auto" (torch AdamW on CPU) is resolved, HF fills the rest.
    ds["optimizer"]["params"]["torch_adam"] = os.environ.get("DS_ACCELERATOR") == "cpu"
    model, tokenizer, _ = build_vlm(cfg.model)
    # HF fills the bucket-size "auto"s from `model.config.hidden_size` (as LLaVA's model class has).
    model.config = model.llm.model.config
    # The stack LLaVA users run computes the loss from full [B, T, vocab] logits (Hugging Face's
    # loss); mmtrain's target-only loss is part of what is being compared.
    model.llm.target_only_loss = False
    dataset = VLMDataset.for_model(cfg.data.train, model, tokenizer, cfg.data)
    times: list[float] = []

    class StepTimer(TrainerCallback):
        last = None

        def on_step_end(self, args, state, control, **kwargs):
            now = time.perf_counter()
            if self.last is not None:
                times.append(now - self.last)
            self.last = now

        def on_train_begin(self, args, state, control, **kwargs):
            self.last = time.perf_counter()

    args = TrainingArguments(
        output_dir=str(Path(cfg.output_dir) / "hf"), per_device_train_batch_size=cfg.micro_batch_size,
        max_steps=cfg.max_steps, learning_rate=cfg.optim.lr, warmup_steps=cfg.optim.warmup_steps,
        lr_scheduler_type="cosine", weight_decay=cfg.optim.weight_decay, max_grad_norm=cfg.grad_clip,
        logging_steps=1, save_strategy="no", report_to=[], remove_unused_columns=False,
        dataloader_num_workers=0, deepspeed=ds, disable_tqdm=True, seed=cfg.seed,
    )
    class SameBatchesTrainer(Trainer):
        """Feeds the exact batches the other arms see (same sampler, same collate)."""

        def get_train_dataloader(self):
            return DataLoader(dataset, batch_sampler=StepSampler(len(dataset), cfg.micro_batch_size, 0, 1, cfg.seed),
                              collate_fn=Collator(tokenizer.pad_token_id))

    trainer = SameBatchesTrainer(model=model, args=args, train_dataset=dataset,
                                 data_collator=Collator(tokenizer.pad_token_id), callbacks=[StepTimer()])
    trainer.train()
    return times


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=25)
    parser.add_argument("--skip", type=int, default=3, help="first steps of each run left out (warm-up)")
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "bench_step")
    parser.add_argument("--arm", choices=ARMS, help=argparse.SUPPRESS)
    parser.add_argument("--config", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.arm:  # child process: one arm, one run
        times = {"mmtrain": run_mmtrain, "torch_loop": run_torch_loop, "hf_trainer": run_hf_trainer}[args.arm](args.config)
        args.result.write_text(json.dumps(times))
        return

    from mmtrain.assets import prepare

    llm_dir = prepare("smollm2-135m")
    per_arm: dict[str, list[float]] = {arm: [] for arm in ARMS}
    for rnd in range(args.rounds):
        for arm in ARMS[rnd % len(ARMS):] + ARMS[:rnd % len(ARMS)]:  # rotate the order: no arm always first
            work = args.workdir / f"{arm}_{rnd}"
            cfg_path = write_yaml(bench_config(args.workdir, llm_dir, max_steps=args.steps) | {"output_dir": str(work)},
                                  work / "config.yaml")
            result = work / "times.json"
            proc = subprocess.run([sys.executable, __file__, "--arm", arm, "--config", str(cfg_path), "--result",
                                   str(result)], cwd=REPO, capture_output=True, text=True)
            if proc.returncode != 0:
                sys.exit(f"arm {arm} failed:\n{proc.stderr[-4000:]}")
            times = json.loads(result.read_text())
            per_arm[arm].extend(times[args.skip:])
            print(f"round {rnd} {arm:<11} median step {statistics.median(times[args.skip:]):.3f} s", flush=True)
    stats = {arm: summarize(t, 0) for arm, t in per_arm.items()}
    base = stats["mmtrain"]["median_s"]
    base_p25 = stats["mmtrain"]["p25_s"]
    report = {
        "benchmark": "train step: mmtrain vs hand-written torch loop vs HF Trainer (same DeepSpeed JSON)",
        "date": time.strftime("%Y-%m-%d"), "environment": environment(),
        "setup": {"llm": "SmolLM2-135M-Instruct (real, frozen)", "micro_batch_size": 4, "precision": "fp32",
                  "deepspeed": "ds_configs/zero2.json", "steps": args.steps, "skip": args.skip, "rounds": args.rounds},
        "arms": stats,
        "ratios": {"mmtrain_vs_torch_loop": base / stats["torch_loop"]["median_s"],
                   "mmtrain_vs_hf_trainer": base / stats["hf_trainer"]["median_s"],
                   "mmtrain_vs_torch_loop_p25": base_p25 / stats["torch_loop"]["p25_s"],
                   "mmtrain_vs_hf_trainer_p25": base_p25 / stats["hf_trainer"]["p25_s"]},
    }
    path = save_json(report, "step.json")
    print(f"\n{'arm':<12} {'median step (s)':>16} {'mmtrain / arm':>14} {'p25 step (s)':>13} {'mmtrain / arm':>14}")
    for arm, s in stats.items():
        print(f"{arm:<12} {s['median_s']:>16.3f} {base / s['median_s']:>14.3f} {s['p25_s']:>13.3f} "
              f"{base_p25 / s['p25_s']:>14.3f}")
    print(f"\nwrote {path}")


if __name__ == "__main__":
    main()
