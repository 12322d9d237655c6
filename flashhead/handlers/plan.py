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

from flashhead.settings import TRUE_WORDS

# vLLM treats temperatures below this as greedy (vllm.sampling_params._SAMPLING_EPS).
GREEDY_TEMPERATURE_EPS = 1e-5


class RowKind(enum.Enum):
    GREEDY = "greedy"  # FlashHead, top-p cluster probes
    SAMPLED = "sampled"  # FlashHead, Gumbel-top-k probes at the row's temperature/generator
    DENSE = "dense"  # exact stock logits for this row


class DenseReason(str):
    """Why rows are served dense: the sentence for the log, and ``label``, the short stable
    name that ``/metrics`` counts rows under (``flashhead.metrics``)."""

    label: str

    def __new__(cls, text: str, label: str = "other") -> DenseReason:
        self = super().__new__(cls, text)
        self.label = label
        return self


@dataclass(frozen=True)
class RowDecision:
    kind: RowKind
    temperature: float = 0.0
    reason: str = ""  # why DENSE (a DenseReason); empty otherwise
    shadow: bool = False  # the request asked for the shadow check on its rows (SHADOW_REQUEST_ARG)

    @property
    def label(self) -> str:
        return getattr(self.reason, "label", "other")


# Sampling features that need exact full-vocabulary logits, in the order they are checked.
# Each: (attribute on SamplingParams, reason). A row with any of them set is served dense.
_DENSE_FEATURES: tuple[tuple[str, DenseReason], ...] = (
    ("logprobs", DenseReason("logprobs requested", "logprobs")),
    ("logit_bias", DenseReason("logit_bias", "logit_bias")),
    ("allowed_token_ids", DenseReason("allowed_token_ids", "allowed_token_ids")),
    ("bad_words", DenseReason("bad_words", "bad_words")),
    ("structured_outputs", DenseReason("structured output", "structured_output")),
    # the name before vLLM 0.11
    ("guided_decoding", DenseReason("structured output", "structured_output")),
    ("logprob_token_ids", DenseReason("logprobs of specific tokens requested", "logprobs")),
)
NO_SAMPLING_PARAMS = DenseReason("no sampling params (pooling or unknown)", "no_sampling_params")
# A request asks for the shadow check on its own greedy rows with vLLM's extra sampling args:
# `"vllm_xargs": {"flashhead_shadow": 1}` in an OpenAI request (SamplingParams.extra_args).
SHADOW_REQUEST_ARG = "flashhead_shadow"


def requests_shadow(sampling_params: Any) -> bool:
    extra = getattr(sampling_params, "extra_args", None)
    value = extra.get(SHADOW_REQUEST_ARG) if isinstance(extra, dict) else None
    if isinstance(value, str):
        return value.strip().lower() in TRUE_WORDS
    return bool(value) if isinstance(value, (bool, int, float)) else False


def classify(sampling_params: Any) -> RowDecision:
    """Decide how one request's logits row is served, from its ``SamplingParams``.

    Duck-typed so that it works across vLLM releases and with test doubles.
    """
    if sampling_params is None:
        return RowDecision(RowKind.DENSE, reason=NO_SAMPLING_PARAMS)
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
        return RowDecision(RowKind.GREEDY, shadow=requests_shadow(sampling_params))
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


def dense_plan(reason: str, source: str = "", label: str | None = None) -> StepPlan:
    """A plan serving the whole call dense; ``label`` defaults to ``reason``'s own (a
    DenseReason) or "other"."""
    if label is not None or not isinstance(reason, DenseReason):
        reason = DenseReason(reason, label or "other")
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
                self._plan = dense_plan(f"plan builder failed: {exc!r}", label="plan_error")
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


NO_PLAN = DenseReason("no step plan (caller is not a sampling step)", "no_plan")


def plan_for_rows(num_rows: int) -> tuple[StepPlan | None, DenseReason]:
    """The plan for a logits call of ``num_rows`` rows, or (None, reason-for-dense).

    ``NO_PLAN`` means the call is not a decode step of a runner FlashHead wraps (a drafter's
    head, warm-up code of vLLM's own): its rows are not counted as decode rows."""
    plan = current_plan()
    if plan is None:
        return None, NO_PLAN
    if plan.all_dense_reason:
        why = plan.all_dense_reason
        return None, why if isinstance(why, DenseReason) else DenseReason(why)
    if plan.num_rows != num_rows:
        return None, DenseReason(
            f"plan has {plan.num_rows} rows, logits call has {num_rows}", "row_mismatch"
        )
    return plan, DenseReason("")
