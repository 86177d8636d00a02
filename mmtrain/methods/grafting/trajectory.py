"""The logit-lens KL trajectory of a causal LM, and the cut K it proposes for a surrogate.

A surrogate keeps a target LLM's layers 0..K-1, replaces the middle by one trainable translator
layer and keeps the last layer. K comes from this trajectory: the target runs on a few hundred
texts; at every decoder layer l its final norm and LM head are applied to that layer's output (the
logit lens), giving a distribution q_l at each position, and KL(q_l || p) is measured against the
model's own output distribution p (q_{L-1} = p). Early layers are far from p; at a sharp
transition the KL drops, then it converges smoothly to 0. The layers after the transition refine
an already-formed prediction and are the ones a translator replaces cheaply.

Two KL curves are measured; `--kl` picks the one the cut uses (`propose_cut`):
- `true-token` (the default; the official code's quantity): per text, the vectors of the
  probabilities q_l and p give the true next token at each of its positions are each normalised
  over the positions (clamped at 1e-6), and KL(q~_l || p~) is summed over the positions; then the
  mean over texts.
- `full`: the full-vocabulary KL(q_l || p) at every position with a true next token, per text the
  mean over its positions, then the mean over texts.
The mean probability q_l (and p) gives the true next token is reported beside both.

`run_trajectory` is `mmtrain surrogate trajectory` (single process, or sharded under ZeRO-3 with
the texts split across the launched ranks). See docs/surrogates.md, "Trajectory and the cut rule".
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Sequence

import torch
import torch.distributed as dist
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

from mmtrain.data.corpus import CorpusError, corpus_texts
from mmtrain.engine.ds_config import DeepSpeedConfigError
from mmtrain.engine.placement import Placement, place_pretrained
from mmtrain.errors import UserError
from mmtrain.models.llm import decoder_layers
from mmtrain.utils.io import atomic_write_bytes, atomic_write_json

DEFAULT_THRESHOLD = 0.1
"""The cut rule's default: the smallest knee prominence (fraction of the largest KL) that counts as a transition."""
TRUE_TOKEN_FLOOR = 1e-6
"""The official true-token KL clamps the position-normalised probabilities here (no log of 0)."""
KL_CURVES = {"true-token": "kl_true_token", "full": "kl"}
"""`--kl` choice -> the result key of the curve the cut uses."""
CHUNK_ELEMENTS = 1 << 25
"""Logits computed at once ([positions, vocab] float32, 128 MiB): bounds memory for large vocabularies."""


class TrajectoryError(UserError, ValueError):
    """The trajectory cannot be computed from what was given (model, texts, options)."""


@dataclass(frozen=True)
class CutProposal:
    """Where the KL curve's transition is, and the cut it gives."""

    transition_layer: int | None
    """The last layer before the sharp drop (the knee); None when the curve has none."""
    cut: int
    """K: the first replaced layer (kept: 0..K-1) = transition_layer + 1, clamped to 1..L-2."""
    rule: str
    threshold: float
    prominence: float
    """How far the knee stands above the straight line from the first to the last layer's KL, as a
    fraction of the largest KL (0 for a straight line, negative where the curve sags below it)."""


@dataclass
class LensParts:
    """The modules the logit lens needs from a causal LM."""

    model: nn.Module
    """The causal LM itself (its forward runs; under ZeRO-3 the root module's hooks must see every step)."""
    layers: nn.ModuleList
    norm: nn.Module
    head: nn.Module


# ---------------------------------------------------------------------------------------------------
# The cut rule


