"""Tests for mmtrain.data.templates: token ids, labels and image placement."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
from transformers import AutoTokenizer

from mmtrain.data.errors import BadSampleError
from mmtrain.data.manifest import Sample
from mmtrain.data.synthetic import make_tiny_tokenizer
from mmtrain.data.templates import IGNORE_INDEX, TEMPLATES, Encoded, get_template

N = 3  # image tokens
IGNORE = IGNORE_INDEX


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory) -> Any:
    texts = ["a red circle on a blue background.", "What is this? It is a square.", "USER: ASSISTANT: user assistant"]
    return AutoTokenizer.from_pretrained(make_tiny_tokenizer(texts * 5, tmp_path_factory.mktemp("tok"), 400))


class CharTokenizer:
    """One token per character; no bos and no pad token, like some chat models."""

    bos_token_id = None
    eos_token_id = 1
    pad_token_id = None
    im_end = 2

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        assert add_special_tokens is False
        if text.startswith("<|im_end|>"):
            return [self.im_end] + self.encode(text[len("<|im_end|>"):], add_special_tokens=False)
        return [ord(char) for char in text]


def caption(text: str, image: bool = True) -> Sample:
    return Sample(Path("m.jsonl"), 5, Path("x.png") if image else None, text, None, None)


def chat(*turns: str, image: bool = True) -> Sample:
    roles = ("human", "gpt")
    pairs = tuple((roles[i % 2], value) for i, value in enumerate(turns))
    return Sample(Path("m.jsonl"), 9, Path("x.png") if image else None, None, pairs, None)


def enc(tok: Any, text: str) -> list[int]:
    return list(tok.encode(text, add_special_tokens=False))


class Expect:
    """Builds the expected ids and labels piece by piece."""

    def __init__(self, tok: Any) -> None:
        self.tok, self.ids, self.labels, self.mask = tok, [], [], []

    def prompt(self, text_or_ids: str | list[int]) -> Expect:
        ids = enc(self.tok, text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        self.ids += ids
        self.labels += [IGNORE] * len(ids)
        self.mask += [False] * len(ids)
        return self

    def target(self, text_or_ids: str | list[int]) -> Expect:
        ids = enc(self.tok, text_or_ids) if isinstance(text_or_ids, str) else text_or_ids
        self.ids += ids
        self.labels += ids
        self.mask += [False] * len(ids)
        return self

    def image(self, filler: int) -> Expect:
        self.ids += [filler] * N
        self.labels += [IGNORE] * N
        self.mask += [True] * N
        return self

    def check(self, encoded: Encoded) -> None:
        assert encoded.input_ids == self.ids
        assert encoded.labels == self.labels
        assert encoded.image_mask == self.mask


def test_plain_caption(tok: Any) -> None:
    encoded = get_template("plain").encode(caption("a red circle."), tok, N)
    Expect(tok).prompt([tok.bos_token_id]).image(tok.pad_token_id).target("a red circle.").target(
        [tok.eos_token_id]).check(encoded)
    # Only the caption and eos are learnt.
    learnt = [label for label in encoded.labels if label != IGNORE]
    assert learnt == enc(tok, "a red circle.") + [tok.eos_token_id]


def test_plain_caption_with_placeholder_inside(tok: Any) -> None:
    encoded = get_template("plain").encode(caption("a red <image> circle."), tok, N)
    Expect(tok).prompt([tok.bos_token_id]).target("a red ").image(tok.pad_token_id).target(" circle.").target(
        [tok.eos_token_id]).check(encoded)


def test_plain_conversation(tok: Any) -> None:
    encoded = get_template("plain").encode(chat("What is this?", "A square.", "Colour?", "Red."), tok, N)
    (Expect(tok).prompt([tok.bos_token_id]).image(tok.pad_token_id)
     .prompt("What is this?\n").target("A square.").target([tok.eos_token_id])
     .prompt("Colour?\n").target("Red.").target([tok.eos_token_id]).check(encoded))


def test_chat_conversation_with_image_in_human_turn(tok: Any) -> None:
    encoded = get_template("chat").encode(chat("What is <image> this?", "A square.", "And?", "Red."), tok, N)
    (Expect(tok).prompt([tok.bos_token_id]).prompt("USER: What is ").image(tok.pad_token_id)
     .prompt(" this?\nASSISTANT: ").target("A square.").target([tok.eos_token_id])
     .prompt("USER: And?\nASSISTANT: ").target("Red.").target([tok.eos_token_id]).check(encoded))


def test_chat_image_in_second_human_turn(tok: Any) -> None:
    encoded = get_template("chat").encode(chat("Hi", "Hello.", "<image>\nWhat?", "A square."), tok, N)
    (Expect(tok).prompt([tok.bos_token_id]).prompt("USER: Hi\nASSISTANT: ").target("Hello.")
     .target([tok.eos_token_id]).prompt("USER: ").image(tok.pad_token_id).prompt("\nWhat?\nASSISTANT: ")
     .target("A square.").target([tok.eos_token_id]).check(encoded))


def test_chat_caption_is_one_turn_with_image_first(tok: Any) -> None:
    encoded = get_template("chat").encode(caption("a red circle."), tok, N)
    (Expect(tok).prompt([tok.bos_token_id]).image(tok.pad_token_id)
     .prompt("USER: Describe the image.\nASSISTANT: ").target("a red circle.").target([tok.eos_token_id])
     .check(encoded))


def test_chatml_caption_and_conversation(tok: Any) -> None:
    im_end = enc(tok, "<|im_end|>")
    assert len(im_end) == 1
    encoded = get_template("chatml").encode(caption("<image>\na red circle."), tok, N)
    (Expect(tok).prompt([tok.bos_token_id]).image(tok.pad_token_id)
     .prompt("<|im_start|>user\nDescribe the image.<|im_end|>\n<|im_start|>assistant\n")
     .target("a red circle.").target(im_end).prompt("\n").check(encoded))
    encoded = get_template("chatml").encode(chat("Hi", "Yo.", image=False), tok, N)
    (Expect(tok).prompt([tok.bos_token_id])
     .prompt("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n").target("Yo.").target(im_end)
     .prompt("\n").check(encoded))


def test_no_bos_and_no_pad_token() -> None:
    tok = CharTokenizer()
    encoded = get_template("plain").encode(caption("ab"), tok, 2)
    assert encoded.input_ids == [0, 0, ord("a"), ord("b"), 1]
    assert encoded.labels == [IGNORE, IGNORE, ord("a"), ord("b"), 1]
    assert encoded.image_mask == [True, True, False, False, False]
    encoded = get_template("chatml").encode(chat("q", "a", image=False), tok, 2)
    assert encoded.labels[-3:] == [ord("a"), CharTokenizer.im_end, IGNORE]
    assert True not in encoded.image_mask


def test_text_only_sample_has_no_image_positions(tok: Any) -> None:
    encoded = get_template("chat").encode(chat("Hi", "Hello.", image=False), tok, N)
    assert not any(encoded.image_mask)
    assert len(encoded.input_ids) == len(encoded.labels) == len(encoded.image_mask) == len(encoded)


def test_custom_placeholder(tok: Any) -> None:
    encoded = get_template("chat").encode(chat("look [IMG] here", "ok"), tok, N, image_placeholder="[IMG]")
    start = encoded.image_mask.index(True)
    assert encoded.input_ids[:start] == [tok.bos_token_id] + enc(tok, "USER: look ")


@pytest.mark.parametrize(("sample", "reason"), [
    (chat("<image> what?", "x", image=False), "<image> placeholder but no image"),
    (chat("<image> and <image>", "x"), "only one image per sample"),
    (chat("<image>", "x", "<image>", "y"), "only one image per sample"),
    (chat("what?", "see <image>"), 'placeholder in conversation turn 2, from "gpt"'),
    (caption("  \n"), "empty text"),
    (caption("<image> "), "empty text"),
    (chat("q", "   "), "empty text"),
    (chat("q", "a", "q2", ""), "empty text (conversation turn 4"),
])
@pytest.mark.parametrize("name", sorted(TEMPLATES))
def test_bad_samples(tok: Any, name: str, sample: Sample, reason: str) -> None:
    with pytest.raises(BadSampleError) as caught:
        get_template(name).encode(sample, tok, N)
    assert reason in caught.value.reason
    assert (caught.value.manifest, caught.value.line) == (sample.manifest, sample.line)


def test_registry_and_unknown_name() -> None:
    assert set(TEMPLATES) == {"plain", "chat", "chatml"}
    assert type(get_template("chatml")) is TEMPLATES["chatml"]
    with pytest.raises(ValueError, match="unknown prompt template 'llama'.*chat, chatml, plain"):
        get_template("llama")


def test_chatml_needs_single_im_end_token() -> None:
    class Plain(CharTokenizer):
        def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
            return [ord(char) for char in text]

    with pytest.raises(ValueError, match=re.escape("<|im_end|> to be a single token")):
        get_template("chatml").encode(caption("x"), Plain(), 1)
