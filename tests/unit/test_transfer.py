"""VPGTrans pieces: projector merge, word-converter fitting and token pairing, speed-up arithmetic."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml

from mmtrain.methods.vpgtrans.config import WordConverterConfig
from mmtrain.methods.vpgtrans.converter import (
    ConverterError,
    TokenPairs,
    corpus_texts,
    fit_word_converter,
    load_converter,
    pair_tokens,
    save_converter,
)
from mmtrain.methods.vpgtrans.merge import merge_checkpoint, merge_projector
from mmtrain.methods.vpgtrans.speedup import SpeedupError, format_report, metric_speedup, read_curve, speedup_report


# ---------------------------------------------------------------------------------------------- merge
def test_merged_projector_equals_converter_after_projector():
    torch.manual_seed(0)
    source = torch.nn.Linear(24, 16)   # resampler width 24 -> source LLM width 16
    converter = torch.nn.Linear(16, 40)  # source LLM width -> target LLM width 40
    weight, bias = merge_projector(source.weight.data, source.bias.data, converter.weight.data, converter.bias.data)
    assert weight.shape == (40, 24) and bias.shape == (40,)
    x = torch.randn(100, 24)
    expected = converter(source(x))
    assert torch.allclose(torch.nn.functional.linear(x, weight, bias), expected, atol=1e-5)
    # The paper's Eq. 2 order (projector after converter) is not even shape-compatible here.
    with pytest.raises(ConverterError, match="fitted for another"):
        merge_projector(source.weight.data, source.bias.data, torch.randn(40, 24), torch.randn(40))


def test_merge_checkpoint_replaces_only_the_projector(tmp_path):
    from safetensors.torch import load_file, save_file

    torch.manual_seed(1)
    tensors = {"projector.weight": torch.randn(16, 8), "projector.bias": torch.randn(16),
               "resampler.proj.weight": torch.randn(8, 8)}
    save_file(tensors, str(tmp_path / "trainable.safetensors"))
    converter = torch.nn.Linear(16, 12)
    save_converter(converter, tmp_path / "conv.safetensors", {"note": "test"})
    merge_checkpoint(tmp_path, tmp_path / "conv.safetensors", tmp_path / "merged.safetensors")
    merged = load_file(str(tmp_path / "merged.safetensors"))
    assert torch.equal(merged["resampler.proj.weight"], tensors["resampler.proj.weight"])
    x = torch.randn(5, 8)
    expected = converter(torch.nn.functional.linear(x, tensors["projector.weight"], tensors["projector.bias"]))
    got = torch.nn.functional.linear(x, merged["projector.weight"], merged["projector.bias"])
    assert torch.allclose(got, expected, atol=1e-5)
    assert load_converter(tmp_path / "conv.safetensors")[2] == {"note": "test"}


def test_merge_refuses_a_checkpoint_without_linear_projector(tmp_path):
    from safetensors.torch import save_file

    save_file({"projector.0.weight": torch.randn(4, 4)}, str(tmp_path / "x.safetensors"))
    save_converter(torch.nn.Linear(4, 4), tmp_path / "c.safetensors", {})
    with pytest.raises(ConverterError, match="projector.weight"):
        merge_checkpoint(tmp_path / "x.safetensors", tmp_path / "c.safetensors", tmp_path / "o.safetensors")
    save_file({"weight": torch.randn(4, 4)}, str(tmp_path / "bad.safetensors"))
    with pytest.raises(ConverterError, match="not a word converter"):
        load_converter(tmp_path / "bad.safetensors")


# ---------------------------------------------------------------------------------------------- fitting
def _planted(vocab=300, d_src=16, d_tgt=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    source = torch.randn(vocab, d_src, generator=g)
    true_w, true_b = torch.randn(d_tgt, d_src, generator=g), 0.1 * torch.randn(d_tgt, generator=g)
    target = source @ true_w.T + true_b
    texts = [[int(i) for i in torch.randint(0, vocab, (6,), generator=g)] for _ in range(600)]
    return source, target, TokenPairs(texts, texts, len(texts), True)


def test_converter_recovers_a_planted_linear_map():
    source, target, pairs = _planted()
    settings = WordConverterConfig(lr=5.0, batch_size=16, epochs=30, holdout=0.1, seed=0)
    converter, report = fit_word_converter(source, target, pairs, settings)
    assert report.texts_heldout == 60 and report.pairs_heldout == 360
    assert abs(report.heldout_cosine_initial) < 0.3
    assert report.heldout_cosine > 0.99
    # Held-out ROWS never seen in training: cosine near 1 on the whole table too.
    with torch.no_grad():
        cos = torch.nn.functional.cosine_similarity(converter(source), target, dim=-1)
    assert float(cos.mean()) > 0.99


def test_converter_fit_is_deterministic_and_respects_settings():
    source, target, pairs = _planted(seed=3)
    settings = WordConverterConfig(lr=5.0, batch_size=100, epochs=2, holdout=0.05, seed=7)
    a, report = fit_word_converter(source, target, pairs, settings)
    b, _ = fit_word_converter(source, target, pairs, settings)
    assert torch.equal(a.weight, b.weight) and torch.equal(a.bias, b.bias)
    assert report.steps == 2 * 6  # 570 training texts in batches of 100, twice
    assert report.settings == {"lr": 5.0, "batch_size": 100, "epochs": 2, "holdout": 0.05, "seed": 7,
                               "match_norm": False}
    assert report.norm_scale == 1.0


def test_match_norm_gives_the_target_scale_and_keeps_the_direction():
    source, target, pairs = _planted(seed=5)
    target = target * 0.05  # a target table 20x shorter than the planted map's outputs
    settings = WordConverterConfig(lr=5.0, batch_size=16, epochs=10, holdout=0.1, seed=0)
    plain, plain_report = fit_word_converter(source, target, pairs, settings)
    matched, report = fit_word_converter(source, target, pairs, dataclasses.replace(settings, match_norm=True))
    # cosine ignores scale: the plain fit's outputs are far from the target's norm, the matched ones on it
    assert plain_report.output_norm > 3 * plain_report.target_norm
    assert report.output_norm == pytest.approx(report.target_norm, rel=1e-4)
    assert report.norm_scale == pytest.approx(plain_report.target_norm / plain_report.output_norm, rel=1e-4)
    assert report.heldout_cosine == pytest.approx(plain_report.heldout_cosine, abs=1e-5)
    assert torch.allclose(matched.weight, plain.weight * report.norm_scale)


def test_converter_errors_name_the_problem():
    source, target, pairs = _planted()
    with pytest.raises(ConverterError, match="no usable text"):
        fit_word_converter(source, target, TokenPairs([], [], 5, False), WordConverterConfig())
    with pytest.raises(ConverterError, match="outside the target embedding table"):
        fit_word_converter(source, target[:10], pairs, WordConverterConfig(epochs=1))
    with pytest.raises(ConverterError, match="holdout"):
        fit_word_converter(source, target, pairs, WordConverterConfig(holdout=1.5))


# ---------------------------------------------------------------------------------------------- pairing
class WordTokenizer:
    """Splits on spaces; ids from a fixed vocabulary (unknown words get one id)."""

    def __init__(self, vocab: list[str], split_long: bool = False) -> None:
        self.vocab = {w: i for i, w in enumerate(vocab)}
        self.split_long = split_long

    def get_vocab(self) -> dict[str, int]:
        return dict(self.vocab)

    def __call__(self, text: str, add_special_tokens: bool = False) -> dict[str, list[int]]:
        pieces = []
        for word in text.split():
            if self.split_long and len(word) > 5:
                pieces += [word[:5], word[5:]]
            else:
                pieces.append(word)
        return {"input_ids": [self.vocab.get(p, 0) for p in pieces]}


def test_same_tokenizer_pairs_every_occurrence_by_id():
    vocab = ["<unk>", "a", "red", "apple", "a red"]
    tok = WordTokenizer(vocab)
    pairs = pair_tokens(["a red apple", "a a a", ""], tok, WordTokenizer(vocab))
    assert pairs.same_tokenizer
    assert pairs.source_ids == [[1, 2, 3], [1, 1, 1]] == pairs.target_ids  # frequency counts: "a" 4 times
    assert pairs.texts_total == 3 and pairs.texts_kept == 2


def test_different_tokenizers_keep_equal_length_texts_and_pair_by_position():
    source = WordTokenizer(["<unk>", "a", "red", "elephant", "apple"])
    target = WordTokenizer(["<unk>", "apple", "red", "a", "eleph", "ant"], split_long=True)
    pairs = pair_tokens(["a red apple", "a red elephant", "red a"], source, target)
    assert not pairs.same_tokenizer
    # "a red elephant" is 3 source tokens but 4 target tokens: dropped.
    assert pairs.source_ids == [[1, 2, 4], [2, 1]]
    assert pairs.target_ids == [[3, 2, 1], [2, 3]]
    assert pairs.texts_kept == 2 and pairs.texts_total == 3


def test_corpus_texts_reads_manifests_and_text_files(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"image": "x.png", "text": "A frog."}) + "\n" + json.dumps(
        {"image": None, "conversations": [{"from": "human", "value": "<image>\nWhat?"},
                                          {"from": "gpt", "value": "A cat."}]}) + "\n")
    text = tmp_path / "t.txt"
    text.write_text("first line\n\nsecond line\n")
    assert corpus_texts([manifest, text]) == ["A frog.", "What?", "A cat.", "first line", "second line"]
    with pytest.raises(ConverterError, match="does not exist"):
        corpus_texts([tmp_path / "missing.txt"])


# ---------------------------------------------------------------------------------------------- speed-up
def _stage(folder: Path, llm: str, val: list[float], epoch_size: int = 100, seconds_per_epoch: float = 10.0,
           setup_s: float = 5.0, world: int = 1, epochs_before_eval: float = 1.0, cpu: bool = True) -> None:
    """A stage folder with one validation per epoch (epoch k at compute setup + k * seconds_per_epoch)."""
    folder.mkdir(parents=True)
    (folder / "stage_config.yaml").write_text(yaml.safe_dump({"model": {"llm": {"name_or_path": llm}}}))
    lines = []
    for k, value in enumerate(val, start=1):
        samples = int(k * epoch_size * epochs_before_eval)
        compute = setup_s + k * seconds_per_epoch
        cpu_s = {"cpu_s": 2.0 * compute} if cpu else {}  # two busy threads
        lines.append({"step": k, "loss": 1.0, "samples": samples, "epoch": 0, "compute_s": compute, **cpu_s})
        lines.append({"step": k, "val_loss": value, "val_ppl": 2.718 ** value, "val_tokens": 10, "samples": samples,
                      "epoch": samples / epoch_size, "compute_s": compute, "world_size": world, **cpu_s})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))


def test_speedup_matches_the_paper_definition(tmp_path):
    # TFS: best 2.0 at epoch 4 (then worse). VPGTrans: source on a small LLM, warm-up (epoch 1), fine-tune.
    _stage(tmp_path / "tfs" / "01-tfs", "big", [4.0, 3.0, 2.5, 2.0, 2.2])
    _stage(tmp_path / "vt" / "01-source", "small", [3.0, 2.0], seconds_per_epoch=3.0, setup_s=1.0)
    _stage(tmp_path / "vt" / "02-warmup", "big", [2.4], setup_s=6.0)
    _stage(tmp_path / "vt" / "03-finetune", "big", [2.1, 1.9, 1.8], setup_s=5.0)
    curve = read_curve(tmp_path / "vt")
    assert [p.epoch for p in curve.points] == [1.0, 2.0, 3.0, 4.0]
    assert curve.prior_stages == ["01-source"] and curve.prior_compute_s == pytest.approx(7.0)
    # warm-up stage: 6 + 10 = 16 s in all; fine-tune epoch k at 16 + 5 + 10 k.
    assert [p.compute_s for p in curve.points] == pytest.approx([16.0, 31.0, 41.0, 51.0])
    s = metric_speedup(curve, read_curve(tmp_path / "tfs"), "val_loss")
    assert (s.tfs_best, s.tfs_best_epoch, s.tfs_compute_s) == (2.0, 4.0, 45.0)
    assert s.vt_epoch == 3.0 and s.speedup_epochs == pytest.approx(4.0 / 3.0)
    assert s.speedup_compute == pytest.approx(45.0 / 41.0)
    assert s.speedup_compute_with_source == pytest.approx(45.0 / 48.0)
    assert s.speedup_cpu == pytest.approx(45.0 / 41.0) and s.speedup_cpu_with_source == pytest.approx(45.0 / 48.0)
    assert s.tfs_final == 2.2 and s.vt_final == 1.8 and s.vt_best == 1.8


def _ledger_stage(folder: Path, flops_per_epoch: float, epochs: int) -> None:
    """The stage's ledger records: a validation after every epoch (step k), the FLOPs spent so far."""
    from mmtrain.cost.ledger import Ledger

    ledger = Ledger(path=folder.parent / "ledger.jsonl", run=folder.parent.name, stage=folder.name[3:],
                    attempt=folder.name, job={})
    ledger.write("process_start", kind="train", rank=0, world_size=1, output_dir=str(folder))
    for k in range(1, epochs + 1):
        counters = {"step_start": 0, "step_end": k, "flops": k * flops_per_epoch, "train_s": 1.0}
        ledger.write("validation", rank=0, world_size=1, step=k, metrics={}, **counters)
    ledger.write("process_end", kind="train", rank=0, world_size=1, outcome="completed", **counters)


