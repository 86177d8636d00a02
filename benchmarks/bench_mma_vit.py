"""MMA on a real ViT, LaVIN's design: router adapters in DINOv2-S's blocks and in the frozen LLM vs
plain adapters in both vs projector-only vs LoRA (configs/mma/vit.yaml), at comparable trainable
budgets, on easy-VQA mixed with text-only prose instructions, the same data order and steps.

For each arm: exact match of greedy answers on the first 1,000 easy-VQA test questions, overall and
by question kind (yes/no, colour, shape) against two baselines that never see the picture: the
majority answer of the same questions, and each question's most frequent training answer; the
answer loss with the image, with none and with another question's image; trainable parameters,
time per step and peak memory; the LLM's text perplexity on held-out prose before (the untouched
LLM: the projector arm) and after training, in domain and out of domain.

    python benchmarks/bench_mma_vit.py                 # run what is missing (resumable), then report
    python benchmarks/bench_mma_vit.py --report-only

Writes benchmarks/results/mma_vit.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
from benchmarks.bench_mma import reference_prose, text_quality  # noqa: E402
from benchmarks.common import (  # noqa: E402
    environment, recipe_stage_folders, run_mmtrain, save_json, trainable_parameters, training_record,
)
from mmtrain.assets.registry import resolve_asset_reference  # noqa: E402
from mmtrain.data.manifest import read_manifest  # noqa: E402

RECIPE = REPO / "configs" / "mma" / "vit.yaml"
ASSETS = ["easy-vqa", "prose", "dinov2-small", "smollm2-135m"]
EVAL_NAME = "vqa"
TRAIN_MANIFEST = "asset:easy-vqa/train.jsonl"
TEST_MANIFEST = "asset:easy-vqa/test.jsonl"
YES_NO = {"yes", "no"}
SHAPES = {"circle", "rectangle", "triangle"}


def question_kind(answer: str) -> str:
    """easy-VQA's three kinds of question, told apart by their answer."""
    return "yes/no" if answer in YES_NO else "shape" if answer in SHAPES else "colour"


def question_prior(train_manifest: Path) -> dict[str, str]:
    """Question text -> its most frequent answer in the training set: what a model that never looks
    at the picture can learn (easy-VQA's yes/no questions are worded differently when the answer is
    "no", so the wording alone answers many of them)."""
    answers: dict[str, Counter] = {}
    for sample in read_manifest(train_manifest):
        (_, question), (_, answer) = sample.conversations[:2]
        answers.setdefault(question.replace("<image>", "").strip(), Counter())[answer.strip()] += 1
    return {question: counts.most_common(1)[0][0] for question, counts in answers.items()}


def test_questions(test_manifest: Path) -> dict[str, str]:
    """Test record id -> its question text."""
    return {str(s.id): s.conversations[0][1].replace("<image>", "").strip() for s in read_manifest(test_manifest)}


def answer_accuracy(examples: list[dict], questions: dict[str, str], prior: dict[str, str]) -> dict:
    """Exact match overall and by question kind, each next to two baselines that ignore the picture:
    the majority answer of those questions, and each question's most frequent training answer."""
    by_kind: dict[str, list[dict]] = {}
    for example in examples:
        by_kind.setdefault(question_kind(example["answer"]), []).append(example)

    def score(rows: list[dict]) -> dict:
        majority = Counter(r["answer"] for r in rows).most_common(1)[0][1] / len(rows)
        question_only = sum(prior.get(questions[r["id"]]) == r["answer"] for r in rows) / len(rows)
        return {"accuracy": sum(r["correct"] for r in rows) / len(rows), "majority": majority,
                "question_only": question_only, "questions": len(rows)}

    return {"all": score(examples), **{kind: score(rows) for kind, rows in sorted(by_kind.items())}}


def quality(folder: Path, questions: dict[str, str], prior: dict[str, str]) -> dict:
    result = json.loads((folder / "eval" / f"{EVAL_NAME}.json").read_text())
    loss = result["loss"]
    return {"answers": answer_accuracy(result["qa"]["examples"], questions, prior), "loss": loss["loss"],
            "loss_no_image": loss.get("loss_no_image"), "loss_other_image": loss.get("loss_other_image"),
            "text_ppl": result["text"]["ppl"]}


