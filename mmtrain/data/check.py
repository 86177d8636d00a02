"""Up-front validation of a manifest: ``mmtrain data check MANIFEST``.

Parses every line, fully decodes every image, checks that texts are usable
and, given a tokenizer, that every sample fits the context. All problems are
reported together, each as ``manifest:line: reason``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

from mmtrain.data.errors import BadSampleError, ManifestError
from mmtrain.data.images import ImageLoadError, load_image
from mmtrain.data.manifest import Sample, scan_manifest
from mmtrain.data.templates import (
    TEMPLATES,
    PromptTemplate,
    TokenizerLike,
    get_template,
    validate_sample,
)
from mmtrain.errors import EXIT_USER_ERROR, report_user_errors

_CHUNK = 256


@dataclass
class CheckReport:
    """The outcome of check_manifest.

    Attributes:
        manifest: The checked manifest.
        num_lines: Non-blank lines (samples) checked.
        num_ok: Samples without any problem.
        problems: ``(line, reason)`` pairs in line order; line 0 is the file itself.
    """

    manifest: Path
    num_lines: int = 0
    num_ok: int = 0
    problems: list[tuple[int, str]] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Whether the manifest has no problem at all."""
        return not self.problems

    def format(self) -> str:
        """A human-readable summary: one line per problem, then the counts."""
        lines = [f"{self.manifest}:{line}: {reason}" for line, reason in self.problems]
        bad = self.num_lines - self.num_ok
        lines.append(f"checked {self.num_lines} samples: {self.num_ok} ok, {bad} bad")
        if not self.ok:
            lines.append("fix or remove the lines above, or train with data.bad_samples=skip to skip bad samples")
        return "\n".join(lines)


def _text_problems(
    sample: Sample,
    tokenizer: TokenizerLike | None,
    max_length: int | None,
    template: PromptTemplate,
    num_image_tokens: int,
    no_image_text: str | None = None,
) -> list[str]:
    try:
        if tokenizer is None:
            validate_sample(sample)
            return []
        length = len(template.encode(sample, tokenizer, num_image_tokens, no_image_text=no_image_text))
    except BadSampleError as error:
        return [error.reason]
    if max_length is not None and length > max_length:
        return [f"text longer than the context: {length} tokens > data.max_length {max_length}"]
    return []


def _image_problems(sample: Sample) -> list[str]:
    if sample.image is None:
        return []
    try:
        load_image(sample.image)
    except ImageLoadError as error:
        return [error.reason]
    return []


def _chunks(items: Iterator[Sample | ManifestError], size: int) -> Iterator[list[Sample | ManifestError]]:
    while chunk := list(islice(items, size)):
        yield chunk


def check_manifest(
    path: str | Path,
    tokenizer: TokenizerLike | str | Path | None = None,
    max_length: int | None = None,
    template: str = "plain",
    num_image_tokens: int = 0,
    num_workers: int = 8,
    no_image_text: str | None = None,
    image_root: str | Path | None = None,
) -> CheckReport:
    """Validates every sample of a manifest and reports all problems found.

    Broken manifest lines are reported, not raised.

    Args:
        path: The JSONL manifest.
        tokenizer: A tokenizer, or a folder to load one from; enables the
            encoding and length checks.
        max_length: Longest allowed encoded sample (needs a tokenizer).
        template: Prompt template name used for encoding.
        num_image_tokens: Positions an image takes in the sequence.
        num_workers: Threads decoding images.
        image_root: The folder relative image paths start from (default: the manifest's folder).
        no_image_text: Text standing in for the image of text-only samples (`data.no_image_text`).

    Returns:
        The report.

    Raises:
        ValueError: Unknown template, or ``max_length`` without a tokenizer.
    """
    prompt_template = get_template(template)
    if max_length is not None and tokenizer is None:
        raise ValueError("checking max_length needs a tokenizer")
    if isinstance(tokenizer, (str, Path)):
        # heavy (seconds to import): only where a model or tokenizer is loaded
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(tokenizer))
    report = CheckReport(manifest=Path(path))
    try:
        items = scan_manifest(path, image_root)
        first = next(items, None)
    except ManifestError as error:
        report.problems.append((error.line, error.reason))
        return report
    if first is None:
        report.problems.append((0, "the manifest has no samples (the file is empty or only has blank lines)"))
        return report

    def with_first() -> Iterator[Sample | ManifestError]:
        yield first
        yield from items

    with ThreadPoolExecutor(max_workers=max(1, num_workers)) as pool:
        for chunk in _chunks(with_first(), _CHUNK):
            samples = [item for item in chunk if isinstance(item, Sample)]
            image_results = iter(pool.map(_image_problems, samples))
            for item in chunk:
                report.num_lines += 1
                if isinstance(item, ManifestError):
                    report.problems.append((item.line, item.reason))
                    continue
                # Tokenizers are not safe to share between threads, so texts are checked here.
                reasons = _text_problems(item, tokenizer, max_length, prompt_template, num_image_tokens,
                                         no_image_text)
                reasons += next(image_results)
                report.problems.extend((item.line, reason) for reason in reasons)
                report.num_ok += not reasons
    return report


@report_user_errors
def main(argv: list[str] | None = None) -> int:
    """Runs ``mmtrain data check``: prints the report of a manifest.

    Args:
        argv: Arguments after ``mmtrain data check`` (defaults to ``sys.argv[1:]``).

    Returns:
        0 when every sample is fine, 1 when there are problems, 2 when the
        check itself could not run (e.g. the tokenizer does not load; a
        UserError such as an unreadable manifest prints ``error: ...``).
    """
    parser = argparse.ArgumentParser(
        prog="mmtrain data check",
        description="Validate a JSONL manifest: parse every line, decode every image, check the texts.",
    )
    parser.add_argument("manifest", type=Path, help="the JSONL manifest (or LLaVA's JSON array) to check")
    parser.add_argument("--image-root", type=Path, help="folder relative image paths start from (data.image_root)")
    parser.add_argument("--tokenizer", type=Path, help="tokenizer folder; enables the encoding and length checks")
    parser.add_argument("--max-length", type=int, help="longest allowed sample in tokens (needs --tokenizer)")
    parser.add_argument("--template", default="plain", choices=sorted(TEMPLATES), help="prompt template")
    parser.add_argument("--num-image-tokens", type=int, default=0, help="sequence positions an image takes")
    parser.add_argument("--no-image-text", help="text standing in for the image of text-only samples "
                        "(data.no_image_text, e.g. 'Image: N/A')")
    args = parser.parse_args(argv)
    if args.max_length is not None and args.tokenizer is None:
        parser.error("--max-length needs --tokenizer")
    tokenizer = None
    if args.tokenizer is not None:
        # heavy (seconds to import): only where a model or tokenizer is loaded
        from transformers import AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(args.tokenizer))
        except (OSError, ValueError) as error:  # transformers' own errors: no usable tokenizer in that folder
            print(f"error: {error}", file=sys.stderr)
            return EXIT_USER_ERROR
    report = check_manifest(
        args.manifest,
        tokenizer=tokenizer,
        max_length=args.max_length,
        template=args.template,
        num_image_tokens=args.num_image_tokens,
        no_image_text=args.no_image_text,
        image_root=args.image_root,
    )
    print(report.format())
    return 0 if report.ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
