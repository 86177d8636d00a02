"""A small, real-image captioned dataset and a matching tiny tokenizer, for tests and smoke runs.

Each picture is a filled circle, square or triangle of one colour on a
background of another, drawn with Pillow; its caption names both colours and
the shape. Everything is deterministic for a given seed.

Command line::

    python -m mmtrain.data.synthetic OUT_DIR [--num-images N] [--image-size S] [--seed K]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
from pathlib import Path

from PIL import Image, ImageDraw
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 210, 40),
    "purple": (140, 60, 180),
    "orange": (245, 140, 30),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
VAL_FRACTION = 0.12
# Their order fixes the ids: <s>=0, </s>=1, <pad>=2, <unk>=3, <|im_start|>=4, <|im_end|>=5.
SPECIAL_TOKENS: tuple[str, ...] = ("<s>", "</s>", "<pad>", "<unk>", "<|im_start|>", "<|im_end|>")
# Words beyond the captions, so prompts and simple questions tokenise into sensible pieces.
GENERIC_TEXTS: tuple[str, ...] = (
    "Describe the image.",
    "USER: What is in the picture?\nASSISTANT: ",
    "user assistant system",
    "What colour is the shape? What shape is it? Where is it?",
    "The image shows a shape on a plain background.",
    "yes no this that it is are was the an of and to in with for on at by from",
    "left right top bottom middle centre center small large big",
)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _draw_scene(rng: random.Random, image_size: int) -> tuple[Image.Image, str]:
    """Draws one random scene and returns it with its caption."""
    shape = rng.choice(SHAPES)
    foreground = rng.choice(sorted(COLOURS))
    background = rng.choice([name for name in sorted(COLOURS) if name != foreground])
    image = Image.new("RGB", (image_size, image_size), COLOURS[background])
    low = max(2, image_size * 3 // 10)
    side = rng.randint(low, max(low, image_size * 7 // 10))
    left = rng.randint(0, image_size - side)
    top = rng.randint(0, image_size - side)
    right, bottom = left + side - 1, top + side - 1
    draw = ImageDraw.Draw(image)
    fill = COLOURS[foreground]
    if shape == "circle":
        draw.ellipse((left, top, right, bottom), fill=fill)
    elif shape == "square":
        draw.rectangle((left, top, right, bottom), fill=fill)
    else:
        draw.polygon([((left + right) / 2, top), (left, bottom), (right, bottom)], fill=fill)
    return image, f"{_article(foreground)} {foreground} {shape} on {_article(background)} {background} background."


def _write_jsonl(path: Path, records: list[dict[str, str]]) -> None:
    """Writes a JSONL file atomically (a reader never sees a half-written file)."""
    partial = path.with_name(path.name + ".partial")
    partial.write_text("".join(json.dumps(record) + "\n" for record in records), encoding="utf-8")
    os.replace(partial, path)


def make_caption_dataset(out_dir: Path, num_images: int = 64, image_size: int = 32, seed: int = 0) -> Path:
    """Draws a captioned shapes dataset and writes its train and val manifests.

    Writes PNGs to ``out_dir/images/``, about 12% of the samples to
    ``out_dir/val.jsonl`` and the rest to ``out_dir/train.jsonl``.

    Args:
        out_dir: Folder to write into (created if needed).
        num_images: Number of pictures.
        image_size: Width and height of the pictures in pixels.
        seed: Seed of all random choices.

    Returns:
        Path of the train manifest.

    Raises:
        ValueError: ``num_images`` < 1 or ``image_size`` < 8.
    """
    if num_images < 1:
        raise ValueError(f"num_images must be at least 1, got {num_images}")
    if image_size < 8:
        raise ValueError(f"image_size must be at least 8, got {image_size}")
    out_dir = Path(out_dir)
    images_dir = out_dir / "images"
    images_dir.mkdir(parents=True, exist_ok=True)
    rng = random.Random(seed)
    records: list[dict[str, str]] = []
    for number in range(num_images):
        image, caption = _draw_scene(rng, image_size)
        name = f"{number:05d}.png"
        image.save(images_dir / name)
        records.append({"id": f"{number:05d}", "image": f"images/{name}", "text": caption})
    order = list(range(num_images))
    rng.shuffle(order)
    num_val = round(num_images * VAL_FRACTION) if num_images > 1 else 0
    val_ids = set(order[:num_val])
    _write_jsonl(out_dir / "val.jsonl", [records[i] for i in range(num_images) if i in val_ids])
    train_path = out_dir / "train.jsonl"
    _write_jsonl(train_path, [records[i] for i in range(num_images) if i not in val_ids])
    return train_path


def make_tiny_tokenizer(texts: list[str], out_dir: Path, vocab_size: int = 512) -> Path:
    """Trains a byte-level BPE tokenizer and saves it as a Hugging Face tokenizer.

    The tokenizer has bos ``<s>`` (id 0), eos ``</s>`` (1), pad ``<pad>`` (2)
    and unk ``<unk>`` (3), plus ``<|im_start|>`` (4) and ``<|im_end|>`` (5) as
    special tokens. It adds no special tokens by itself when encoding.

    Args:
        texts: Training texts.
        out_dir: Folder the tokenizer is saved to with ``save_pretrained``.
        vocab_size: Upper bound of ``len(tokenizer)``.

    Returns:
        ``out_dir``, loadable with ``AutoTokenizer.from_pretrained``.

    Raises:
        ValueError: ``vocab_size`` cannot hold the 256 byte tokens and the
            special tokens.
    """
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import PreTrainedTokenizerFast

    smallest = 256 + len(SPECIAL_TOKENS)
    if vocab_size < smallest:
        raise ValueError(f"vocab_size must be at least {smallest} (256 bytes + special tokens), got {vocab_size}")
    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=bpe,
        bos_token="<s>",
        eos_token="</s>",
        pad_token="<pad>",
        unk_token="<unk>",
        extra_special_tokens=["<|im_start|>", "<|im_end|>"],
    )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def _read_captions(manifest: Path) -> list[str]:
    with manifest.open(encoding="utf-8") as handle:
        return [json.loads(line)["text"] for line in handle if line.strip()]


def main(argv: list[str] | None = None) -> int:
    """Writes the synthetic dataset and a tokenizer into OUT_DIR, unless already there.

    Args:
        argv: Command-line arguments (defaults to ``sys.argv[1:]``).

    Returns:
        The exit status, 0.
    """
    parser = argparse.ArgumentParser(
        prog="python -m mmtrain.data.synthetic",
        description="Write a small captioned shapes dataset and a tiny tokenizer.",
    )
    parser.add_argument("out_dir", type=Path, help="folder to write train.jsonl, val.jsonl, images/, tokenizer/")
    parser.add_argument("--num-images", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out_dir: Path = args.out_dir
    train_path, tokenizer_dir = out_dir / "train.jsonl", out_dir / "tokenizer"
    if train_path.is_file() and tokenizer_dir.is_dir():
        print(f"{out_dir} already holds a dataset and a tokenizer; nothing to do")
        return 0
    try:
        make_caption_dataset(out_dir, num_images=args.num_images, image_size=args.image_size, seed=args.seed)
    except ValueError as error:
        parser.error(str(error))
    texts = _read_captions(train_path) + _read_captions(out_dir / "val.jsonl") + list(GENERIC_TEXTS)
    # The tokenizer folder only appears once complete, so an interrupted run is redone.
    partial = out_dir / "tokenizer.partial"
    shutil.rmtree(partial, ignore_errors=True)
    make_tiny_tokenizer(texts, partial)
    shutil.rmtree(tokenizer_dir, ignore_errors=True)
    os.replace(partial, tokenizer_dir)
    print(f"wrote {train_path}, {out_dir / 'val.jsonl'} and {tokenizer_dir}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
