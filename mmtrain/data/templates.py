"""Prompt templates: turning a Sample into token ids, labels and image positions.

Each text segment is tokenised on its own (without special tokens) and the
pieces are concatenated, so prompt/target boundaries are exact. Labels are
``IGNORE_INDEX`` everywhere except on target text (captions, ``gpt`` turns)
and the token that ends each target.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from mmtrain.data.errors import BadSampleError
from mmtrain.data.manifest import GPT, HUMAN, Sample

IGNORE_INDEX = -100
DEFAULT_IMAGE_PLACEHOLDER = "<image>"
CAPTION_PROMPT = "Describe the image."

# A piece of an encoded sample: text to tokenise or a token id, and whether it is a target.
_Piece = tuple[str | int, bool]


class TokenizerLike(Protocol):
    """The part of a Hugging Face tokenizer the templates use."""

    @property
    def bos_token_id(self) -> int | None: ...

    @property
    def eos_token_id(self) -> int | None: ...

    @property
    def pad_token_id(self) -> int | None: ...

    def encode(self, text: str, *, add_special_tokens: bool = ...) -> list[int]: ...


@dataclass
class Encoded:
    """A tokenised sample; all three lists have the same length.

    Attributes:
        input_ids: Token ids; image positions hold a filler id.
        labels: Target ids, ``IGNORE_INDEX`` where nothing is learnt.
        image_mask: True at the positions the image embeddings will fill.
    """

    input_ids: list[int]
    labels: list[int]
    image_mask: list[bool]

    def __len__(self) -> int:
        return len(self.input_ids)


def validate_sample(sample: Sample, image_placeholder: str = DEFAULT_IMAGE_PLACEHOLDER) -> None:
    """Checks the texts of a sample, without a tokenizer.

    Args:
        sample: The sample to check.
        image_placeholder: The string marking where the image goes.

    Raises:
        BadSampleError: A caption or ``gpt`` turn is empty, a placeholder is
            in a ``gpt`` turn, there is more than one placeholder, or a
            placeholder in a sample without an image.
    """

    def bad(reason: str) -> BadSampleError:
        return BadSampleError(sample.manifest, sample.line, reason)

    placeholders = 0
    if sample.text is not None:
        if not sample.text.replace(image_placeholder, "").strip():
            raise bad("empty text (the caption)")
        placeholders += sample.text.count(image_placeholder)
    for number, (role, value) in enumerate(sample.conversations or (), start=1):
        if role == GPT:
            if not value.strip():
                raise bad(f'empty text (conversation turn {number}, from "{GPT}")')
            if image_placeholder in value:
                raise bad(f'{image_placeholder} placeholder in conversation turn {number}, from "{GPT}" '
                          f'(the image must be in a "{HUMAN}" turn)')
        placeholders += value.count(image_placeholder)
    if placeholders > 1:
        raise bad(f"{placeholders} {image_placeholder} placeholders, but only one image per sample is supported")
    if placeholders == 1 and not sample.has_image:
        raise bad(f"{image_placeholder} placeholder but no image")


class PromptTemplate:
    """Base class of the templates: subclasses say how a sample becomes text pieces."""

    name: ClassVar[str] = ""

    def encode(
        self,
        sample: Sample,
        tokenizer: TokenizerLike,
        num_image_tokens: int,
        image_placeholder: str = DEFAULT_IMAGE_PLACEHOLDER,
        no_image_text: str | None = None,
    ) -> Encoded:
        """Tokenises a sample into ids, labels and the image mask.

        The image takes ``num_image_tokens`` positions where its placeholder
        stands, or right after bos (before all text) when there is none.

        Args:
            sample: The sample to encode.
            tokenizer: A Hugging Face tokenizer; it needs an eos token.
            num_image_tokens: Positions an image takes in the sequence.
            image_placeholder: The string marking where the image goes.
            no_image_text: For a sample without an image: text (not learnt) put where an image
                goes when there is no placeholder, right after bos (LaVIN: "Image: N/A\n").

        Returns:
            The encoded sample.

        Raises:
            BadSampleError: The sample's texts are unusable (see validate_sample).
            ValueError: The tokenizer lacks a token the template needs.
        """
        validate_sample(sample, image_placeholder)
        if tokenizer.eos_token_id is None:
            raise ValueError(f"the {self.name!r} template needs a tokenizer with an eos token")
        pieces = self._pieces(sample, tokenizer, image_placeholder)
        filler = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        encoded = Encoded(input_ids=[], labels=[], image_mask=[])

        def add_tokens(ids: list[int], target: bool) -> None:
            encoded.input_ids.extend(ids)
            encoded.labels.extend(ids if target else [IGNORE_INDEX] * len(ids))
            encoded.image_mask.extend([False] * len(ids))

        def add_image() -> None:
            encoded.input_ids.extend([filler] * num_image_tokens)
            encoded.labels.extend([IGNORE_INDEX] * num_image_tokens)
            encoded.image_mask.extend([True] * num_image_tokens)

        if tokenizer.bos_token_id is not None:
            add_tokens([tokenizer.bos_token_id], target=False)
        placed = any(isinstance(content, str) and image_placeholder in content for content, _ in pieces)
        if sample.has_image and not placed:
            add_image()
        if not sample.has_image and no_image_text:
            add_tokens(list(tokenizer.encode(no_image_text, add_special_tokens=False)), target=False)
        for content, target in pieces:
            if isinstance(content, int):
                add_tokens([content], target)
                continue
            for index, part in enumerate(content.split(image_placeholder)):
                if index > 0:
                    add_image()
                if part:
                    add_tokens(list(tokenizer.encode(part, add_special_tokens=False)), target)
        return encoded

    def _turns(self, sample: Sample, image_placeholder: str) -> list[tuple[str, str]]:
        """The sample as (role, value) turns; a caption becomes one question and its answer."""
        if sample.conversations is not None:
            return list(sample.conversations)
        assert sample.text is not None
        # The image of a caption goes before all text, so its placeholder is dropped.
        caption = sample.text.replace(image_placeholder, "").strip()
        return [(HUMAN, CAPTION_PROMPT), (GPT, caption)]

    def _pieces(self, sample: Sample, tokenizer: TokenizerLike, image_placeholder: str) -> list[_Piece]:
        raise NotImplementedError


class PlainTemplate(PromptTemplate):
    """``[bos] [image] caption [eos]``; conversations as ``"{human}\\n"`` then ``"{gpt}" eos``."""

    name = "plain"

    def _pieces(self, sample: Sample, tokenizer: TokenizerLike, image_placeholder: str) -> list[_Piece]:
        eos = tokenizer.eos_token_id
        assert eos is not None
        if sample.text is not None:
            return [(sample.text, True), (eos, True)]
        pieces: list[_Piece] = []
        for role, value in sample.conversations or ():
            if role == HUMAN:
                pieces.append((f"{value}\n", False))
            else:
                pieces += [(value, True), (eos, True)]
        return pieces


class ChatTemplate(PromptTemplate):
    """``USER: {human}\\nASSISTANT: `` prompts and ``{gpt}`` eos targets."""

    name = "chat"

    def _pieces(self, sample: Sample, tokenizer: TokenizerLike, image_placeholder: str) -> list[_Piece]:
        eos = tokenizer.eos_token_id
        assert eos is not None
        pieces: list[_Piece] = []
        for role, value in self._turns(sample, image_placeholder):
            if role == HUMAN:
                pieces.append((f"USER: {value}\nASSISTANT: ", False))
            else:
                pieces += [(value, True), (eos, True)]
        return pieces


class ChatMLTemplate(PromptTemplate):
    """ChatML turns; each answer ends with ``<|im_end|>``, which is learnt."""

    name = "chatml"
    IM_START = "<|im_start|>"
    IM_END = "<|im_end|>"

    def _pieces(self, sample: Sample, tokenizer: TokenizerLike, image_placeholder: str) -> list[_Piece]:
        end_ids = tokenizer.encode(self.IM_END, add_special_tokens=False)
        if len(end_ids) != 1:
            raise ValueError(f"the chatml template needs {self.IM_END} to be a single token of the tokenizer; "
                             f"add it as a special token")
        pieces: list[_Piece] = []
        for role, value in self._turns(sample, image_placeholder):
            if role == HUMAN:
                pieces.append((f"{self.IM_START}user\n{value}{self.IM_END}\n{self.IM_START}assistant\n", False))
            else:
                pieces += [(value, True), (end_ids[0], True), ("\n", False)]
        return pieces


TEMPLATES: dict[str, type[PromptTemplate]] = {
    template.name: template for template in (PlainTemplate, ChatTemplate, ChatMLTemplate)
}


def get_template(name: str) -> PromptTemplate:
    """Returns an instance of the named template.

    Args:
        name: A key of TEMPLATES.

    Raises:
        ValueError: The name is unknown; the message lists the valid names.
    """
    try:
        return TEMPLATES[name]()
    except KeyError:
        valid = ", ".join(sorted(TEMPLATES))
        raise ValueError(f"unknown prompt template {name!r}; valid templates: {valid}") from None


def stop_token_ids(tokenizer) -> list[int]:
    """What ends an answer: the eos token, plus the ChatML turn end when the vocabulary has one."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end not in ids:
        ids.append(im_end)
    return ids
