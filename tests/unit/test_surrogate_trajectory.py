"""The logit-lens KL trajectory: hooks + lens against a direct computation, batching, the cut rule, outputs."""

from __future__ import annotations

import json
from argparse import Namespace
from pathlib import Path

import pytest
import torch

from mmtrain.methods.grafting.trajectory import (
    DEFAULT_THRESHOLD,
    CutProposal,
    TrajectoryError,
    accumulate,
    batch_lens,
    curves_from_sums,
    lens_parts,
    pad_batch,
    propose_cut,
    rank_batches,
    run_trajectory,
    scored_positions,
)

TINY = dict(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=64, initializer_range=0.2)


def _llama(seed: int = 0, **overrides):
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(seed)
    config = AutoConfig.for_model("llama", **{**TINY, **overrides})
    return AutoModelForCausalLM.from_config(config).eval()


@pytest.fixture(scope="module")
def model():
    return _llama()


@pytest.fixture(scope="module")
def batch():
    torch.manual_seed(1)
    seqs = [torch.randint(0, 256, (n,)).tolist() for n in (12, 5, 9, 2)]
    return seqs, *pad_batch(seqs, pad_id=0)


@torch.no_grad()
def _direct(model, ids, mask):
    """Per-text mean KL(q_l || p) and q_l(true token) from truncated copies of the model (layers 0..l)."""
    from transformers import AutoModelForCausalLM

    num_layers = model.config.num_hidden_layers
    log_p = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.double(), -1)
    keep = scored_positions(mask)
    targets = torch.zeros_like(ids)
    targets[:, :-1] = ids[:, 1:]
    kl = torch.zeros(ids.shape[0], num_layers, dtype=torch.float64)
    q_true = torch.zeros_like(kl)
    q_at = torch.zeros(*ids.shape, num_layers, dtype=torch.float64)
    for layer in range(num_layers):
        config = model.config.__class__.from_dict({**model.config.to_dict(), "num_hidden_layers": layer + 1})
        truncated = AutoModelForCausalLM.from_config(config).eval()
        missing, unexpected = truncated.load_state_dict(model.state_dict(), strict=False)
        assert not missing and len(unexpected) == 9 * (num_layers - layer - 1)
        log_q = torch.log_softmax(truncated(input_ids=ids, attention_mask=mask).logits.double(), -1)
        per_position = (log_q.exp() * (log_q - log_p)).sum(-1)
        true = log_q.gather(2, targets.unsqueeze(2)).squeeze(2).exp()
        kl[:, layer] = (per_position * keep).sum(1) / keep.sum(1)
        q_true[:, layer] = (true * keep).sum(1) / keep.sum(1)
        q_at[:, :, layer] = true
    p_at = log_p.gather(2, targets.unsqueeze(2)).squeeze(2).exp()
    p_true = (p_at * keep).sum(1) / keep.sum(1)
    return kl, q_true, p_true, _official_true_token_kl(q_at, p_at, keep)


def _official_true_token_kl(q_at, p_at, keep):
    """The grafting paper's trajectory KL, text by text: the true-token probabilities of the layer (q)
    and of the output (p) over the text's positions, each normalised to sum to 1 and floored at 1e-6,
    then sum(q log(q / p))."""
    out = torch.zeros(q_at.shape[0], q_at.shape[2], dtype=torch.float64)
    for text in range(q_at.shape[0]):
        p = p_at[text][keep[text]]
        p = (p / p.sum()).clamp(min=1e-6)
        for layer in range(q_at.shape[2]):
            q = q_at[text, :, layer][keep[text]]
            q = (q / q.sum()).clamp(min=1e-6)
            out[text, layer] = (q * (q / p).log()).sum()
    return out


