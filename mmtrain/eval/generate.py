"""`mmtrain generate`: answer a prompt about images with a trained run, or with an exported LLaVA folder.

A run (or checkpoint) answers through mmtrain's model, its prompt template and `generate_answers`
(sharded over ranks as in `mmtrain eval`); an exported folder (`mmtrain export`) through
transformers' LlavaForConditionalGeneration and its processor's chat template. Both are greedy, so
the same image and prompt give the same text either way.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from mmtrain.data import load_image
from mmtrain.data.manifest import GPT, HUMAN, Sample, read_manifest
from mmtrain.errors import UserError

IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".webp", ".bmp", ".gif", ".tif", ".tiff"})
COMMAND_LINE = Path("<command line>")
_UNUSED_ANSWER = "-"  # a prompt's sample needs an answer turn; generation stops before it


class GenerateInputError(UserError):
    """An --image argument that is no image, folder of images or manifest."""


def collect_images(paths: list[str]) -> list[Path]:
    """Image files from the arguments: files, folders (their images, sorted) and manifests (their images)."""
    images: list[Path] = []
    for argument in paths:
        path = Path(argument)
        if path.is_dir():
            found = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
            if not found:
                raise GenerateInputError(f"--image {path}: the folder holds no image ({', '.join(sorted(IMAGE_SUFFIXES))})")
            images += found
        elif path.suffix in (".jsonl", ".json"):  # a manifest, or a LLaVA JSON array of records
            images += [s.image for s in read_manifest(path) if s.image is not None]
        elif path.is_file():
            images.append(path)
        else:
            raise GenerateInputError(f"--image {path}: no such file or folder")
    return images


def prompt_samples(images: list[Path], prompt: str | None) -> list[Sample]:
    """One sample per image: a caption request (the template's caption prompt) or the given question."""
    samples = []
    for line, image in enumerate(images, start=1):
        if prompt is None:
            samples.append(Sample(COMMAND_LINE, line, image, _UNUSED_ANSWER, None, None))
        else:
            turns = ((HUMAN, prompt), (GPT, _UNUSED_ANSWER))
            samples.append(Sample(COMMAND_LINE, line, image, None, turns, None))
    return samples


def is_export(path: str | Path) -> bool:
    """Whether `path` is a folder written by `mmtrain export` (a transformers LLaVA folder)."""
    config = Path(path) / "config.json"
    return config.is_file() and json.loads(config.read_text()).get("model_type") == "llava"


def generate_with_export(folder: str | Path, images: list[Path], prompt: str | None, max_new_tokens: int) -> list[str]:
    """Greedy answers of an exported LLaVA folder, prompted through its processor's chat template."""
    # heavy (seconds to import): only where a model is loaded
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(folder, dtype=torch.float32).eval()
    processor = AutoProcessor.from_pretrained(folder)
    content = [{"type": "image"}] + ([{"type": "text", "text": prompt}] if prompt is not None else [])
    text = processor.apply_chat_template([{"role": "user", "content": content}], add_generation_prompt=True)
    answers = []
    for image in images:
        inputs = processor(images=load_image(image), text=text, return_tensors="pt")
        with torch.no_grad():
            new = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
        answers.append(processor.decode(new[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True).strip())
    return answers