def report(output_dir: Path, run_missing: bool) -> dict:
    ood_text = output_dir / "reference_prose.txt"
    if not ood_text.is_file():
        reference_prose(ood_text)
    questions = test_questions(Path(resolve_asset_reference(TEST_MANIFEST)))
    prior = question_prior(Path(resolve_asset_reference(TRAIN_MANIFEST)))
    arms = {}
    for name, folder in recipe_stage_folders(RECIPE, output_dir).items():
        if not (folder / "eval" / f"{EVAL_NAME}.json").is_file():
            print(f"(arm {name}: no results in {folder})")
            continue
        arms[name] = {**trainable_parameters(folder), **training_record(folder), **quality(folder, questions, prior),
                      **text_quality(folder, ood_text, run_missing)}
    result = {"recipe": str(RECIPE.relative_to(REPO)), "arms": arms}
    if "projector" in arms:  # the LLM is untouched in that arm: its perplexities are the "before"
        result["text_ppl_before"] = arms["projector"]["text_ppl"]
        result["ood_text_ppl_before"] = arms["projector"].get("ood_text_ppl")
    return result


def format_report(result: dict) -> str:
    arms = result["arms"]
    base = arms.get("projector", {}).get("step_time_s")
    nan = float("nan")
    lines = [f"{'arm':<10} {'trainable':>10} {'exact':>6} {'yes/no':>6} {'colour':>6} {'shape':>6} "
             f"{'loss':>6} {'no img':>7} {'other':>6} {'text ppl':>9} {'ood ppl':>8} {'txt loss':>8} "
             f"{'s/step':>7} {'x proj':>7} {'peak MiB':>9}"]
    for name, arm in arms.items():
        answers = arm["answers"]
        ratio = arm["step_time_s"] / base if base else nan
        lines.append(f"{name:<10} {arm['trainable']:>10,} {answers['all']['accuracy']:>6.3f} "
                     + " ".join(f"{answers.get(k, {}).get('accuracy', nan):>6.3f}" for k in ("yes/no", "colour", "shape"))
                     + f" {arm['loss']:>6.3f} {arm['loss_no_image'] or nan:>7.3f} {arm['loss_other_image'] or nan:>6.3f}"
                     f" {arm['text_ppl']:>9.2f} {arm.get('ood_text_ppl', nan):>8.2f} "
                     f"{arm.get('text_instruction_loss', nan):>8.3f} {arm['step_time_s']:>7.2f} {ratio:>7.2f} "
                     f"{arm['peak_rss_mib'] or 0:>9.0f}")
    if arms:
        answers = next(iter(arms.values()))["answers"]
        lines.append("majority answer of the same questions: " + ", ".join(
            f"{k} {v['majority']:.3f} ({v['questions']} q)" for k, v in answers.items()))
        lines.append("each question's most frequent training answer (no picture): " + ", ".join(
            f"{k} {v['question_only']:.3f}" for k, v in answers.items()))
    if "text_ppl_before" in result:
        lines.append(f"perplexities of the untouched LLM (before): held-out licence prose {result['text_ppl_before']:.2f}, "
                     f"out-of-domain reference prose {result.get('ood_text_ppl_before') or nan:.2f}")
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output-dir", default=str(REPO / "runs" / "mma-vit"))
    parser.add_argument("--report-only", action="store_true")
    args = parser.parse_args()
    output_dir = Path(args.output_dir)
    if not args.report_only:
        run_mmtrain(["assets", "prepare", *ASSETS])
        run_mmtrain(["run", str(RECIPE), "--output-dir", str(output_dir)])
    result = report(output_dir, run_missing=not args.report_only)
    result["command"] = "python benchmarks/bench_mma_vit.py"
    result["environment"] = environment()
    save_json(result, "mma_vit.json")
    print(format_report(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