def propose_cut(kl: Sequence[float], threshold: float | None = None) -> CutProposal:
    """The transition layer and cut K of a KL-per-layer curve (docs/surrogates.md, "Trajectory and the cut rule").

    The curve is a plateau, a sharp drop, then a smooth convergence to 0 at the last layer. The
    transition is the knee where the plateau ends: with y_l = KL_l / max KL and x_l = l / (L-1),
    the layer standing furthest above the straight line from (0, y_0) to (1, y_{L-1}) (the first
    one on ties). K = knee + 1: the layers that make the drop and the convergence are replaced,
    clamped to 1..L-2 (one layer kept before the translator; the translator is not the last layer).
    A knee less than `threshold` above the line is no sharp transition (a straight or sagging
    curve); then nothing is proposed for removal: transition None, K = L-2.
    """
    threshold = _check_threshold(DEFAULT_THRESHOLD if threshold is None else threshold)
    values = [float(v) for v in kl]
    if len(values) < 3:
        raise TrajectoryError(f"the cut rule needs at least 3 layers, got a curve of {len(values)}")
    if any(not math.isfinite(v) or v < -1e-6 for v in values):
        raise TrajectoryError(f"the KL curve has negative or non-finite values: {values}")
    last, top = len(values) - 1, max(values)
    y = [v / top if top > 0 else 0.0 for v in values]
    above_line = [y[i] - (y[0] + (y[last] - y[0]) * i / last) for i in range(len(y))]
    knee = max(range(len(y)), key=lambda i: (above_line[i], -i))
    prominence = above_line[knee]
    rule = (f"knee: the layer furthest above the line from the first to the last layer's KL (normalised by "
            f"the maximum), if at least {threshold:g} above it; cut K = knee + 1, clamped to 1..L-2")
    if prominence < threshold:
        rule += f"; this curve's best knee is {prominence:.3g} above: no sharp transition, K = L-2"
        return CutProposal(None, last - 1, rule, threshold, prominence)
    return CutProposal(knee, min(knee + 1, last - 1), rule, threshold, prominence)


def _check_threshold(threshold: float) -> float:
    threshold = float(threshold)
    if not 0.0 < threshold < 1.0:
        raise TrajectoryError(f"--threshold must lie strictly between 0 and 1 (the knee's least height above the "
                              f"line, as a fraction of the largest KL); got {threshold}")
    return threshold


# ---------------------------------------------------------------------------------------------------
# The logit lens


def lens_parts(model: nn.Module) -> LensParts:
    """The decoder layers, final norm and LM head of a Llama/Qwen2/Mistral-style causal LM."""
    kind = getattr(getattr(model, "config", None), "model_type", type(model).__name__)
    try:
        layers = decoder_layers(model)
    except ValueError:
        layers = None
    decoder = model.get_decoder() if hasattr(model, "get_decoder") else None
    norm = getattr(decoder, "norm", None)
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if not isinstance(layers, nn.ModuleList) or not isinstance(norm, nn.Module) or not isinstance(head, nn.Module):
        raise TrajectoryError(
            f"{kind}: expected a Llama/Qwen2/Mistral-style causal LM (decoder layers at model.model.layers, "
            "final norm at model.model.norm, an LM head); this architecture is not supported")
    num_layers = getattr(model.config, "num_hidden_layers", len(layers))
    if len(layers) != num_layers:
        raise TrajectoryError(f"{kind}: model.model.layers has {len(layers)} layers but the config says {num_layers}")
    if len(layers) < 3:
        raise TrajectoryError(f"{kind}: {len(layers)} decoder layers; a trajectory (and a surrogate) needs at least 3")
    return LensParts(model=model, layers=layers, norm=norm, head=head)


class _Capture:
    """Forward hooks keeping, at the scored positions of the current batch, each decoder layer's
    output (`outputs`) and the final norm's (`final`: what the model's own LM head sees)."""

    def __init__(self, parts: LensParts, keep: torch.Tensor) -> None:
        self.keep = keep
        self.outputs: list[torch.Tensor | None] = [None] * (len(parts.layers) + 1)
        modules = [*parts.layers, parts.norm]
        self._handles = [m.register_forward_hook(self._hook(i)) for i, m in enumerate(modules)]

    @property
    def final(self) -> torch.Tensor:
        return self.outputs[-1]

    def _hook(self, index: int) -> Callable:
        def hook(module, inputs, output):
            hidden = output[0] if isinstance(output, (tuple, list)) else output
            self.outputs[index] = hidden[self.keep].detach()

        return hook

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()


