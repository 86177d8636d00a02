"""Manifests: reading and validating the records that describe training samples.

A manifest holds one JSON object per line (blank lines are ignored), or, in a
``.json`` file, one JSON array of them (LLaVA's data files, read as they are), in
one of two shapes:

* caption: ``{"image": "path", "text": "..."}``
* instruction: ``{"image": "path" | null, "conversations": [{"from": "human", "value": "..."}, ...]}``

Both may also carry ``"id"`` (any value) and ``"category"`` (a string). A
multiple-choice question also carries ``"options"`` (two or more distinct strings)
and ``"answer"`` (the index of the right option), which evaluation scores. Image
paths are relative to the manifest's folder (or ``data.image_root``) unless
absolute. Images are not opened here; that happens when a sample is loaded.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn

from mmtrain.data.errors import ManifestError

log = logging.getLogger(__name__)

ALLOWED_KEYS: tuple[str, ...] = ("answer", "category", "conversations", "id", "image", "options", "text")
TURN_KEYS: tuple[str, ...] = ("from", "value")
HUMAN = "human"
GPT = "gpt"


@dataclass(frozen=True)
class Sample:
    """One record of a manifest.

    Exactly one of ``text`` (caption) and ``conversations`` is set.

    Attributes:
        manifest: The manifest file the record came from.
        line: 1-based line number of the record in the manifest.
        image: Path of the image, or None for a text-only sample.
        text: The caption of a caption record.
        conversations: ``(role, value)`` turns of an instruction record, role
            being ``"human"`` or ``"gpt"``.
        category: Optional free-form category of the sample.
        options: The choices of a multiple-choice question, else None.
        answer: Index into ``options`` of the right choice, else None.
        id: The record's ``"id"``, else None.
    """

    manifest: Path
    line: int
    image: Path | None
    text: str | None
    conversations: tuple[tuple[str, str], ...] | None
    category: str | None
    options: tuple[str, ...] | None = None
    answer: int | None = None
    id: Any = None

    @property
    def has_image(self) -> bool:
        """Whether the sample comes with an image."""
        return self.image is not None


def _json_type(value: Any) -> str:
    """Names the JSON type of a decoded value, for error messages."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "a list"
    if isinstance(value, dict):
        return "an object"
    return type(value).__name__


def _quoted(names: tuple[str, ...]) -> str:
    return ", ".join(f'"{name}"' for name in names)


def _parse_conversations(value: Any, fail: Callable[[str], NoReturn]) -> tuple[tuple[str, str], ...]:
    """Validates the ``conversations`` field; ``fail(reason)`` raises a ManifestError."""
    if not isinstance(value, list):
        fail(f'"conversations" must be a list of turns, got {_json_type(value)}')
    if not value:
        fail('"conversations" is an empty list')
    turns: list[tuple[str, str]] = []
    for number, turn in enumerate(value, start=1):
        where = f"conversation turn {number}"
        if not isinstance(turn, dict):
            fail(f'{where} must be an object with "from" and "value", got {_json_type(turn)}')
        for key in turn:
            if key not in TURN_KEYS:
                fail(f'{where} has unknown key "{key}" (allowed keys: {_quoted(TURN_KEYS)})')
        for key in TURN_KEYS:
            if key not in turn:
                fail(f'{where} has no "{key}" key')
        role, text = turn["from"], turn["value"]
        if role not in (HUMAN, GPT):
            fail(f'{where}: "from" must be "{HUMAN}" or "{GPT}", got {json.dumps(role)}')
        if not isinstance(text, str):
            fail(f'{where}: "value" must be a string, got {_json_type(text)}')
        expected = HUMAN if number % 2 == 1 else GPT
        if role != expected:
            fail(f'{where} is from "{role}" but should be from "{expected}" '
                 f'(turns must alternate, starting with "{HUMAN}")')
        turns.append((role, text))
    if len(turns) < 2:
        fail(f'the conversation has no "{GPT}" turn, so there is nothing to learn from')
    return tuple(turns)


def parse_record(raw: str | dict[str, Any], manifest: Path, line: int, image_root: Path | None = None,
                 unused_keys: set[str] | None = None) -> Sample:
    """Parses one manifest line (or one record of a JSON array) into a Sample.

    Args:
        raw: The text of the line (not blank), or the decoded record.
        manifest: Path of the manifest, used to resolve relative image paths.
        line: 1-based line number (a JSON array: the record's index), used in error messages.
        image_root: The folder relative image paths start from (default: the manifest's folder).
        unused_keys: Collects keys mmtrain does not use instead of failing on them (LLaVA's files).

    Returns:
        The parsed sample.

    Raises:
        ManifestError: The line is not valid JSON or does not follow the schema.
    """

    def fail(reason: str) -> NoReturn:
        raise ManifestError(manifest, line, reason)

    if isinstance(raw, str):
        try:
            record = json.loads(raw)
        except json.JSONDecodeError as error:
            raise ManifestError(manifest, line, f"not valid JSON ({error.msg} at column {error.colno})") from None
    else:
        record = raw
    if not isinstance(record, dict):
        fail(f"expected a JSON object, got {_json_type(record)}")
    unknown = [key for key in record if key not in ALLOWED_KEYS]
    if unknown and unused_keys is None:
        fail(f'unknown key "{unknown[0]}" (allowed keys: {_quoted(ALLOWED_KEYS)})')
    if unknown:
        unused_keys.update(unknown)
        record = {key: value for key, value in record.items() if key in ALLOWED_KEYS}

    has_text, has_conversations = "text" in record, "conversations" in record
    if has_text and has_conversations:
        fail('expected either "text" or "conversations", not both')
    if not has_text and not has_conversations:
        fail('expected "text" (a string) or "conversations" (a list)')

    image_value = record.get("image")
    image: Path | None = None
    if image_value is not None:
        if not isinstance(image_value, str):
            fail(f'"image" must be a path string or null, got {_json_type(image_value)}')
        if not image_value.strip():
            fail('"image" is an empty string')
        # An absolute image path stays absolute when joined.
        image = (image_root if image_root is not None else manifest.parent) / image_value

    text: str | None = None
    conversations: tuple[tuple[str, str], ...] | None = None
    if has_text:
        text = record["text"]
        if not isinstance(text, str):
            fail(f'expected "text" (a string) or "conversations" (a list), but "text" is {_json_type(text)}')
        if image is None:
            fail('a caption record ("text") needs an "image"; use "conversations" for text-only samples')
    else:
        conversations = _parse_conversations(record["conversations"], fail)

    category = record.get("category")
    if category is not None and not isinstance(category, str):
        fail(f'"category" must be a string, got {_json_type(category)}')

    options, answer = _parse_choices(record, fail)
    return Sample(manifest=manifest, line=line, image=image, text=text, conversations=conversations,
                  category=category, options=options, answer=answer, id=record.get("id"))


