"""Plain-text corpora: the texts of manifests (captions, conversation turns) and of text files.

Used wherever a method needs text alone: VPGTrans's word converter, the surrogate's logit-lens
trajectory.
"""

from __future__ import annotations

from pathlib import Path
from typing import Iterable

from mmtrain.data.manifest import read_manifest
from mmtrain.errors import UserError


class CorpusError(UserError, ValueError):
    """A corpus file is missing or holds no text; the message names it."""


def corpus_texts(paths: Iterable[str | Path], key: str = "--texts") -> list[str]:
    """The texts of a corpus: captions and conversation turns of JSONL manifests, lines of other files.

    Args:
        key: the setting or flag that named the files, for error messages.
    """
    paths = list(paths)
    texts: list[str] = []
    for path in paths:
        path = Path(path)
        if not path.is_file():
            raise CorpusError(f"{key}: {path} does not exist")
        if path.suffix == ".jsonl":
            for sample in read_manifest(path):
                if sample.text is not None:
                    texts.append(sample.text)
                for _, value in sample.conversations or ():
                    texts.append(value.replace("<image>", " ").strip())
        else:
            texts += [line.strip() for line in path.read_text(errors="replace").splitlines()]
    texts = [t for t in texts if t]
    if not texts:
        raise CorpusError(f"{key}: no text in {', '.join(str(p) for p in paths)}")
    return texts
