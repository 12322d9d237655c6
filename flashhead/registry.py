"""Patchset YAML: load, validate, select by vLLM version, check ranges.

One file per vLLM version range (``patchsets/vllm-X.Y.yaml``, schema in docs/DESIGN.md).
Validation collects every problem in a file and reports each as
``file:line: field: problem (fix)``; line numbers come from the YAML node marks (the file is
composed with ``yaml.SafeLoader``, so the values mean exactly what ``yaml.safe_load`` gives).
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet
from packaging.version import Version

from flashhead.compat.process import PROCESS_KINDS  # the `process:` values name these kinds
from flashhead.settings import PATCHSET_DIR_ENV, settings
from flashhead.signatures import SignatureSyntaxError, parse_signature
from flashhead.version_ranges import interval, overlap_hint, spec_text

__all__ = [
    "KINDS",
    "PROCESS_KINDS",
    "LoadResult",
    "PatchSet",
    "PatchSpec",
    "PatchsetError",
    "Problem",
    "Requirement",
    "check_ranges",
    "default_patchset_dir",
    "load_patchset",
    "load_patchsets",
    "loads_patchset",
    "patchset_dir",
    "select_patchset",
]

SCHEMA_VERSION = 1
KINDS = ("wrap", "replace", "register_oot", "register_architecture")
# Kinds whose handler is a callable named in YAML.
KINDS_WITH_HANDLER = ("wrap", "replace", "register_oot")
# Kinds whose live signature must be declared: the patch calls or replaces the target.
KINDS_NEEDING_SIGNATURE = ("wrap", "replace")
SERVE_VALUES = ("flashhead", "dense")
SUPPORT_KEYS = ("v1_runner", "v2_runner", "spec_decode")
SUPPORT_VALUES = ("flashhead", "dense", "absent")
HANDLER_PACKAGE = "flashhead"

TOP_FIELDS = ("schema", "vllm", "description", "serve", "reason", "support", "patches")
PATCH_FIELDS = (
    "id",
    "kind",
    "target",
    "handler",
    "signature",
    "signature_of",
    "requires",
    "architectures",
    "always",
    "process",
    "required",
    "why",
    "remove_when",
)
REQUIRES_FIELDS = ("target", "signature")

_IDENT = r"[A-Za-z_][A-Za-z0-9_]*"
_DOTTED = rf"{_IDENT}(?:\.{_IDENT})*"
TARGET_RE = re.compile(rf"^(?P<module>{_DOTTED}):(?P<qualname>{_DOTTED})$")
DOTTED_RE = re.compile(rf"^{_DOTTED}$")
ID_RE = re.compile(r"^[a-z0-9]+(?:-[a-z0-9]+)*$")
IDENT_RE = re.compile(rf"^{_IDENT}$")


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


# --------------------------------------------------------------------------------------------
# Locating files


def default_patchset_dir() -> Path:
    """The patchsets shipped with the package (flashhead.patchsets)."""
    import flashhead.patchsets as shipped

    return Path(shipped.__file__).resolve().parent


def patchset_dir() -> Path:
    """``$FLASHHEAD_PATCHSET_DIR`` when set (tests, local overrides), else the shipped ones."""
    override = settings().patchset_dir
    return Path(override).expanduser() if override else default_patchset_dir()


# --------------------------------------------------------------------------------------------
# Loading


class _Validator:
    """Turns a composed YAML node tree into a PatchSet, collecting problems with their lines."""

    def __init__(self, path: Path, loader: yaml.SafeLoader):
        self.path = path
        self.file = str(path)
        self.loader = loader
        self.problems: list[Problem] = []

    # -- helpers ---------------------------------------------------------------------------
    def problem(self, node: yaml.Node | None, fld: str, message: str, fix: str = "") -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(Problem(self.file, line, fld, message, fix))

    def value(self, node: yaml.Node) -> Any:
        # SafeConstructor per node: exactly yaml.safe_load's meaning of each scalar.
        return self.loader.construct_object(node, deep=True)

    def mapping(
        self, node: yaml.Node, where: str, allowed: Sequence[str]
    ) -> dict[str, tuple[yaml.Node, yaml.Node]] | None:
        """key -> (key node, value node); reports non-mappings, duplicate and unknown keys."""
        if not isinstance(node, yaml.MappingNode):
            self.problem(
                node,
                where,
                f"expected a mapping, got {_node_kind(node)}",
                "write `key: value` lines",
            )
            return None
        out: dict[str, tuple[yaml.Node, yaml.Node]] = {}
        for key_node, value_node in node.value:
            key = self.value(key_node) if isinstance(key_node, yaml.ScalarNode) else None
            if not isinstance(key, str):
                self.problem(key_node, where, f"keys must be strings, got {key!r}", "quote the key")
                continue
            name = f"{where}.{key}" if where else key
            if key in out:
                self.problem(key_node, name, "duplicate key", "keep one of the two entries")
                continue
            if key not in allowed:
                self.problem(
                    key_node,
                    name,
                    "unknown field",
                    f"allowed here: {', '.join(allowed)}; check the spelling",
                )
                continue
            out[key] = (key_node, value_node)
        return out

    def string(
        self, node: yaml.Node, fld: str, *, nonempty: bool = True, fix: str = "quote the value"
    ) -> str | None:
        value = self.value(node)
        if not isinstance(value, str):
            self.problem(node, fld, f"expected a string, got {_type_name(value)} {value!r}", fix)
            return None
        if nonempty and not value.strip():
            self.problem(node, fld, "must not be empty", "write a short sentence")
            return None
        return value

    def boolean(self, node: yaml.Node, fld: str) -> bool | None:
        value = self.value(node)
        if not isinstance(value, bool):
            self.problem(
                node,
                fld,
                f"expected true or false, got {_type_name(value)} {value!r}",
                "write true or false",
            )
            return None
        return value

    def choice(
        self, node: yaml.Node, fld: str, allowed: Sequence[str], noun: str = "value"
    ) -> str | None:
        value = self.value(node)
        if value not in allowed:
            self.problem(node, fld, f"unknown {noun} {value!r}", f"one of: {', '.join(allowed)}")
            return None
        return value

    def matching(
        self, node: yaml.Node, fld: str, pattern: re.Pattern[str], noun: str, fix: str
    ) -> str | None:
        """A non-empty string that matches `pattern` (else "bad <noun> ...")."""
        value = self.string(node, fld)
        if value is not None and not pattern.match(value):
            self.problem(node, fld, f"bad {noun} {value!r}", fix)
            return None
        return value

    # -- top level -------------------------------------------------------------------------
    def patchset(self, root: yaml.Node) -> PatchSet | None:
        top = self.mapping(root, "", TOP_FIELDS)
        if top is None:
            return None
        for required in ("schema", "vllm", "patches"):
            if required not in top:
                self.problem(root, required, "missing", f"add `{required}:` (see docs/DESIGN.md)")

        schema = SCHEMA_VERSION
        if "schema" in top:
            node = top["schema"][1]
            value = self.value(node)
            if type(value) is not int or value != SCHEMA_VERSION:
                self.problem(
                    node,
                    "schema",
                    f"unsupported schema {value!r}",
                    f"write `schema: {SCHEMA_VERSION}`",
                )

        spec = SpecifierSet()
        vllm_line = 0
        vllm_text = ""
        if "vllm" in top:
            node = top["vllm"][1]
            vllm_line = node.start_mark.line + 1
            spec = self.specifier(node) or spec
            vllm_text = str(self.value(node)).strip()

        description = ""
        if "description" in top:
            description = self.string(top["description"][1], "description", nonempty=False) or ""

        serve = "flashhead"
        if "serve" in top:
            serve = self.choice(top["serve"][1], "serve", SERVE_VALUES) or serve

        reason = ""
        if "reason" in top:
            reason = self.string(top["reason"][1], "reason", nonempty=False) or ""
        if serve == "dense" and not reason.strip():
            node = top["serve"][1]
            self.problem(
                node, "reason", "required when serve: dense", "say why FlashHead cannot be served"
            )

        support: dict[str, str] = {}
        if "support" in top:
            fields = self.mapping(top["support"][1], "support", SUPPORT_KEYS)
            for key, (_, node) in (fields or {}).items():
                value = self.choice(node, f"support.{key}", SUPPORT_VALUES)
                if value is not None:
                    support[key] = value

        patches: list[PatchSpec] = []
        if "patches" in top:
            patches = self.patch_list(top["patches"][1])

        if self.problems:
            return None
        return PatchSet(
            path=self.path,
            vllm=spec,
            patches=tuple(patches),
            schema=schema,
            description=description,
            serve=serve,
            reason=reason,
            support=support,
            vllm_line=vllm_line,
            vllm_text=vllm_text,
        )

    def specifier(self, node: yaml.Node) -> SpecifierSet | None:
        value = self.value(node)
        if not isinstance(value, str) or not value.strip():
            self.problem(
                node,
                "vllm",
                f"expected a version range string, got {value!r}",
                'write e.g. ">=0.29,<0.34"',
            )
            return None
        try:
            spec = SpecifierSet(value)
        except InvalidSpecifier as exc:
            self.problem(
                node,
                "vllm",
                f"bad version range {value!r}: {exc}",
                'write a PEP 440 range like ">=0.29,<0.34"',
            )
            return None
        if not list(spec):
            self.problem(
                node, "vllm", "empty version range", 'write a PEP 440 range like ">=0.29,<0.34"'
            )
            return None
        if interval(spec).empty:
            self.problem(node, "vllm", f"range {value!r} matches no version", "fix the bounds")
            return None
        return spec

    # -- patches ---------------------------------------------------------------------------
    def patch_list(self, node: yaml.Node) -> list[PatchSpec]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(
                node,
                "patches",
                f"expected a list, got {_node_kind(node)}",
                "write `- id: ...` items",
            )
            return []
        out: list[PatchSpec] = []
        seen: dict[str, int] = {}
        for index, item in enumerate(node.value):
            patch = self.patch(item, index)
            if patch is None:
                continue
            if patch.id in seen:
                self.problem(
                    item,
                    f"patches[{index}].id",
                    f"duplicate id {patch.id!r} (first at line {seen[patch.id]})",
                    "give every patch its own id",
                )
                continue
            seen[patch.id] = patch.line
            out.append(patch)
        return out

    def patch(self, node: yaml.Node, index: int) -> PatchSpec | None:
        where = f"patches[{index}]"
        before = len(self.problems)
        peeked = _peek_id(node)
        pid = f"{where}({peeked})" if peeked else where
        fields = self.mapping(node, pid, PATCH_FIELDS)
        if fields is None:
            return None
        for required in ("id", "kind", "target", "why", "remove_when"):
            if required not in fields:
                self.problem(node, f"{pid}.{required}", "missing", _MISSING_FIX[required])

        values: dict[str, Any] = {}
        if "id" in fields:
            ident = self.matching(
                fields["id"][1],
                f"{where}.id",
                ID_RE,
                "id",
                "use lowercase letters, digits and dashes",
            )
            if ident is not None:
                values["id"] = ident
                pid = f"{where}({ident})"
        kind = None
        if "kind" in fields:
            kind = self.choice(fields["kind"][1], f"{pid}.kind", KINDS, "kind")
            if kind is not None:
                values["kind"] = kind
        if "target" in fields:
            n = fields["target"][1]
            values["target"] = self.target(n, f"{pid}.target")
        for text_field in ("why", "remove_when"):
            if text_field in fields:
                values[text_field] = self.string(fields[text_field][1], f"{pid}.{text_field}")

        if "handler" in fields:
            values["handler"] = self.handler(fields["handler"][1], f"{pid}.handler")
        elif kind in KINDS_WITH_HANDLER:
            self.problem(
                node,
                f"{pid}.handler",
                f"missing (kind {kind} needs one)",
                "add `handler: flashhead.handlers.<module>:<function>`",
            )
        if "handler" in fields and kind == "register_architecture":
            self.problem(
                fields["handler"][0],
                f"{pid}.handler",
                "not used by kind register_architecture",
                "remove it",
            )

        if "signature" in fields:
            values["signature"] = self.signature(fields["signature"][1], f"{pid}.signature")
        elif kind in KINDS_NEEDING_SIGNATURE:
            self.problem(
                node,
                f"{pid}.signature",
                f"missing (kind {kind} must declare the live signature it was written against)",
                'add `signature: "(self, ...)"` as in the vLLM source, without annotations',
            )
        if "signature_of" in fields:
            n = fields["signature_of"][1]
            member = self.matching(
                n,
                f"{pid}.signature_of",
                DOTTED_RE,
                "member name",
                "write a method name such as forward",
            )
            if member is not None:
                values["signature_of"] = member
            if "signature" not in fields:
                self.problem(
                    n,
                    f"{pid}.signature_of",
                    "given without `signature`",
                    "add the signature it refers to",
                )

        if "requires" in fields:
            values["requires"] = self.requires(fields["requires"][1], f"{pid}.requires")

        if "architectures" in fields:
            values["architectures"] = self.architectures(
                fields["architectures"][1], f"{pid}.architectures"
            )
            if kind is not None and kind != "register_architecture":
                self.problem(
                    fields["architectures"][0],
                    f"{pid}.architectures",
                    f"not used by kind {kind}",
                    "remove it",
                )
        elif kind == "register_architecture":
            self.problem(
                node,
                f"{pid}.architectures",
                "missing",
                "add `architectures:` mapping NewArch: BaseArch",
            )

        for flag in ("always", "required"):
            if flag in fields:
                values[flag] = self.boolean(fields[flag][1], f"{pid}.{flag}")
        if "process" in fields:
            values["process"] = self.process(fields["process"][1], f"{pid}.process")

        if len(self.problems) > before:
            return None
        return PatchSpec(
            id=values["id"],
            kind=values["kind"],
            target=values["target"],
            why=values["why"],
            remove_when=values["remove_when"],
            handler=values.get("handler"),
            signature=values.get("signature"),
            signature_of=values.get("signature_of"),
            requires=tuple(values.get("requires") or ()),
            architectures=dict(values.get("architectures") or {}),
            always=bool(values.get("always", False)),
            process=values.get("process"),
            required=bool(values.get("required", True)),
            source=self.file,
            line=node.start_mark.line + 1,
        )

    def target(self, node: yaml.Node, fld: str) -> str | None:
        return self.matching(
            node,
            fld,
            TARGET_RE,
            "target",
            "write module.path:Qualified.name, e.g. vllm.model_executor.layers.logits_processor:LogitsProcessor.forward",
        )

    def handler(self, node: yaml.Node, fld: str) -> str | None:
        value = self.matching(
            node, fld, TARGET_RE, "handler", "write flashhead.handlers.<module>:<function>"
        )
        if value is None:
            return None
        module = value.split(":", 1)[0]
        if module != HANDLER_PACKAGE and not module.startswith(HANDLER_PACKAGE + "."):
            self.problem(
                node,
                fld,
                f"handler module {module!r} is outside the {HANDLER_PACKAGE} package",
                f"handlers must live in {HANDLER_PACKAGE}.* (e.g. {HANDLER_PACKAGE}.handlers.<module>)",
            )
            return None
        return value

    def signature(self, node: yaml.Node, fld: str) -> str | None:
        # An empty string is left to parse_signature, whose error says what a signature looks like.
        value = self.string(node, fld, nonempty=False, fix='quote it: "(self, x, y=None)"')
        if value is None:
            return None
        try:
            parse_signature(value)
        except SignatureSyntaxError as exc:
            self.problem(
                node,
                fld,
                str(exc),
                "write the parameter list as in the vLLM source, in parentheses, without annotations",
            )
            return None
        return value

    def requires(self, node: yaml.Node, fld: str) -> list[Requirement]:
        if not isinstance(node, yaml.SequenceNode):
            self.problem(
                node, fld, f"expected a list, got {_node_kind(node)}", "write `- target: ...` items"
            )
            return []
        out = []
        for i, item in enumerate(node.value):
            where = f"{fld}[{i}]"
            fields = self.mapping(item, where, REQUIRES_FIELDS)
            if fields is None:
                continue
            if "target" not in fields:
                self.problem(
                    item, f"{where}.target", "missing", "add `target: module:Qualified.name`"
                )
                continue
            target = self.target(fields["target"][1], f"{where}.target")
            signature = None
            if "signature" in fields:
                signature = self.signature(fields["signature"][1], f"{where}.signature")
            if target is not None:
                out.append(Requirement(target, signature, item.start_mark.line + 1))
        return out

    def architectures(self, node: yaml.Node, fld: str) -> dict[str, str]:
        fields = self.mapping(node, fld, _AnyKey())
        out: dict[str, str] = {}
        for key, (key_node, value_node) in (fields or {}).items():
            base = self.value(value_node)
            if not IDENT_RE.match(key):
                self.problem(
                    key_node, f"{fld}.{key}", "bad architecture name", "use a Python class name"
                )
            elif not isinstance(base, str) or not IDENT_RE.match(base):
                self.problem(
                    value_node,
                    f"{fld}.{key}",
                    f"bad base architecture {base!r}",
                    "name the vLLM architecture, e.g. LlamaForCausalLM",
                )
            else:
                out[key] = base
        if fields is not None and not fields and not out:
            self.problem(node, fld, "empty", "list at least one NewArch: BaseArch pair")
        return out

    def process(self, node: yaml.Node, fld: str) -> tuple[str, ...] | None:
        value = self.value(node)
        if value == "any":
            return None
        fix = f"write `any` or a list from: {', '.join(PROCESS_KINDS)}"
        if not isinstance(value, list) or not value:
            self.problem(node, fld, f"expected `any` or a non-empty list, got {value!r}", fix)
            return None
        bad = [v for v in value if v not in PROCESS_KINDS]
        if bad:
            self.problem(node, fld, f"unknown process kind(s) {bad!r}", fix)
            return None
        if len(set(value)) != len(value):
            self.problem(node, fld, "duplicate entries", "list each process kind once")
            return None
        return tuple(value)


class _AnyKey(tuple):
    """`allowed` for mappings whose keys are data (architectures), not field names."""

    def __contains__(self, item: object) -> bool:
        return True


_MISSING_FIX = {
    "id": "add `id: short-name` (lowercase, digits, dashes)",
    "kind": f"add `kind:` one of {', '.join(KINDS)}",
    "target": "add `target: module.path:Qualified.name`",
    "why": "add `why:` saying what the patch is for",
    "remove_when": "add `remove_when:` saying when the patch can go (or `never`)",
}


def _peek_id(node: yaml.Node) -> str | None:
    """The patch's id as written, for naming fields before the mapping is validated."""
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            if (
                isinstance(key, yaml.ScalarNode)
                and key.value == "id"
                and isinstance(value, yaml.ScalarNode)
            ):
                return value.value if ID_RE.match(value.value) else None
    return None


