"""Write a LLaVA-format folder: config, safetensors weights, tokenizer with `<image>`, processor.

Written into a temporary sibling folder and renamed into place, so a failed export leaves nothing.
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable

from safetensors.torch import save_file

from mmtrain.data.templates import stop_token_ids
from mmtrain.errors import UserError
from mmtrain.export.chat_template import chat_template
from mmtrain.export.llava import IMAGE_TOKEN, llava_weights


def export_llava(model: Any, cfg: Any, tokenizer: Any, out: str | Path, overwrite: bool = False,
                 card: Callable[[dict[str, Any]], str] | None = None) -> Path:
    """Export `model` (a VisionLanguageModel with full, unpartitioned weights) as a LLaVA folder `out`.

    Args:
        card: given the LLaVA config, the model card's Markdown (written as README.md).
    """
    # heavy (seconds to import): only where a model is exported
    from transformers import GenerationConfig, LlavaConfig, LlavaProcessor

    out = Path(out)
    if out.exists() and any(out.iterdir()) and not overwrite:
        raise UserError(f"{out} exists and is not empty; choose another --out, or pass --overwrite")
    weights = llava_weights(model, cfg, len(tokenizer))
    out.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        LlavaConfig(**weights.config).save_pretrained(staging)
        save_file(weights.state_dict, str(staging / "model.safetensors"), metadata={"format": "pt"})
        tokenizer.add_special_tokens({"additional_special_tokens": [IMAGE_TOKEN]})
        if tokenizer.convert_tokens_to_ids(IMAGE_TOKEN) != weights.config["image_token_index"]:
            raise RuntimeError(f"{IMAGE_TOKEN} got id {tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)}, expected "
                               f"{weights.config['image_token_index']}")
        vision = model.vision
        adds_bos = tokenizer.bos_token_id is not None and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]
        template = chat_template(cfg.data.template, with_bos=tokenizer.bos_token_id is not None and not adds_bos,
                                 image_token=IMAGE_TOKEN)
        processor = LlavaProcessor(image_processor=vision.processor, tokenizer=tokenizer,
                                   patch_size=vision.model.config.patch_size,
                                   vision_feature_select_strategy=weights.config["vision_feature_select_strategy"],
                                   num_additional_image_tokens=1 if vision.has_cls else 0,
                                   image_token=IMAGE_TOKEN, chat_template=template)
        processor.save_pretrained(staging)
        GenerationConfig(eos_token_id=stop_token_ids(tokenizer), pad_token_id=tokenizer.pad_token_id,
                         do_sample=False).save_pretrained(staging)
        if card is not None:
            (staging / "README.md").write_text(card(weights.config))
        if out.exists():
            shutil.rmtree(out)
        staging.rename(out)
    finally:
        if staging.exists():
            shutil.rmtree(staging)
    return out
