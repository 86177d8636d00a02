"""The two primitives every metric is built from, sharded over ranks: target log-probs and greedy answers.

Rank r takes samples r, r + N, ... (padded by wrapping so every rank runs the same number of
forwards, which ZeRO-3's collective parameter gathers need); results are gathered to every rank
in manifest order and the padding is dropped.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist

from mmtrain.data import VLMDataset, collate, get_template
from mmtrain.data.manifest import Sample
from mmtrain.data.templates import stop_token_ids
from mmtrain.engine.evaluate import rank_share
from mmtrain.eval.loading import EvalModel


def build_dataset(em: EvalModel, samples: list[Sample]) -> VLMDataset:
    """Samples encoded exactly as in training (same template, image transform and visual tokens)."""
    data = em.cfg.data
    return VLMDataset(samples, em.tokenizer, em.model.vision.image_transform, tuple(em.model.vision.image_shape),
                      get_template(data.template), em.model.num_image_tokens, data.max_length, bad_samples="error",
                      no_image_text=data.no_image_text)


def _gather(local: list[tuple[int, Any]], em: EvalModel, total: int) -> list[Any]:
    if em.world_size > 1:
        parts: list[Any] = [None] * em.world_size
        dist.all_gather_object(parts, local)
        local = [item for part in parts for item in part]
    by_index = dict(local)
    return [by_index[i] for i in range(total)]


def _chunks(em: EvalModel, count: int, batch_size: int):
    share = rank_share(count, em.rank, em.world_size)
    for start in range(0, len(share), batch_size):
        yield share[start:start + batch_size]


def _pad_token(em: EvalModel) -> int:
    return em.tokenizer.pad_token_id if em.tokenizer.pad_token_id is not None else 0


@torch.no_grad()
def target_logprobs(em: EvalModel, samples: list[Sample], batch_size: int) -> list[tuple[float, int]]:
    """(summed log-probability of the target tokens, number of target tokens) for every sample."""
    if not samples:
        return []
    dataset = build_dataset(em, samples)
    local: list[tuple[int, tuple[float, int]]] = []
    for chunk in _chunks(em, len(samples), batch_size):
        batch = collate([dataset.load(i) for i, _ in chunk], _pad_token(em))
        batch = {k: v.to(em.device) for k, v in batch.items()}
        sums, counts = em.model.target_logprobs(**batch)
        sums, counts = sums.cpu(), counts.cpu()
        local += [(i, (float(sums[row]), int(counts[row]))) for row, (i, real) in enumerate(chunk) if real]
    return _gather(local, em, len(samples))


def _prompt_only(item: dict[str, Any]) -> dict[str, Any]:
    """Cut an encoded sample just before its first target token (what the model must continue)."""
    targets = (item["labels"] != -100).nonzero()
    end = int(targets[0]) if len(targets) else item["input_ids"].shape[0]
    return {**item, "input_ids": item["input_ids"][:end], "image_mask": item["image_mask"][:end]}


def _left_pad(items: list[dict[str, Any]], pad: int) -> dict[str, torch.Tensor]:
    longest = max(item["input_ids"].shape[0] for item in items)
    size = len(items)
    input_ids = torch.full((size, longest), pad, dtype=torch.long)
    attention_mask = torch.zeros((size, longest), dtype=torch.long)
    image_mask = torch.zeros((size, longest), dtype=torch.bool)
    for row, item in enumerate(items):
        length = item["input_ids"].shape[0]
        input_ids[row, longest - length:] = item["input_ids"]
        attention_mask[row, longest - length:] = 1
        image_mask[row, longest - length:] = item["image_mask"]
    return {"input_ids": input_ids, "attention_mask": attention_mask, "image_mask": image_mask,
            "pixel_values": torch.stack([item["pixel_values"] for item in items]),
            "has_image": torch.tensor([bool(item["has_image"]) for item in items], dtype=torch.bool)}


@torch.no_grad()
def generate_answers(em: EvalModel, samples: list[Sample], batch_size: int, max_new_tokens: int) -> list[str]:
    """Greedy continuation of each sample's prompt (everything before its first target), decoded."""
    if not samples:
        return []
    dataset = build_dataset(em, samples)
    stops = stop_token_ids(em.tokenizer)
    local: list[tuple[int, str]] = []
    for chunk in _chunks(em, len(samples), batch_size):
        batch = _left_pad([_prompt_only(dataset.load(i)) for i, _ in chunk], _pad_token(em))
        batch = {k: v.to(em.device) for k, v in batch.items()}
        new = em.model.generate(**batch, max_new_tokens=max_new_tokens, eos_token_id=stops,
                                pad_token_id=_pad_token(em), synced_ranks=em.zero3 and em.world_size > 1).cpu()
        for row, (i, real) in enumerate(chunk):
            if real:
                ids = [t for t in new[row].tolist() if t not in stops and t != _pad_token(em)]
                local.append((i, em.tokenizer.decode(ids, skip_special_tokens=True).strip()))
    return _gather(local, em, len(samples))


@torch.no_grad()
def text_logprobs(em: EvalModel, text: str, window: int, max_tokens: int) -> tuple[float, int]:
    """Summed next-token log-probability and token count of plain `text`, through the LLM alone.

    The text is cut into windows of `window` tokens (at most `max_tokens` in all), each scored on
    its own; every rank takes its share of the windows.
    """
    ids = em.tokenizer(text, add_special_tokens=False)["input_ids"][:max_tokens]
    windows = [ids[i:i + window] for i in range(0, len(ids), window) if len(ids[i:i + window]) > 1]
    total, count = 0.0, 0
    local: list[tuple[int, tuple[float, int]]] = []
    for chunk in _chunks(em, len(windows), 1):
        (i, real), = chunk
        tokens = torch.tensor([windows[i]], device=em.device)
        embeds = em.model.llm.embed(tokens)
        sums, counts = em.model.llm.target_logprobs(embeds, torch.ones_like(tokens), tokens)
        if real:
            local.append((i, (float(sums[0]), int(counts[0]))))
    for s, n in _gather(local, em, len(windows)):
        total, count = total + s, count + n
    return total, count