def _node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the scalar {node.value!r}"


def _type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def load_patchset(path: str | os.PathLike[str]) -> PatchSet:
    """Load and validate one file. Raises PatchsetError (with every problem) or OSError."""
    path = Path(path)
    text = path.read_text(encoding="utf-8")
    return loads_patchset(text, path)


def loads_patchset(text: str, path: str | os.PathLike[str] = "<string>") -> PatchSet:
    path = Path(path)
    loader = yaml.SafeLoader(text)
    try:
        try:
            root = loader.get_single_node()
        except yaml.MarkedYAMLError as exc:
            mark = exc.problem_mark or exc.context_mark
            line = mark.line + 1 if mark is not None else 1
            what = " ".join(x for x in (exc.context, exc.problem) if x)
            raise PatchsetError(
                [
                    Problem(
                        str(path),
                        line,
                        "(yaml)",
                        f"syntax error: {what}",
                        "fix the YAML syntax (indentation, quoting, colons)",
                    )
                ]
            ) from None
        except yaml.YAMLError as exc:
            raise PatchsetError(
                [Problem(str(path), 1, "(yaml)", f"cannot parse: {exc}", "fix the YAML syntax")]
            ) from None
        if root is None:
            raise PatchsetError(
                [Problem(str(path), 1, "(file)", "empty patchset", "add schema, vllm and patches")]
            )
        validator = _Validator(path, loader)
        try:
            patchset = validator.patchset(root)
        except yaml.constructor.ConstructorError as exc:
            mark = exc.problem_mark
            line = mark.line + 1 if mark is not None else 1
            validator.problems.append(
                Problem(str(path), line, "(yaml)", str(exc.problem), "remove YAML tags")
            )
            patchset = None
        if validator.problems or patchset is None:
            raise PatchsetError(sorted(validator.problems, key=lambda p: p.line))
        return patchset
    finally:
        loader.dispose()


