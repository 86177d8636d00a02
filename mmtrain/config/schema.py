"""The run configuration: typed dataclasses, the single source of truth for every setting.

A YAML file maps onto `RunConfig`; `mmtrain.config.loader` does the strict parsing (unknown keys,
wrong types and invalid choices fail naming the key). The DeepSpeed JSON's `"auto"` values are
filled from these fields by `mmtrain.engine.ds_config`. The methods' own settings (MMA's `adapter`,
VPGTrans's `word_converter`...) are defined next to each method's code and joined in here at the
places they belong (`with_sections`, see `mmtrain.config.methods`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Literal

from mmtrain.config.methods import with_sections

Trainability = Literal["frozen", "full", "adapters"]


@dataclass
class _VisionCore:
    """The vision tower: any Hugging Face vision model, by name/path or built from a config dict."""

    kind: str = "hf"
    """Tower family from the vision registry (`hf` = any Hugging Face vision model)."""
    name_or_path: str | None = None
    """Hugging Face model name or local folder; loaded with its image processor."""
    config: dict[str, Any] | None = None
    """Build a randomly initialised tower from this config dict instead (needs `model_type`)."""
    image_size: int | None = None
    """Run the tower on square images of this side (px) instead of its image processor's: resize the
    shorter side to it, then centre-crop. For ViTs that interpolate their position embeddings (DINOv2);
    e.g. 112 on small pictures costs a quarter of 224's compute. Null: the processor's own size."""
    trainable: Trainability = "frozen"
    trainable_top_k: int = 0
    """With `trainable: frozen`, still train the top k transformer blocks of the tower."""
    feature_layer: int = -1
    """Which hidden state feeds the resampler (-1 = last block's output, -2 = the one before...)."""
    drop_cls: bool = True
    """Drop the CLS token (when the tower has one) and keep only patch tokens."""
    cls_every: int = 0
    """LaVIN's visual tokens: the CLS token after every k-th block (k = 4: 6 tokens for 24 blocks)
    instead of the patch tokens of `feature_layer` (0 = off)."""


VisionConfig = with_sections(_VisionCore, "model.vision", "VisionConfig")
"""The vision tower's settings plus the method sections at `model.vision` (MMA: `adapter`)."""


@dataclass
class ResamplerConfig:
    """The visual prompt generator between the tower and the projector."""

    kind: Literal["qformer", "mlp", "identity"] = "qformer"
    """`identity`: no resampler, the tower's tokens go to the projector as they are (LaVIN)."""
    num_queries: int = 32
    num_layers: int = 2
    hidden_size: int = 768
    num_heads: int = 8
    mlp_ratio: float = 4.0
    dropout: float = 0.0
    spatial_merge: int = 1
    """`mlp` only: merge each k x k block of neighbouring patch tokens into one token before the MLP
    (Qwen2-VL's patch merger: layer norm, concatenate, MLP), so a 16x16 grid gives 64 tokens at k = 2
    and 16 at k = 4. Needs a square token grid (`drop_cls: true` on a ViT); 1 = keep every token."""
    trainable: Trainability = "full"


@dataclass
class ProjectorConfig:
    """Linear (optionally MLP) map from the resampler width into the LLM's embedding width."""

    kind: Literal["linear", "mlp"] = "linear"
    hidden_size: int | None = None
    """MLP only: the hidden width (default: the LLM's width; LaVIN: 128)."""
    activation: Literal["gelu", "silu"] = "gelu"
    """MLP only: the activation between the two layers (LaVIN: silu)."""
    init: Literal["default", "xavier"] = "default"
    """Initial weights: PyTorch's default for linear layers, or xavier-uniform with zero biases (LaVIN's)."""
    trainable: Trainability = "full"
    image_boundaries: bool = False
    """Learned begin-of-image and end-of-image embeddings around every image's visual tokens (two
    more positions per image); they train with the projector."""


@dataclass
class _LLMCore:
    """The language model: a Hugging Face causal LM (or an encoder-decoder LM: T5, BART), frozen by default."""

    name_or_path: str | None = None
    config: dict[str, Any] | None = None
    """Build a randomly initialised LLM from this config dict instead (needs `model_type`)."""
    tokenizer: str | None = None
    """Tokenizer folder; defaults to `name_or_path`."""
    trainable: Trainability = "frozen"
    """`adapters` trains only flagged modules: a surrogate's translator (`mmtrain surrogate build`),
    attached adapters."""
    attn_implementation: Literal["auto", "flash_attention_2", "sdpa", "eager"] = "auto"
    trust_remote_code: bool = False
    quantization: Literal["none", "8bit", "4bit"] = "none"
    """Load the frozen LLM's linear layers quantised by bitsandbytes (LaVIN's "lite" mode: 4bit);
    ZeRO-1/2 only."""
    quant_type: Literal["nf4", "fp4"] = "nf4"
    """4-bit data type."""


LLMConfig = with_sections(_LLMCore, "model.llm", "LLMConfig")
"""The LLM's settings plus the method sections at `model.llm` (MMA: `adapter`, VL-PET: `vl_pet`, LoRA: `lora`)."""


@dataclass
class ModelConfig:
    vision: VisionConfig = field(default_factory=VisionConfig)
    resampler: ResamplerConfig = field(default_factory=ResamplerConfig)
    projector: ProjectorConfig = field(default_factory=ProjectorConfig)
    llm: LLMConfig = field(default_factory=LLMConfig)
    init_seed: int = 0
    """Seed for randomly initialised modules (resampler, projector, towers built from a config)."""


@dataclass
class DataConfig:
    train: str | list[str] | None = None
    """Training manifest (JSONL; image paths are relative to it), or a list of them, mixed into one
    training set (e.g. image-text with text-only samples)."""
    val: str | None = None
    image_root: str | None = None
    """Folder that relative image paths start from (LLaVA's JSON files name images under an image
    folder, not next to the file); default: each manifest's own folder."""
    train_samples: int | None = None
    """Train on a seeded random subset of this many samples of `data.train` (null = all of them)."""
    val_samples: int | None = None
    """Validate on a seeded random subset of this many samples of `data.val` (null = all of them)."""
    bad_samples: Literal["error", "skip"] = "error"
    template: Literal["plain", "chat", "chatml"] = "plain"
    max_length: int = 512
    """Longest sample in tokens, image tokens included; longer samples are bad samples."""
    image_placeholder: str = "<image>"
    no_image_text: str | None = None
    """Text that stands where the image would for text-only samples (LaVIN: "Image: N/A\n")."""
    shuffle: bool = True
    num_workers: int | Literal["auto"] = 0
    """DataLoader worker processes (0 = load in the training process). `auto`: on a GPU machine,
    up to 4 per rank with pinned memory, leaving a core to each rank; inline on CPU machines, where
    the ranks use every core. Workers persist across epochs."""
    packing: bool = False
    """Pack samples (with their visual tokens) into rows of up to `max_length` positions; attention
    never crosses a sample. `micro_batch_size` then counts rows."""
    group_by: Literal["none", "length", "modality"] = "none"
    """Batches of similar length (`length`), or of one modality with similar lengths (`modality`:
    image or text-only); deterministic in (seed, epoch, world size). Not with `packing`."""
    feature_cache: str | None = None
    """Folder of cached frozen-tower outputs, shared by runs, stages and arms over the same images and
    tower: computed once (sharded across ranks), read back memory-mapped; needs a frozen tower
    (or frozen bottom blocks, with `model.vision.trainable_top_k`)."""


@dataclass
class OptimConfig:
    name: Literal["adamw", "adamw8bit"] = "adamw"
    """`adamw8bit`: bitsandbytes' AdamW with 8-bit optimizer states."""
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8
    lr_multipliers: dict[str, float] = field(default_factory=dict)
    """Per-component LR factors, e.g. `{projector: 5.0}`; keys: vision, resampler, projector, llm."""
    schedule: Literal["cosine", "constant"] = "cosine"
    warmup_steps: int = 0
    min_lr_ratio: float = 0.0
    """Cosine decays to `lr * min_lr_ratio`."""


@dataclass
class CheckpointConfig:
    save_every: int = 0
    """Save every N optimizer steps (0 = only at the end)."""
    keep_last: int = 2
    resume: str = "auto"
    """`auto` (latest complete checkpoint in output_dir, if any), `never`, or a checkpoint folder."""


@dataclass
class LoggingConfig:
    """Where the training loop's scalars go besides `metrics.jsonl` (always written)."""

    tensorboard: bool = False
    """Write every logged step's and every validation's numbers as TensorBoard scalars to
    `<output_dir>/tensorboard/` (`tensorboard --logdir runs/`)."""


@dataclass
class _InitSourceCore:
    """Weights loaded into the model before training, e.g. a component inherited from an earlier stage.

    Loaded after the model is built and before the engine wraps it (and again before a resume
    restores the trainable part), so inherited modules that stay frozen are never lost.
    """

    path: str
    """A checkpoint folder (its `trainable.safetensors`) or a `.safetensors` file."""
    modules: list[str] = field(default_factory=list)
    """Only tensors whose names start with one of these prefixes (`resampler`, `projector`,
    `vision.model.encoder`...); empty = every tensor in the file."""
    rename: dict[str, str] = field(default_factory=dict)
    """Prefix renames applied to the file's names before matching, e.g. `{resampler.: vpg.}`."""
    strict: bool = True
    """Fail when a selected tensor has no parameter of the same name and shape in the model."""


DEFAULT_COLLECTIVE_TIMEOUT_S = 1800
"""The process group's collective timeout unless a run config sets `collective_timeout_s` (DeepSpeed's too)."""

InitSource = with_sections(_InitSourceCore, "init", "InitSource")
"""An init source plus the method sections of an `init` entry (VPGTrans: `word_converter`)."""


@dataclass
class RunConfig:
    """Everything one training run needs. Public keys map one to one onto YAML keys."""

    deepspeed: str = "ds_configs/zero2.json"
    output_dir: str = "runs/default"
    max_steps: int = 100
    """Optimizer steps of the whole run; the LR schedule spans them."""
    stop_after_steps: int | None = None
    """End this invocation at this global step (the schedule still spans max_steps), e.g. to fit
    a job's time limit; a later invocation resumes."""
    seed: int = 0
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    micro_batch_size: int = 4
    """Samples per rank per forward."""
    grad_accum_steps: int = 1
    grad_clip: float = 1.0
    gradient_checkpointing: bool = False
    log_every: int = 1
    eval_every: int = 0
    """Validation loss on `data.val` every N steps (0 = only at the end; nothing without data.val)."""
    progress_bar: bool = True
    collective_timeout_s: int = DEFAULT_COLLECTIVE_TIMEOUT_S
    """Seconds a collective (all-reduce, gather, barrier) waits for the other ranks before this rank fails:
    bounds the hang when a rank or node stops responding. Raise it if one step, evaluation or checkpoint
    save legitimately keeps a rank away longer."""
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    init: list[InitSource] = field(default_factory=list)
    """Weights to start from, applied in order (later sources win)."""