def _parse_choices(record: dict[str, Any], fail: Callable[[str], NoReturn]) -> tuple[tuple[str, ...] | None, int | None]:
    """Validates the optional ``options``/``answer`` pair of a multiple-choice record."""
    has_options, has_answer = "options" in record, "answer" in record
    if not has_options and not has_answer:
        return None, None
    if has_options != has_answer:
        fail('"options" and "answer" go together: a multiple-choice record needs both')
    options, answer = record["options"], record["answer"]
    if not isinstance(options, list) or len(options) < 2 or not all(isinstance(o, str) and o.strip() for o in options):
        fail('"options" must be a list of at least two non-empty strings')
    if len(set(options)) != len(options):
        fail('"options" has duplicates; every choice must be distinct')
    if not isinstance(answer, int) or isinstance(answer, bool) or not 0 <= answer < len(options):
        fail(f'"answer" must be the index (0 to {len(options) - 1}) of the right option, got {json.dumps(answer)}')
    return tuple(options), answer


def scan_manifest(path: str | Path, image_root: str | Path | None = None) -> Iterator[Sample | ManifestError]:
    """Parses a manifest record by record without stopping at broken ones.

    A ``.json`` file is LLaVA's format: one JSON array of records, numbered by index in messages;
    keys mmtrain does not use are left out with one warning naming them.

    Args:
        path: The JSONL manifest, or a JSON array of records.
        image_root: The folder relative image paths start from (default: the manifest's folder).

    Yields:
        A Sample for each valid record, a ManifestError (not raised) for each
        broken one. Blank lines yield nothing.

    Raises:
        ManifestError: The file cannot be read at all (line 0).
    """
    manifest = Path(path)
    root = Path(image_root) if image_root is not None else None
    if not manifest.exists():
        raise ManifestError(manifest, 0, "manifest file not found", hint="check the path")
    if manifest.is_dir():
        raise ManifestError(manifest, 0, "the manifest path is a directory, not a JSONL file", hint="check the path")
    if manifest.suffix == ".json":
        yield from _scan_json_array(manifest, root)
        return
    try:
        handle = manifest.open("rb")
    except OSError as error:
        reason = f"cannot read the manifest ({error.strerror})"
        raise ManifestError(manifest, 0, reason, hint="check the path") from None
    with handle:
        for line, raw_bytes in enumerate(handle, start=1):
            try:
                raw = raw_bytes.decode("utf-8")
            except UnicodeDecodeError as error:
                yield ManifestError(manifest, line, f"not UTF-8 text ({error.reason} at byte {error.start})")
                continue
            if line == 1:
                raw = raw.removeprefix("\ufeff")
            if not raw.strip():
                continue
            try:
                yield parse_record(raw, manifest, line, root)
            except ManifestError as error:
                yield error


def _scan_json_array(manifest: Path, root: Path | None) -> Iterator[Sample | ManifestError]:
    """The records of a LLaVA-style JSON array file, by index."""
    hint = "a .json manifest is one JSON array of records (LLaVA's format); use .jsonl for one record a line"
    try:
        records = json.loads(manifest.read_text(encoding="utf-8-sig"))
    except OSError as error:
        raise ManifestError(manifest, 0, f"cannot read the manifest ({error.strerror})", hint="check the path") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ManifestError(manifest, 0, f"not valid JSON ({error})", hint=hint) from None
    if not isinstance(records, list):
        raise ManifestError(manifest, 0, f"expected a JSON array of records, got {_json_type(records)}", hint=hint)
    unused: set[str] = set()
    for index, record in enumerate(records):
        try:
            yield parse_record(record, manifest, index, root, unused_keys=unused)
        except ManifestError as error:
            yield error
    if unused:
        log.warning("%s: keys mmtrain does not use are ignored: %s", manifest, ", ".join(sorted(unused)))


def read_manifest(path: str | Path, image_root: str | Path | None = None) -> list[Sample]:
    """Reads and validates a whole manifest.

    Args:
        path: The JSONL manifest, or a JSON array of records (LLaVA's format).
        image_root: The folder relative image paths start from (default: the manifest's folder).

    Returns:
        The samples in file order.

    Raises:
        ManifestError: The file is missing or empty, or a line is not valid
            JSON or breaks the schema (the first such line is reported).
    """
    samples: list[Sample] = []
    for item in scan_manifest(path, image_root):
        if isinstance(item, ManifestError):
            raise item
        samples.append(item)
    if not samples:
        raise ManifestError(path, 0, "the manifest has no samples (the file is empty or only has blank lines)")
    return samples
