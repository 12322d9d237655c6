"""FlashHead's run-time settings from ``FLASHHEAD_*`` environment variables, read once.

``settings()`` parses them on first use and keeps the result for the process. A bad value
never stops a server: the setting takes its default and ``Settings.problems`` says which
variable, what was wrong and what to write instead (the plugin logs each once; the doctor
shows them).

Variables here (others predate this module and are parsed where they are used; issue 15
moves them in):

- ``FLASHHEAD_SHADOW``: share 0..1 of FlashHead's greedy rows also scored with the dense head,
  for the ``/metrics`` agreement counters (default 0: off).
- ``FLASHHEAD_SHADOW_MIN_AGREEMENT``: serve the model dense from then on once the shadow top-1
  agreement over the last ``GUARD_WINDOW`` rows falls below this (default: no guard).
- ``FLASHHEAD_METRICS_DIR``: set by flashhead itself in the API server process, inherited by
  its engine and worker processes (where the counters are written). Not for users.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping
from dataclasses import dataclass, field

SHADOW_ENV = "FLASHHEAD_SHADOW"
SHADOW_MIN_AGREEMENT_ENV = "FLASHHEAD_SHADOW_MIN_AGREEMENT"
METRICS_DIR_ENV = "FLASHHEAD_METRICS_DIR"

# The guard judges the agreement of the last GUARD_WINDOW shadow rows, once it has at least
# GUARD_MIN_ROWS of them (a fresh server cannot wait for 512 rows before it may fall back).
GUARD_WINDOW = 512
GUARD_MIN_ROWS = 128


@dataclass(frozen=True)
class Settings:
    shadow: float = 0.0
    shadow_min_agreement: float | None = None
    metrics_dir: str | None = None
    problems: tuple[str, ...] = field(default=())


def _share(env: Mapping[str, str], name: str, problems: list[str]) -> float | None:
    raw = env.get(name, "").strip()
    if not raw:
        return None
    try:
        value = float(raw)
    except ValueError:
        value = float("nan")
    if not 0.0 <= value <= 1.0:  # also false for nan
        problems.append(
            f"{name}={raw!r} is not a share between 0 and 1 (e.g. {name}=0.01); ignored"
        )
        return None
    return value


def parse(env: Mapping[str, str]) -> Settings:
    """Settings from ``env`` (a mapping like ``os.environ``); never raises."""
    problems: list[str] = []
    shadow = _share(env, SHADOW_ENV, problems)
    minimum = _share(env, SHADOW_MIN_AGREEMENT_ENV, problems)
    if minimum is not None and not shadow:
        problems.append(
            f"{SHADOW_MIN_AGREEMENT_ENV} is set but {SHADOW_ENV} is 0: the guard needs shadow "
            f"rows; set {SHADOW_ENV} (e.g. 0.01) or unset {SHADOW_MIN_AGREEMENT_ENV}"
        )
    return Settings(
        shadow=shadow or 0.0,
        shadow_min_agreement=minimum,
        metrics_dir=env.get(METRICS_DIR_ENV) or None,
        problems=tuple(problems),
    )


@functools.lru_cache(maxsize=1)
def settings() -> Settings:
    """This process's settings, parsed on first use."""
    return parse(os.environ)


def reset_for_tests() -> None:
    settings.cache_clear()
