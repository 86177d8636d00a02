"""The model card (`README.md`) of an exported folder: what was trained, on what, how well, at what cost."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _numbers(result: dict[str, Any], prefix: str = "") -> list[tuple[str, float]]:
    """The numeric results of an evaluation JSON, two levels deep (`loss.loss`, `captions.cider`, ...)."""
    found: list[tuple[str, float]] = []
    for key, value in result.items():
        if isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            found.append((prefix + key, float(value)))
        elif isinstance(value, dict) and not prefix:
            found += _numbers(value, f"{key}.")
    return found


def model_card(run: Path, step: int, cfg: Any, llava_config: dict[str, Any], parameters: str,
               cost: dict[str, Any] | None, out_name: str) -> str:
    """The card's Markdown. `parameters`: the run's parameter table; `cost`: its `mmtrain cost` totals."""
    vision, llm = cfg.model.vision, cfg.model.llm
    train = cfg.data.train if isinstance(cfg.data.train, list) else [cfg.data.train]
    lines = [
        f"# {out_name}", "",
        "A LLaVA-format vision-language model (transformers `LlavaForConditionalGeneration`), exported by "
        f"`mmtrain export` from `{run}` at step {step}.", "",
        "## Model", "",
        f"- vision tower: `{vision.name_or_path or llava_config['vision_config'].get('model_type')}`, hidden state "
        f"{llava_config['vision_feature_layer']}, strategy `{llava_config['vision_feature_select_strategy']}` "
        f"({llava_config['image_seq_length']} visual tokens an image)",
        "- projector: two-layer MLP with GELU (LLaVA-1.5's `mlp2x_gelu`)",
        f"- language model: `{llm.name_or_path or llava_config['text_config'].get('model_type')}`; `<image>` is token "
        f"{llava_config['image_token_index']}",
        f"- prompt template: `{cfg.data.template}` (the processor's chat template)", "",
        "## Training", "",
        f"- data: {', '.join(f'`{path}`' for path in train)}; {cfg.max_steps} steps of {cfg.micro_batch_size} "
        f"(x {cfg.grad_accum_steps} accumulation) per rank, `{cfg.precision}`",
        "", "```", parameters.rstrip(), "```", "",
    ]
    stages = run.parent / "summary.json"
    if stages.is_file():
        summary = json.loads(stages.read_text())
        lines += ["Stages of its pipeline: " + ", ".join(f"`{s['name']}`" for s in summary.get("stages", [])), ""]
    lines += ["## Evaluation", ""]
    results = sorted((run / "eval").glob("*.json")) if (run / "eval").is_dir() else []
    for path in results:
        numbers = _numbers(json.loads(path.read_text()))
        lines.append(f"- `{path.stem}`: " + ", ".join(f"{k} {v:.4g}" for k, v in numbers[:12]))
    if not results:
        lines.append("- no evaluation was run (`mmtrain eval RUN --data MANIFEST` writes one)")
    lines += ["", "## Cost", ""]
    if cost:
        lines.append(f"- {cost['allocated_gpu_hours']:.4g} GPU-hours allocated, {cost['productive_gpu_hours']:.4g} "
                     f"productive, over {cost['attempts']} attempt(s) (`mmtrain cost {run}`)")
    else:
        lines.append("- not recorded (the run has no ledger)")
    lines += ["", "## Use", "", "```python", "from transformers import AutoProcessor, LlavaForConditionalGeneration",
              f'model = LlavaForConditionalGeneration.from_pretrained("{out_name}")',
              f'processor = AutoProcessor.from_pretrained("{out_name}")', "```", ""]
    return "\n".join(lines)