def load_patchsets(directory: str | os.PathLike[str] | None = None) -> LoadResult:
    """Every ``*.yaml`` in `directory` (default: :func:`patchset_dir`), sorted by file name.

    Never raises for bad files: their problems are returned so that the caller (plugin, doctor,
    checker) decides what to do.
    """
    root = Path(directory) if directory is not None else patchset_dir()
    result = LoadResult([], [])
    if not root.is_dir():
        result.problems.append(
            Problem(
                str(root),
                0,
                "(dir)",
                "patchset directory not found",
                f"check ${PATCHSET_DIR_ENV} or the install",
            )
        )
        return result
    for path in sorted(root.glob("*.yaml")):
        try:
            result.patchsets.append(load_patchset(path))
        except PatchsetError as exc:
            result.problems.extend(exc.problems)
            result.failed_files.append(path)
        except (OSError, UnicodeDecodeError) as exc:
            result.problems.append(
                Problem(str(path), 0, "(file)", f"cannot read: {exc}", "check the file")
            )
            result.failed_files.append(path)
    return result


def select_patchset(patchsets: Iterable[PatchSet], version: Version | str) -> PatchSet | None:
    """The patchset whose range contains `version` (the release used for matching), or None.

    With overlapping ranges (a checker error) the first by file name wins, deterministically.
    """
    v = version if isinstance(version, Version) else Version(str(version))
    for ps in sorted(patchsets, key=lambda p: p.name):
        if ps.matches(v):
            return ps
    return None


# --------------------------------------------------------------------------------------------
# Range checks


def check_ranges(patchsets: Sequence[PatchSet]) -> list[str]:
    """Problems with the version ranges of a collection of patchsets: empty or overlapping.

    Each problem is ``file:line: vllm: ...`` so the checker can print it as is.
    """
    problems: list[str] = []
    intervals = [(ps, interval(ps.vllm)) for ps in sorted(patchsets, key=lambda p: p.name)]
    for ps, iv in intervals:
        if iv.empty:
            problems.append(
                f"{ps.path}:{ps.vllm_line}: vllm: range {ps.range_text!r} matches no version (fix the bounds)"
            )
    for i, (a, ia) in enumerate(intervals):
        for b, ib in intervals[i + 1 :]:
            if ia.empty or ib.empty:
                continue
            both = ia.intersect(ib)
            if not both.empty:
                problems.append(
                    f"{b.path}:{b.vllm_line}: vllm: range {b.range_text!r} overlaps {a.name} "
                    f"({a.range_text!r}, line {a.vllm_line}){overlap_hint(both)} "
                    "(every vLLM version must select at most one file; move a bound)"
                )
    return problems
