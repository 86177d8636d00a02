"""Predict a pipeline's GPU-hours and per-GPU memory before anything is submitted (`mmtrain cost estimate`).

Per stage, on the meta device (no weights are read or allocated; a model the meta device cannot
run forward, e.g. an encoder-decoder LM, is counted on a random CPU copy up to `CPU_COUNT_LIMIT`):
- tokens per sample: the mean length of the first `SAMPLE_RECORDS` records of the stage's training
  manifest(s), encoded exactly as the data pipeline does (template, tokenizer, image tokens), each
  capped at `data.max_length`; without the tokenizer, about `CHARS_PER_TOKEN` characters a token;
  without a readable manifest, `data.max_length` (the worst case). Images per sample: the share of
  sampled records with an image (1.0 when unknown).
- FLOPs = max_steps x global batch x `StepFlops.step(tokens, images)` per sample, the same
  frozen-aware FLOPs model the trainer writes to the ledger (`mmtrain/cost/flops.py`), counted at
  that sequence length. Wall hours = FLOPs / (GPUs x peak FLOP/s x MFU) / 3600; GPU-hours = wall
  hours x GPUs.
- per-GPU memory from the ZeRO stage and offload settings of the stage's DeepSpeed JSON (filled
  as the trainer fills it): weights, gradients and optimizer states by what ZeRO partitions,
  activations after Korthikanti et al. 2022, a fixed CUDA-context allowance.
`gpus` is the total GPU count (the data-parallel world size); `nodes` only splits the
offloaded CPU memory per node. Every modelling choice is listed in the result's `assumptions`.
"""

from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Any

from torch import nn

from mmtrain.config.loader import resolve_asset_references
from mmtrain.cost.flops import step_flops_model
from mmtrain.cost.hardware import MEMORY_GIB, known_gpu_types, normalise_gpu_type, peak_flops
from mmtrain.data.errors import ManifestError
from mmtrain.data.manifest import scan_manifest
from mmtrain.data.templates import get_template
from mmtrain.engine.ds_config import DeepSpeedConfigError, fill_ds_config, load_ds_json, zero_stage
from mmtrain.models.build import build_vlm
from mmtrain.models.counting import build_on_meta, config_only
from mmtrain.models.llm import load_tokenizer

GIB = 2**30
SAMPLE_RECORDS = 256
CHARS_PER_TOKEN = 4.0
DEFAULT_MFU = {"bf16": 0.35, "fp16": 0.35, "fp32": 0.5}
CUDA_CONTEXT_GIB = 1.0
CPU_COUNT_LIMIT = 1e9
"""Largest model (parameters) counted on a CPU copy when the meta device cannot run it."""
REPO = Path(__file__).resolve().parents[2]

ASSUMPTIONS = [
    "gpus is the total GPU count over all nodes (the data-parallel world size); global batch = "
    "micro_batch_size x grad_accum_steps x gpus",
    "FLOPs count the tokens of each sample, not the padding up to the longest sample of a micro batch "
    "(as the trainer's ledger does); GPU-hours = FLOPs / (peak x MFU) / 3600, wall hours = GPU-hours / gpus; "
    f"default MFU {DEFAULT_MFU['bf16']} in bf16/fp16 (tensor cores), {DEFAULT_MFU['fp32']} in fp32 (CUDA cores): "
    "small models and short sequences reach far less, measure with the ledger and pass --mfu",
    "evaluation, validation, checkpointing and start-up time are not included",
    "memory: weights in the precision's width (fp32 4 bytes, bf16/fp16 2); trainable parameters add their "
    "gradients (same width) and the optimizer: an fp32 master copy (4 bytes; DeepSpeed keeps one under ZeRO >= 1 "
    "and in 16-bit) and AdamW's two moments (8 bytes, adamw8bit 2); ZeRO-1 partitions the optimizer over the "
    "GPUs, ZeRO-2 also the gradients, ZeRO-3 also every weight, frozen ones included",
    "offload_optimizer moves the optimizer states and an fp32 gradient partition to CPU memory, offload_param "
    "(ZeRO-3) the weights; cpu_memory_gib is that offloaded memory per node",
    "quantized LLM: its frozen linear layers (not the LM head) take 1 byte (8bit) or 0.5 byte (4bit) a weight, "
    "quantization constants ignored",
    "activations (Korthikanti et al. 2022): s*b*h*(34 + 5*a*s/h) bytes per transformer layer in 16-bit, x2 in "
    "fp32; the 5*a*s/h attention-matrix term only with eager attention (flash/SDPA do not store it); with "
    "gradient checkpointing 2*s*b*h per LLM layer plus one layer in full; only where a gradient flows "
    "(a frozen component with nothing trainable before it stores none); frozen layers store somewhat less "
    "than this bound; at the longest sampled sequence (else data.max_length) and the micro batch, plus the "
    "fp32 logits and log-softmax of the loss; resampler and projector activations are ignored; an "
    "encoder-decoder LM counts every position through its encoder and decoder layers (an upper bound)",
    f"overhead: {CUDA_CONTEXT_GIB:g} GiB for the CUDA context and kernels; under ZeRO-3 also the largest block "
    "gathered in full plus the prefetch bucket; allocator fragmentation and communication buckets are not "
    "modelled, keep a margin",
]