# -------------------------------------------------------------------------------------------- the lens
def test_lens_matches_truncated_models(model, batch):
    seqs, ids, mask = batch
    stats = batch_lens(lens_parts(model), ids, mask)
    kl, q_true, p_true, true_token_kl = _direct(model, ids, mask)
    assert stats["kl"].shape == (4, 6) and stats["kl"].dtype == torch.float64
    several = torch.tensor([len(s) > 2 for s in seqs])  # one scored position normalises to 1 on both sides: KL 0
    assert true_token_kl[several, :-1].min() > 1e-3 and true_token_kl[~several].abs().max() < 1e-9
    torch.testing.assert_close(stats["kl_true_token"], true_token_kl, atol=1e-6, rtol=1e-5)
    assert stats["kl_true_token"][:, -1].abs().max() < 1e-9
    assert kl[:, :-1].min() > 0.05  # a meaningful comparison: the layers do move the prediction
    torch.testing.assert_close(stats["kl"], kl, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(stats["q_true"], q_true, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(stats["p_true"], p_true, atol=1e-6, rtol=1e-5)
    assert stats["kl"][:, -1].abs().max() < 1e-6  # the lens at the last layer is the output itself
    torch.testing.assert_close(stats["q_true"][:, -1], stats["p_true"])
    assert stats["positions"].tolist() == [len(s) - 1 for s in seqs]


def test_padding_and_chunking_do_not_change_the_result(model, batch):
    seqs, ids, mask = batch
    parts = lens_parts(model)
    reference = batch_lens(parts, ids, mask)
    # Other pad ids and extra padding columns: padded positions are neither inputs that matter nor scored.
    other_ids, other_mask = pad_batch(seqs, pad_id=7)
    wide_ids = torch.cat([other_ids, torch.full((4, 5), 99)], 1)
    wide_mask = torch.cat([other_mask, torch.zeros(4, 5, dtype=torch.long)], 1)
    # 3 positions per chunk of logits
    padded = batch_lens(parts, wide_ids, wide_mask, chunk_elements=3 * 256)
    for key in reference:
        torch.testing.assert_close(padded[key], reference[key], atol=1e-6, rtol=1e-5)
    # Each text alone (no padding at all) gives its row of the padded batch.
    for i, seq in enumerate(seqs):
        alone = batch_lens(parts, *pad_batch([seq], pad_id=0))
        torch.testing.assert_close(alone["kl"][0], reference["kl"][i], atol=1e-6, rtol=1e-5)


def test_scored_positions_are_those_with_a_true_next_token():
    mask = torch.tensor([[1, 1, 1, 0], [1, 1, 1, 1], [1, 0, 0, 0]])
    assert scored_positions(mask).int().tolist() == [[1, 1, 0, 0], [1, 1, 1, 0], [0, 0, 0, 0]]


def test_unsupported_or_too_small_models_are_named():
    with pytest.raises(TrajectoryError, match="at least 3"):
        lens_parts(_llama(num_hidden_layers=2))
    with pytest.raises(TrajectoryError, match="not supported"):
        lens_parts(torch.nn.Linear(2, 2))


# ----------------------------------------------------------------------------------- batches and sums
@pytest.mark.parametrize("world_size", [1, 2, 3])
def test_rank_batches_cover_every_text_once_in_lock_step(world_size):
    seqs = [[i] * (2 + i % 5) for i in range(11)]
    per_rank = [rank_batches(seqs, r, world_size, batch_size=2) for r in range(world_size)]
    assert len({len(b) for b in per_rank}) == 1  # same number of forwards on every rank
    real = [s for batches in per_rank for chunk, is_real in batches if is_real for s in chunk]
    assert sorted(real) == sorted(seqs)
    dummies = [chunk for batches in per_rank for chunk, is_real in batches if not is_real]
    assert len(dummies) == len(per_rank[0]) * world_size - sum(1 for b in per_rank for _, r in b if r)


def test_dummy_batches_weigh_nothing(model, batch):
    seqs, ids, mask = batch
    parts = lens_parts(model)
    real = [(seqs[:2], True), (seqs[2:], True)]
    sums = accumulate(parts, real, 0, torch.device("cpu"))
    with_dummy = accumulate(parts, real + [([seqs[0][:2]], False)], 0, torch.device("cpu"))
    torch.testing.assert_close(with_dummy, sums)
    curves = curves_from_sums(sums, 6)
    direct = batch_lens(parts, ids, mask)
    assert curves["texts"] == 4 and curves["positions"] == sum(len(s) - 1 for s in seqs)
    assert curves["kl"] == pytest.approx(direct["kl"].mean(0).tolist(), rel=1e-6)
    assert curves["kl_true_token"] == pytest.approx(direct["kl_true_token"].mean(0).tolist(), rel=1e-5)
    assert curves["output_true_token_prob"] == pytest.approx(float(direct["p_true"].mean()), rel=1e-6)


# ------------------------------------------------------------------------------------------- cut rule
def test_cut_on_a_step_curve():
    # Plateau (drifting down) to layer 5, a sharp drop, smooth convergence: the knee is layer 5.
    kl = [8.0, 7.9, 7.5, 7.6, 7.4, 7.2, 2.0, 0.6, 0.4, 0.3, 0.2, 0.0]
    cut = propose_cut(kl)
    assert (cut.transition_layer, cut.cut) == (5, 6)
    assert cut.threshold == DEFAULT_THRESHOLD and cut.prominence == pytest.approx(7.2 / 8 - (1 - 5 / 11))
    assert "knee" in cut.rule and "no sharp transition" not in cut.rule
    # Scale-free: the same curve in other units gives the same cut.
    assert propose_cut([v * 1000 for v in kl]) == CutProposal(5, 6, cut.rule, cut.threshold,
                                                              pytest.approx(cut.prominence))
    # A one-layer drop after a two-layer plateau; a drop at the very end (cut clamped to L-2).
    assert propose_cut([9.0, 8.8, 0.5, 0.3, 0.2, 0.1, 0.0]).cut == 2
    late = propose_cut([9.0, 8.8, 8.9, 8.7, 8.8, 8.6, 0.0])
    assert (late.transition_layer, late.cut) == (5, 5)
    # Documented limit: layer 0 is the line's own start, so a drop right after it reads as no knee.
    assert propose_cut([5.0, 0.4, 0.3, 0.2, 0.1, 0.0]).transition_layer is None


def test_cut_on_smooth_flat_and_zero_curves():
    linear = [10.0 * (1 - layer / 11) for layer in range(12)]  # no knee: the line itself
    assert propose_cut(linear) == CutProposal(None, 10, propose_cut(linear).rule, DEFAULT_THRESHOLD,
                                              pytest.approx(0.0, abs=1e-12))
    assert "no sharp transition" in propose_cut(linear).rule
    sagging = [10.0 * 0.5 ** layer for layer in range(11)] + [0.0]  # smooth, below the line everywhere
    assert propose_cut(sagging).transition_layer is None and propose_cut(sagging).cut == 10
    smooth = [10.0 / (1 + 2.718 ** (layer - 7)) for layer in range(12)]  # a smooth sigmoid: knee before its middle
    assert propose_cut(smooth).transition_layer in (4, 5) and propose_cut(smooth).cut in (5, 6)
    flat = [3.0] * 11 + [0.0]  # nothing converges before the end: keep all but the translator
    assert propose_cut(flat).transition_layer == 10 and propose_cut(flat).cut == 10
    assert propose_cut([0.0] * 8).transition_layer is None and propose_cut([0.0] * 8).cut == 6


def test_cut_threshold_argument():
    kl = [8.0, 7.5, 7.0, 6.0, 4.0, 2.0, 0.5, 0.0]  # knee at layer 3, 0.75 - (1 - 3/7) = 0.179 above the line
    assert propose_cut(kl, 0.15).cut == 4 and propose_cut(kl, 0.15).threshold == 0.15
    weak = propose_cut(kl, 0.2)
    assert weak.transition_layer is None and weak.cut == 6 and "0.2" in weak.rule
    for bad in (0.0, 1.0, -0.5, 2.0):
        with pytest.raises(TrajectoryError, match="threshold"):
            propose_cut(kl, bad)
    with pytest.raises(TrajectoryError, match="at least 3"):
        propose_cut([1.0, 0.0])
    with pytest.raises(TrajectoryError, match="non-finite"):
        propose_cut([1.0, float("nan"), 0.0])


# ---------------------------------------------------------------------------------------- the command
@pytest.fixture(scope="module")
def saved_model(tmp_path_factory) -> tuple[Path, Path]:
    from mmtrain.data.synthetic import make_tiny_tokenizer

    root = tmp_path_factory.mktemp("trajectory")
    texts = [f"the {c} cat sat on the {d} mat number {i}" for i, (c, d) in
             enumerate(zip(["red", "big", "old", "tiny"] * 5, ["blue", "warm", "flat", "new", "soft"] * 4))]
    (root / "texts.txt").write_text("\n".join(texts + ["x"]) + "\n")
    make_tiny_tokenizer(texts, root / "model", vocab_size=300)
    _llama(seed=3, vocab_size=300).save_pretrained(root / "model")
    return root / "model", root / "texts.txt"


def _args(model, texts, out, **overrides) -> Namespace:
    values = dict(model=str(model), texts=[str(texts)], out=str(out), num_texts=300, max_length=16, batch_size=3,
                  threshold=None, deepspeed=None, precision="fp32")
    return Namespace(**{**values, **overrides})


def test_run_writes_json_and_png(saved_model, tmp_path):
    model, texts = saved_model
    result = run_trajectory(_args(model, texts, tmp_path / "out", threshold=0.3))
    saved = json.loads((tmp_path / "out" / "trajectory.json").read_text())
    assert saved == result
    assert saved["texts"] == 20 and saved["num_layers"] == 6 and saved["world_size"] == 1
    assert len(saved["kl"]) == len(saved["true_token_prob"]) == 6 and saved["kl"][-1] == pytest.approx(0, abs=1e-6)
    assert saved["threshold"] == 0.3 and "0.3" in saved["rule"]
    # The cut comes from the true-token curve unless --kl full says otherwise.
    assert saved["cut_curve"] == "true-token" and saved["kl_true_token"][-1] == pytest.approx(0, abs=1e-9)
    assert saved["cut"] == propose_cut(saved["kl_true_token"], 0.3).cut
    assert saved["knee_prominence"] == pytest.approx(propose_cut(saved["kl_true_token"], 0.3).prominence)
    full = run_trajectory(_args(model, texts, tmp_path / "full", threshold=0.3, kl="full"))
    assert full["cut_curve"] == "full" and full["kl"] == pytest.approx(saved["kl"])
    assert full["knee_prominence"] == pytest.approx(propose_cut(saved["kl"], 0.3).prominence)
    with pytest.raises(TrajectoryError, match="--kl"):
        run_trajectory(_args(model, texts, tmp_path / "bad", kl="vocab"))
    assert saved["params_local_per_rank"] == [saved["params_total"]] and not saved["zero3"]
    assert saved["elapsed_s"] > 0 and "per text" in saved["averaging"]
    # FLOPs counted as it ran: more than the lens's LM head at every layer and scored position alone
    config = json.loads((model / "config.json").read_text())
    lens = 2 * config["vocab_size"] * config["hidden_size"] * config["num_hidden_layers"] * saved["positions"]
    assert lens < saved["flops"] < 100 * lens
    png = (tmp_path / "out" / "trajectory.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["trajectory.json", "trajectory.png"]
    # --num-texts takes the first N usable texts; the batching does not change the curve.
    fewer = run_trajectory(_args(model, texts, tmp_path / "few", num_texts=5, batch_size=1))
    assert fewer["texts"] == 5


def test_batching_does_not_change_the_curve(saved_model, tmp_path):
    model, texts = saved_model
    one = run_trajectory(_args(model, texts, tmp_path / "a", batch_size=1))
    many = run_trajectory(_args(model, texts, tmp_path / "b", batch_size=8))
    assert many["kl"] == pytest.approx(one["kl"], rel=1e-5, abs=1e-7)
    assert many["kl_true_token"] == pytest.approx(one["kl_true_token"], rel=1e-5, abs=1e-7)
    assert many["positions"] == one["positions"]


def test_errors_are_trajectory_errors(saved_model, tmp_path, monkeypatch):
    model, texts = saved_model
    with pytest.raises(TrajectoryError, match="does not exist"):
        run_trajectory(_args(tmp_path / "nope", texts, tmp_path / "o"))
    with pytest.raises(TrajectoryError, match="config.json"):
        run_trajectory(_args(tmp_path, texts, tmp_path / "o"))
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(TrajectoryError, match="--texts: no text"):
        run_trajectory(_args(model, empty, tmp_path / "o"))
    with pytest.raises(TrajectoryError, match="--texts.*does not exist"):
        run_trajectory(_args(model, tmp_path / "missing.txt", tmp_path / "o"))
    short = tmp_path / "short.txt"
    short.write_text("x\ny\n")
    with pytest.raises(TrajectoryError, match="2 or more tokens"):
        run_trajectory(_args(model, short, tmp_path / "o"))
    with pytest.raises(TrajectoryError, match="threshold"):
        run_trajectory(_args(model, texts, tmp_path / "o", threshold=1.5))
    with pytest.raises(TrajectoryError, match="batch-size"):
        run_trajectory(_args(model, texts, tmp_path / "o", batch_size=0))
    monkeypatch.setenv("WORLD_SIZE", "2")
    with pytest.raises(TrajectoryError, match="without --deepspeed"):
        run_trajectory(_args(model, texts, tmp_path / "o"))
    monkeypatch.delenv("WORLD_SIZE")
    with pytest.raises(TrajectoryError, match="no --texts"):
        run_trajectory(Namespace(**{**vars(_args(model, texts, tmp_path / "o")), "texts": []}))
    assert not (tmp_path / "o").exists()


def test_cli_reports_errors(saved_model, tmp_path, capsys):
    from mmtrain.methods.grafting.cli import main

    model, texts = saved_model
    assert main(["trajectory", str(tmp_path / "nope"), "--texts", str(texts)]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["trajectory", str(model), "--texts", str(texts), "--out", str(tmp_path / "cli"),
                 "--num-texts", "4"]) == 0
    assert json.loads((tmp_path / "cli" / "trajectory.json").read_text())["texts"] == 4
