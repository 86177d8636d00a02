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

import contextlib
import logging
import platform
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch

import mmtrain
from mmtrain.config import RunConfig, dump_config, to_dict
from mmtrain.cost.ledger import LEDGER_FILE, Ledger
from mmtrain.cost.usage import AttemptUsage
from mmtrain.engine.accelerator import move_buffers, on_cpu, release_large_frees_to_os
from mmtrain.engine.checkpoint import load_checkpoint, resolve_resume, save_checkpoint
from mmtrain.engine.distributed import DistEnv, init_distributed
from mmtrain.engine.ds_config import fill_ds_config, load_ds_json, zero_stage
from mmtrain.engine.metrics import MetricsLog, local_parameter_report, peak_memory
from mmtrain.engine.optim import build_optimizer_args, build_param_groups, lr_factor, scheduler_factory
from mmtrain.engine.preemption import StopRequest
from mmtrain.models import build_vlm, format_parameter_table, load_init_weights, parameter_table
from mmtrain.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("mmtrain")
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _llm_hidden_size(cfg: RunConfig) -> int:
    from transformers import AutoConfig

    llm = cfg.model.llm
    if llm.name_or_path:
        return AutoConfig.from_pretrained(llm.name_or_path, trust_remote_code=llm.trust_remote_code).hidden_size
    params = dict(llm.config or {})
    return AutoConfig.for_model(params.pop("model_type", "llama"), **params).hidden_size


def step_seed(seed: int, step: int, micro: int, rank: int) -> int:
    return (seed * 1_000_003 + step * 7919 + micro * 104_729 + rank * 15_485_863) % (2**63 - 1)


