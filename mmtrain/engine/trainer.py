"""The training loop: build the VLM, wrap it in a DeepSpeed engine, train, log, checkpoint, resume.

Launch (from the repository root; the same config runs under every launcher):
    python -m mmtrain.train configs/tiny.yaml                               # one process
    deepspeed --num_gpus 2 --module mmtrain.train configs/tiny.yaml         # DeepSpeed launcher
    torchrun --nproc_per_node 2 -m mmtrain.train configs/tiny.yaml          # torchrun
    srun -n 2 python -m mmtrain.train configs/tiny.yaml                     # SLURM

Data order and randomness are functions of (seed, global step, rank), so a resumed run sees the
same batches and dropout masks as an uninterrupted one.
"""

from __future__ import annotations

import logging
import os
import platform
import socket
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

import mmtrain
from mmtrain.config import RunConfig, dump_config, to_dict
from mmtrain.config.errors import ConfigError
from mmtrain.config.paths import RunDir
from mmtrain.data import Collator, VLMDataset
from mmtrain.engine.accelerator import on_cpu
from mmtrain.engine.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from mmtrain.engine.evaluate import validation_loss
from mmtrain.engine.events import (
    CheckpointSaved,
    EvaluationEnd,
    EventBus,
    EventSink,
    FirstBatch,
    LoopStart,
    ProcessEnd,
    ProcessStart,
    StepEnd,
)
from mmtrain.engine.metrics import MetricsLog, local_parameter_report, peak_memory
from mmtrain.engine.optim import build_optimizer_args, build_param_groups, lr_factor, scheduler_factory
from mmtrain.engine.feature_cache import prepare_feature_cache
from mmtrain.engine.loader import build_loader, build_sampler, check_packing_support
from mmtrain.engine.placement import build_placed_vlm, plan
from mmtrain.engine.preemption import StopRequest
from mmtrain.engine.tensorboard import TensorBoardSink
from mmtrain.models import format_parameter_table, parameter_table
from mmtrain.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("mmtrain")


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