def scored_positions(attention_mask: torch.Tensor) -> torch.Tensor:
    """[B, T] bool: positions of right-padded texts that have a true next token."""
    keep = torch.zeros_like(attention_mask, dtype=torch.bool)
    keep[:, :-1] = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
    return keep


def _log_probs(parts: LensParts, hidden: torch.Tensor, normed: bool) -> torch.Tensor:
    # `.forward` rather than `__call__`: under ZeRO-3 the caller has gathered these weights, and the
    # modules' own fetch/release hooks must not run (they would re-partition them mid-use).
    if not normed:
        hidden = parts.norm.forward(hidden)
    return torch.log_softmax(parts.head.forward(hidden).float(), dim=-1)


@torch.no_grad()
def batch_lens(parts: LensParts, input_ids: torch.Tensor, attention_mask: torch.Tensor,
               gather: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               chunk_elements: int = CHUNK_ELEMENTS) -> dict[str, torch.Tensor]:
    """Per-text means of the lens statistics of one right-padded batch (float64, on CPU).

    Returns `kl` [B, L] (full-vocabulary KL(q_l || p) per layer, mean over positions), `kl_true_token`
    [B, L] (the KL between the position-normalised true-token probabilities of q_l and p), `q_true`
    [B, L] (q_l's mean probability of the true next token), `p_true` [B] (p's), `positions` [B]
    (scored positions per text). A text without a scored position has zeros. `gather` wraps the
    norm and LM head use (ZeRO-3: GatheredParameters).
    """
    keep = scored_positions(attention_mask)
    capture = _Capture(parts, keep)
    try:
        # logits_to_keep=1: the model's own LM head runs on one position; p comes from the captured
        # final-norm output at the scored positions.
        parts.model(input_ids=input_ids, attention_mask=attention_mask, use_cache=False, logits_to_keep=1)
    finally:
        capture.remove()
    final = capture.final
    targets = input_ids[:, 1:][keep[:, :-1]]
    rows = torch.arange(input_ids.shape[0], device=input_ids.device).unsqueeze(1).expand_as(keep)[keep]
    batch, num_layers = input_ids.shape[0], len(parts.layers)
    kl = torch.zeros(batch, num_layers, dtype=torch.float64, device=input_ids.device)
    q_true = torch.zeros_like(kl)
    p_true = torch.zeros(batch, dtype=torch.float64, device=input_ids.device)
    q_at = torch.zeros(final.shape[0], num_layers, dtype=torch.float64, device=input_ids.device)
    p_at = torch.zeros(final.shape[0], dtype=torch.float64, device=input_ids.device)
    vocab = parts.head.weight.ds_shape[0] if hasattr(parts.head.weight, "ds_shape") else parts.head.weight.shape[0]
    step = max(1, chunk_elements // max(1, vocab))
    with gather():
        # Positions outside, layers inside: p's log-probabilities are computed once per chunk, and
        # at most one layer's [chunk, vocab] logits exist at a time.
        for start in range(0, final.shape[0], step):
            span = slice(start, start + step)
            idx, tgt = rows[span], targets[span].unsqueeze(1)
            log_p = _log_probs(parts, final[span], normed=True)
            p_at[span] = log_p.gather(1, tgt).squeeze(1).exp().double()
            for layer, hidden in enumerate(capture.outputs[:-1]):
                log_q = _log_probs(parts, hidden[span], normed=False)
                per_position = (log_q.exp() * (log_q - log_p)).sum(dim=-1)
                kl[:, layer].index_add_(0, idx, per_position.double())
                q_at[span, layer] = log_q.gather(1, tgt).squeeze(1).exp().double()
                del log_q, per_position
    q_true.index_add_(0, rows, q_at)
    p_true.index_add_(0, rows, p_at)
    positions = keep.sum(dim=1).double()
    denom = positions.clamp(min=1.0)
    return {"kl": (kl / denom.unsqueeze(1)).cpu(), "kl_true_token": _true_token_kl(q_at, p_at, rows, batch).cpu(),
            "q_true": (q_true / denom.unsqueeze(1)).cpu(), "p_true": (p_true / denom).cpu(),
            "positions": positions.cpu()}


def _true_token_kl(q_at: torch.Tensor, p_at: torch.Tensor, rows: torch.Tensor, batch: int) -> torch.Tensor:
    """[B, L]: per text, KL(q~_l || p~) of the true-token probabilities normalised over its positions.

    `q_at` [P, L] and `p_at` [P] are the probabilities at the batch's P scored positions; `rows` [P]
    names each position's text.
    """
    q_sum = torch.zeros(batch, q_at.shape[1], dtype=q_at.dtype, device=q_at.device).index_add_(0, rows, q_at)
    p_sum = torch.zeros(batch, dtype=p_at.dtype, device=p_at.device).index_add_(0, rows, p_at)
    q = (q_at / q_sum[rows]).clamp(min=TRUE_TOKEN_FLOOR)
    p = (p_at / p_sum[rows]).clamp(min=TRUE_TOKEN_FLOOR).unsqueeze(1)
    out = torch.zeros(batch, q_at.shape[1], dtype=q_at.dtype, device=q_at.device)
    return out.index_add_(0, rows, q * (q / p).log())


# ---------------------------------------------------------------------------------------------------
# Texts and batches


def tokenize_texts(tokenizer: Any, texts: Sequence[str], num_texts: int, max_length: int) -> list[list[int]]:
    """Token ids of the first `num_texts` texts with at least 2 tokens (one scored position), truncated."""
    if num_texts < 1 or max_length < 2:
        raise TrajectoryError(f"--num-texts must be >= 1 and --max-length >= 2 (got {num_texts}, {max_length})")
    out: list[list[int]] = []
    for text in texts:
        ids = tokenizer(text, truncation=True, max_length=max_length)["input_ids"]
        if len(ids) >= 2:
            out.append(list(ids))
            if len(out) == num_texts:
                break
    if not out:
        raise TrajectoryError(f"none of the {len(texts)} texts has 2 or more tokens; nothing to score")
    return out


def pad_batch(seqs: Sequence[Sequence[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded [B, T] input ids and attention mask."""
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, seq in enumerate(seqs):
        ids[i, :len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask[i, :len(seq)] = 1
    return ids, mask


def rank_batches(seqs: Sequence[list[int]], rank: int, world_size: int,
                 batch_size: int) -> list[tuple[list[list[int]], bool]]:
    """This rank's batches as (sequences, real); every rank gets the same number of batches.

    Texts are dealt round-robin; a rank's share is sorted longest first (less padding, and the
    largest batch, the likeliest to run out of memory, runs first). A rank with fewer batches than
    the others runs dummy batches (real = False) so that the ZeRO-3 collectives stay matched.
    """
    share = sorted(seqs[rank::world_size], key=len, reverse=True)
    per_rank = math.ceil(math.ceil(len(seqs) / world_size) / batch_size)
    chunks = [share[b * batch_size:(b + 1) * batch_size] for b in range(per_rank)]
    return [(chunk, True) if chunk else ([seqs[0][:2]], False) for chunk in chunks]


@torch.no_grad()
def accumulate(parts: LensParts, batches: Sequence[tuple[list[list[int]], bool]], pad_id: int,
               device: torch.device, gather: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
               chunk_elements: int = CHUNK_ELEMENTS, progress: bool = False) -> torch.Tensor:
    """Float64 sums over this rank's texts: [kl (L), q_true (L), kl_true_token (L), p_true, texts, positions].

    `progress`: print a line about every tenth of the batches (long runs on CPU take tens of minutes).
    """
    num_layers = len(parts.layers)
    sums = torch.zeros(3 * num_layers + 3, dtype=torch.float64)
    started, every = time.time(), max(1, len(batches) // 10)
    for index, (seqs, real) in enumerate(batches):
        if progress and index % every == 0:
            print(f"trajectory: batch {index + 1}/{len(batches)} ({time.time() - started:.0f} s)", flush=True)
        ids, mask = pad_batch(seqs, pad_id)
        stats = batch_lens(parts, ids.to(device), mask.to(device), gather, chunk_elements)
        if not real:  # a dummy batch (ZeRO-3 lock-step): weight 0
            continue
        sums[:num_layers] += stats["kl"].sum(0)
        sums[num_layers:2 * num_layers] += stats["q_true"].sum(0)
        sums[2 * num_layers:3 * num_layers] += stats["kl_true_token"].sum(0)
        sums[-3] += stats["p_true"].sum()
        sums[-2] += float((stats["positions"] > 0).sum())
        sums[-1] += stats["positions"].sum()
    return sums


def curves_from_sums(sums: torch.Tensor, num_layers: int) -> dict[str, Any]:
    """Means over texts from the (all-reduced) sums of `accumulate`."""
    texts = float(sums[-2])
    if texts == 0:
        raise TrajectoryError("no text was scored")
    return {
        "kl": [float(v) / texts for v in sums[:num_layers]],
        "true_token_prob": [float(v) / texts for v in sums[num_layers:2 * num_layers]],
        "kl_true_token": [float(v) / texts for v in sums[2 * num_layers:3 * num_layers]],
        "output_true_token_prob": float(sums[-3]) / texts,
        "texts": int(texts),
        "positions": int(sums[-1]),
    }


# ---------------------------------------------------------------------------------------------------
# Model loading


def _dtype(precision: str) -> torch.dtype:
    dtypes = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if precision not in dtypes:
        raise TrajectoryError(f"--precision must be one of {', '.join(dtypes)}, got {precision!r}")
    return dtypes[precision]


def _check_model_folder(path: Path) -> None:
    if not path.is_dir():
        raise TrajectoryError(f"model folder {path} does not exist")
    if not (path / "config.json").is_file():
        raise TrajectoryError(f"{path} has no config.json; pass a Hugging Face causal-LM folder")


def load_model(path: Path, precision: str, ds_json: str | None, batch_size: int) -> Placement:
    """The causal LM on the launched ranks (`mmtrain.engine.placement`): one process without `ds_json`,
    partitioned under a ZeRO-3 JSON, replicated under another."""
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoConfig, AutoModelForCausalLM

    dtype = _dtype(precision)
    hidden = AutoConfig.from_pretrained(path).hidden_size
    try:
        return place_pretrained(lambda: AutoModelForCausalLM.from_pretrained(path, dtype=dtype), ds_json,
                                batch_size, precision, hidden)
    except DeepSpeedConfigError as exc:
        raise TrajectoryError(str(exc)) from None


def _gather_lens_weights(parts: LensParts, zero3: bool) -> Callable[[], contextlib.AbstractContextManager]:
    if not zero3:
        return contextlib.nullcontext
    # heavy; imported where used, once the accelerator is chosen
    import deepspeed

    params = {id(p): p for m in (parts.norm, parts.head) for p in m.parameters()}  # tied head = embeddings once
    return lambda: deepspeed.zero.GatheredParameters(list(params.values()), modifier_rank=None)


def parameter_counts(model: nn.Module) -> tuple[int, int]:
    """(elements held by this rank, elements of the whole model); equal unless ZeRO-3 partitioned."""
    local = total = 0
    for p in model.parameters():
        if hasattr(p, "ds_numel"):
            total += p.ds_numel
            # Small parameters below stage3_param_persistence_threshold stay whole on every rank.
            local += p.ds_numel if getattr(p, "ds_persist", False) else p.ds_tensor.numel()
        else:
            total += p.numel()
            local += p.numel()
    return local, total


def _all_reduce(tensor: torch.Tensor, world_size: int, device: torch.device) -> torch.Tensor:
    if world_size == 1:
        return tensor

    on_device = tensor.to(device)
    dist.all_reduce(on_device)
    return on_device.cpu()


def _all_gather_int(value: int, world_size: int, device: torch.device) -> list[int]:
    if world_size == 1:
        return [value]

    out = [torch.zeros(1, dtype=torch.long, device=device) for _ in range(world_size)]
    dist.all_gather(out, torch.tensor([value], dtype=torch.long, device=device))
    return [int(t.item()) for t in out]


# ---------------------------------------------------------------------------------------------------
# Outputs


def plot_trajectory(result: dict[str, Any], path: str | Path) -> None:
    """KL per layer (log scale) over the true-token probability, knee and cut marked; written atomically."""
    # heavy: only when a plot is drawn
    import matplotlib

    matplotlib.use("Agg")
    # heavy: only when a plot is drawn
    import matplotlib.pyplot as plt

    last = len(result["kl"]) - 1
    fig, (ax_kl, ax_p) = plt.subplots(2, 1, figsize=(8, 6.5), sharex=True, height_ratios=(2, 1))
    used = result.get("cut_curve", "full")
    for choice, key in KL_CURVES.items():
        if key not in result:
            continue
        # The last layer's KL is 0 by construction (q_{L-1} = p): off a log axis.
        shown = [i for i, v in enumerate(result[key]) if v > 0]
        ax_kl.semilogy(shown, [result[key][i] for i in shown], "o-" if choice == used else "o:", ms=3,
                       label=f"{choice} KL" + (" (cut)" if choice == used else ""))
    ax_kl.set_ylabel("KL(q_l || p), nats")
    ax_kl.set_title(f"{Path(result['model']).name}: logit-lens KL to the output, {result['texts']} texts, "
                    f"{result['positions']} positions (layer {last}: 0)", fontsize=9)
    ax_p.plot(range(last + 1), result["true_token_prob"], "o-", ms=3, color="tab:green", label="q_l")
    ax_p.axhline(result["output_true_token_prob"], color="gray", ls=":", label="p (output)")
    ax_p.set_ylabel("P(true next token)")
    ax_p.set_xlabel("decoder layer l")
    ax_p.legend(loc="upper left", fontsize=8)
    knee, cut = result["transition_layer"], result["cut"]
    for ax in (ax_kl, ax_p):
        first = ax is ax_kl  # the legend is on the upper panel
        if knee is not None:
            ax.axvline(knee, color="tab:orange", ls="--", label=f"transition (knee): layer {knee}" if first else None)
        ax.axvline(cut, color="tab:red", label=f"cut K = {cut}: layers {cut}..{last - 1} replaced" if first else None)
        ax.grid(alpha=0.3)
    ax_kl.legend(fontsize=8)
    fig.tight_layout()
    image = io.BytesIO()
    try:
        fig.savefig(image, format="png", dpi=110)
    finally:
        plt.close(fig)
    atomic_write_bytes(path, image.getvalue())  # a temporary file in the same folder, then os.replace


def default_out_dir(model: str | Path) -> Path:
    return Path("runs") / "trajectory" / Path(model).resolve().name


# ---------------------------------------------------------------------------------------------------
# The command


def run_trajectory(args: Any) -> dict[str, Any]:
    """`mmtrain surrogate trajectory`: the curves, the proposed cut, trajectory.json + trajectory.png.

    `args` has model, texts, out, num_texts, max_length, batch_size, threshold, deepspeed, precision.
    Every rank returns the result; rank 0 writes the files.
    """
    # heavy (seconds to import): only where a model or tokenizer is loaded
    from transformers import AutoTokenizer


    started = time.time()
    model_dir = Path(args.model)
    _check_model_folder(model_dir)
    ranks = int(os.environ.get("WORLD_SIZE", "1"))
    if ranks > 1 and not args.deepspeed:
        raise TrajectoryError(f"launched as {ranks} ranks without --deepspeed: every rank would run the whole "
                              "trajectory; pass --deepspeed ds_configs/zero3.json to shard it, or run one process")
    if args.batch_size < 1:
        raise TrajectoryError(f"--batch-size must be >= 1, got {args.batch_size}")
    if not args.texts:
        raise TrajectoryError("no --texts given")
    if args.threshold is not None:
        _check_threshold(args.threshold)  # before the (long) run
    kl_choice = getattr(args, "kl", None) or "true-token"
    if kl_choice not in KL_CURVES:
        raise TrajectoryError(f"--kl must be one of {', '.join(KL_CURVES)}, got {kl_choice!r}")
    try:
        texts = corpus_texts(args.texts)
    except CorpusError as exc:
        raise TrajectoryError(str(exc).replace("word_converter.corpus", "--texts")) from None
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    seqs = tokenize_texts(tokenizer, texts, args.num_texts, args.max_length)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0

    loaded = load_model(model_dir, args.precision, args.deepspeed, args.batch_size)
    parts = lens_parts(loaded.model)
    local_params, total_params = parameter_counts(loaded.model)

    batches = rank_batches(seqs, loaded.rank, loaded.world_size, args.batch_size)
    # The FLOPs it costs (the forwards and the lens at every layer), counted as they run: a method's
    # total cost includes choosing its cut.
    with FlopCounterMode(display=False) as counter:
        sums = accumulate(parts, batches, pad_id, loaded.device, _gather_lens_weights(parts, loaded.zero3),
                          progress=loaded.rank == 0)
    sums = _all_reduce(torch.cat([sums, torch.tensor([float(counter.get_total_flops())], dtype=torch.float64)]),
                       loaded.world_size, loaded.device)
    flops, sums = float(sums[-1]), sums[:-1]
    curves = curves_from_sums(sums, len(parts.layers))
    proposal = propose_cut(curves[KL_CURVES[kl_choice]], args.threshold)
    result = {
        "model": str(model_dir.resolve()),
        "model_type": loaded.model.config.model_type,
        "num_layers": len(parts.layers),
        **{k: curves[k] for k in ("texts", "positions")},
        "max_length": args.max_length,
        "averaging": "per text: mean over its positions that have a true next token; then mean over texts",
        "cut_curve": kl_choice,
        "kl_true_token": curves["kl_true_token"],
        "kl": curves["kl"],
        "true_token_prob": curves["true_token_prob"],
        "output_true_token_prob": curves["output_true_token_prob"],
        "transition_layer": proposal.transition_layer,
        "cut": proposal.cut,
        "rule": proposal.rule,
        "threshold": proposal.threshold,
        "knee_prominence": proposal.prominence,
        "precision": args.precision,
        "world_size": loaded.world_size,
        "zero3": loaded.zero3,
        "params_total": total_params,
        "params_local_per_rank": _all_gather_int(local_params, loaded.world_size, loaded.device),
        "texts_sources": [str(t) for t in args.texts],
        "flops": flops,
        "elapsed_s": round(time.time() - started, 2),
    }
    if loaded.rank == 0:
        out = Path(args.out) if args.out else default_out_dir(model_dir)
        atomic_write_json(out / "trajectory.json", result)
        plot_trajectory(result, out / "trajectory.png")
        print(f"trajectory: {result['texts']} texts, {result['positions']} positions, {result['num_layers']} layers; "
              f"transition at layer {proposal.transition_layer}, proposed cut K = {proposal.cut} "
              f"(of {result['num_layers']}); "
              f"wrote {out / 'trajectory.json'} and trajectory.png ({result['elapsed_s']:.0f} s)")
    return result
