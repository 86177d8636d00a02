"""Every metric a manifest supports, computed for one trained model.

- all samples: validation loss and perplexity (token-weighted, targets only);
- samples with images: the same loss with NO image (the LLM alone on the same text) and with a
  MISMATCHED image (another sample's): the image helps only if loss < both;
- captions: greedy captions per distinct image, scored with CIDEr-D against all of its captions;
- question/answer conversations: greedy answers, exact match after normalisation;
- multiple-choice records (`options` + `answer`): accuracy by the likelihood of each option's
  letter as the answer, and by the likelihood of each option's text;
- optionally a plain-text file: perplexity of the LLM inside the VLM (does its language survive?).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mmtrain.data import read_manifest
from mmtrain.data.dataset import random_subset
from mmtrain.data.manifest import Sample
from mmtrain.eval import metrics
from mmtrain.eval.loading import EvalModel
from mmtrain.eval.scoring import generate_answers, target_logprobs, text_logprobs
from mmtrain.eval.variants import OPTION_LETTERS, reference_answer, with_answer, with_other_images, without_image


@dataclass
class EvalOptions:
    max_samples: int | None = None
    """Evaluate the first N samples of the manifest (all when None)."""
    seeded_sample: bool = False
    """Draw the `max_samples` at random with the run's seed instead of taking the first N: on the run's
    validation manifest with `max_samples = data.val_samples`, exactly the samples training validated on."""
    generate: int | None = None
    """Generate for at most N items (distinct images for captions, questions for QA); None = all,
    0 = no generation (no CIDEr or exact match)."""
    max_new_tokens: int = 24
    batch_size: int = 8
    ablations: bool = True
    """Also score the no-image and mismatched-image variants."""
    text: str | None = None
    """A plain-text file for the text-only perplexity check."""
    text_window: int = 256
    text_max_tokens: int = 4096


def _loss(scores: list[tuple[float, int]]) -> tuple[float, int]:
    total = sum(s for s, _ in scores)
    tokens = sum(n for _, n in scores)
    return (-total / tokens if tokens else float("nan")), tokens


def evaluate_manifest(em: EvalModel, manifest: str | Path, opts: EvalOptions) -> dict[str, Any]:
    """Run every applicable metric on `manifest`; the same dict on every rank."""
    samples = read_manifest(manifest, em.cfg.data.image_root)  # LLaVA's .json files name images under it
    if opts.seeded_sample and not opts.max_samples:
        raise ValueError("--seeded-sample draws --max-samples samples; give --max-samples N")
    if opts.max_samples:
        if opts.seeded_sample:
            samples = random_subset(samples, min(opts.max_samples, len(samples)), em.cfg.seed, manifest)
        else:
            samples = samples[: opts.max_samples]
    result: dict[str, Any] = {"data": str(manifest), "samples": len(samples)}
    headline: dict[str, float] = {}

    loss, tokens = _loss(target_logprobs(em, samples, opts.batch_size))
    result["loss"] = {"loss": loss, "ppl": math.exp(loss), "tokens": tokens}
    headline["loss"] = loss
    if opts.ablations and any(s.image is not None for s in samples):
        no_image, _ = _loss(target_logprobs(em, [without_image(s) for s in samples], opts.batch_size))
        other_image, _ = _loss(target_logprobs(em, with_other_images(samples), opts.batch_size))
        result["loss"].update(loss_no_image=no_image, loss_other_image=other_image,
                              image_helps=bool(loss < no_image and loss < other_image))
        headline.update(loss_no_image=no_image, loss_other_image=other_image)

    captions = [s for s in samples if s.text is not None]
    if captions and opts.generate != 0:
        result["captions"] = _caption_metrics(em, captions, opts)
        headline["cider"] = result["captions"]["cider"]
    questions = [s for s in samples if s.conversations is not None and s.options is None]
    if questions and opts.generate != 0:
        result["qa"] = _qa_metrics(em, questions, opts)
        headline["exact_match"] = result["qa"]["exact_match"]
    choices = [s for s in samples if s.options is not None]
    if choices:
        result["multiple_choice"] = _choice_metrics(em, choices, opts)
        headline["mc_accuracy"] = result["multiple_choice"]["accuracy"]
    if opts.text:
        total, count = text_logprobs(em, Path(opts.text).read_text(encoding="utf-8"), opts.text_window,
                                     opts.text_max_tokens)
        text_loss = -total / count if count else float("nan")
        result["text"] = {"file": opts.text, "loss": text_loss, "ppl": math.exp(text_loss), "tokens": count}
        headline["text_ppl"] = result["text"]["ppl"]
    result["headline"] = headline
    return result


def _caption_metrics(em: EvalModel, captions: list[Sample], opts: EvalOptions) -> dict[str, Any]:
    by_image: dict[str, list[Sample]] = {}
    for sample in captions:
        by_image.setdefault(str(sample.image), []).append(sample)
    images = list(by_image)[: opts.generate] if opts.generate is not None else list(by_image)
    firsts = [by_image[image][0] for image in images]
    predictions = generate_answers(em, firsts, opts.batch_size, opts.max_new_tokens)
    references = {image: [s.text for s in by_image[image]] for image in images}
    cider, per_item = metrics.cider_d(dict(zip(images, predictions)), references)
    examples = [{"image": image, "prediction": pred, "references": references[image],
                 "cider": per_item[image]} for image, pred in zip(images, predictions)]
    return {"cider": cider, "images": len(images), "examples": examples}


def _qa_metrics(em: EvalModel, questions: list[Sample], opts: EvalOptions) -> dict[str, Any]:
    chosen = questions[: opts.generate] if opts.generate is not None else questions
    predictions = generate_answers(em, chosen, opts.batch_size, opts.max_new_tokens)
    answers = [reference_answer(s) for s in chosen]
    hits = [metrics.exact_match(p, a) for p, a in zip(predictions, answers)]
    examples = [{"id": s.id, "image": str(s.image) if s.image else None, "prediction": p, "answer": a, "correct": h}
                for s, p, a, h in zip(chosen, predictions, answers, hits)]
    return {"exact_match": sum(hits) / len(hits), "questions": len(chosen), "examples": examples}


def _choice_metrics(em: EvalModel, choices: list[Sample], opts: EvalOptions) -> dict[str, Any]:
    width = max(len(s.options) for s in choices)
    if width > len(OPTION_LETTERS):
        raise ValueError(f"at most {len(OPTION_LETTERS)} options per question are supported, got {width}")
    by_letter, by_text = [], []
    for kind, scores in (("letter", by_letter), ("text", by_text)):
        variants, owners = [], []
        for index, sample in enumerate(choices):
            for j, option in enumerate(sample.options):
                variants.append(with_answer(sample, OPTION_LETTERS[j] if kind == "letter" else option))
                owners.append(index)
        scored = target_logprobs(em, variants, opts.batch_size)
        per_question: list[list[float]] = [[] for _ in choices]
        for owner, (logprob, count) in zip(owners, scored):
            # Option texts differ in length: compare mean log-probability per token.
            per_question[owner].append(logprob / max(count, 1) if kind == "text" else logprob)
        scores.extend(per_question)
    answers = [s.answer for s in choices]
    result = {"accuracy": metrics.multiple_choice_accuracy(by_letter, answers),
              "accuracy_by_option_text": metrics.multiple_choice_accuracy(by_text, answers),
              "chance": sum(1 / len(s.options) for s in choices) / len(choices), "questions": len(choices)}
    categories = sorted({s.category for s in choices if s.category})
    if len(categories) > 1:  # e.g. the question kinds of a mixed set
        result["by_category"] = {}
        for category in categories:
            rows = [i for i, s in enumerate(choices) if s.category == category]
            pick = [answers[i] for i in rows]
            result["by_category"][category] = {
                "questions": len(rows),
                "accuracy": metrics.multiple_choice_accuracy([by_letter[i] for i in rows], pick),
                "accuracy_by_option_text": metrics.multiple_choice_accuracy([by_text[i] for i in rows], pick)}
    return result


def format_results(result: dict[str, Any], show: int = 0) -> str:
    """A short terminal table of the headline numbers, then up to `show` generated examples."""
    lines = [f"{result['data']}  ({result['samples']} samples)"]
    for key, value in result["headline"].items():
        lines.append(f"  {key:18s} {value:10.4f}")
    if "loss" in result and "image_helps" in result["loss"]:
        lines.append(f"  {'image helps':18s} {'yes' if result['loss']['image_helps'] else 'NO'}")
    mc = result.get("multiple_choice")
    if mc:
        lines.append(f"  {'mc_by_option_text':18s} {mc['accuracy_by_option_text']:10.4f}   (chance {mc['chance']:.3f})")
        for category, row in mc.get("by_category", {}).items():
            lines.append(f"    {category:16s} letter {row['accuracy']:.3f}  option text {row['accuracy_by_option_text']:.3f}"
                         f"  ({row['questions']} questions)")
    examples = (result.get("captions") or result.get("qa") or {}).get("examples", [])
    if show and examples:  # spread over the set: manifests are often grouped by category
        examples = [examples[i * len(examples) // min(show, len(examples))] for i in range(min(show, len(examples)))]
    else:
        examples = []
    for example in examples:
        name = Path(example["image"]).name if example.get("image") else example.get("id")
        truth = example.get("references", [example.get("answer")])
        lines.append(f"  - {name}: {example['prediction']!r}  (reference: {truth[0]!r})")
    return "\n".join(lines)
