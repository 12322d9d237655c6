"""Small helpers over composed YAML nodes: the node at a validation error's location, and the
field name a message shows for it (``patches[1](logits).requires[0].target``)."""

from __future__ import annotations

from typing import Any

import yaml

from flashhead.patchset.schema import ID_RE, KINDS

# A location as pydantic reports it: keys, list indexes, the union's tag after a patch index,
# and "[key]" after a dict key when the key itself (not its value) is meant.
Loc = tuple[str | int, ...]
KEY = "[key]"


def find_node(root: yaml.Node, loc: Loc) -> yaml.Node:
    """The node at `loc`, or the deepest node on its way (a missing field: the mapping that
    lacks it). A kind tag is not in the file and is skipped."""
    node = root
    parts = list(loc)
    for i, part in enumerate(parts):
        if part == KEY:
            continue
        if isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if not 0 <= part < len(node.value):
                return node
            node = node.value[part]
        elif isinstance(node, yaml.MappingNode):
            entry = _entry(node, part)
            if entry is None:
                if _is_tag(parts, i):
                    continue
                return node
            key_node, value_node = entry
            node = key_node if parts[i + 1 : i + 2] == [KEY] else value_node
        else:
            return node
    return node


def field_name(root: yaml.Node, loc: Loc) -> str:
    """``patches[1](logits).kind``: indexes in brackets, a patch's id (when it is a good one)
    after its index, except in the name of the id itself."""
    parts = [p for i, p in enumerate(loc) if p != KEY and not _is_tag(list(loc), i)]
    out = ""
    for i, part in enumerate(parts):
        if isinstance(part, int) and isinstance(
            find_node(root, tuple(parts[:i])), yaml.SequenceNode
        ):
            out += f"[{part}]"
            if i == 1 and parts[0] == "patches" and parts[2:3] != ["id"]:
                pid = peek_id(find_node(root, ("patches", part)))
                out += f"({pid})" if pid else ""
        else:
            out += f".{part}" if out else str(part)
    return out


def _is_tag(parts: list[Any], i: int) -> bool:
    return i == 2 and parts[0] == "patches" and parts[i] in KINDS


def _entry(node: yaml.MappingNode, key: Any) -> tuple[yaml.Node, yaml.Node] | None:
    for key_node, value_node in reversed(node.value):  # the last of duplicates, as safe_load
        if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(key):
            return key_node, value_node
    return None


def peek_id(node: yaml.Node) -> str | None:
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


def node_kind(node: yaml.Node) -> str:
    if isinstance(node, yaml.MappingNode):
        return "a mapping"
    if isinstance(node, yaml.SequenceNode):
        return "a list"
    return f"the scalar {node.value!r}"


def type_name(value: Any) -> str:
    return "null" if value is None else type(value).__name__