class Trainer:
    """One training run described by a RunConfig; `fit()` trains to `max_steps` (or `stop_after_steps`)."""

    def __init__(self, cfg: RunConfig, stop_request: StopRequest | None = None) -> None:
        """Build everything and resume. `stop_request`: one installed earlier by the caller, so that a stop
        signal arriving during start-up is not lost (default: installed here)."""
        import deepspeed

        self.cfg = cfg
        self._started = time.perf_counter()
        self._cpu_started = time.process_time()
        self._eval_cpu_seconds = 0.0
        self._compute_before = self._cpu_before = 0.0  # earlier invocations' (a resumed run)
        self.usage = AttemptUsage(start_step=0)
        self.stop_request = stop_request or StopRequest().install()  # a scheduler's warning: checkpoint, exit
        self.stopped_by_signal = False
        if on_cpu():
            release_large_frees_to_os()
        self.dist: DistEnv = init_distributed()
        self.rank, self.world_size = self.dist.rank, self.dist.world_size
        self.is_main = self.rank == 0
        _configure_logging(self.is_main)
        if cfg.precision == "fp16" and on_cpu():
            raise ValueError("precision=fp16 needs a GPU; on CPU use fp32 (bf16 works but is far slower there)")
        self.output_dir = Path(cfg.output_dir)
        self.ledger = Ledger.from_env(self.output_dir / LEDGER_FILE, default_stage=self.output_dir.name)
        self.ledger.write("process_start", kind="train", rank=self.rank, world_size=self.world_size,
                          output_dir=str(self.output_dir))
        if self.is_main:
            self.output_dir.mkdir(parents=True, exist_ok=True)
            dump_config(cfg, self.output_dir / "config.yaml")
        ds_path = cfg.deepspeed
        self.ds_config = fill_ds_config(load_ds_json(ds_path), cfg, self.world_size, _llm_hidden_size(cfg),
                                        source=ds_path)
        self.zero_stage = zero_stage(self.ds_config)
        if cfg.model.llm.quantization != "none" and self.zero_stage == 3:
            raise ValueError(f"model.llm.quantization={cfg.model.llm.quantization}: ZeRO-3 cannot partition "
                             f"bitsandbytes-quantised weights; use a ZeRO-1/2 config ({ds_path} is stage 3)")

        llm_context = self._zero3_construction() if self.zero_stage == 3 else contextlib.nullcontext()
        model, self.tokenizer, self.attn_implementation = build_vlm(cfg.model, DTYPES[cfg.precision], llm_context)
        if cfg.gradient_checkpointing:
            model.llm.enable_gradient_checkpointing()
            model.keep_llm_in_train_mode = True
        for source in cfg.init:
            if source.word_converter is not None:
                from mmtrain.methods.vpgtrans.init import load_converted_init

                names = load_converted_init(model, source, cfg, self.tokenizer, self.output_dir)
            else:
                names = load_init_weights(model, source)
            log.info("init: %d tensors from %s", len(names), source.path)
        self.param_rows = parameter_table(model)
        table = format_parameter_table(self.param_rows)
        log.info("parameters:\n%s", table)

        self.dataset, self.collator = self._build_data(model)
        if not on_cpu():
            move_buffers(model, torch.device("cuda", self.dist.local_rank))
        groups = build_param_groups(model, cfg.optim)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, config=self.ds_config, lr_scheduler=scheduler_factory(cfg.optim, cfg.max_steps),
            **build_optimizer_args(groups, cfg.optim),
        )
        self.model = self.engine.module
        self.metrics = MetricsLog(self.output_dir, self.is_main)
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
            atomic_write_text(self.output_dir / "params.txt", table + "\n")
            atomic_write_json(self.output_dir / "run_info.json", self._run_info(resume_from))
        self.usage.start_step = self.usage.step = self.start_step
        self.flops_model = None

    @contextlib.contextmanager
    def _zero3_construction(self):
        """Build the LLM inside zero.Init (partitioned as created, HF initialisation intact).

        The HfDeepSpeedConfig must stay referenced for the engine's life: transformers consults it
        (weakly) to construct under zero.Init and later for ZeRO-3-aware calls such as generation.
        It is created only here, so the vision side is built as ordinary modules first.
        """
        from transformers.integrations import HfDeepSpeedConfig

        self._hf_ds_config = HfDeepSpeedConfig(self.ds_config)
        yield

    # ------------------------------------------------------------------ data
    def _build_data(self, model):
        from mmtrain.data import Collator, VLMDataset

        cfg = self.cfg
        if not cfg.data.train:
            raise ValueError("data.train: set the training manifest (a JSONL file, or a list of them)")
        def dataset_for(manifest: str, subset: int | None) -> VLMDataset:
            return VLMDataset.for_model(manifest, model, self.tokenizer, cfg.data, self.output_dir / "skipped.jsonl",
                                        subset=subset, seed=cfg.seed)

        self.val_dataset = dataset_for(cfg.data.val, cfg.data.val_samples) if cfg.data.val else None
        return dataset_for(cfg.data.train, cfg.data.train_samples), Collator(self.tokenizer.pad_token_id)

    def _loader(self, start_batch: int):
        from torch.utils.data import DataLoader

        from mmtrain.data import StepSampler

        cfg = self.cfg
        sampler = StepSampler(len(self.dataset), cfg.micro_batch_size, self.rank, self.world_size, cfg.seed,
                              shuffle=cfg.data.shuffle, start_batch=start_batch)
        self.sampler = sampler
        return DataLoader(self.dataset, batch_sampler=sampler, collate_fn=self.collator,
                          num_workers=cfg.data.num_workers, persistent_workers=cfg.data.num_workers > 0)

    # ------------------------------------------------------------------ loop
    def fit(self) -> dict[str, Any]:
        """Train until max_steps (or stop_after_steps, or a stop signal); returns the last logged record.

        Every rank appends its `process_end` to the ledger, also when training fails.
        """
        outcome = "failed"
        try:
            record = self._fit()
            outcome = ("preempted" if self.stopped_by_signal
                       else "completed" if self.usage.step >= self.cfg.max_steps else "stopped")
            return record
        finally:
            self.stop_request.uninstall()
            self._write_process_end(outcome)

    def _fit(self) -> dict[str, Any]:
        from tqdm import tqdm

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
        self.usage.begin_loop()
        while step < end:
            t0 = time.perf_counter()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            tokens = 0
            samples = 0
            images = 0
            lrs_used = self._group_lrs() if (step + 1) % cfg.log_every == 0 or step + 1 == end else None
            for micro in range(gas):
                batch = next(batches)
                tokens += int(batch["attention_mask"].sum())  # counted on the host copy: no device sync
                samples += int(batch["input_ids"].shape[0])
                images += int(batch["has_image"].sum())
                if self.flops_model is None:
                    counting_started = time.perf_counter()
                    self.flops_model = self._count_flops(batch)
                    self.usage.move_to_startup(time.perf_counter() - counting_started)
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
                                  loss_sum.new_tensor(1.0 if self.stop_request.requested else 0.0)])
            dist.all_reduce(totals)
            totals = totals.cpu()
            step_time = time.perf_counter() - t0
            self.tokens_seen += int(totals[1])
            self.samples_seen += int(totals[2])
            step_flops = self.flops_model.step(float(totals[1]), float(totals[3])) if self.flops_model else 0.0
            self.usage.end_step(step, int(totals[2]), int(totals[1]), int(totals[3]), step_flops)
            stop = bool(totals[4] > 0)
            if step % cfg.log_every == 0 or step == end:
                record = {
                    "step": step,
                    "loss": float(totals[0]) / (gas * self.world_size),
                    "lr": cfg.optim.lr * lr_factor(step - 1, cfg.optim, cfg.max_steps),
                    "tokens_per_s": float(totals[1]) / step_time,
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
                self.metrics.log(record)
                bar.set_postfix(loss=f"{record['loss']:.4f}", lr=f"{record['lr']:.2e}")
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
        skip_log = self.output_dir / "skipped.jsonl"
        if self.is_main and skip_log.is_file():  # DataLoader workers count in their own processes: read the log
            count = sum(1 for line in skip_log.read_text().splitlines() if line.strip())
            log.warning("skipped %d bad samples (data.bad_samples=skip); see %s", count, skip_log)
        if self.is_main:
            log.info("done at step %d; checkpoints in %s", step, self.output_dir / "checkpoints")
        return record

    def _group_lrs(self) -> dict[str, float]:
        """The learning rate of each optimizer group now (i.e. for the next update), by group name."""
        return {group.get("name", str(i)): float(group["lr"]) for i, group in enumerate(self.optimizer.param_groups)}

    def compute_seconds(self) -> float:
        """Wall seconds this run has spent on anything but validation (setup, training, saving), over every
        invocation; times `world_size` it is the run's process-seconds (GPU-seconds on GPUs)."""
        return self._compute_before + time.perf_counter() - self._started - self.usage.eval_s

    def cpu_seconds(self) -> float:
        """CPU time (all threads) of this process on the same work as `compute_seconds`, over every
        invocation: unlike wall time, it hardly grows when other jobs share the CPU."""
        return self._cpu_before + time.process_time() - self._cpu_started - self._eval_cpu_seconds

    def evaluate(self, step: int) -> dict[str, Any]:
        """Validation loss on data.val (collective), logged as its own metrics record.

        The record also says where training stood: samples seen, epochs (samples / training-set
        size) and compute seconds so far, so learning curves can be drawn against either.
        """
        from mmtrain.engine.evaluate import validation_loss

        started, cpu_started = time.perf_counter(), time.process_time()
        result = validation_loss(self.engine, self.val_dataset, self.collator, self.cfg.micro_batch_size,
                                 self.rank, self.world_size)
        self.usage.eval_s += time.perf_counter() - started
        self._eval_cpu_seconds += time.process_time() - cpu_started
        record = {"step": step, **result, "samples": self.samples_seen,
                  "epoch": self.samples_seen / len(self.dataset), "compute_s": self.compute_seconds(),
                  "cpu_s": self.cpu_seconds(), "world_size": self.world_size}
        self.metrics.log(record)
        log.info("step %d: val_loss %.4f  val_ppl %.2f", step, result["val_loss"], result["val_ppl"])
        return record

    def save(self, step: int) -> Path:
        """Write a checkpoint (collective); rank 0 then records in the ledger what it keeps."""
        started = time.perf_counter()
        state = {"global_step": step, "samples_seen": self.samples_seen, "tokens_seen": self.tokens_seen,
                 "compute_s": self.compute_seconds(), "cpu_s": self.cpu_seconds()}
        path = save_checkpoint(self.engine, self.output_dir, step, state, self.cfg.checkpoint.keep_last)
        self.usage.checkpoint_s += time.perf_counter() - started
        log.info("saved checkpoint %s", path)
        if self.is_main:
            self.ledger.write("checkpoint", rank=self.rank, world_size=self.world_size, step=step,
                              checkpoint_s=round(self.usage.checkpoint_s, 3), **self.usage.counters())
        return path

    def _count_flops(self, batch: dict[str, torch.Tensor]):
        """The FLOPs model of this VLM at the first batch's mean sequence length (collective under ZeRO-3)."""
        from mmtrain.cost.flops import step_flops_model

        length = int(batch["attention_mask"].sum()) // max(int(batch["input_ids"].shape[0]), 1)
        self.engine.eval()  # no dropout draws, no BatchNorm statistics updated: training is unaffected
        try:
            flops = step_flops_model(self.model, length, self.cfg.gradient_checkpointing, device=self.engine.device)
        except Exception as exc:  # an estimate must never stop training
            log.warning("could not count the model's FLOPs (%s: %s); the ledger records 0 FLOPs",
                        type(exc).__name__, exc)
            return False
        finally:
            self.engine.train()
        if self.is_main:
            log.info("FLOPs per image %s, per token %.4g (multipliers %s)",
                     {k: f"{v:.4g}" for k, v in flops.forward.items() if k != "llm"}, flops.forward["llm"],
                     flops.multipliers)
        return flops

    def _write_process_end(self, outcome: str) -> None:
        self.ledger.write("process_end", kind="train", rank=self.rank, world_size=self.world_size, outcome=outcome,
                          signal=self.stop_request.name or None, max_steps=self.cfg.max_steps,
                          precision=self.cfg.precision, zero_stage=self.zero_stage,
                          flops_model=self.flops_model.as_dict() if self.flops_model else None,
                          **self.usage.counters(), timing=self.usage.times(), memory=peak_memory())

    # ------------------------------------------------------------------ records
    def _write_rank_report(self) -> None:
        report = {"rank": self.rank, "world_size": self.world_size, "zero_stage": self.zero_stage,
                  "parameters": local_parameter_report(self.model), **peak_memory()}
        atomic_write_json(self.output_dir / "ranks" / f"rank{self.rank}.json", report)

    def _run_info(self, resume_from: Path | None) -> dict[str, Any]:
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
        from deepspeed.utils import logger as ds_logger

        ds_logger.setLevel(logging.WARNING)
    except ImportError:
        pass
