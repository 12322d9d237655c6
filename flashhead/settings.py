"""Every ``FLASHHEAD_*`` environment variable, parsed in one place, once per process.

``settings()`` parses them on first use and keeps the result for the process. A bad value
never stops a server: the setting falls back (to its default, or to the safe side, which is
the dense head, for ``FLASHHEAD_ENABLED``), and ``Settings.problems`` says which variable,
what was wrong and what to write instead (the plugin logs each once; the doctor shows them).

``VARIABLES`` is the table of them all, with defaults and meanings; docs/DESIGN.md shows it
and a test keeps the two in step. Booleans follow one rule: 1/true/yes/on and 0/false/no/off,
any case; empty means unset.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from flashhead.kernels.options import BACKENDS, SELECT_METHODS, KernelOptions

ENABLED_ENV = "FLASHHEAD_ENABLED"
BACKEND_ENV = "FLASHHEAD_BACKEND"
DENSE_MIN_BATCH_ENV = "FLASHHEAD_DENSE_MIN_BATCH"
CPU_COMPILE_ENV = "FLASHHEAD_CPU_COMPILE"
TRITON_SELECT_ENV = "FLASHHEAD_TRITON_SELECT"
TRITON_S1_ENV = "FLASHHEAD_TRITON_S1"
TRITON_S2_ENV = "FLASHHEAD_TRITON_S2"
TRITON_SEL_ENV = "FLASHHEAD_TRITON_SEL"
SHADOW_ENV = "FLASHHEAD_SHADOW"
SHADOW_MIN_AGREEMENT_ENV = "FLASHHEAD_SHADOW_MIN_AGREEMENT"
METRICS_DIR_ENV = "FLASHHEAD_METRICS_DIR"
LOG_LEVEL_ENV = "FLASHHEAD_LOG_LEVEL"
PATCHSET_DIR_ENV = "FLASHHEAD_PATCHSET_DIR"
VLLM_VERSION_ENV = "FLASHHEAD_VLLM_VERSION"
CACHE_ENV = "FLASHHEAD_CACHE"
CUDA_GRAPHS_ENV = "FLASHHEAD_CUDA_GRAPHS"

# The guard judges the agreement of the last GUARD_WINDOW shadow rows, once it has at least
# GUARD_MIN_ROWS of them (a fresh server cannot wait for 512 rows before it may fall back).
GUARD_WINDOW = 512
GUARD_MIN_ROWS = 128

TRUE_WORDS = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


@dataclass(frozen=True)
class Settings:
    enabled: bool = True
    backend: str = "auto"
    dense_min_batch: int | None = None
    cpu_compile: bool = True
    triton_select: str = "bisect"
    triton_stage1_blocks: tuple[int, int, int, int, int] | None = None
    triton_stage2_blocks: tuple[int, int, int, int] | None = None
    triton_select_warps: int | None = None
    cuda_graphs: bool = True
    shadow: float = 0.0
    shadow_min_agreement: float | None = None
    metrics_dir: str | None = None
    log_level: str = "INFO"
    patchset_dir: str | None = None
    vllm_version: str | None = None
    cache_dir: str | None = None
    problems: tuple[str, ...] = field(default=())

    def kernel_options(self) -> KernelOptions:
        return KernelOptions(
            backend=self.backend,
            dense_min_batch=self.dense_min_batch,
            cpu_compile=self.cpu_compile,
            triton_select=self.triton_select,
            triton_stage1_blocks=self.triton_stage1_blocks,
            triton_stage2_blocks=self.triton_stage2_blocks,
            triton_select_warps=self.triton_select_warps,
            cuda_graphs=self.cuda_graphs,
        )


class _Bad(ValueError):
    """A value that does not parse; the message says what to write instead."""


def _boolean(raw: str) -> bool:
    low = raw.lower()
    if low in TRUE_WORDS:
        return True
    if low in _FALSE:
        return False
    raise _Bad("is not a boolean (1/0, true/false, yes/no, on/off)")


def _share(raw: str) -> float:
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also false for nan
        raise _Bad("is not a share between 0 and 1 (e.g. 0.01)")
    return value


def _choice(options: tuple[str, ...]) -> Callable[[str], str]:
    def parse(raw: str) -> str:
        low = raw.lower()
        if low not in options:
            raise _Bad(f"is not one of {', '.join(options)}")
        return low

    return parse


def _count(raw: str) -> int:
    try:
        value = int(raw)
    except ValueError:
        value = -1
    if value < 0:
        raise _Bad("is not a whole number >= 0 (0 = never dense)")
    return value


def _ints(count: int) -> Callable[[str], tuple[int, ...]]:
    def parse(raw: str) -> tuple[int, ...]:
        try:
            values = tuple(int(x) for x in raw.split(","))
        except ValueError:
            values = ()
        if len(values) != count or min(values) <= 0:
            raise _Bad(f"is not {count} comma-separated positive integers")
        return values

    return parse


def _level(raw: str) -> str:
    up = raw.upper()
    if up not in LOG_LEVELS:
        raise _Bad(f"is not a log level ({', '.join(LOG_LEVELS)})")
    return up


def _text(raw: str) -> str:
    return raw


@dataclass(frozen=True)
class Variable:
    name: str
    attribute: str  # on Settings
    default: str  # as documented
    meaning: str
    parse: Callable[[str], Any]
    # The value a bad setting falls back to, and why, when that is not the default.
    on_bad: Any = None
    on_bad_note: str = ""


VARIABLES: tuple[Variable, ...] = (
    Variable(
        ENABLED_ENV, "enabled", "1",
        "0 serves FlashHead models with the stock dense head (the kill switch; the "
        "architectures stay registered)",
        _boolean, on_bad=False, on_bad_note="serving dense until it is one",
    ),
    Variable(
        BACKEND_ENV, "backend", "auto",
        "kernel backend: auto (Triton for CUDA tensors when it imports, else torch), "
        "triton or torch", _choice(BACKENDS),
    ),
    Variable(
        DENSE_MIN_BATCH_ENV, "dense_min_batch", "(measured)",
        "hand batches of this many rows or more to the dense head; 0 = never; unset = a CPU "
        "server times its own dense head against FlashHead at the first step "
        "(flashhead/crossover.py), else the rows-scored rule (kernels/dispatch.py)", _count,
    ),
    Variable(
        CPU_COMPILE_ENV, "cpu_compile", "1",
        "0 turns off the CPU fast path's torch.compile'd gather-dot (gather + GEMV instead)",
        _boolean,
    ),
    Variable(
        CUDA_GRAPHS_ENV, "cuda_graphs", "1",
        "0 launches FlashHead's logits path eagerly on a GPU instead of replaying its own CUDA "
        "graphs (batches of up to 32 rows)", _boolean,
    ),
    Variable(
        SHADOW_ENV, "shadow", "0",
        "share 0..1 of FlashHead's greedy rows also scored by the dense head, only compared "
        "(/metrics agreement counters)", _share,
    ),
    Variable(
        SHADOW_MIN_AGREEMENT_ENV, "shadow_min_agreement", "(no guard)",
        f"serve the model dense from then on once the shadow top-1 agreement of the last "
        f"{GUARD_WINDOW} rows falls below this", _share,
    ),
    Variable(
        LOG_LEVEL_ENV, "log_level", "INFO", "level of the `flashhead` logger", _level,
    ),
    Variable(
        PATCHSET_DIR_ENV, "patchset_dir", "(shipped)",
        "directory of patchset YAML files to use instead of the shipped ones", _text,
    ),
    Variable(
        VLLM_VERSION_ENV, "vllm_version", "(detected)",
        "the vLLM version to match patchsets against (tests, doctor \"what if\")", _text,
    ),
    Variable(
        CACHE_ENV, "cache_dir", "~/.cache/flashhead",
        "where flashhead keeps fetched vLLM sources (static check) and the scripts keep "
        "venvs, models and wheels", _text,
    ),
    Variable(
        TRITON_SELECT_ENV, "triton_select", "bisect",
        "Triton top-p select: bisect or radix", _choice(SELECT_METHODS),
    ),
    Variable(
        TRITON_S1_ENV, "triton_stage1_blocks", "(built in)",
        "tuning runs: Triton stage-1 blocks BLOCK_B,BLOCK_C,BLOCK_D,warps,stages", _ints(5),
    ),
    Variable(
        TRITON_S2_ENV, "triton_stage2_blocks", "(built in)",
        "tuning runs: Triton stage-2 rows,BLOCK_D,warps,stages", _ints(4),
    ),
    Variable(
        TRITON_SEL_ENV, "triton_select_warps", "(built in)",
        "tuning runs: warps of the Triton select", _ints(1),
    ),
    Variable(
        METRICS_DIR_ENV, "metrics_dir", "(set by flashhead)",
        "set by flashhead in a server's first process for its engine and workers' counters; "
        "not for users", _text,
    ),
)  # fmt: skip


def variables_table() -> str:
    """The markdown table of every variable (docs/DESIGN.md carries it; a test compares)."""
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| `{v.name}` | {v.default} | {v.meaning} |" for v in VARIABLES]
    return "\n".join(lines) + "\n"


def parse(env: Mapping[str, str]) -> Settings:
    """Settings from ``env`` (a mapping like ``os.environ``); never raises."""
    problems: list[str] = []
    values: dict[str, Any] = {}
    for var in VARIABLES:
        raw = env.get(var.name, "").strip()
        if not raw:
            continue
        try:
            value = var.parse(raw)
        except _Bad as exc:
            note = var.on_bad_note or "ignored"
            problems.append(f"{var.name}={raw!r} {exc}; {note}")
            if var.on_bad is not None:
                values[var.attribute] = var.on_bad
            continue
        values[var.attribute] = value
    if "triton_select_warps" in values:
        values["triton_select_warps"] = values["triton_select_warps"][0]
    if values.get("shadow_min_agreement") is not None and not values.get("shadow"):
        problems.append(
            f"{SHADOW_MIN_AGREEMENT_ENV} is set but {SHADOW_ENV} is 0: the guard needs shadow "
            f"rows; set {SHADOW_ENV} (e.g. 0.01) or unset {SHADOW_MIN_AGREEMENT_ENV}"
        )
    return Settings(**values, problems=tuple(problems))


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """This process's settings, parsed on first use."""
    return parse(os.environ)


def reset_for_tests() -> None:
    settings.cache_clear()
