"""Validating a composed YAML node tree into a PatchSet: the rules are the pydantic models of
`schema.py`; this module gives every problem its line (from the YAML node marks) and its
``file:line: field: problem (fix)`` wording.

Two checks stay on the node tree, because the constructed data has lost what they need:
duplicate keys (``yaml.safe_load`` keeps the last) and ids repeated across patches (to name the
first one's line).
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from packaging.specifiers import SpecifierSet
from pydantic import BaseModel, ValidationError

from flashhead.patchset.model import PatchSet, PatchSpec, Problem, Requirement
from flashhead.patchset.schema import (
    ERROR_TYPE,
    ID_RE,
    KINDS,
    PATCH_FIELDS,
    PATCH_MODELS,
    PatchCommon,
    PatchsetModel,
    RequirementModel,
    SupportModel,
)
from flashhead.patchset.yaml_nodes import Loc, field_name, find_node, node_kind, type_name

_MISSING = {
    "schema": ("missing", "add `schema:` (see docs/DESIGN.md)"),
    "vllm": ("missing", "add `vllm:` (see docs/DESIGN.md)"),
    "patches": ("missing", "add `patches:` (see docs/DESIGN.md)"),
    "id": ("missing", "add `id: short-name` (lowercase, digits, dashes)"),
    "kind": ("missing", f"add `kind:` one of {', '.join(KINDS)}"),
    "target": ("missing", "add `target: module.path:Qualified.name`"),
    "why": ("missing", "add `why:` saying what the patch is for"),
    "remove_when": ("missing", "add `remove_when:` saying when the patch can go (or `never`)"),
    "handler": (
        "missing (kind {kind} needs one)",
        "add `handler: flashhead.handlers.<module>:<function>`",
    ),
    "signature": (
        "missing (kind {kind} must declare the live signature it was written against)",
        'add `signature: "(self, ...)"` as in the vLLM source, without annotations',
    ),
    "architectures": ("missing", "add `architectures:` mapping NewArch: BaseArch"),
}
_LIST_FIX = {"patches": "write `- id: ...` items", "requires": "write `- target: ...` items"}


def _kind_in(loc: Loc) -> str | None:
    """The patch kind a location lies under (pydantic puts the union's tag in the location)."""
    if len(loc) > 2 and loc[0] == "patches" and loc[2] in KINDS:
        return str(loc[2])
    return None


def _model_at(loc: Loc) -> type[BaseModel]:
    """The model whose fields a location's last part is checked against."""
    kind = _kind_in(loc)
    if kind is None:
        return SupportModel if loc[:1] == ("support",) else PatchsetModel
    return RequirementModel if "requires" in loc[3:] else PATCH_MODELS[kind]


def _allowed(model: type[BaseModel]) -> list[str]:
    return [f.alias or name for name, f in model.model_fields.items()]


class _Validator:
    def __init__(self, path: Path, loader: yaml.SafeLoader):
        self.path = path
        self.file = str(path)
        self.loader = loader
        self.problems: list[Problem] = []
        self.root: yaml.Node | None = None

    def add(self, name_loc: Loc, at: Loc | yaml.Node, message: str, fix: str) -> None:
        """A problem named by `name_loc`, on the line of `at` (a node, or the node at a loc)."""
        assert self.root is not None
        node = at if isinstance(at, yaml.Node) else find_node(self.root, at)
        name = field_name(self.root, name_loc)
        self.problems.append(Problem(self.file, node.start_mark.line + 1, name, message, fix))

    # -- the whole file ---------------------------------------------------------------------
    def patchset(self, root: yaml.Node) -> PatchSet | None:
        self.root = root
        self.check_keys(root, ())
        data = self.loader.construct_document(root)
        self.check_ids(data)
        try:
            model = PatchsetModel.model_validate(data)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                self.report(error, data)
            return None
        if self.problems:
            return None
        return self.build(model)

    def check_keys(self, node: yaml.Node, loc: Loc) -> None:
        """Duplicate and non-string keys, anywhere in the file."""
        if isinstance(node, yaml.SequenceNode):
            for i, item in enumerate(node.value):
                self.check_keys(item, (*loc, i))
        if not isinstance(node, yaml.MappingNode):
            return
        seen: set[str] = set()
        for key_node, value_node in node.value:
            scalar = isinstance(key_node, yaml.ScalarNode)
            key = self.loader.construct_object(key_node) if scalar else None
            if not isinstance(key, str):
                self.add(loc, key_node, f"keys must be strings, got {key!r}", "quote the key")
                continue
            if key in seen:
                self.add((*loc, key), key_node, "duplicate key", "keep one of the two entries")
            seen.add(key)
            self.check_keys(value_node, (*loc, key))

    def check_ids(self, data: Any) -> None:
        patches = data.get("patches") if isinstance(data, dict) else None
        if not isinstance(patches, list):
            return
        first: dict[str, int] = {}
        for index, item in enumerate(patches):
            pid = item.get("id") if isinstance(item, dict) else None
            if not isinstance(pid, str) or not ID_RE.match(pid):
                continue  # the models report a bad or missing id
            line = self.line(("patches", index))
            if pid in first:
                self.add(
                    ("patches", index, "id"),
                    ("patches", index),
                    f"duplicate id {pid!r} (first at line {first[pid]})",
                    "give every patch its own id",
                )
            else:
                first[pid] = line

    # -- one pydantic error -> one problem -------------------------------------------------
    def report(self, error: Any, data: Any) -> None:
        loc: Loc = tuple(error["loc"])
        kind, ctx, value = error["type"], error.get("ctx") or {}, error.get("input")
        if kind == ERROR_TYPE:
            field = ctx.get("field")
            name_loc = (*loc, field) if field else loc
            line_loc = (*loc, ctx.get("line_of") or field) if field else loc
            self.add(name_loc, line_loc, ctx["message"], ctx["fix"])
        elif kind == "missing":
            message, fix = _MISSING.get(loc[-1], ("missing", "add it (see patchsets/schema.json)"))
            self.add(loc, loc, message.format(kind=_kind_in(loc)), fix)
        elif kind == "extra_forbidden":
            key, patch_kind = loc[-1], _kind_in(loc)
            if patch_kind is not None and "requires" not in loc[3:] and key in PATCH_FIELDS:
                self.add(loc, (*loc, "[key]"), f"not used by kind {patch_kind}", "remove it")
            else:
                allowed = ", ".join(_allowed(_model_at(loc)))
                fix = f"allowed here: {allowed}; check the spelling"
                self.add(loc, (*loc, "[key]"), "unknown field", fix)
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            if kind == "union_tag_invalid":
                fix = f"one of: {', '.join(KINDS)}"
                self.add((*loc, "kind"), (*loc, "kind"), f"unknown kind {ctx['tag']!r}", fix)
            else:
                self.add((*loc, "kind"), loc, *_MISSING["kind"])
            self.check_common_fields(loc, _get(data, loc))
        elif kind == "literal_error":
            expected = ", ".join(re.findall(r"'([^']*)'", str(ctx.get("expected", ""))))
            self.add(loc, loc, f"unknown value {value!r}", f"one of: {expected}")
        elif kind == "bool_type":
            message = f"expected true or false, got {type_name(value)} {value!r}"
            self.add(loc, loc, message, "write true or false")
        elif kind in ("model_type", "model_attributes_type", "dict_type"):
            node = find_node(self.root, loc)
            self.add(
                loc, loc, f"expected a mapping, got {node_kind(node)}", "write `key: value` lines"
            )
        elif kind in ("list_type", "tuple_type"):
            node = find_node(self.root, loc)
            fix = _LIST_FIX.get(str(loc[-1]), "write a YAML list")
            self.add(loc, loc, f"expected a list, got {node_kind(node)}", fix)
        elif kind == "string_type":
            message = f"expected a string, got {type_name(value)} {value!r}"
            self.add(loc, loc, message, "quote the value")
        else:  # a rule without its own wording yet: pydantic's, and where to look
            self.add(loc, loc, error["msg"], "see patchsets/schema.json")

    def check_common_fields(self, loc: Loc, item: Any) -> None:
        """A patch of unknown kind: still check the fields every kind has, to report them all."""
        if not isinstance(item, dict):
            return
        common = {k: v for k, v in item.items() if k in PatchCommon.model_fields}
        try:
            PatchCommon.model_validate(common)
        except ValidationError as exc:
            for error in exc.errors(include_url=False):
                if error["loc"] == ("kind",):
                    continue  # reported above
                error["loc"] = (*loc, *error["loc"])
                self.report(error, item)

    # -- the loaded form -----------------------------------------------------------------
    def line(self, loc: Loc) -> int:
        assert self.root is not None
        return find_node(self.root, loc).start_mark.line + 1

    def build(self, model: PatchsetModel) -> PatchSet:
        patches = []
        for i, p in enumerate(model.patches):
            requires = tuple(
                Requirement(r.target, r.signature, self.line(("patches", i, "requires", j)))
                for j, r in enumerate(p.requires)
            )
            patches.append(
                PatchSpec(
                    id=p.id,
                    kind=p.kind,
                    target=p.target,
                    why=p.why,
                    remove_when=p.remove_when,
                    handler=getattr(p, "handler", None),
                    signature=getattr(p, "signature", None),
                    signature_of=getattr(p, "signature_of", None),
                    requires=requires,
                    architectures=dict(getattr(p, "architectures", {})),
                    always=p.always,
                    process=None if p.process == "any" else tuple(p.process),
                    required=p.required,
                    source=self.file,
                    line=self.line(("patches", i)),
                )
            )
        return PatchSet(
            path=self.path,
            vllm=SpecifierSet(model.vllm),
            patches=tuple(patches),
            schema=model.schema_version,
            description=model.description,
            serve=model.serve,
            reason=model.reason,
            support=model.support.model_dump(exclude_none=True),
            vllm_line=self.line(("vllm",)),
            vllm_text=model.vllm,
        )


def _get(data: Any, loc: Loc) -> Any:
    for part in loc:
        try:
            data = data[part]
        except (KeyError, IndexError, TypeError):
            return None
    return data