def test_speedup_in_flops_from_the_ledgers(tmp_path):
    _stage(tmp_path / "tfs" / "01-tfs", "big", [4.0, 3.0, 2.5, 2.0, 2.2])
    _stage(tmp_path / "vt" / "01-source", "small", [3.0, 2.0])
    _stage(tmp_path / "vt" / "02-warmup", "big", [2.4])
    _stage(tmp_path / "vt" / "03-finetune", "big", [2.1, 1.9, 1.8])
    _ledger_stage(tmp_path / "tfs" / "01-tfs", 100.0, 5)
    _ledger_stage(tmp_path / "vt" / "01-source", 30.0, 2)
    _ledger_stage(tmp_path / "vt" / "02-warmup", 60.0, 1)  # the projector alone trains: cheaper steps
    _ledger_stage(tmp_path / "vt" / "03-finetune", 100.0, 3)
    from mmtrain.cost.curve import folder_compute

    vt, tfs = read_curve(tmp_path / "vt", folder_compute), read_curve(tmp_path / "tfs", folder_compute)
    assert [p.flops for p in vt.points] == [60.0, 160.0, 260.0, 360.0] and vt.prior_flops == 60.0
    s = metric_speedup(vt, tfs, "val_loss")
    assert (s.tfs_flops, s.vt_flops) == (400.0, 260.0)
    assert s.speedup_flops == pytest.approx(400 / 260) and s.speedup_flops_with_source == pytest.approx(400 / 320)
    report = format_report(speedup_report(tmp_path / "vt", tmp_path / "tfs", compute_of=folder_compute))
    assert "FLOPs" in report and "1.54x" in report
    # Without ledgers (older runs) the FLOPs ratios are unknown, the rest unchanged.
    (tmp_path / "tfs" / "ledger.jsonl").unlink()
    s = metric_speedup(vt, read_curve(tmp_path / "tfs", folder_compute), "val_loss")
    assert s.speedup_flops is None and s.speedup_epochs == pytest.approx(4 / 3)