def estimate_pipeline(pipeline, gpus: int, gpu_type: str, nodes: int = 1, mfu: float | None = None,
                      peak_tflops: float | None = None) -> dict:
    """GPU-hours and per-GPU memory of every stage of a loaded recipe (`mmtrain.pipeline.load_recipe`).

    Args:
        gpus: total GPUs (all nodes together): the world size.
        gpu_type: a `mmtrain.cost.hardware` type (`h100`, `a100`...; case and aliases allowed).
        nodes: nodes the GPUs are spread over (for the offloaded CPU memory per node).
        mfu: model FLOPs utilisation; default `DEFAULT_MFU` by precision.
        peak_tflops: dense peak TFLOP/s of one GPU, instead of the table's.

    Returns:
        The dict described in the module docstring; `mfu` and `peak_tflops` at the top are numbers,
        or {precision: number} when stages train in different precisions.

    Raises:
        ValueError: bad counts, an unknown GPU type without `peak_tflops`, a stage's DeepSpeed JSON that
            the trainer would refuse.
    """
    if gpus < 1 or nodes < 1 or gpus % nodes:
        raise ValueError(f"gpus ({gpus}) must be a positive multiple of nodes ({nodes}): gpus counts all nodes' GPUs")
    if mfu is not None and not 0 < mfu <= 1:
        raise ValueError(f"mfu must be in (0, 1], got {mfu}")
    gpu = normalise_gpu_type(gpu_type)
    assumptions = list(ASSUMPTIONS)
    if gpu not in MEMORY_GIB:
        assumptions.append(f"GPU type {gpu_type!r} has no memory size in the table: `fits` is null")
    models: dict[str, nn.Module] = {}
    stages, used_mfu, used_peak = [], {}, {}
    for stage in pipeline.stages:
        precision = stage.config.precision
        peak = peak_flops(gpu, precision, peak_tflops)
        if peak is None:
            raise ValueError(f"no peak FLOP/s for GPU type {gpu_type!r} in {precision} (known types: "
                             f"{', '.join(known_gpu_types())}); pass --peak-tflops with one GPU's dense peak")
        used_mfu[precision] = mfu if mfu is not None else DEFAULT_MFU[precision]
        used_peak[precision] = peak / 1e12
        notes: list[str] = []
        stages.append(_estimate_stage(stage, gpus, nodes, gpu, peak, used_mfu[precision], models, notes))
        assumptions += [f"stage {stage.name}: {note}" for note in notes]
    return {
        "recipe": pipeline.name, "gpu_type": gpu, "gpus": gpus, "nodes": nodes,
        "mfu": _single(used_mfu), "peak_tflops": _single(used_peak), "stages": stages,
        "total": {"flops": sum(s["flops"] for s in stages), "gpu_hours": sum(s["gpu_hours"] for s in stages)},
        "assumptions": assumptions,
    }


def meta_model(model_cfg) -> nn.Module:
    """The VLM of `model_cfg` on the meta device, as the estimate counts it (see `_counting_config`)."""
    return build_on_meta(_counting_config(model_cfg))


