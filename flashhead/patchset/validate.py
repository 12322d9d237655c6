"""Validating a composed YAML node tree into a PatchSet, every problem with its line:
``file:line: field: problem (fix)`` (line numbers come from the YAML node marks)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import InvalidSpecifier, SpecifierSet

from flashhead.compat.process import PROCESS_KINDS  # the `process:` values name these kinds
from flashhead.patchset.model import (
    DOTTED_RE,
    HANDLER_PACKAGE,
    ID_RE,
    IDENT_RE,
    KINDS,
    KINDS_NEEDING_SIGNATURE,
    KINDS_WITH_HANDLER,
    PATCH_FIELDS,
    REQUIRES_FIELDS,
    SCHEMA_VERSION,
    SERVE_VALUES,
    SUPPORT_KEYS,
    SUPPORT_VALUES,
    TARGET_RE,
    TOP_FIELDS,
    PatchSet,
    PatchSpec,
    Problem,
    Requirement,
)
from flashhead.patchset.yaml_nodes import AnyKey, node_kind, peek_id, type_name
from flashhead.signatures import SignatureSyntaxError, parse_signature
from flashhead.version_ranges import interval


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
                f"expected a mapping, got {node_kind(node)}",
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
            self.problem(node, fld, f"expected a string, got {type_name(value)} {value!r}", fix)
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
                f"expected true or false, got {type_name(value)} {value!r}",
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
                f"expected a list, got {node_kind(node)}",
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
        peeked = peek_id(node)
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
                node, fld, f"expected a list, got {node_kind(node)}", "write `- target: ...` items"
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
        fields = self.mapping(node, fld, AnyKey())
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


_MISSING_FIX = {
    "id": "add `id: short-name` (lowercase, digits, dashes)",
    "kind": f"add `kind:` one of {', '.join(KINDS)}",
    "target": "add `target: module.path:Qualified.name`",
    "why": "add `why:` saying what the patch is for",
    "remove_when": "add `remove_when:` saying when the patch can go (or `never`)",
}
