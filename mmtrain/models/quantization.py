"""bitsandbytes loading of a frozen LLM in 8 or 4 bits (LaVIN's "lite" mode), on CPU or CUDA.

Only the LLM's linear layers are quantised (embeddings, norms and the LM head stay in the run's
dtype); the quantised weights never train. ZeRO-3 cannot partition quantised tensors, so the
trainer refuses that combination.
"""

from __future__ import annotations

import os

import torch

from mmtrain.config.schema import LLMConfig


def quantization_kwargs(cfg: LLMConfig, dtype: torch.dtype) -> dict:
    """Extra `from_pretrained` arguments for `cfg.quantization` (none when it is `none`)."""
    if cfg.quantization == "none":
        return {}
    if not cfg.name_or_path:
        raise ValueError("model.llm.quantization quantises pretrained weights: set model.llm.name_or_path")
    if cfg.trainable == "full":
        raise ValueError("model.llm.quantization: a quantised LLM cannot be trained in full "
                         "(use trainable: frozen or adapters)")
    try:
        import bitsandbytes  # noqa: F401
    except ImportError as exc:
        raise RuntimeError(f"model.llm.quantization needs bitsandbytes (pip install -r requirements.txt): {exc}") from None
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import BitsAndBytesConfig

    if cfg.quantization == "8bit":
        config = BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=["lm_head"])
    else:
        config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type=cfg.quant_type,
                                    bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head"])
    return {"quantization_config": config, "device_map": {"": _device()}}


def _device() -> str | int:
    """Where bitsandbytes puts the weights: this rank's GPU, or the CPU."""
    if torch.cuda.is_available() and os.environ.get("DS_ACCELERATOR") != "cpu":
        return int(os.environ.get("LOCAL_RANK", "0"))
    return "cpu"


def keep_cpu_layout(model: torch.nn.Module) -> int:
    """Stop bitsandbytes from repacking 4-bit weights for its CPU inference kernel; returns how many layers.

    On CPUs with AVX512-BF16, `Linear4bit` rewrites its weight in place into a CPU-only packed
    layout the first time it runs in eval mode without gradients (a validation pass, the FLOP
    count). Training resumed after that gets no gradient through the layer, so the adapters before
    it receive none. Keeping the original layout costs only inference speed on such CPUs.
    """
    count = 0
    for module in model.modules():
        if getattr(module, "support_avx512bf16_for_cpu", False):
            module.support_avx512bf16_for_cpu = False
            count += 1
    return count