def _counting_config(model_cfg):
    """`model_cfg` with eager attention and no quantization.

    Eager: Hugging Face's SDPA mask code reads the attention mask's values (`.item()`), which meta
    tensors do not have; eager attention runs the same matmuls, so the count is the same. Quantization is priced in bytes a weight (`_memory`).
    """
    model_cfg = copy.deepcopy(model_cfg)
    model_cfg.llm.attn_implementation = "eager"
    model_cfg.llm.quantization = "none"
    return model_cfg


def _single(by_precision: dict[str, float]) -> float | dict[str, float]:
    values = set(by_precision.values())
    return values.pop() if len(values) == 1 else by_precision


def _estimate_stage(stage, gpus: int, nodes: int, gpu: str | None, peak: float, mfu: float,
                    models: dict[str, nn.Module], notes: list[str]) -> dict:
    cfg = copy.deepcopy(stage.config)
    resolve_asset_references(cfg.model, f"stage {stage.name}", "model.")
    key = repr(cfg.model)  # stages often share a model: build each once
    if key not in models:
        models[key] = meta_model(cfg.model)
    model = models[key]

    tokens, longest, images, source = _sample_statistics(cfg, model, notes)
    flops_model = _step_flops(model, cfg, max(1, round(tokens)), models, notes)
    notes += flops_model.notes
    global_batch = cfg.micro_batch_size * cfg.grad_accum_steps * gpus
    flops = cfg.max_steps * global_batch * flops_model.step(tokens, images)
    hours_wall = flops / (gpus * peak * mfu) / 3600

    ds = _deepspeed_config(cfg, stage.name, gpus, model.llm.hidden_size)
    memory, cpu_bytes, offload = _memory(model, cfg, ds, flops_model.multipliers, gpus, longest, notes)
    capacity = MEMORY_GIB.get(gpu or "")
    return {
        "name": stage.name, "steps": cfg.max_steps, "global_batch": global_batch,
        "tokens_per_sample": tokens, "tokens_source": source, "images_per_sample": images,
        "flops": flops, "gpu_hours": hours_wall * gpus, "hours_wall": hours_wall,
        "zero_stage": zero_stage(ds), "offload": offload,
        "memory_per_gpu_gib": {k: v / GIB for k, v in memory.items()},
        "cpu_memory_gib": cpu_bytes * (gpus // nodes) / GIB,
        "fits": None if capacity is None else memory["total"] / GIB <= capacity,
    }


def _step_flops(model: nn.Module, cfg, sequence: int, models: dict[str, nn.Module], notes: list[str]):
    """`step_flops_model` on the meta model; on a randomly initialised CPU copy where the meta device
    cannot run the forward (the encoder-decoder wrapper packs its inputs by the mask's values)."""
    try:
        return step_flops_model(model, sequence, cfg.gradient_checkpointing)
    except RuntimeError as exc:
        size = sum(p.numel() for p in model.parameters())
        if size > CPU_COUNT_LIMIT:
            raise ValueError(f"cannot count this model's FLOPs on the meta device ({exc}), and at {size / 1e9:.1f}B "
                             "parameters it is too large to count on the CPU") from None

    key = "cpu:" + repr(cfg.model)
    try:
        if key not in models:
            models[key] = build_vlm(config_only(_counting_config(cfg.model)), with_tokenizer=False)[0]
        counted = step_flops_model(models[key], sequence, cfg.gradient_checkpointing)
    except Exception as exc:  # whatever stops the forward, say so instead of a traceback
        raise ValueError(f"cannot count this model's FLOPs, on the meta device nor on a CPU copy "
                         f"({type(exc).__name__}: {exc})") from None
    notes.append("FLOPs counted on a randomly initialised CPU copy of the model (the meta device cannot run it)")
    return counted


# ---------------------------------------------------------------------------------------------- data
def _sample_statistics(cfg, model: nn.Module, notes: list[str]) -> tuple[float, int, float, str]:
    """(mean tokens per sample, longest sampled sample, share of samples with an image, tokens_source)."""
    max_length = cfg.data.max_length
    fallback = (float(max_length), max_length, 1.0, "max_length")
    if not cfg.data.train:
        notes.append(f"no data.train: every sample assumed data.max_length = {max_length} tokens, with an image")
        return fallback
    data = copy.deepcopy(cfg.data)
    try:
        resolve_asset_references(data, "data", "data.")
        manifests = data.train if isinstance(data.train, list) else [data.train]
        sampled = [_first_records(path) for path in manifests]
    except (ValueError, OSError) as exc:  # ConfigError, ManifestError are ValueErrors
        notes.append(f"training manifest unreadable ({exc}): samples assumed data.max_length = {max_length} tokens")
        return fallback
    tokenizer = None
    try:
        tokenizer = load_tokenizer(cfg.model.llm)
    except Exception as exc:  # any tokenizer problem: fall back to counting characters
        notes.append(f"tokenizer not loadable ({type(exc).__name__}: {exc}); text tokens ~ characters / "
                     f"{CHARS_PER_TOKEN:g}")

    # A mixture samples its manifests in proportion to their sizes.
    weights = [_count_records(path) for path in manifests] if len(manifests) > 1 else [1]
    tokens = images = total_weight = 0.0
    longest = 0
    for samples, weight in zip(sampled, weights):
        lengths = [n for n in (_encoded_length(s, tokenizer, model.num_image_tokens, data) for s in samples)
                   if n is not None]
        if not lengths:
            continue
        capped = [min(n, max_length) for n in lengths]
        tokens += weight * sum(capped) / len(capped)
        images += weight * sum(s.has_image for s in samples) / len(samples)
        longest = max(longest, max(capped))
        total_weight += weight
    if not total_weight:
        notes.append(f"no usable record in the first {SAMPLE_RECORDS} of the manifest(s): data.max_length assumed")
        return fallback
    source = "manifest" if tokenizer is not None else "manifest-approx"
    notes.append(f"tokens per sample from the first <= {SAMPLE_RECORDS} records of {len(manifests)} manifest(s)"
                 + (" (mixed by record count)" if len(manifests) > 1 else "")
                 + f"; activations at the longest of them, {longest} tokens")
    return tokens / total_weight, longest, images / total_weight, source


def _first_records(path: str) -> list:
    samples = []
    for item in scan_manifest(path):
        if not isinstance(item, ManifestError):
            samples.append(item)
            if len(samples) == SAMPLE_RECORDS:
                break
    return samples


def _count_records(path: str) -> int:
    with open(path, "rb") as handle:
        return sum(1 for line in handle if line.strip())


def _encoded_length(sample, tokenizer, num_image_tokens: int, data) -> int | None:
    """The sample's sequence length as the dataset encodes it (None: a bad sample, which is skipped)."""
    if tokenizer is not None:
        try:
            return len(get_template(data.template).encode(sample, tokenizer, num_image_tokens,
                                                          data.image_placeholder, data.no_image_text))
        except ValueError:  # BadSampleError, or a template the tokenizer cannot serve
            return None
    texts = [sample.text] if sample.text is not None else [value for _, value in sample.conversations or ()]
    if not sample.has_image and data.no_image_text:
        texts.append(data.no_image_text)
    chars = sum(len(t.replace(data.image_placeholder, "")) for t in texts)
    # + bos and one end-of-turn token per turn
    return math.ceil(chars / CHARS_PER_TOKEN) + 1 + len(texts) + (num_image_tokens if sample.has_image else 0)


# ---------------------------------------------------------------------------------------------- memory
def _deepspeed_config(cfg, stage_name: str, gpus: int, hidden_size: int) -> dict[str, Any]:
    """The stage's DeepSpeed JSON filled as the trainer fills it (paths relative to the repo as a fallback)."""
    path = Path(cfg.deepspeed)
    if not path.is_file() and not path.is_absolute() and (REPO / path).is_file():
        path = REPO / path
    try:
        return fill_ds_config(load_ds_json(path), cfg, world_size=gpus, hidden_size=hidden_size, source=str(path))
    except DeepSpeedConfigError as exc:
        raise ValueError(f"stage {stage_name}: {exc}") from None


def _memory(model: nn.Module, cfg, ds: dict[str, Any], multipliers: dict[str, float], gpus: int,
            sequence: int, notes: list[str]) -> tuple[dict[str, float], float, str]:
    """(per-GPU bytes by kind, offloaded CPU bytes per GPU, offload label)."""
    zero_cfg = ds.get("zero_optimization", {})
    zero = zero_stage(ds)
    off_optimizer = zero >= 1 and _offloaded(zero_cfg, "offload_optimizer")
    off_param = zero == 3 and _offloaded(zero_cfg, "offload_param")
    width = 4 if cfg.precision == "fp32" else 2
    quantization = cfg.model.llm.quantization
    if quantization != "none" and (zero == 3 or not cfg.model.llm.name_or_path):
        notes.append(f"model.llm.quantization={quantization} needs pretrained weights (model.llm.name_or_path) "
                     "and ZeRO-1/2: the trainer refuses this stage as it is")

    trainable = frozen = quantized = 0
    quantized_ids = _quantized_weights(model) if quantization != "none" else set()
    for p in model.parameters():
        if p.requires_grad:
            trainable += p.numel()
        elif id(p) in quantized_ids:
            quantized += p.numel()
        else:
            frozen += p.numel()
    quant_width = {"8bit": 1.0, "4bit": 0.5}.get(quantization, width)
    master = 4 if (width == 2 or zero >= 1) else 0
    moments = 2 if cfg.optim.name == "adamw8bit" else 8

    memory = {
        "weights_frozen": (frozen * width + quantized * quant_width) / (gpus if zero == 3 else 1),
        "weights_trainable": trainable * width / (gpus if zero == 3 else 1),
        "gradients": trainable * width / (gpus if zero >= 2 else 1),
        "optimizer": trainable * (master + moments) / (gpus if zero >= 1 else 1),
    }
    cpu = 0.0
    if off_optimizer:
        cpu += memory["optimizer"] + trainable * 4 / gpus
        memory["optimizer"] = 0.0
    if off_param:
        cpu += memory["weights_frozen"] + memory["weights_trainable"]
        memory["weights_frozen"] = memory["weights_trainable"] = 0.0
    memory["activations"] = _activation_bytes(model, cfg, multipliers, sequence, width)
    overhead = CUDA_CONTEXT_GIB * GIB
    if zero == 3:
        gathered = _largest_block(model) + int(zero_cfg.get("stage3_prefetch_bucket_size", 0))
        overhead += min(gathered, int(zero_cfg.get("stage3_max_live_parameters", gathered))) * width
    memory["overhead"] = overhead
    memory["total"] = sum(memory.values())
    offload = "+".join(name for name, on in (("optimizer", off_optimizer), ("param", off_param)) if on) or "none"
    return memory, cpu, offload


def _offloaded(zero_cfg: dict[str, Any], key: str) -> bool:
    return str((zero_cfg.get(key) or {}).get("device", "none")).lower() not in ("none", "")


def _quantized_weights(model: nn.Module) -> set[int]:
    """ids of the frozen LLM linear weights bitsandbytes would quantise (all but the LM head)."""
    hf = model.llm.model
    head = hf.get_output_embeddings() if hasattr(hf, "get_output_embeddings") else None
    return {id(m.weight) for name, m in hf.named_modules()
            if isinstance(m, nn.Linear) and m is not head and not name.endswith("lm_head")
            and not m.weight.requires_grad}


def _largest_block(model: nn.Module) -> int:
    """Parameters of the largest element of any ModuleList (a transformer block): what ZeRO-3 gathers at once."""
    sizes = [sum(p.numel() for p in block.parameters())
             for module in model.modules() if isinstance(module, nn.ModuleList) for block in module]
    return max(sizes, default=0)


def _shape(config) -> tuple[int, int, int] | None:
    """(layers, hidden size, attention heads) of a Hugging Face transformer config, or None."""
    def first(*names):
        return next((getattr(config, n) for n in names if isinstance(getattr(config, n, None), int)), None)

    if config is None:
        return None
    layers = first("num_hidden_layers", "num_layers", "n_layer", "encoder_layers")
    layers = (layers or 0) + (first("num_decoder_layers", "decoder_layers") or 0)
    hidden = first("hidden_size", "d_model", "n_embd")
    heads = first("num_attention_heads", "num_heads", "n_head", "encoder_attention_heads")
    return (layers, hidden, heads) if layers and hidden and heads else None


def _layer_bytes(s: int, b: int, h: int, a: int, eager: bool) -> float:
    # Korthikanti et al. 2022 ("Reducing Activation Recomputation in Large Transformer Models"), eq. 2:
    # 16-bit activations one transformer layer keeps for its backward, without recomputation.
    return s * b * h * (34 + (5 * a * s / h if eager else 0))


def _activation_bytes(model: nn.Module, cfg, multipliers: dict[str, float], sequence: int, width: int) -> float:
    b = cfg.micro_batch_size
    layers_total = logits = 0.0
    llm_shape = _shape(getattr(model.llm.model, "config", None))
    if llm_shape is not None:
        layers, h, a = llm_shape
        one = _layer_bytes(sequence, b, h, a, cfg.model.llm.attn_implementation == "eager")
        if multipliers.get("llm", 1.0) <= 1.0:  # forward only: one layer at a time
            layers_total += one
        elif cfg.gradient_checkpointing:
            layers_total += layers * 2 * sequence * b * h + one
        else:
            layers_total += layers * one
        # The loss: fp32 logits and their log-softmax, on target positions only for target-only losses
        # (bounded by the text positions), else on every position.
        positions = sequence - model.num_image_tokens if getattr(model.llm, "target_only_loss", False) else sequence
        logits = max(positions, 1) * b * model.llm.vocab_size * 8
    if multipliers.get("vision", 1.0) > 1.0:
        config = getattr(getattr(model.vision, "model", None), "config", None)
        vision_shape = _shape(config)
        if vision_shape is not None:
            layers, h, a = vision_shape
            size, patch = getattr(config, "image_size", None), getattr(config, "patch_size", None)
            tokens = (size // patch) ** 2 + 1 if size and patch else model.vision.num_tokens
            layers_total += layers * _layer_bytes(tokens, b, h, a, eager=False)
    return layers_total * width / 2 + logits


# ---------------------------------------------------------------------------------------------- report
def format_estimate(result: dict) -> str:
    """A table of the stages (time, then memory per GPU), the totals and the assumptions."""
    peak = result["peak_tflops"]
    lines = [f"recipe {result['recipe']}: {result['gpus']} x {result['gpu_type']} on {result['nodes']} node(s), "
             f"MFU {result['mfu']}, peak {peak} TFLOP/s per GPU", ""]
    head = (f"{'stage':<16} {'steps':>7} {'batch':>6} {'tok/sample':>18} {'img':>5} {'FLOPs':>9} "
            f"{'GPU-h':>9} {'wall-h':>8}")
    lines += [head, "-" * len(head)]
    for s in result["stages"]:
        tokens = f"{s['tokens_per_sample']:.1f} ({s['tokens_source']})"
        lines.append(f"{s['name']:<16} {s['steps']:>7} {s['global_batch']:>6} {tokens:>18} "
                     f"{s['images_per_sample']:>5.2f} {s['flops']:>9.3g} {s['gpu_hours']:>9.3g} "
                     f"{s['hours_wall']:>8.3g}")
    total = result["total"]
    lines += [f"{'total':<16} {'':>7} {'':>6} {'':>18} {'':>5} {total['flops']:>9.3g} {total['gpu_hours']:>9.3g}",
              ""]
    head = (f"{'memory GiB/GPU':<16} {'ZeRO':>4} {'offload':>15} {'frozen':>7} {'train':>7} {'grads':>7} "
            f"{'optim':>7} {'activ':>7} {'other':>6} {'total':>7} {'CPU/node':>8} fits")
    lines += [head, "-" * len(head)]
    for s in result["stages"]:
        m = s["memory_per_gpu_gib"]
        fits = {True: "yes", False: "NO", None: "?"}[s["fits"]]
        lines.append(f"{s['name']:<16} {s['zero_stage']:>4} {s['offload']:>15} {m['weights_frozen']:>7.2f} "
                     f"{m['weights_trainable']:>7.2f} {m['gradients']:>7.2f} {m['optimizer']:>7.2f} "
                     f"{m['activations']:>7.2f} {m['overhead']:>6.2f} {m['total']:>7.2f} "
                     f"{s['cpu_memory_gib']:>8.2f} {fits}")
    lines += ["", "assumptions:"] + [f"  - {a}" for a in result["assumptions"]]
    return "\n".join(lines)
