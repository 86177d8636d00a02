"""The sample variants evaluation scores: no image, another sample's image, another answer."""

from __future__ import annotations

from pathlib import Path

from mmtrain.data.manifest import Sample
from mmtrain.eval.variants import reference_answer, with_answer, with_other_images, without_image


def caption(i: int, image: str | None = "img") -> Sample:
    return Sample(manifest=Path("m.jsonl"), line=i + 1, image=Path(f"{image}{i}.png") if image else None,
                  text=f"caption {i}.", conversations=None, category=None)


def question() -> Sample:
    turns = (("human", "<image>\nWhat is it?"), ("gpt", "A yak."), ("human", "Sure?"), ("gpt", "Yes."))
    return Sample(manifest=Path("m.jsonl"), line=1, image=Path("yak.png"), text=None, conversations=turns,
                  category=None)


def test_without_image_drops_the_picture_and_its_placeholder():
    plain = without_image(question())
    assert plain.image is None and plain.conversations[0] == ("human", "What is it?")
    assert plain.conversations[1:] == question().conversations[1:]
    assert without_image(caption(0)).image is None and without_image(caption(0)).text == "caption 0."


def test_other_images_never_keep_their_own_and_skip_text_only_samples():
    samples = [caption(0), caption(1, image=None), caption(2), caption(3), caption(4)]
    shuffled = with_other_images(samples)
    assert shuffled[1] == samples[1]
    moved = [s for s in shuffled if s.image is not None]
    assert all(new.image != old.image for new, old in zip(moved, [s for s in samples if s.image]))
    assert sorted(s.image for s in moved) == sorted(s.image for s in samples if s.image)  # a permutation
    assert [s.text for s in shuffled] == [s.text for s in samples]
    assert with_other_images([caption(0)]) == [caption(0)]


def test_with_answer_replaces_the_first_answer_and_drops_later_turns():
    changed = with_answer(question(), "B")
    assert changed.conversations == (("human", "<image>\nWhat is it?"), ("gpt", "B"))
    assert with_answer(caption(3), "a cat.").text == "a cat."
    assert reference_answer(question()) == "A yak." and reference_answer(caption(3)) == "caption 3."
