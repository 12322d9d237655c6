"""Fetch a vLLM release's Python sources without building or importing it.

`pip download --no-binary :all: vllm==X` builds the sdist's metadata, and vLLM's build needs
torch and CUDA, so it fails on a plain machine. The `.tar.gz` itself needs no build: we locate it
with pip's own package finder and session (so the index, proxies and certificates come from the
user's pip configuration; no host is named here), download it and keep only `vllm/**/*.py`.

Cache layout: `<cache root>/vllm-src/<version>/vllm/...` plus a `.complete` JSON marker. A cached
release needs no network. Several processes may fetch at once: each release is guarded by a
file lock and published with an atomic rename, so readers never see a half-extracted tree.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import logging
import os
import shutil
import tarfile
import tempfile
import warnings
import zipfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from packaging.version import InvalidVersion, Version

PROJECT = "vllm"
MARKER = ".complete"


class SdistError(RuntimeError):
    """A release's sources could not be located, downloaded or extracted."""


@dataclass(frozen=True)
class ReleaseArchive:
    version: str
    filename: str
    url: str
    kind: str  # "sdist" | "wheel"


def cache_root() -> Path:
    """`$FLASHHEAD_CACHE` or `~/.cache/flashhead`."""
    from flashhead.settings import settings

    env = settings().cache_dir
    return Path(env).expanduser() if env else Path.home() / ".cache" / "flashhead"


def source_dir(version: str, root: Path | None = None) -> Path:
    """Where release `version`'s sources live (the directory that contains `vllm/`)."""
    return (root or cache_root()) / "vllm-src" / _normalise(version)


def cached_source(version: str, root: Path | None = None) -> Path | None:
    """The cached source tree of `version`, or None when it has not been fetched (completely)."""
    path = source_dir(version, root)
    return path if (path / MARKER).is_file() and (path / PROJECT).is_dir() else None


def fetch_source(version: str, root: Path | None = None, *, quiet: bool = True) -> Path:
    """Return a directory holding release `version`'s `vllm/**/*.py`, fetching it if not cached."""
    found = cached_source(version, root)
    if found is not None:
        return found
    dest = source_dir(version, root)
    dest.parent.mkdir(parents=True, exist_ok=True)
    with _file_lock(dest.parent / f".{dest.name}.lock"):
        # Another process may have finished while we waited for the lock.
        found = cached_source(version, root)
        if found is not None:
            return found
        archive = locate_archive(version, quiet=quiet)
        tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}.", dir=dest.parent))
        try:
            # Wheels (0.15.x) are ~0.5 GB: stream to disk rather than hold them in memory.
            download = tmp.with_name(tmp.name + ".download")
            sha256 = _download(archive, download, quiet=quiet)
            try:
                count = _extract_python_files(archive, download, tmp)
            finally:
                download.unlink(missing_ok=True)
            if count == 0:
                raise SdistError(f"{archive.filename}: no vllm/**/*.py files inside")
            meta = {
                "version": archive.version,
                "kind": archive.kind,
                "filename": archive.filename,
                "url": archive.url,
                "sha256": sha256,
                "python_files": count,
            }
            (tmp / MARKER).write_text(json.dumps(meta, indent=1) + "\n")
            if dest.exists():  # a stale, incomplete tree from a killed run
                shutil.rmtree(dest)
            os.rename(tmp, dest)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return dest


def source_info(path: Path) -> dict:
    """The `.complete` metadata of a cached tree (empty for a tree given by the user)."""
    marker = Path(path) / MARKER
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return {}


def list_releases(*, quiet: bool = True) -> list[str]:
    """Every final (non-pre-release) vLLM version on the configured index, oldest first."""
    finder, _session = _pip_finder(quiet=quiet)
    versions = {Version(str(c.version)) for c in finder.find_all_candidates(PROJECT)}
    return [
        str(v) for v in sorted(v for v in versions if not v.is_prerelease and not v.is_devrelease)
    ]


