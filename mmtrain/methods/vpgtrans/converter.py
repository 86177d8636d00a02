"""The word converter: a linear map from a source LLM's input-embedding space into a target's.

Training pairs come from a text corpus. When both LLMs share a tokenizer, every token occurrence
pairs the two embedding rows of its id (so frequent tokens weigh more). When they do not, only texts
whose two tokenisations have the same length are kept, and tokens are paired position by position.
The map (with bias) is fitted with plain SGD on the mean of `1 - cos(W e_src + b, e_tgt)` over the
pairs of a batch of texts; a held-out share of the texts measures the result.
"""

from __future__ import annotations

import json
import math
import random
import time
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors import safe_open
from safetensors.torch import save

from mmtrain.data.corpus import CorpusError
from mmtrain.data.corpus import corpus_texts as read_corpus
from mmtrain.errors import UserError
from mmtrain.methods.vpgtrans.config import WordConverterConfig
from mmtrain.utils.io import atomic_write_bytes

CONVERTER_FILE = "word_converter.safetensors"


class ConverterError(UserError, ValueError):
    """The converter cannot be fitted or loaded; the message says why and what to do."""


# ---------------------------------------------------------------------------------------------- corpus
def corpus_texts(paths: Iterable[str | Path]) -> list[str]:
    """`mmtrain.data.corpus.corpus_texts`, its errors naming `word_converter.corpus`."""
    try:
        return read_corpus(paths, key="word_converter.corpus")
    except CorpusError as exc:
        raise ConverterError(str(exc)) from None


def same_vocabulary(source_tokenizer: Any, target_tokenizer: Any) -> bool:
    """Whether the two tokenizers map every token string to the same id."""
    return source_tokenizer.get_vocab() == target_tokenizer.get_vocab()


@dataclass
class TokenPairs:
    """Per kept text, the source and target token ids to pair position by position."""

    source_ids: list[list[int]]
    target_ids: list[list[int]]
    texts_total: int
    same_tokenizer: bool

    @property
    def texts_kept(self) -> int:
        return len(self.source_ids)


def pair_tokens(texts: Sequence[str], source_tokenizer: Any, target_tokenizer: Any,
                same_tokenizer: bool | None = None) -> TokenPairs:
    """Token-id pairs of every text (same tokenizer) or of the texts tokenised to equal lengths."""
    if same_tokenizer is None:
        same_tokenizer = same_vocabulary(source_tokenizer, target_tokenizer)
    source_ids, target_ids = [], []
    for text in texts:
        src = source_tokenizer(text, add_special_tokens=False)["input_ids"]
        tgt = src if same_tokenizer else target_tokenizer(text, add_special_tokens=False)["input_ids"]
        if src and len(src) == len(tgt):
            source_ids.append(list(src))
            target_ids.append(list(tgt))
    return TokenPairs(source_ids, target_ids, len(texts), same_tokenizer)


# ---------------------------------------------------------------------------------------------- fitting
@dataclass
class FitReport:
    """What fitting measured: pairs, steps, cosines (held-out before/after, training after), time."""

    same_tokenizer: bool
    texts_total: int
    texts_kept: int
    texts_train: int
    texts_heldout: int
    pairs_train: int
    pairs_heldout: int
    epochs: int
    steps: int
    heldout_cosine_initial: float
    heldout_cosine: float
    train_cosine: float
    norm_scale: float
    """The factor `match_norm` scaled the fitted map by (1.0 without it)."""
    output_norm: float
    """Mean norm of the (scaled) map's outputs over the training pairs."""
    target_norm: float
    """Mean norm of the target embeddings over the training pairs."""
    fit_seconds: float
    settings: dict[str, Any]


def _batches(items: list[int], size: int) -> list[list[int]]:
    return [items[i:i + size] for i in range(0, len(items), size)]


def _rows(table: torch.Tensor, ids: list[list[int]], which: str) -> torch.Tensor:
    flat = torch.tensor([i for seq in ids for i in seq], dtype=torch.long)
    if flat.numel() and int(flat.max()) >= table.shape[0]:
        raise ConverterError(f"token id {int(flat.max())} is outside the {which} embedding table "
                             f"({table.shape[0]} rows): the tokenizer does not belong to that LLM")
    return table.index_select(0, flat)


@torch.no_grad()
def mean_cosine(converter: torch.nn.Linear, source: torch.Tensor, target: torch.Tensor, chunk: int = 65536) -> float:
    """Mean cosine similarity between converter(source rows) and target rows."""
    if source.shape[0] == 0:
        return float("nan")
    total = 0.0
    for start in range(0, source.shape[0], chunk):
        out = converter(source[start:start + chunk])
        total += float(F.cosine_similarity(out, target[start:start + chunk], dim=-1).double().sum())
    return total / source.shape[0]


