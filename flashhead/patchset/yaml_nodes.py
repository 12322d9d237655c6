"""Small helpers over composed YAML nodes, for the validator's messages."""

from __future__ import annotations

from typing import Any

import yaml

from flashhead.patchset.model import ID_RE


class AnyKey(tuple):
    """`allowed` for mappings whose keys are data (architectures), not field names."""

    def __contains__(self, item: object) -> bool:
        return True


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