def test_speedup_never_reached_and_higher_is_better(tmp_path):
    _stage(tmp_path / "tfs", "big", [3.0, 2.0, 1.0])
    _stage(tmp_path / "vt", "big", [2.5, 1.5, 1.2], cpu=False)  # written before CPU time was recorded
    vt, tfs = read_curve(tmp_path / "vt"), read_curve(tmp_path / "tfs")
    s = metric_speedup(vt, tfs, "val_loss")
    assert s.vt_epoch is None and s.speedup_epochs is None and s.speedup_compute is None
    assert "never" in format_report(speedup_report(tmp_path / "vt", tmp_path / "tfs"))
    # A higher-is-better metric: the best is the maximum, reached when >= it.
    for curve, values in ((tfs, [0.1, 0.5, 0.4]), (vt, [0.3, 0.5, 0.6])):
        for point, value in zip(curve.points, values):
            point.metrics["val_accuracy"] = value
    s = metric_speedup(vt, tfs, "val_accuracy")
    assert not s.lower_is_better and s.tfs_best == 0.5 and s.tfs_best_epoch == 2.0 and s.vt_epoch == 2.0
    assert s.speedup_epochs == 1.0 and s.speedup_compute == pytest.approx(1.0) and s.speedup_cpu is None


def test_speedup_counts_processes_and_refuses_mismatched_runs(tmp_path):
    _stage(tmp_path / "tfs", "big", [2.0], world=4)
    assert read_curve(tmp_path / "tfs").points[0].compute_s == pytest.approx(60.0)  # (5 + 10) s x 4 processes
    _stage(tmp_path / "other", "huge", [1.0])
    with pytest.raises(SpeedupError, match="different LLMs"):
        speedup_report(tmp_path / "other", tmp_path / "tfs")
    (tmp_path / "empty").mkdir()
    with pytest.raises(SpeedupError, match="neither a training run"):
        read_curve(tmp_path / "empty")