def locate_archive(version: str, *, quiet: bool = True) -> ReleaseArchive:
    """The sdist link of `vllm==version`, or a wheel where the release published no sdist."""
    wanted = Version(_normalise(version))
    finder, _session = _pip_finder(quiet=quiet)
    candidates = [
        c for c in finder.find_all_candidates(PROJECT) if Version(str(c.version)) == wanted
    ]
    if not candidates:
        raise SdistError(
            f"vllm=={version}: no such release on the configured package index "
            "(check the version, or pip's index settings: `pip config list`)"
        )
    sdists = [c for c in candidates if not c.link.is_wheel and c.link.filename.endswith(".tar.gz")]
    if sdists:
        link = sdists[0].link
        return ReleaseArchive(str(wanted), link.filename, link.url_without_fragment, "sdist")
    # 0.15.x published wheels only. All wheels carry the same Python files; prefer x86_64.
    wheels = sorted(
        (c for c in candidates if c.link.is_wheel),
        key=lambda c: ("x86_64" not in c.link.filename, c.link.filename),
    )
    if not wheels:
        raise SdistError(f"vllm=={version}: the index has neither an sdist nor a wheel")
    link = wheels[0].link
    return ReleaseArchive(str(wanted), link.filename, link.url_without_fragment, "wheel")


def _normalise(version: str) -> str:
    try:
        return str(Version(version))
    except InvalidVersion as exc:
        raise SdistError(f"{version!r} is not a valid version (expected e.g. 0.32.0)") from exc


def _pip_finder(*, quiet: bool):
    """pip's own finder + session, configured exactly like `pip download` (config files, env)."""
    try:
        with warnings.catch_warnings():
            # setuptools' distutils shim warns when pip's import order trips it; not ours to fix.
            warnings.simplefilter("ignore", UserWarning)
            # pip imports the stdlib distutils; a later setuptools import in the same process
            # (torch.utils.cpp_extension does one) then fails its shim's assertion. Importing
            # setuptools first makes both use setuptools' copy.
            with contextlib.suppress(ImportError):
                import setuptools  # noqa: F401
            from pip._internal.commands import create_command

            cmd = create_command("download")
    except ImportError as exc:  # pragma: no cover - pip is in every venv we support
        raise SdistError(f"pip is needed to locate vLLM releases: {exc}") from exc
    if quiet:
        # pip logs "Location ... is ignored" for file:// indexes that lack the project.
        logging.getLogger("pip._internal").setLevel(logging.ERROR)
    options, _ = cmd.parse_args(["--no-deps", PROJECT])
    session = cmd._build_session(options)
    finder = cmd._build_package_finder(options, session, ignore_requires_python=True)
    return finder, session


def _download(archive: ReleaseArchive, out: Path, *, quiet: bool) -> str:
    """Stream `archive` into `out`; return its sha256."""
    digest = hashlib.sha256()
    try:
        with open(out, "wb") as fh:
            if archive.url.startswith("file://"):
                from urllib.request import url2pathname

                with open(url2pathname(archive.url[len("file://") :]), "rb") as src:
                    for chunk in iter(lambda: src.read(1 << 20), b""):
                        digest.update(chunk)
                        fh.write(chunk)
            else:
                _finder, session = _pip_finder(quiet=quiet)
                resp = session.get(archive.url, stream=True)
                resp.raise_for_status()
                for chunk in resp.iter_content(chunk_size=1 << 20):
                    digest.update(chunk)
                    fh.write(chunk)
    except Exception as exc:
        raise SdistError(f"downloading {archive.filename} failed: {exc}") from exc
    return digest.hexdigest()


def _extract_python_files(archive: ReleaseArchive, data: Path, dest: Path) -> int:
    """Write `vllm/**/*.py` from the archive under `dest/vllm/`; return how many files."""
    count = 0
    for rel, content in _python_members(archive, data):
        parts = Path(rel).parts
        if ".." in parts or Path(rel).is_absolute():
            continue  # never write outside dest, whatever the archive says
        out = dest / rel
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(content)
        count += 1
    return count


def _python_members(archive: ReleaseArchive, data: Path) -> Iterator[tuple[str, bytes]]:
    if archive.kind == "wheel":
        with zipfile.ZipFile(data) as zf:
            for name in zf.namelist():
                if name.startswith(f"{PROJECT}/") and name.endswith(".py"):
                    yield name, zf.read(name)
        return
    with tarfile.open(data, mode="r:gz") as tf:
        for member in tf:
            if not member.isfile() or not member.name.endswith(".py"):
                continue
            # sdist members are "vllm-X.Y.Z/vllm/...": drop the top directory.
            _top, _, rel = member.name.partition("/")
            if not rel.startswith(f"{PROJECT}/"):
                continue
            fh = tf.extractfile(member)
            if fh is not None:
                yield rel, fh.read()


@contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    with open(path, "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
