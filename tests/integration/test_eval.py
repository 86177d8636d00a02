"""`mmtrain eval` on a tiny trained run: scores agree with the training loss, generation with a plain
greedy loop, the no-image/mismatched-image ablations and QA metrics are produced, ZeRO-3 sharding
over 2 ranks gives the single-process numbers, and bad targets fail with a clear message."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from mmtrain.assets.easy_vqa import choice_record
from tests.conftest import REPO, launch, tiny_config, write_config


@pytest.fixture(scope="module")
def trained_run(tiny_assets, tmp_path_factory):
    """A tiny VLM trained for 6 steps (single process), and a mixed manifest to evaluate it on."""
    out = tmp_path_factory.mktemp("eval_run")
    cfg = tiny_config(tiny_assets, out / "run", max_steps=6, **{"checkpoint.save_every": 0, "data.template": "chat"})
    path = write_config(cfg, out / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    folder = Path(tiny_assets["val"]).parent
    records = [json.loads(line) for line in Path(tiny_assets["val"]).read_text().splitlines()][:6]
    lines = []
    for i, rec in enumerate(records):
        image = str(folder / rec["image"])
        lines.append({"image": image, "text": rec["text"]})
        lines.append({"image": image, "conversations": [{"from": "human", "value": "<image>\nWhat is it?"},
                                                        {"from": "gpt", "value": rec["text"]}]})
        options = [rec["text"], "no.", "yes."]
        lines.append({"image": image, "options": options, "answer": 0, "category": f"kind-{i % 2}", "conversations": [
            {"from": "human", "value": "<image>\nWhich?"}, {"from": "gpt", "value": "A"}]})
    manifest = out / "mixed.jsonl"
    manifest.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return {"run": out / "run", "manifest": manifest, "assets": tiny_assets}


def test_target_logprobs_match_the_training_loss(trained_run):
    from mmtrain.data import Collator, read_manifest
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.eval.scoring import build_dataset, target_logprobs

    em = load_for_eval(trained_run["run"])
    samples = read_manifest(trained_run["manifest"])[:5]
    scores = target_logprobs(em, samples, batch_size=2)
    dataset = build_dataset(em, samples)
    for i, (logprob, count) in enumerate(scores):
        batch = Collator(em.tokenizer.pad_token_id)([dataset.load(i)])
        with torch.no_grad():
            loss = em.model(**batch).loss  # the training path's mean token cross-entropy
        assert count == int((batch["labels"][:, 1:] != -100).sum())
        assert abs(-logprob / count - float(loss)) < 1e-4


def test_generation_matches_a_plain_greedy_loop(trained_run):
    from mmtrain.data import read_manifest
    from mmtrain.data.templates import stop_token_ids
    from mmtrain.eval.loading import load_for_eval
    from mmtrain.eval.scoring import _prompt_only, build_dataset, generate_answers

    em = load_for_eval(trained_run["run"])
    samples = [s for s in read_manifest(trained_run["manifest"]) if s.options is None][:4]
    answers = generate_answers(em, samples, batch_size=3, max_new_tokens=6)  # mixed prompt lengths: left padding
    dataset = build_dataset(em, samples)
    stops = stop_token_ids(em.tokenizer)
    for i, answer in enumerate(answers):
        item = _prompt_only(dataset.load(i))
        ids, mask = item["input_ids"][None], item["image_mask"][None]
        new = []
        with torch.no_grad():
            for _ in range(6):  # no KV cache, no padding: the whole sequence every step
                embeds = em.model.embed_inputs(ids, item["pixel_values"][None], torch.tensor([item["has_image"]]), mask)
                logits = em.model.llm.model(inputs_embeds=embeds, attention_mask=torch.ones_like(ids)).logits
                token = int(logits[0, -1].argmax())
                if token in stops:
                    break
                new.append(token)
                ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
                mask = torch.cat([mask, torch.tensor([[False]])], dim=1)
        assert answer == em.tokenizer.decode(new, skip_special_tokens=True).strip()


def _eval(trained_run, tmp_path, *extra: str) -> dict:
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(trained_run["run"]), "--data",
                           str(trained_run["manifest"]), "--out", str(out), "--max-new-tokens", "6", *extra],
                          cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(out.read_text()) | {"stdout": proc.stdout}


def test_eval_cli_writes_every_metric(trained_run, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("A small red fox jumps over the lazy dog. " * 20)
    result = _eval(trained_run, tmp_path, "--text", str(text))
    assert result["samples"] == 18 and result["step"] == 6
    loss = result["loss"]
    assert loss["tokens"] > 0 and loss["ppl"] == pytest.approx(2.718281828 ** loss["loss"], rel=1e-6)
    assert {"loss_no_image", "loss_other_image", "image_helps"} <= set(loss)
    assert loss["loss_no_image"] != loss["loss"]
    assert result["captions"]["images"] == 6 and 0 <= result["captions"]["cider"]
    assert result["qa"]["questions"] == 6 and 0 <= result["qa"]["exact_match"] <= 1
    mc = result["multiple_choice"]
    assert mc["questions"] == 6 and mc["chance"] == pytest.approx(1 / 3)
    assert {k: v["questions"] for k, v in mc["by_category"].items()} == {"kind-0": 3, "kind-1": 3}
    assert mc["accuracy"] == pytest.approx(sum(v["accuracy"] for v in mc["by_category"].values()) / 2)
    assert result["text"]["tokens"] > 100 and result["headline"]["text_ppl"] > 1
    assert "cider" in result["stdout"] and "image helps" in result["stdout"]


def test_seeded_sample_scores_the_samples_training_validated_on(tiny_assets, tmp_path):
    """`--seeded-sample` with the run's val_samples scores the very subset the run's validation used:
    the same loss and token count as the last validation in metrics.jsonl (the first N would differ)."""
    cfg = tiny_config(tiny_assets, tmp_path / "run", max_steps=4, eval_every=4, seed=3,
                      **{"data.val": str(tiny_assets["val"]), "data.val_samples": 5})
    path = write_config(cfg, tmp_path / "config.yaml")
    proc = subprocess.run([sys.executable, "-m", "mmtrain.train", str(path)], cwd=REPO, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    records = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    validation = [r for r in records if "val_loss" in r][-1]
    assert validation["step"] == 4

    def score(*extra: str) -> dict:
        out = tmp_path / "eval.json"
        proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(tmp_path / "run"), "--data",
                               str(tiny_assets["val"]), "--out", str(out), "--max-samples", "5", "--generate", "0",
                               "--no-ablations", *extra], cwd=REPO, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr[-4000:]
        return json.loads(out.read_text())["loss"]

    seeded, first = score("--seeded-sample"), score()
    assert seeded["tokens"] == validation["val_tokens"]
    assert seeded["loss"] == pytest.approx(validation["val_loss"], abs=1e-4)
    assert first["tokens"] != seeded["tokens"] or abs(first["loss"] - seeded["loss"]) > 1e-6
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(tmp_path / "run"), "--data",
                           str(tiny_assets["val"]), "--seeded-sample"], cwd=REPO, capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2 and "--max-samples" in proc.stderr


@pytest.mark.slow
def test_zero3_sharded_eval_equals_single_process(trained_run, tmp_path):
    single = _eval(trained_run, tmp_path, "--max-samples", "7")
    out = tmp_path / "sharded.json"
    launch(["-m", "mmtrain", "eval", str(trained_run["run"]), "--data", str(trained_run["manifest"]),
            "--out", str(out), "--max-new-tokens", "6", "--max-samples", "7",
            "--deepspeed", str(REPO / "ds_configs" / "zero3.json")], nprocs=2, timeout=400)
    sharded = json.loads(out.read_text())
    assert sharded["zero3"] and sharded["world_size"] == 2
    for key, value in single["headline"].items():
        assert sharded["headline"][key] == pytest.approx(value, abs=1e-4), key
    assert [e["prediction"] for e in sharded["captions"]["examples"]] == \
        [e["prediction"] for e in single["captions"]["examples"]]


def test_eval_bad_target_and_manifest_fail_clearly(trained_run, tmp_path):
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(tmp_path), "--data",
                           str(trained_run["manifest"])], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "neither a run folder" in proc.stderr and "Traceback" not in proc.stderr
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"image": "x.png", "text": "fine."}\n{"image": 3}\n')
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(trained_run["run"]), "--data", str(bad)],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"{bad}:2" in proc.stderr and "Traceback" not in proc.stderr


def test_thirteen_way_choice_as_easy_vqa_asks_it(trained_run, tmp_path):
    """easy-VQA's multiple choice has 13 options (all its answers): scored, with chance 1/13."""
    answers = ["circle", "green", "red", "gray", "yes", "teal", "black", "rectangle", "yellow", "triangle", "brown",
               "blue", "no"]
    folder = Path(trained_run["assets"]["val"]).parent
    images = [json.loads(line)["image"] for line in Path(trained_run["assets"]["val"]).read_text().splitlines()][:4]
    records = [choice_record({"id": f"q{i}", "image": str(folder / image), "question": "what shape is it?",
                              "answer": answers[(3 * i) % 13]}, answers) for i, image in enumerate(images)]
    for record in records:  # the tiny LLM's context holds no 13-line option list: the options are scored alone
        record["conversations"][0]["value"] = "<image>\nWhich?"
    manifest = tmp_path / "choice.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp_path / "result.json"
    proc = subprocess.run([sys.executable, "-m", "mmtrain", "eval", str(trained_run["run"]), "--data", str(manifest),
                           "--out", str(out)], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    mc = json.loads(out.read_text())["multiple_choice"]
    assert mc["questions"] == 4 and mc["chance"] == pytest.approx(1 / 13) and 0 <= mc["accuracy"] <= 1