# ---------------------------------------------------------------------------------------------- tables
def test_embedding_table_is_read_from_the_checkpoint_alone(tmp_path):
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    from mmtrain.methods.vpgtrans.embeddings import EmbeddingReadError, read_embedding_table

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=1))
    model.save_pretrained(tmp_path / "llama")
    assert torch.equal(read_embedding_table(tmp_path / "llama"), model.get_input_embeddings().weight.detach())
    # An unusual name is found by name and shape ([vocab_size, hidden_size] from config.json).
    odd = tmp_path / "odd"
    odd.mkdir()
    (odd / "config.json").write_text(json.dumps({"vocab_size": 64, "hidden_size": 16}))
    table = torch.randn(64, 16)
    save_file({"backbone.token_embedding.weight": table, "backbone.position_embedding.weight": torch.randn(64, 16),
               "head.weight": torch.randn(64, 16)}, str(odd / "model.safetensors"))
    assert torch.equal(read_embedding_table(odd), table)
    save_file({"a.embed.weight": table, "b.embed.weight": table.clone()}, str(odd / "model.safetensors"))
    with pytest.raises(EmbeddingReadError, match="cannot tell"):
        read_embedding_table(odd)
    with pytest.raises(EmbeddingReadError, match="no model.safetensors"):
        read_embedding_table(tmp_path)
    # A tied checkpoint that stores the shared matrix under the head's name only (transformers 5 saves
    # SmolLM2-135M so); untied, the head is another matrix and is not taken for the embedding.
    tied = tmp_path / "tied"
    tied.mkdir()
    save_file({"lm_head.weight": table, "model.norm.weight": torch.ones(16)}, str(tied / "model.safetensors"))
    (tied / "config.json").write_text(json.dumps({"vocab_size": 64, "hidden_size": 16, "tie_word_embeddings": True}))
    assert torch.equal(read_embedding_table(tied), table)
    (tied / "config.json").write_text(json.dumps({"vocab_size": 64, "hidden_size": 16, "tie_word_embeddings": False}))
    with pytest.raises(EmbeddingReadError, match="cannot tell"):
        read_embedding_table(tied)


def test_plateau_rule():
    from mmtrain.methods.vpgtrans.speedup import plateaued

    assert not plateaued([5.0, 4.0, 3.5, 3.2], patience=3, min_improvement=0.005)
    # 3.19 is less than 0.5% below 3.2, then two worse epochs: three epochs without a real improvement
    assert plateaued([5.0, 4.0, 3.2, 3.19, 3.25, 3.3], patience=3, min_improvement=0.005)
    assert not plateaued([5.0, 4.0, 3.2, 3.19, 3.25, 3.1], patience=3, min_improvement=0.005)
    assert not plateaued([3.0, 3.0, 3.0], patience=3, min_improvement=0.0)  # too short to tell
    assert plateaued([0.1, 0.5, 0.5, 0.49, 0.5], patience=3, min_improvement=0.01, lower=False)
