"""The patchset registry: the public names of ``flashhead.patchset`` (model, load, select).

Modules: ``patchset.schema`` (the file schema as pydantic models), ``patchset.model`` (what a
loaded file holds), ``patchset.validate`` (YAML nodes -> schema -> model, every problem with its
line), ``patchset.load`` (files and directories), ``patchset.select``
(the file for a release; disjoint, non-empty ranges).
"""

from __future__ import annotations

from flashhead.compat.process import PROCESS_KINDS
from flashhead.patchset.load import (
    default_patchset_dir,
    load_patchset,
    load_patchsets,
    loads_patchset,
    patchset_dir,
)
from flashhead.patchset.model import (
    LoadResult,
    PatchSet,
    PatchsetError,
    PatchSpec,
    Problem,
    Requirement,
)
from flashhead.patchset.schema import (
    HANDLER_PACKAGE,
    KINDS,
    KINDS_NEEDING_SIGNATURE,
    KINDS_WITH_HANDLER,
    PATCH_FIELDS,
    SCHEMA_VERSION,
    SERVE_VALUES,
    SUPPORT_KEYS,
    SUPPORT_VALUES,
    TOP_FIELDS,
    json_schema,
)
from flashhead.patchset.select import check_ranges, select_patchset

__all__ = [
    "HANDLER_PACKAGE",
    "KINDS",
    "KINDS_NEEDING_SIGNATURE",
    "KINDS_WITH_HANDLER",
    "PATCH_FIELDS",
    "PROCESS_KINDS",
    "SCHEMA_VERSION",
    "SERVE_VALUES",
    "SUPPORT_KEYS",
    "SUPPORT_VALUES",
    "TOP_FIELDS",
    "LoadResult",
    "PatchSet",
    "PatchSpec",
    "PatchsetError",
    "Problem",
    "Requirement",
    "check_ranges",
    "json_schema",
    "default_patchset_dir",
    "load_patchset",
    "load_patchsets",
    "loads_patchset",
    "patchset_dir",
    "select_patchset",
]
