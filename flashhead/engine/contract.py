"""The engine's contract: what it reads of a patch, the statuses, the record, the kind ABC."""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from enum import Enum
from typing import Any, Protocol


class RequiredSymbol(Protocol):
    """Another symbol a handler relies on; checked like the target (exists, signature)."""

    @property
    def target(self) -> str: ...  # module:Qualified.name
    @property
    def module(self) -> str: ...
    @property
    def signature(self) -> str | None: ...


class PatchTarget(Protocol):
    """What the engine reads of a patch. The patchset model (`registry.PatchSpec`) is one; its
    vLLM-only fields (process, always, architectures) are the plugin's and the vLLM kinds'."""

    @property
    def id(self) -> str: ...
    @property
    def kind(self) -> str: ...
    @property
    def target(self) -> str: ...  # module:Qualified.name
    @property
    def module(self) -> str: ...
    @property
    def handler(self) -> str | None: ...
    @property
    def signature(self) -> str | None: ...
    @property
    def signature_of(self) -> str | None: ...
    @property
    def requires(self) -> Sequence[RequiredSymbol]: ...
    @property
    def required(self) -> bool: ...
    @property
    def where(self) -> str: ...  # file:line for messages


class Status(str, Enum):
    """A patch's state. A ``str`` so that records compare with, and serialise as, the names the
    doctor and the YAML docs use ("applied", "skipped-version", ...)."""

    APPLIED = "applied"
    PENDING = "pending"
    SKIPPED_VERSION = "skipped-version"
    SKIPPED_PROCESS = "skipped-process"
    MISSING_TARGET = "missing-target"
    SIGNATURE_MISMATCH = "signature-mismatch"
    HANDLER_ERROR = "handler-error"
    DISABLED = "disabled"
    ROLLED_BACK = "rolled-back"
    RUNTIME_ERROR = "runtime-error"

    def __str__(self) -> str:  # the name in f-strings and format() on every Python
        return self.value

    __format__ = str.__format__


STATUSES = tuple(Status)
SKIPPED_STATUSES = (Status.SKIPPED_VERSION, Status.SKIPPED_PROCESS, Status.DISABLED)
FAILED_STATUSES = (
    Status.MISSING_TARGET,
    Status.SIGNATURE_MISMATCH,
    Status.HANDLER_ERROR,
    Status.ROLLED_BACK,
    Status.RUNTIME_ERROR,
)

# Statuses a rollback turns into `rolled-back` (the rest already say why the patch is not live).
_ROLLED_BACK_FROM = (Status.APPLIED, Status.PENDING, Status.RUNTIME_ERROR)

Undo = Callable[[], None]
HOOK_LOCK_TIMEOUT_S = 30.0


@dataclass
class PatchRecord:
    set_id: str
    patch_id: str
    kind: str
    target: str
    required: bool
    status: Status
    reason: str = ""
    source: str = ""
    # Kind-specific facts (e.g. registered / missing architectures).
    details: dict[str, Any] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return {
            "set": self.set_id,
            "id": self.patch_id,
            "kind": self.kind,
            "target": self.target,
            "required": self.required,
            "status": self.status,
            "reason": self.reason,
            "source": self.source,
            "details": dict(self.details),
        }


class PatchFailure(Exception):
    """Raised by a kind (or the engine) to fail a patch with a given status."""

    def __init__(self, status: str, reason: str):
        super().__init__(reason)
        self.status = Status(status)
        self.reason = reason


@dataclass
class ApplyContext:
    """Everything a kind needs to install one patch."""

    spec: PatchTarget
    owner: Any  # the module or class holding the attribute
    attr: str
    raw: Any  # the attribute as stored (function, staticmethod, class, ...), maybe inherited
    own: bool  # whether `attr` is in owner's own __dict__ (else inherited: undo deletes)
    target: Any  # getattr(owner, attr)
    handler: Callable[..., Any] | None
    # True while the patch should act (set active, patch not disabled, host kill switch on).
    enabled: Callable[[], bool]
    # The wrap kind calls this when the handler raised at run time.
    on_runtime_error: Callable[[BaseException], None]
    record: PatchRecord
    patch_key: str


class Kind(ABC):
    """A way of installing a patch. ``apply`` returns the undo; raise PatchFailure to fail."""

    name = ""
    # Import the target module at once instead of waiting for the host to import it
    # (e.g. a registry that must be filled before the host looks things up).
    eager_import = False

    @abstractmethod
    def apply(self, ctx: ApplyContext) -> Undo:
        """Install the patch described by ``ctx``; return what undoes it."""