def fit_word_converter(source_table: torch.Tensor, target_table: torch.Tensor, pairs: TokenPairs,
                       settings: WordConverterConfig, log=None) -> tuple[torch.nn.Linear, FitReport]:
    """Fit W, b minimising mean(1 - cos(W e_src + b, e_tgt)) with SGD; returns the map and a report.

    Args:
        source_table, target_table: [vocab, width] input-embedding tables.
        pairs: from `pair_tokens`.
        settings: lr, batch_size (texts per step), epochs, holdout, seed.
    """
    started = time.perf_counter()
    if pairs.texts_kept == 0:
        raise ConverterError(f"no usable text among {pairs.texts_total}: the two tokenizers never split a text "
                             "into the same number of tokens; use a larger corpus")
    if not 0.0 <= settings.holdout < 1.0:
        raise ConverterError(f"word_converter.holdout: {settings.holdout} must be in [0, 1)")
    if settings.batch_size < 1 or settings.epochs < 1 or settings.lr <= 0:
        raise ConverterError("word_converter: batch_size and epochs must be at least 1 and lr positive")
    order = list(range(pairs.texts_kept))
    random.Random(settings.seed).shuffle(order)
    heldout_count = min(math.ceil(settings.holdout * len(order)), len(order) - 1) if settings.holdout else 0
    heldout, train = order[:heldout_count], order[heldout_count:]

    def rows(indices: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        return (_rows(source_table, [pairs.source_ids[i] for i in indices], "source"),
                _rows(target_table, [pairs.target_ids[i] for i in indices], "target"))

    @torch.no_grad()
    def pair_stats(indices: list[int]) -> tuple[float, int, float, float]:
        """Mean cosine, pair count, mean output norm and mean target norm over the texts' pairs."""
        # batch by batch: a large corpus's rows (millions of tokens x two widths) never sit in memory at once
        total = out_norm = tgt_norm = 0.0
        count = 0
        for batch in _batches(indices, settings.batch_size):
            src, tgt = rows(batch)
            if src.shape[0]:
                total += mean_cosine(converter, src, tgt) * src.shape[0]
                out_norm += float(converter(src).norm(dim=-1).double().sum())
                tgt_norm += float(tgt.norm(dim=-1).double().sum())
                count += src.shape[0]
        if not count:
            return float("nan"), 0, 0.0, 0.0
        return total / count, count, out_norm / count, tgt_norm / count

    generator = torch.Generator().manual_seed(settings.seed)
    converter = torch.nn.Linear(source_table.shape[1], target_table.shape[1])
    with torch.no_grad():  # nn.Linear's own initialisation, drawn from the seeded generator
        bound = 1.0 / math.sqrt(source_table.shape[1])
        converter.weight.uniform_(-bound, bound, generator=generator)
        converter.bias.uniform_(-bound, bound, generator=generator)
    initial, pairs_heldout, _, _ = pair_stats(heldout)
    optimizer = torch.optim.SGD(converter.parameters(), lr=settings.lr)
    shuffler = random.Random(settings.seed + 1)
    steps = 0
    for epoch in range(settings.epochs):
        shuffler.shuffle(train)
        for batch in _batches(train, settings.batch_size):
            src, tgt = rows(batch)
            loss = (1.0 - F.cosine_similarity(converter(src), tgt, dim=-1)).mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            steps += 1
        if log is not None:
            log(f"word converter epoch {epoch + 1}/{settings.epochs}: last batch loss {float(loss):.4f}")
    # the cosine ignores scale, so the training pairs' cosine holds before and after match_norm's scaling
    train_cosine, pairs_train, output_norm, target_norm = pair_stats(train)
    norm_scale = target_norm / output_norm if settings.match_norm and output_norm > 0 else 1.0
    if norm_scale != 1.0:
        with torch.no_grad():
            converter.weight.mul_(norm_scale)
            converter.bias.mul_(norm_scale)
    report = FitReport(
        same_tokenizer=pairs.same_tokenizer, texts_total=pairs.texts_total, texts_kept=pairs.texts_kept,
        texts_train=len(train), texts_heldout=len(heldout), pairs_train=pairs_train,
        pairs_heldout=pairs_heldout, epochs=settings.epochs, steps=steps,
        heldout_cosine_initial=initial, heldout_cosine=pair_stats(heldout)[0],
        train_cosine=train_cosine, norm_scale=norm_scale, output_norm=output_norm * norm_scale,
        target_norm=target_norm, fit_seconds=time.perf_counter() - started,
        settings={k: v for k, v in asdict(settings).items()
                  if k in ("lr", "batch_size", "epochs", "holdout", "seed", "match_norm")},
    )
    return converter, report


# ---------------------------------------------------------------------------------------------- files
def save_converter(converter: torch.nn.Linear, path: str | Path, metadata: dict[str, Any]) -> None:
    """Write `weight` and `bias` to a safetensors file (atomically), with `metadata` as JSON inside."""
    data = save({"weight": converter.weight.detach().contiguous(), "bias": converter.bias.detach().contiguous()},
                metadata={"mmtrain": json.dumps(metadata, sort_keys=True)})
    atomic_write_bytes(path, data)


def load_converter(path: str | Path) -> tuple[torch.Tensor, torch.Tensor, dict[str, Any]]:
    """(weight [d_tgt, d_src], bias [d_tgt], metadata) of a converter file."""
    path = Path(path)
    if path.is_dir():
        path = path / CONVERTER_FILE
    if not path.is_file():
        raise ConverterError(f"no word converter at {path}; fit one with `mmtrain transfer converter`")
    with safe_open(str(path), framework="pt") as handle:
        keys = set(handle.keys())
        if keys != {"weight", "bias"}:
            raise ConverterError(f"{path}: not a word converter (tensors {sorted(keys)}, expected bias and weight)")
        weight, bias = handle.get_tensor("weight"), handle.get_tensor("bias")
        metadata = json.loads((handle.metadata() or {}).get("mmtrain", "{}"))
    if weight.ndim != 2 or bias.shape != (weight.shape[0],):
        raise ConverterError(f"{path}: weight {tuple(weight.shape)} and bias {tuple(bias.shape)} do not form a "
                             "linear map")
    return weight, bias, metadata