class Trainer:
    """One training run described by a RunConfig; `fit()` trains to `max_steps` (or `stop_after_steps`)."""

    def __init__(self, cfg: RunConfig, stop_request: StopRequest | None = None,
                 sinks: list[EventSink] | None = None) -> None:
        """Build everything and resume.

        Args:
            stop_request: one installed earlier by the caller, so that a stop signal arriving during
                start-up is not lost (default: installed here).
            sinks: listeners to the loop's events besides the metrics file and TensorBoard (the
                cost ledger's recorder, attached by the command that starts training).
        """
        self.cfg = cfg
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()
        self._eval_seconds = 0.0
        self._eval_cpu_seconds = 0.0
        self._compute_before = self._cpu_before = 0.0  # earlier invocations' (a resumed run)
        self.stop_request = stop_request or StopRequest().install()  # a scheduler's warning: checkpoint, exit
        self.stopped_by_signal = False
        self.step = 0
        self.events = EventBus(sinks)
        self.run_dir = RunDir(cfg.output_dir)
        self.output_dir = self.run_dir.root
        self.placement = plan(cfg, "train")
        self.dist = self.placement.dist
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        _configure_logging(self.is_main)
        self.metrics = MetricsLog(self.output_dir, self.is_main)
        self.events.add(self.metrics)
        self.events.add(TensorBoardSink(self.run_dir.tensorboard, cfg.logging.tensorboard and self.is_main))
        self.events.emit(ProcessStart(kind="train", rank=self.rank, world_size=self.world_size,
                                      output_dir=str(self.output_dir)))
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.run_dir.config)
        self.ds_config = self.placement.ds_config
        self.zero_stage = self.placement.zero_stage

        model = build_placed_vlm(self.placement, cfg, self.output_dir)
        self.tokenizer, self.attn_implementation = self.placement.tokenizer, self.placement.attn_implementation
        if cfg.gradient_checkpointing:
            model.llm.enable_gradient_checkpointing()
            model.keep_llm_in_train_mode = True
        self.param_rows = parameter_table(model)
        table = format_parameter_table(self.param_rows)
        log.info("parameters:\n%s", table)

        self.dataset, self.collator = self._build_data(model)
        groups = build_param_groups(model, cfg.optim)
        self.placement.wrap(model, lr_scheduler=scheduler_factory(cfg.optim, cfg.max_steps),
                            **build_optimizer_args(groups, cfg.optim))
        self.engine, self.optimizer, self.scheduler = (self.placement.engine, self.placement.optimizer,
                                                       self.placement.scheduler)
        self.model = self.engine.module
        if cfg.data.feature_cache:
            datasets = [self.dataset] + ([self.val_dataset] if self.val_dataset is not None else [])
            prepare_feature_cache(cfg.data.feature_cache, self.model, cfg.model.vision, datasets,
                                  cfg.micro_batch_size, self.engine.device)
        self.start_step = 0
        self.samples_seen = 0
        self.tokens_seen = 0
        resume_from = resolve_resume(cfg.checkpoint.resume, self.output_dir)
        if resume_from is None:
            self.metrics.truncate_after(0)  # a fresh start: earlier records in this folder are void
        else:
            state = load_checkpoint(self.engine, resume_from)
            self.start_step = int(state["global_step"])
            self.samples_seen = int(state.get("samples_seen", 0))
            self.tokens_seen = int(state.get("tokens_seen", 0))
            self._compute_before = float(state.get("compute_s", 0.0))
            self._cpu_before = float(state.get("cpu_s", 0.0))
            self.metrics.truncate_after(self.start_step)
            log.info("resumed from %s at step %d", resume_from, self.start_step)
        if self.is_main:
            atomic_write_text(self.run_dir.params, table + "\n")
            atomic_write_json(self.run_dir.run_info, self._run_info(resume_from))
        self.step = self.start_step

    # ------------------------------------------------------------------ data
    def _build_data(self, model):
        cfg = self.cfg
        if not cfg.data.train:
            raise ConfigError("data.train: set the training manifest (a JSONL file, or a list of them)")
        def dataset_for(manifest: str, subset: int | None) -> VLMDataset:
            return VLMDataset.for_model(manifest, model, self.tokenizer, cfg.data, self.run_dir.skipped,
                                        subset=subset, seed=cfg.seed)

        if cfg.data.packing:
            check_packing_support(model)
        self.val_dataset = dataset_for(cfg.data.val, cfg.data.val_samples) if cfg.data.val else None
        return dataset_for(cfg.data.train, cfg.data.train_samples), Collator(self.tokenizer.pad_token_id,
                                                                             packing=cfg.data.packing)

    def _loader(self, start_batch: int):
        cfg = self.cfg
        self.sampler = build_sampler(self.dataset, cfg.data, cfg.micro_batch_size, self.rank, self.world_size,
                                     cfg.seed, start_batch)
        return build_loader(self.dataset, self.sampler, self.collator, cfg.data, on_gpu=not on_cpu())

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until max_steps (or stop_after_steps, or a stop signal); returns the last logged record.

        Every rank emits `ProcessEnd` (the ledger's `process_end`), also when training fails.
        """
        outcome = "failed"
        try:
            record = self._fit()
            outcome = ("preempted" if self.stopped_by_signal
                       else "completed" if self.step >= self.cfg.max_steps else "stopped")
            return record
        finally:
            self.stop_request.uninstall()
            self.events.emit(ProcessEnd(outcome=outcome, signal=self.stop_request.name or None,
                                        max_steps=self.cfg.max_steps, precision=self.cfg.precision,
                                        zero_stage=self.zero_stage, memory=peak_memory()))
            self.events.close()

    def _fit(self) -> dict[str, Any]:
        # heavy; imported where used, once the accelerator is chosen
        import deepspeed.comm as dist

        cfg = self.cfg
        gas = cfg.grad_accum_steps
        end = cfg.max_steps if cfg.stop_after_steps is None else min(cfg.max_steps, cfg.stop_after_steps)
        batches = iter(self._loader(self.start_step * gas))
        device = self.engine.device
        self.engine.train()
        bar = tqdm(total=cfg.max_steps, initial=self.start_step, disable=not (self.is_main and cfg.progress_bar),
                   desc="train", dynamic_ncols=True, file=sys.stderr)
        record: dict[str, Any] = {}
        last_saved = self.start_step
        step = self.start_step
        first_batch = True
        self.events.emit(LoopStart(step=step, engine=self.engine, gradient_checkpointing=cfg.gradient_checkpointing))
        while step < end:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            tokens = 0
            positions = 0
            samples = 0
            images = 0
            lrs_used = self._group_lrs() if (step + 1) % cfg.log_every == 0 or step + 1 == end else None
            for micro in range(gas):
                batch = next(batches)
                tokens += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
                positions += batch["attention_mask"].numel()
                samples += int(batch["has_image"].shape[0])
                images += int(batch["has_image"].sum())
                if first_batch:
                    self.events.emit(FirstBatch(batch=batch))
                    first_batch = False
                torch.manual_seed(step_seed(cfg.seed, step, micro, self.rank))
                batch = {k: v.to(device, non_blocking=True) for k, v in batch.items()}
                loss = self.engine(**batch).loss
                self.engine.backward(loss)
                self.engine.step()
                loss_sum += loss.detach().double()
            step += 1
            # One collective and one host sync per optimizer step; on the device (NCCL needs it there).
            # It also carries the stop flag, so every rank stops after the same step.
            totals = torch.stack([loss_sum, loss_sum.new_tensor(float(tokens)), loss_sum.new_tensor(float(samples)),
                                  loss_sum.new_tensor(float(images)),
                                  loss_sum.new_tensor(1.0 if self.stop_request.requested else 0.0),
                                  loss_sum.new_tensor(float(positions))])
            dist.all_reduce(totals)
            totals = totals.cpu()
            step_time = time.perf_counter() - t0
            self.tokens_seen += int(totals[1])
            self.samples_seen += int(totals[2])
            self.step = step
            stop = bool(totals[4] > 0)
            logged = step % cfg.log_every == 0 or step == end
            if logged:
                record = {
                    "step": step,
                    "loss": float(totals[0]) / (gas * self.world_size),
                    "lr": cfg.optim.lr * lr_factor(step - 1, cfg.optim, cfg.max_steps),
                    "tokens_per_s": float(totals[1]) / step_time,
                    "padding_fraction": 1.0 - float(totals[1]) / float(totals[5]),
                    "step_time_s": step_time,
                    "samples": self.samples_seen,
                    "tokens": self.tokens_seen,
                    "epoch": self.sampler.epoch_of(step * gas - 1),
                    "compute_s": self.compute_seconds(),
                    "cpu_s": self.cpu_seconds(),
                    "lr_groups": lrs_used,
                }
                grad_norm = self.engine.get_global_grad_norm()
                if grad_norm is not None:
                    record["grad_norm"] = float(grad_norm)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
            self.events.emit(StepEnd(step=step, samples=int(totals[2]), tokens=int(totals[1]), images=int(totals[3]),
                                     record=record if logged else None))
            bar.update(1)
            if stop:
                self.stopped_by_signal = True
                log.warning("stop signal (%s) received: checkpointing at step %d and exiting for a requeue",
                            self.stop_request.name or "on another rank", step)
                break
            if self.val_dataset is not None and cfg.eval_every and step % cfg.eval_every == 0 and step < end:
                self.evaluate(step)
            if cfg.checkpoint.save_every and step % cfg.checkpoint.save_every == 0 and step < end:
                self.save(step)
                last_saved = step
        bar.close()
        if self.stopped_by_signal:
            if step > last_saved:
                self.save(step)
            self._write_rank_report()
            return record
        if step > last_saved:
            if self.val_dataset is not None:
                self.evaluate(step)
            self.save(step)
        self._write_rank_report()
        skip_log = self.run_dir.skipped
        if self.is_main and skip_log.is_file():  # DataLoader workers count in their own processes: read the log
            count = sum(1 for line in skip_log.read_text().splitlines() if line.strip())
            log.warning("skipped %d bad samples (data.bad_samples=skip); see %s", count, skip_log)
        if self.is_main:
            log.info("done at step %d; checkpoints in %s", step, self.run_dir.checkpoints)
        return record

    def _group_lrs(self) -> dict[str, float]:
        """The learning rate of each optimizer group now (i.e. for the next update), by group name."""
        return {group.get("name", str(i)): float(group["lr"]) for i, group in enumerate(self.optimizer.param_groups)}

    def compute_seconds(self) -> float:
        """Wall seconds this run has spent on anything but validation (setup, training, saving), over every
        invocation; times `world_size` it is the run's process-seconds (GPU-seconds on GPUs)."""
        return self._compute_before + time.perf_counter() - self._started - self._eval_seconds

    def cpu_seconds(self) -> float:
        """CPU time (all threads) of this process on the same work as `compute_seconds`, over every
        invocation: unlike wall time, it hardly grows when other jobs share the CPU."""
        return self._cpu_before + time.process_time() - self._cpu_started - self._eval_cpu_seconds

    def evaluate(self, step: int) -> dict[str, Any]:
        """Validation loss on data.val (collective), logged as its own metrics record.

        The record also says where training stood: samples seen, epochs (samples / training-set
        size) and compute seconds so far, so learning curves can be drawn against either.
        """
        started, cpu_started = time.perf_counter(), time.process_time()
        result = validation_loss(self.engine, self.val_dataset, self.collator, self.cfg.micro_batch_size,
                                 self.rank, self.world_size)
        seconds = time.perf_counter() - started
        self._eval_seconds += seconds
        self._eval_cpu_seconds += time.process_time() - cpu_started
        record = {"step": step, **result, "samples": self.samples_seen,
                  "epoch": self.samples_seen / len(self.dataset), "compute_s": self.compute_seconds(),
                  "cpu_s": self.cpu_seconds(), "world_size": self.world_size}
        self.events.emit(EvaluationEnd(step=step, record=record, seconds=seconds))
        log.info("step %d: val_loss %.4f  val_ppl %.2f", step, result["val_loss"], result["val_ppl"])
        return record

    def save(self, step: int) -> Path:
        """Write a checkpoint (collective), then emit `CheckpointSaved` (the ledger records what it keeps)."""
        started = time.perf_counter()
        state = {"global_step": step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
                 "compute_s": self.compute_seconds(), "cpu_s": self.cpu_seconds()}
        path = save_checkpoint(self.engine, self.output_dir, step, state, self.cfg.checkpoint.keep_last)
        log.info("saved checkpoint %s", path)
        self.events.emit(CheckpointSaved(step=step, path=str(path), seconds=time.perf_counter() - started))
        return path

    # ------------------------------------------------------------------ records
    def _write_rank_report(self) -> None:
        report = {"rank": self.rank, "world_size": self.world_size, "host": socket.gethostname(),
                  "master": f"{os.environ.get('MASTER_ADDR')}:{os.environ.get('MASTER_PORT')}",
                  "zero_stage": self.zero_stage, "parameters": local_parameter_report(self.model), **peak_memory()}
        atomic_write_json(self.run_dir.rank_report(self.rank), report)

    def _run_info(self, resume_from: Path | None) -> dict[str, Any]:
        # heavy; imported where used, once the accelerator is chosen
        import deepspeed
        import transformers

        return {
            "mmtrain": mmtrain.__version__,
            "torch": torch.__version__,
            "deepspeed": deepspeed.__version__,
            "transformers": transformers.__version__,
            "python": platform.python_version(),
            "accelerator": "cpu" if on_cpu() else torch.cuda.get_device_name(0),
            "launcher": self.dist.launcher,
            "world_size": self.world_size,
            "zero_stage": self.zero_stage,
            "attn_implementation": self.attn_implementation,
            "num_image_tokens": self.model.num_image_tokens,
            "parameters": self.param_rows,
            "deepspeed_config": self.ds_config,
            "resumed_from": str(resume_from) if resume_from else None,
            "config": to_dict(self.cfg),
        }


def _configure_logging(is_main: bool) -> None:
    warnings.filterwarnings("ignore", category=FutureWarning, module=r"torch\.distributed")
    logging.basicConfig(level=logging.INFO if is_main else logging.WARNING,
                        format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    try:
        # heavy; imported where used, once the accelerator is chosen
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
