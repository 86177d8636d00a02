"""Sample variants that evaluation scores: without the image, with another sample's image, other answers.

Each variant is an ordinary manifest `Sample`, so the training templates encode it exactly as
they encode training data.
"""

from __future__ import annotations

import dataclasses

from mmtrain.data.manifest import GPT, HUMAN, Sample
from mmtrain.data.templates import DEFAULT_IMAGE_PLACEHOLDER

OPTION_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def _strip_placeholder(text: str, placeholder: str) -> str:
    return text.replace(placeholder + "\n", "").replace(placeholder, "").strip()


def without_image(sample: Sample, placeholder: str = DEFAULT_IMAGE_PLACEHOLDER) -> Sample:
    """The same text with no image: the LLM alone on the prompt (placeholders removed)."""
    turns = None
    if sample.conversations is not None:
        turns = tuple((role, _strip_placeholder(value, placeholder) if role == HUMAN else value)
                      for role, value in sample.conversations)
    text = None if sample.text is None else _strip_placeholder(sample.text, placeholder) or sample.text
    return dataclasses.replace(sample, image=None, text=text, conversations=turns)


def with_other_images(samples: list[Sample]) -> list[Sample]:
    """Every sample with the image of another one (a rotation by half the set: never its own image).

    The mismatched-image loss separates "the model uses what is in the image" from "the model has
    learnt the captions' style", which the no-image loss alone cannot.
    """
    with_image = [i for i, s in enumerate(samples) if s.image is not None]
    out = list(samples)
    count = len(with_image)
    if count < 2:
        return out
    shift = count // 2
    for k, index in enumerate(with_image):
        out[index] = dataclasses.replace(samples[index], image=samples[with_image[(k + shift) % count]].image)
    return out


def with_answer(sample: Sample, answer: str) -> Sample:
    """The sample with its first answer (caption, or first `gpt` turn) replaced by `answer`."""
    if sample.conversations is None:
        return dataclasses.replace(sample, text=answer)
    turns = list(sample.conversations)
    first = next(i for i, (role, _) in enumerate(turns) if role == GPT)
    turns[first] = (GPT, answer)
    return dataclasses.replace(sample, conversations=tuple(turns[: first + 1]))


def reference_answer(sample: Sample) -> str:
    """The caption, or the first `gpt` turn."""
    if sample.text is not None:
        return sample.text
    return next(value for role, value in sample.conversations or () if role == GPT)
