"""Step plans: which logits rows of the current model step FlashHead may serve, and how.

Runner wrappers (``runner_v1``, ``runner_v2``) open a plan scope around the call that computes
logits for sampling; the FlashHead logits processor reads it. The plan is built lazily (on the
first logits call inside the scope), because the runner updates its batch *inside* the wrapped
call, after the wrapper runs.

No plan, or a plan whose row count differs from the logits call (spec decode, an unknown
caller), means dense for the whole call: FlashHead never guesses which row is which request.
"""

from __future__ import annotations

import contextlib
import contextvars
import enum
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch

# vLLM treats temperatures below this as greedy (vllm.sampling_params._SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5


class RowKind(enum.Enum):
    GREEDY = "greedy"  # FlashHead, top-p cluster probes
    SAMPLED = "sampled"  # FlashHead, Gumbel-top-k probes at the row's temperature/generator
    DENSE = "dense"  # exact stock logits for this row


@dataclass(frozen=True)
class RowDecision:
    kind: RowKind
    temperature: float = 0.0
    reason: str = ""  # why DENSE; empty otherwise


# Sampling features that need exact full-vocabulary logits, in the order they are checked.
# Each: (attribute on SamplingParams, reason). A row with any of them set is served dense.
_DENSE_FEATURES: tuple[tuple[str, str], ...] = (
    ("logprobs", "logprobs requested"),
    ("logit_bias", "logit_bias"),
    ("allowed_token_ids", "allowed_token_ids"),
    ("bad_words", "bad_words"),
    ("structured_outputs", "structured output"),
    ("guided_decoding", "structured output"),  # name before vLLM 0.11
    ("logprob_token_ids", "logprobs of specific tokens requested"),
)


def classify(sampling_params: Any) -> RowDecision:
    """Decide how one request's logits row is served, from its ``SamplingParams``.

    Duck-typed so that it works across vLLM releases and with test doubles.
    """
    if sampling_params is None:
        return RowDecision(RowKind.DENSE, reason="no sampling params (pooling or unknown)")
    for attr, reason in _DENSE_FEATURES:
        value = getattr(sampling_params, attr, None)
        if (
            value is not None
            and value is not False
            and not (isinstance(value, (list, dict, tuple, set)) and len(value) == 0)
        ):
            return RowDecision(RowKind.DENSE, reason=reason)
    temperature = float(getattr(sampling_params, "temperature", 1.0) or 0.0)
    if temperature < GREEDY_TEMPERATURE_EPS:
        return RowDecision(RowKind.GREEDY)
    return RowDecision(RowKind.SAMPLED, temperature=temperature)


@dataclass
class StepPlan:
    """Per-row decisions for one logits call, in logits-row order."""

    decisions: Sequence[RowDecision]
    generators: Sequence[torch.Generator | None] = ()
    source: str = ""
    # Whole call dense regardless of rows (prompt logprobs, spec decode, ...).
    all_dense_reason: str = ""

    @property
    def num_rows(self) -> int:
        return len(self.decisions)

    def generator(self, row: int) -> torch.Generator | None:
        return self.generators[row] if row < len(self.generators) else None

    def flash_rows(self) -> list[int]:
        return [i for i, d in enumerate(self.decisions) if d.kind is not RowKind.DENSE]

    def dense_rows(self) -> list[int]:
        return [i for i, d in enumerate(self.decisions) if d.kind is RowKind.DENSE]


def dense_plan(reason: str, source: str = "") -> StepPlan:
    return StepPlan(decisions=(), source=source, all_dense_reason=reason)


def greedy_plan(num_rows: int, source: str = "") -> StepPlan:
    return StepPlan(decisions=[RowDecision(RowKind.GREEDY)] * num_rows, source=source)


_MASK63 = (1 << 63) - 1


def seeded_generator(seed: int, position: int) -> torch.Generator:
    """FlashHead's own generator for a seeded request at one sequence position.

    FlashHead never draws from vLLM's per-request generators: whether the head draws noise at
    all can depend on the batch (the dispatcher serves some batches densely), so sharing vLLM's
    stream would make a seeded request's tokens depend on what it was batched with. A stream
    keyed by (seed, position) repeats exactly and leaves vLLM's own sampling untouched.
    """
    gen = torch.Generator()
    gen.manual_seed((int(seed) * 1_000_003 + int(position)) & _MASK63)
    return gen


PlanSource = Callable[[], StepPlan]

_current: contextvars.ContextVar[_LazyPlan | None] = contextvars.ContextVar(
    "flashhead_step_plan", default=None
)


class _LazyPlan:
    """Builds the plan on first use and keeps it for the rest of the scope."""

    __slots__ = ("_build", "_plan")

    def __init__(self, build: PlanSource):
        self._build = build
        self._plan: StepPlan | None = None

    def get(self) -> StepPlan:
        if self._plan is None:
            try:
                self._plan = self._build()
            except Exception as exc:  # a plan we cannot build is a dense plan, never a guess
                self._plan = dense_plan(f"plan builder failed: {exc!r}")
        return self._plan


@contextlib.contextmanager
def plan_scope(build: PlanSource | StepPlan) -> Iterator[None]:
    """Make ``build`` the step plan for logits calls made inside the ``with`` block."""
    lazy = _LazyPlan(build if callable(build) else (lambda: build))
    token = _current.set(lazy)
    try:
        yield
    finally:
        _current.reset(token)


def current_plan() -> StepPlan | None:
    lazy = _current.get()
    return None if lazy is None else lazy.get()


def plan_for_rows(num_rows: int) -> tuple[StepPlan | None, str]:
    """The plan for a logits call of ``num_rows`` rows, or (None, reason-for-dense)."""
    plan = current_plan()
    if plan is None:
        return None, "no step plan (caller is not a sampling step)"
    if plan.all_dense_reason:
        return None, plan.all_dense_reason
    if plan.num_rows != num_rows:
        return None, f"plan has {plan.num_rows} rows, logits call has {num_rows}"
    return plan, ""
