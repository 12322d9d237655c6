"""The loaded patchset: what a validated `patchsets/vllm-X.Y.yaml` file holds, with the file
and line of every patch (the schema itself is `schema.py`'s pydantic models)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from packaging.specifiers import SpecifierSet
from packaging.version import Version

from flashhead.patchset.schema import SCHEMA_VERSION
from flashhead.version_ranges import spec_text

# --------------------------------------------------------------------------------------------
# Data model


@dataclass(frozen=True)
class Problem:
    file: str
    line: int
    field: str
    message: str
    fix: str = ""

    def __str__(self) -> str:
        fix = f" ({self.fix})" if self.fix else ""
        return f"{self.file}:{self.line}: {self.field}: {self.message}{fix}"


class PatchsetError(ValueError):
    """A patchset file is invalid. ``problems`` lists every problem found in it."""

    def __init__(self, problems: Sequence[Problem]):
        self.problems = list(problems)
        super().__init__("\n".join(str(p) for p in self.problems))


class _Target:
    """`module` and `qualname` of a dataclass's `target` (`module:Qualified.name`)."""

    target: str  # declared by the dataclass itself (a plain base's annotations are no fields)

    @property
    def module(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def qualname(self) -> str:
        return self.target.split(":", 1)[1]


@dataclass(frozen=True)
class Requirement(_Target):
    """Another symbol a handler relies on; checked like the target (exists, signature)."""

    target: str
    signature: str | None = None
    line: int = 0


@dataclass(frozen=True)
class PatchSpec(_Target):
    id: str
    kind: str
    target: str
    why: str = ""
    remove_when: str = ""
    handler: str | None = None
    signature: str | None = None
    signature_of: str | None = None
    requires: tuple[Requirement, ...] = ()
    # register_architecture only: new architecture name -> base architecture name.
    architectures: Mapping[str, str] = field(default_factory=dict)
    always: bool = False
    # None = any process; else the vLLM process kinds that need the patch.
    process: tuple[str, ...] | None = None
    required: bool = True
    source: str = ""
    line: int = 0

    @property
    def where(self) -> str:
        return f"{self.source}:{self.line}" if self.source else self.id


@dataclass(frozen=True)
class PatchSet:
    path: Path
    vllm: SpecifierSet
    patches: tuple[PatchSpec, ...]
    schema: int = SCHEMA_VERSION
    description: str = ""
    serve: str = "flashhead"
    reason: str = ""
    support: Mapping[str, str] = field(default_factory=dict)
    vllm_line: int = 0
    # The range as written in the file (str(SpecifierSet) reorders it).
    vllm_text: str = ""

    @property
    def range_text(self) -> str:
        return self.vllm_text or spec_text(self.vllm)

    @property
    def name(self) -> str:
        return self.path.name

    def matches(self, version: Version | str) -> bool:
        """Whether this set covers `version` (pass the release used for matching, see compat)."""
        v = version if isinstance(version, Version) else Version(str(version))
        return self.vllm.contains(v, prereleases=True)


@dataclass
class LoadResult:
    patchsets: list[PatchSet]
    problems: list[Problem]
    # Files that failed validation (their problems are in `problems`).
    failed_files: list[Path] = field(default_factory=list)
