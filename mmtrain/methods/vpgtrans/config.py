"""VPGTrans's settings: the word converter of an `init` entry (`init[].word_converter`) or of a
recipe's `inherit` entry. Plain dataclasses: imported while the run config's schema is assembled."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class WordConverterConfig:
    """VPGTrans's word converter: a linear map (with bias) from a source LLM's input-embedding space to
    this run's LLM's, fitted over a text corpus with the loss 1 - cosine and plain SGD, then composed
    with the inherited projector (W_t = W_w W_s, b_t = W_w b_s + b_w). Defaults are the official ones
    (use 8 epochs across model families)."""

    source_llm: str | None = None
    """The LLM folder the inherited projector was trained for (in recipes: the inherited stage's LLM)."""
    source_tokenizer: str | None = None
    """Its tokenizer folder, if not `source_llm` (in recipes: the inherited stage's)."""
    corpus: list[str] = field(default_factory=list)
    """Manifests (.jsonl: captions and conversation turns) and/or text files (one text a line);
    empty = the run's `data.train`."""
    lr: float = 5.0
    batch_size: int = 4096
    """Texts per SGD step."""
    epochs: int = 5
    holdout: float = 0.05
    """Fraction of the texts held out to report the fitted converter's cosine."""
    seed: int = 0
    match_norm: bool = False
    """Not in the official recipe: after fitting, scale the map so its outputs' mean norm equals the
    target embeddings' over the training pairs. The cosine loss ignores scale; across model
    families the two tables' scales can differ several-fold (SmolLM2-135M's rows are 5.6x longer
    than Qwen2.5's), and the merged projector would inherit the mismatch."""
    path: str | None = None
    """Use this already-fitted converter (`mmtrain transfer converter` output) instead of fitting one."""


SECTIONS = {"init": {"word_converter": WordConverterConfig}, "inherit": {"word_converter": WordConverterConfig}}
