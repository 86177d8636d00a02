"""The streamed surrogate build against an in-memory construction, on tiny random Llama and Qwen2 models."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file
from transformers import AutoConfig, AutoModelForCausalLM

from mmtrain.methods.grafting.build import SurrogateBuildError, SurrogateInfo, build_surrogate, parse_size

REPO = Path(__file__).resolve().parents[2]
LLAMA = dict(model_type="llama", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
QWEN2 = dict(model_type="qwen2", vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=6,
             num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_sliding_window=True,
             sliding_window=4, max_window_layers=4, layer_types=["full_attention"] * 4 + ["sliding_attention"] * 2)
SMALL_FILES = {"tokenizer.json": '{"fake": true}\n', "tokenizer_config.json": "{}\n",
               "special_tokens_map.json": "{}\n", "chat_template.jinja": "{{ messages }}\n"}


def _save_target(folder: Path, params: dict, seed: int, max_shard_size: str | None = "100KB", **extra) -> Path:
    torch.manual_seed(seed)
    params = {**params, **extra}
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    model.save_pretrained(folder, **({"max_shard_size": max_shard_size} if max_shard_size else {}))
    for name, text in SMALL_FILES.items():
        (folder / name).write_text(text)
    (folder / "asset.json").write_text('{"name": "not copied"}\n')
    (folder / "original").mkdir()
    (folder / "original" / "consolidated.pth").write_bytes(b"not copied")
    return folder


@pytest.fixture(scope="module")
def targets(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("surrogate_targets")
    found = {
        "llama": _save_target(root / "llama", LLAMA, 0, tie_word_embeddings=False),
        "llama_tied": _save_target(root / "llama_tied", LLAMA, 1, tie_word_embeddings=True),
        "qwen2": _save_target(root / "qwen2", QWEN2, 2, tie_word_embeddings=True),
        "llama_single": _save_target(root / "llama_single", LLAMA, 3, max_shard_size=None,
                                     tie_word_embeddings=False),
    }
    for name in ("llama", "llama_tied", "qwen2"):
        assert (found[name] / "model.safetensors.index.json").is_file()
        assert len(list(found[name].glob("model-*.safetensors"))) > 3
    assert not (found["llama_single"] / "model.safetensors.index.json").exists()
    return found


def _in_memory_surrogate(target: Path, cut: int) -> torch.nn.Module:
    """The surrogate built the obvious way: the whole target in memory, state copied module by module."""
    full = AutoModelForCausalLM.from_pretrained(target)
    total = full.config.num_hidden_layers
    params = json.loads((target / "config.json").read_text())
    params["num_hidden_layers"] = cut + 2
    if "layer_types" in params:
        params["layer_types"] = params["layer_types"][:cut + 1] + [params["layer_types"][-1]]
    small = AutoModelForCausalLM.from_config(AutoConfig.for_model(params.pop("model_type"), **params))
    small.model.embed_tokens.load_state_dict(full.model.embed_tokens.state_dict())
    for i in range(cut + 1):
        small.model.layers[i].load_state_dict(full.model.layers[i].state_dict())
    small.model.layers[cut + 1].load_state_dict(full.model.layers[total - 1].state_dict())
    small.model.norm.load_state_dict(full.model.norm.state_dict())
    if not full.config.tie_word_embeddings:
        small.lm_head.load_state_dict(full.lm_head.state_dict())
    return small.eval()


def _checkpoint_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors: dict[str, torch.Tensor] = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as handle:
            assert handle.metadata() == {"format": "pt"}
        tensors.update(load_file(path))
    return tensors


def _sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _leftovers(parent: Path) -> list[str]:
    return sorted(p.name for p in parent.iterdir() if ".partial-" in p.name)


def _check_surrogate(target: Path, out: Path, cut: int, info: SurrogateInfo) -> None:
    expected = _in_memory_surrogate(target, cut)
    tied = expected.config.tie_word_embeddings
    written = _checkpoint_tensors(out)
    state = {k: v for k, v in expected.state_dict().items() if not (tied and k == "lm_head.weight")}
    assert sorted(written) == sorted(state)
    for name, tensor in state.items():
        assert torch.equal(written[name], tensor), name

    source = _checkpoint_tensors(target)
    total = json.loads((target / "config.json").read_text())["num_hidden_layers"]
    for surrogate_index, target_index in ((cut, cut), (cut + 1, total - 1)):
        prefix = f"model.layers.{surrogate_index}."
        layer = {k[len(prefix):]: v for k, v in written.items() if k.startswith(prefix)}
        assert layer and all(torch.equal(v, source[f"model.layers.{target_index}.{k}"]) for k, v in layer.items())

    loaded, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"] and not loading["unexpected_keys"], loading
    assert loaded.config.num_hidden_layers == cut + 2
    assert getattr(loaded.config, "layer_types", None) == getattr(expected.config, "layer_types", None)
    ids = torch.randint(0, expected.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded.eval()(ids).logits, expected(ids).logits, rtol=0, atol=0)

    config = json.loads((out / "config.json").read_text())
    record = config["mmtrain_surrogate"]
    assert record["target"] == str(target.resolve()) and record["cut"] == cut == record["translator_layer"]
    assert record["target_num_layers"] == total
    assert record["layer_map"] == {**{str(i): i for i in range(cut + 1)}, str(cut + 1): total - 1}
    assert record["target_config_sha256"] == _sha256(target / "config.json")
    index = target / "model.safetensors.index.json"
    if index.exists():
        assert record["target_index_sha256"] == _sha256(index)
    else:
        raw = (target / "model.safetensors").read_bytes()
        assert record["target_index_sha256"] == hashlib.sha256(raw[:8 + struct.unpack("<Q", raw[:8])[0]]).hexdigest()
    on_disk = sorted(p.name for p in out.iterdir())
    assert sorted(record["files"]) == sorted(set(on_disk) - {"config.json"})
    assert all(_sha256(out / name) == sha for name, sha in record["files"].items())
    assert record["files"] == info.files
    for name, text in SMALL_FILES.items():
        assert (out / name).read_text() == text
    assert not (out / "asset.json").exists() and not (out / "original").exists()
    assert (out / "generation_config.json").is_file()
    assert info.out == out and info.cut == cut and info.num_layers == cut + 2 and info.target_num_layers == total
    assert info.bytes_written == sum((out / name).stat().st_size for name in on_disk)
    assert _leftovers(out.parent) == []


@pytest.mark.parametrize("name,cut", [("llama", 2), ("llama_tied", 1), ("qwen2", 3)])
def test_sharded_build_matches_in_memory_surrogate(targets, tmp_path, name, cut):
    out = tmp_path / "surrogate"
    limit = 60_000
    info = build_surrogate(targets[name], cut, out, max_shard_bytes=limit)
    _check_surrogate(targets[name], out, cut, info)

    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == sorted(info.weight_files) == sorted(p.name for p in out.glob("model-*.safetensors"))
    assert len(shards) > 3 and shards[-1] == f"model-{len(shards):05d}-of-{len(shards):05d}.safetensors"
    assert not (out / "model.safetensors").exists()
    sizes = {}
    for shard in shards:
        tensors = load_file(out / shard)
        sizes[shard] = sum(t.numel() * t.element_size() for t in tensors.values())
        assert sizes[shard] <= limit or len(tensors) == 1
        raw = (out / shard).read_bytes()
        assert struct.unpack("<Q", raw[:8])[0] % 8 == 0
    assert index["metadata"]["total_size"] == sum(sizes.values()) == info.bytes_read
    assert str(out) in info.summary() and f"cut K={cut}" in info.summary()


def test_qwen2_per_layer_config(targets, tmp_path):
    out = tmp_path / "surrogate"
    build_surrogate(targets["qwen2"], 2, out)
    config = json.loads((out / "config.json").read_text())
    assert config["num_hidden_layers"] == 4
    assert config["layer_types"] == ["full_attention"] * 3 + ["sliding_attention"]
    assert config["max_window_layers"] == 3
    assert AutoConfig.from_pretrained(out).layer_types == config["layer_types"]


def test_single_file_target(targets, tmp_path):
    out = tmp_path / "surrogate"
    info = build_surrogate(targets["llama_single"], 3, out)
    assert info.weight_files == ["model.safetensors"] and not (out / "model.safetensors.index.json").exists()
    _check_surrogate(targets["llama_single"], out, 3, info)


def test_small_chunks_copy_the_same_bytes(targets, tmp_path):
    one = build_surrogate(targets["llama"], 2, tmp_path / "a", max_shard_bytes=10**9)
    two = build_surrogate(targets["llama"], 2, tmp_path / "b", max_shard_bytes=10**9, chunk_bytes=1000)
    assert one.files == two.files and two.buffer_bytes == 1000


def _assert_fails(target: Path, cut: int, out: Path, *needles: str) -> str:
    with pytest.raises(SurrogateBuildError) as err:
        build_surrogate(target, cut, out, max_shard_bytes=60_000)
    message = str(err.value)
    for needle in needles:
        assert needle in message, message
    assert _leftovers(out.parent) == []
    return message


def test_unknown_layout(tmp_path):
    gpt2 = tmp_path / "gpt2"
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model("gpt2", n_layer=3, n_embd=32, n_head=2,
                                                                  vocab_size=64, n_positions=32))
    model.save_pretrained(gpt2)
    _assert_fails(gpt2, 1, tmp_path / "out", "'gpt2'", "llama", "supported")
    assert not (tmp_path / "out").exists()

    config = json.loads((gpt2 / "config.json").read_text())
    (gpt2 / "config.json").write_text(json.dumps({**config, "model_type": "llama", "num_hidden_layers": 3}))
    _assert_fails(gpt2, 1, tmp_path / "out", "transformer.h.0.", "model.layers.{i}")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("cut", [0, 5, -1, 100])
def test_cut_out_of_range(targets, tmp_path, cut):
    _assert_fails(targets["llama"], cut, tmp_path / "out", f"K={cut}", "1..4", "L=6")
    assert not (tmp_path / "out").exists()


def test_existing_output_folder(targets, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    _assert_fails(targets["llama"], 2, out, "exists already", str(out))
    assert [p.name for p in out.iterdir()] == ["keep.txt"]


def _copy_target(source: Path, dest: Path) -> Path:
    shutil.copytree(source, dest)
    return dest


def test_missing_shard(targets, tmp_path):
    target = _copy_target(targets["llama"], tmp_path / "target")
    shard = sorted(target.glob("model-*.safetensors"))[1]
    shard.unlink()
    _assert_fails(target, 2, tmp_path / "out", "missing", shard.name)
    assert not (tmp_path / "out").exists()


def _drop_from_index(target: Path, prefix: str) -> None:
    index_path = target / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if not k.startswith(prefix)}
    index_path.write_text(json.dumps(index))


def test_missing_lm_head(targets, tmp_path):
    target = _copy_target(targets["llama"], tmp_path / "target")
    _drop_from_index(target, "lm_head.")
    _assert_fails(target, 2, tmp_path / "out", "lacks lm_head.weight", "tie_word_embeddings")


def test_missing_layer_and_config(targets, tmp_path):
    target = _copy_target(targets["llama"], tmp_path / "target")
    _drop_from_index(target, "model.layers.4.")
    _assert_fails(target, 2, tmp_path / "out", "missing layer indices [4]")

    (target / "config.json").unlink()
    _assert_fails(target, 2, tmp_path / "out", "no config.json")
    _assert_fails(tmp_path / "nowhere", 2, tmp_path / "out", "does not exist")


def test_no_checkpoint(tmp_path):
    target = tmp_path / "target"
    target.mkdir()
    (target / "config.json").write_text(json.dumps(LLAMA))
    (target / "pytorch_model.bin").write_bytes(b"")
    _assert_fails(target, 2, tmp_path / "out", "model.safetensors.index.json", "pytorch_model.bin")


def test_interrupted_build_leaves_nothing(targets, tmp_path, monkeypatch):
    import mmtrain.methods.grafting.stream as stream

    calls = []
    real = stream.copy_range

    def interrupted(*args, **kwargs):
        calls.append(1)
        if len(calls) == 20:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(stream, "copy_range", interrupted)
    out = tmp_path / "out"
    with pytest.raises(KeyboardInterrupt):
        build_surrogate(targets["llama"], 2, out, max_shard_bytes=60_000)
    assert len(calls) == 20 and not out.exists() and _leftovers(tmp_path) == []


@pytest.mark.parametrize("text,size", [("2GB", 2 * 10**9), ("500MB", 5 * 10**8), ("1.5GiB", 3 * 2**29),
                                       ("123", 123), ("100kb", 10**5), (" 64 MiB ", 2**26), (4096, 4096)])
def test_parse_size(text, size):
    assert parse_size(text) == size


@pytest.mark.parametrize("text", ["lots", "2XB", "-1", "", "0", "1e9", "GB"])
def test_parse_size_rejects_garbage(text):
    with pytest.raises(SurrogateBuildError, match="size") as err:
        parse_size(text)
    assert isinstance(err.value, ValueError)


def _cli(*args: str) -> subprocess.CompletedProcess:
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    return subprocess.run([sys.executable, "-m", "mmtrain", "surrogate", "build", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=120)


def test_cli(targets, tmp_path):
    out = tmp_path / "out"
    proc = _cli(str(targets["llama"]), "--cut", "2", "--out", str(out), "--max-shard-size", "100KB")
    assert proc.returncode == 0, proc.stderr
    assert str(out) in proc.stdout and "cut K=2" in proc.stdout and "translator = copy of layer 2" in proc.stdout
    assert json.loads((out / "config.json").read_text())["num_hidden_layers"] == 4

    bad = _cli(str(targets["llama"]), "--cut", "5", "--out", str(tmp_path / "bad"))
    assert bad.returncode == 2 and bad.stderr.startswith("error: ") and "1..4" in bad.stderr
    assert not (tmp_path / "bad").exists() and _leftovers(tmp_path) == []

    size = _cli(str(targets["llama"]), "--cut", "2", "--out", str(tmp_path / "size"), "--max-shard-size", "huge")
    assert size.returncode == 2 and size.stderr.startswith("error: cannot read 'huge' as a size")


def test_tied_checkpoint_storing_the_shared_matrix_as_lm_head(targets, tmp_path):
    """Tied checkpoints may hold only `lm_head.weight` (as the converted SmolLM2 asset does)."""
    import shutil

    from safetensors.torch import save_file

    source = tmp_path / "head_only"
    shutil.copytree(targets["llama_tied"], source)
    full = AutoModelForCausalLM.from_pretrained(source)
    for stale in list(source.glob("model*.safetensors*")):
        stale.unlink()
    state = {k: v.contiguous() for k, v in full.state_dict().items() if k != "model.embed_tokens.weight"}
    state["lm_head.weight"] = full.model.embed_tokens.weight.detach().clone()
    save_file(state, str(source / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "surrogate"
    build_surrogate(source, 2, out)
    assert "lm_head.weight" in _checkpoint_tensors(out) and "model.embed_tokens.weight" not in _checkpoint_tensors(out)
    loaded, loading = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not loading["missing_keys"], loading
    assert torch.equal(loaded.model.embed_tokens.weight, full.model.embed_tokens.weight)
