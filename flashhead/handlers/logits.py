"""FlashHead's ``LogitsProcessor``: registered out of tree (``register_oot``) in place of vLLM's.

``make_logits_processor(base_cls, spec)`` returns a subclass of the release's ``LogitsProcessor``.
At construction it looks at the model vLLM is building (``get_current_vllm_config()``): a model
without ``flash_head_cache_dir`` in its config gets the stock class itself (the instance's class
is switched back, so nothing of FlashHead runs per call). A FlashHead model loads its assets from
its own folder now and builds the ``FlashHead`` from ``lm_head.weight`` on the first call (the
weights are not loaded yet at construction).

Per call, the step plan (``flashhead.handlers.plan``) says which rows FlashHead serves; every
other row, and every call without a matching plan, gets vLLM's own logits. Any error inside
FlashHead gives the stock result for that call and is logged once: never a wrong token.
"""

from __future__ import annotations

import inspect
import logging
import re
import zlib
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from flashhead import metrics
from flashhead.crossover import Crossover, time_head_against_dense
from flashhead.handlers.model_context import (
    build_context,
    max_logits_rows,
    model_identity,
    resolve_model_dir,
    served_model_name,
)
from flashhead.handlers.plan import NO_PLAN, DenseReason, StepPlan, plan_for_rows
from flashhead.handlers.shadow import ShadowCheck, count_and_shadow
from flashhead.handlers.step_logits import logit_transform, plan_logits
from flashhead.handlers.tensor_parallel import (
    build_sharded_head,
    counts_rows,
    describe_shard,
    is_sharded,
    pp_size,
    shard_dense_reason,
    tp_size,
    undeclared_parallel_reason,
)
from flashhead.settings import DENSE_MIN_BATCH_ENV
from flashhead.sharded_head import ShardMismatch

_log = logging.getLogger(__name__)


def _logger() -> logging.Logger:
    # vLLM only attaches handlers to its own "vllm" logger: log under it so that the lines show
    # up in `vllm serve` output next to vLLM's own.
    try:
        from vllm.logger import init_logger

        return init_logger("vllm.flashhead")
    except Exception:
        return _log


_logged_once: set[str] = set()
# Every FlashHead model whose logits processor this process built (a target, a draft model).
_states: list[_FlashHeadState] = []


def log_once(key: str, level: int, msg: str, *args: Any) -> None:
    """Log ``msg`` the first time ``key`` is seen in this process."""
    if key in _logged_once:
        return
    _logged_once.add(key)
    _logger().log(level, msg, *args)


def flashhead_models_in_process() -> list[str]:
    """The FlashHead models served in this process (their paths, in construction order)."""
    return [state.model for state in _states]


def _log_dense_step(model: str, why: str) -> None:
    """Say once per reason why a whole logits call of a FlashHead model was served dense (no
    silent fallback). Calls outside any step plan (a drafter's head, a caller FlashHead does not
    know) are logged at DEBUG only: they are not decode steps of this model."""
    if why.startswith("no step plan"):
        level = logging.DEBUG
    elif why.startswith("speculative decoding") or why.startswith("plan has"):
        level = logging.WARNING
    else:
        level = logging.INFO
    # One line per kind of reason: row counts differ from call to call.
    log_once(
        "dense-step:" + re.sub(r"\d+", "N", why),
        level,
        "FlashHead: logits of %s served dense: %s",
        model,
        why,
    )


def flashhead_enabled() -> bool:
    """FLASHHEAD_ENABLED=0 serves FlashHead models dense (the model still loads)."""
    try:
        from flashhead.runtime import flashhead_active
    except ImportError:
        from flashhead.settings import settings

        return settings().enabled
    return bool(flashhead_active())


class _FlashHeadState:
    """FlashHead bits of one logits processor (assets now, head on first use)."""

    def __init__(
        self,
        model: str,
        model_dir: Path,
        assets: Any,
        model_name: str = "",
        shadow: ShadowCheck | None = None,
    ):
        self.model = model
        self.model_dir = model_dir
        self.assets = assets
        self.model_name = model_name or model  # the model_name label of /metrics
        self.shadow = shadow
        # The first state of this model in the process (the target's), when this is a later one.
        self.primary: _FlashHeadState | None = None
        self.build_context: int | None = None
        self.head: Any = None
        self.weight_key: tuple[int, tuple[int, ...]] | None = None
        self.dense_reason = DenseReason("")
        self.crossover: Crossover | None = None
        self._timed_head: Any = None  # the head `crossover` was measured for
        self.max_rows: int | None = None  # the most rows a logits call can have (vLLM's config)

    def count(self, path: str, reason: str, n: int) -> None:
        if not counts_rows():
            return
        try:
            metrics.counters().count_rows(self.model_name, path, reason, n)
        except Exception as exc:  # counting must never cost an answer
            log_once("count-error", logging.ERROR, "FlashHead: counting failed: %r", exc)

    def count_dense(self, plan: StepPlan | None, why: DenseReason, n_rows: int) -> None:
        """Count a call's rows served dense: by each row's own reason where the plan has rows."""
        if plan is not None and plan.num_rows == n_rows and not plan.all_dense_reason:
            for decision in plan.decisions:
                self.count("dense", decision.label if decision.reason else why.label, 1)
        else:
            self.count("dense", why.label, n_rows)

    def head_for(self, lm_head: Any, vocab_size: int) -> Any:
        """The FlashHead for this lm_head, or None (``dense_reason`` says why)."""
        weight = getattr(lm_head, "weight", None)
        if weight is None:
            self.dense_reason = DenseReason(
                f"lm_head {type(lm_head).__name__} has no weight", "head_unsupported"
            )
            return None
        key = (weight.data_ptr(), tuple(weight.shape))
        if self.primary is not None:
            return self._primary_head(key)
        if self.head is not None and key == self.weight_key:
            return self.head
        if self.dense_reason.label in ("tp_mismatch", "build_error"):
            return None  # once is enough: dense for good (on every TP rank alike)
        reason = _dense_head_reason(lm_head, weight, vocab_size, self.assets)
        if reason:
            self.dense_reason = reason
            return None
        try:
            if tp_size(lm_head) > 1:
                self.head = build_sharded_head(lm_head, weight, self.assets)
            else:
                from flashhead.head import FlashHead

                self.head = FlashHead.build(weight[:vocab_size], self.assets)
        except Exception as exc:
            self.dense_reason = DenseReason(f"building FlashHead failed: {exc!r}", "build_error")
            raise
        layout = metrics.LAYOUT_TENSOR_PARALLEL if is_sharded(self.head) else metrics.LAYOUT_SINGLE
        try:  # every rank counts its own head (rows are counted by the first rank only)
            metrics.counters().set_head(self.model_name, layout)
        except Exception as exc:
            log_once("count-error", logging.ERROR, "FlashHead: counting failed: %r", exc)
        self.weight_key = key
        return self.head

    def time_against_dense(
        self,
        head: Any,
        stock: Callable[[torch.Tensor], torch.Tensor | None],
        transform: Any,
        like: torch.Tensor,
    ) -> None:
        """Once per head (a drafter sharing the target's head reuses its figure): time it
        against the server's own dense head and hand it the batches where it is about as fast."""
        if self._timed_head is head or self.primary is not None:
            return
        self._timed_head = head
        try:
            self.crossover = time_head_against_dense(head, stock, transform, like, self.max_rows)
        except Exception as exc:  # the static rule stays: never worse than before
            log_once(
                "crossover-error",
                logging.WARNING,
                "FlashHead: timing %s against the dense head failed, the static rule decides: %r",
                self.model,
                exc,
            )
        if self.crossover is not None:
            log_once(
                f"crossover:{id(self)}",
                logging.INFO,
                "FlashHead: %s, timed against the server's dense head at start-up: %s (%s=N "
                "fixes the choice)",
                self.model,
                self.crossover.describe(),
                DENSE_MIN_BATCH_ENV,
            )

    def _primary_head(self, key: tuple[int, tuple[int, ...]]) -> Any:
        """A processor built under the same model's config after the first one (an EAGLE / MTP
        drafter: vLLM builds it under the target's config) may use the target's FlashHead only
        on the target's very weight (vLLM shares the ``lm_head`` when the draft has none or the
        same one): the clusters were fitted to that weight and to no other."""
        target = self.primary
        if target.head is None:
            self.dense_reason = DenseReason(
                "a second head of this model was called before the first one was built",
                "head_pending",
            )
            return None
        if key != target.weight_key:
            self.dense_reason = DenseReason(
                f"a second head of this model (a drafter's, shape {list(key[1])}) does not "
                "share the first one's lm_head weight, and FlashHead's clusters belong to that "
                "weight only",
                "head_mismatch",
            )
            return None
        return target.head  # the target's own index: no second copy in memory


def _stage1_name(head: Any) -> str:
    rows4 = getattr(head, "rows4", getattr(getattr(head, "index", None), "rows4", None))
    return "int4 head rows" if rows4 is not None else "int8 centroids"


def _dense_head_reason(
    lm_head: Any, weight: torch.Tensor, vocab_size: int, assets: Any
) -> DenseReason:
    sharded = tp_size(lm_head) > 1
    from flashhead import runtime

    if reason := undeclared_parallel_reason(tp_size(lm_head), pp_size(), runtime.support()):
        return reason
    if sharded and (reason := shard_dense_reason(lm_head, weight, vocab_size)):
        return reason
    quant = getattr(lm_head, "quant_method", None)
    if quant is not None and type(quant).__name__ not in (
        "UnquantizedEmbeddingMethod",
        "UnquantizedLinearMethod",
    ):
        return DenseReason(
            f"quantized lm_head ({type(quant).__name__}): FlashHead needs a dense weight",
            "quantized_head",
        )
    if weight.dim() != 2 or not weight.dtype.is_floating_point:
        return DenseReason(
            f"lm_head weight is {tuple(weight.shape)} {weight.dtype}, not a float matrix",
            "head_unsupported",
        )
    n_assigned = int(assets.assignments.shape[0])
    if n_assigned != vocab_size or (weight.shape[0] < vocab_size and not sharded):
        return DenseReason(
            f"cluster assignments cover {n_assigned} tokens, the model's vocabulary is "
            f"{vocab_size} (lm_head has {weight.shape[0]} rows)",
            "head_unsupported",
        )
    return DenseReason("")


def make_logits_processor(base_cls: type, spec: Any = None) -> type:
    """Factory for ``register_oot``: a subclass of ``base_cls`` with the same ``forward``
    signature (``skip_gather`` exists from vLLM 0.29)."""
    has_skip_gather = "skip_gather" in inspect.signature(base_cls.forward).parameters

    class FlashHeadLogitsProcessor(base_cls):  # type: ignore[misc, valid-type]
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            state = _flashhead_state_for_current_model()
            if state is None:
                # Not a FlashHead model (or FlashHead off): be the stock class, no per-call cost.
                self.__class__ = base_cls
                return
            self._flashhead = state

        def _flashhead_forward(
            self, lm_head: Any, hidden_states: torch.Tensor, embedding_bias: Any, stock: Callable
        ) -> torch.Tensor | None:
            state: _FlashHeadState = self._flashhead
            if self.logits_as_input or embedding_bias is not None or hidden_states.dim() != 2:
                return stock(hidden_states)
            n_rows = int(hidden_states.shape[0])
            plan, why = plan_for_rows(n_rows)
            # Decode rows of this model are counted; warm-up and drafter calls are not.
            counted = why is not NO_PLAN and not (
                plan is not None and plan.source.endswith(("-draft", "dummy"))
            )
            if state.shadow is not None and state.shadow.tripped:
                if counted:
                    state.count("dense", "guard", n_rows)
                return stock(hidden_states)
            if plan is None or not plan.flash_rows():
                if plan is None:
                    _log_dense_step(state.model, why)
                if counted:
                    state.count_dense(plan, why, n_rows)
                return stock(hidden_states)
            try:
                head = state.head_for(lm_head, self.org_vocab_size)
                if head is None:
                    log_once(
                        f"dense:{id(state)}:{state.dense_reason.label}",
                        logging.DEBUG
                        if state.dense_reason.label == "head_pending"
                        else logging.WARNING,
                        "FlashHead: %s is served dense: %s",
                        state.model,
                        state.dense_reason,
                    )
                    if counted:
                        state.count("dense", state.dense_reason.label, n_rows)
                    return stock(hidden_states)
                transform = logit_transform(self.scale, self.soft_cap)
                state.time_against_dense(head, stock, transform, hidden_states)
                # Same dtype as the stock head's output (bf16 for a bf16 model): candidate scores
                # are rounded as the dense GEMM rounds them, so vLLM's argmax breaks bf16 ties the
                # same way (smallest id) on both paths.
                logits = plan_logits(head, hidden_states, plan, stock, transform)
                if logits is None:  # a later TP rank, where vLLM's gather returns nothing
                    return None
            except ShardMismatch as exc:  # raised on every rank together: all go dense
                state.head, state.dense_reason = None, DenseReason(str(exc), "tp_mismatch")
                log_once(
                    "tp-mismatch",
                    logging.ERROR,
                    "FlashHead: %s is served dense from now on: %s",
                    state.model,
                    exc,
                )
                if counted:
                    state.count("dense", "tp_mismatch", n_rows)
                return stock(hidden_states)
            except Exception as exc:
                log_once(
                    f"error:{type(exc).__name__}",
                    logging.ERROR,
                    "FlashHead: error in the logits path, this call is served dense: %r",
                    exc,
                )
                if counted:
                    state.count("dense", "error", n_rows)
                return stock(hidden_states)
            if counted:
                try:
                    count_and_shadow(state, head, plan, hidden_states, logits, stock, log_once)
                except Exception as exc:  # counting must never cost an answer
                    log_once("count-error", logging.ERROR, "FlashHead: counting failed: %r", exc)
            if plan.source.endswith("-draft"):
                log_once(
                    f"draft:{id(state)}",
                    logging.INFO,
                    "FlashHead: draft tokens of %s served by FlashHead (p=%d probes)",
                    state.model,
                    int(getattr(head, "n_probes", -1)),
                )
            elif not plan.source.endswith("dummy"):
                if is_sharded(head):
                    log_once("tp", logging.INFO, "FlashHead: %s", describe_shard(head))
                log_once(
                    "serving",
                    logging.INFO,
                    "FlashHead: serving decode steps of %s (c=%d clusters, s=%d tokens/cluster, "
                    "p=%d probes, stage 1: %s, backend=%s)",
                    state.model,
                    int(getattr(head, "n_clusters", -1)),
                    int(getattr(head, "cluster_size", -1)),
                    int(getattr(head, "n_probes", -1)),
                    _stage1_name(head),
                    getattr(head, "backend", "?"),
                )
                # The core head may itself hand a batch to its dense GEMM (kernels/dispatch.py:
                # faster there); say once per path which one served real steps, so tests and
                # users can tell candidate retrieval from the dispatcher's dense choice.
                why = _dispatcher_reason(head, len(plan.flash_rows()), hidden_states.device)
                path = "dense-by-dispatcher" if why else "flashhead"
                log_once(
                    f"path:{path}",
                    logging.INFO,
                    "FlashHead: decode steps of %s served (path: %s)%s",
                    state.model,
                    path,
                    f": {why}" if why else "",
                )
                if plan.source.endswith("-spec"):
                    log_once(
                        "spec",
                        logging.INFO,
                        "FlashHead: speculative decoding verification rows of %s served "
                        "(%d logits rows in the first such step)",
                        state.model,
                        plan.num_rows,
                    )
            if is_sharded(head) and not getattr(self, "use_all_gather", True):
                # The stock head gathers to the first rank only; the others return nothing.
                return logits if head.comm.rank == 0 else None
            return logits

        if has_skip_gather:

            def forward(
                self,
                lm_head: Any,
                hidden_states: torch.Tensor,
                embedding_bias: torch.Tensor | None = None,
                skip_gather: bool = False,
            ) -> torch.Tensor | None:
                def stock(h: torch.Tensor) -> torch.Tensor | None:
                    return base_cls.forward(self, lm_head, h, embedding_bias, skip_gather)

                if skip_gather:  # vocab-sharded sampling: the caller wants local shards
                    return stock(hidden_states)
                return self._flashhead_forward(lm_head, hidden_states, embedding_bias, stock)

        else:

            def forward(
                self,
                lm_head: Any,
                hidden_states: torch.Tensor,
                embedding_bias: torch.Tensor | None = None,
            ) -> torch.Tensor | None:
                def stock(h: torch.Tensor) -> torch.Tensor | None:
                    return base_cls.forward(self, lm_head, h, embedding_bias)

                return self._flashhead_forward(lm_head, hidden_states, embedding_bias, stock)

    FlashHeadLogitsProcessor.__name__ = "FlashHeadLogitsProcessor"
    FlashHeadLogitsProcessor.__qualname__ = "FlashHeadLogitsProcessor"
    return FlashHeadLogitsProcessor


def _dispatcher_reason(head: Any, n_rows: int, device: torch.device) -> str:
    """Why the core head hands these rows to its dense GEMM, or "" (a sharded head: no text)."""
    reason = getattr(head, "dense_reason", None)
    if reason is not None:
        return reason(n_rows, device)
    return "the dispatcher's choice" if head.uses_dense(n_rows, device) else ""


def _flashhead_state_for_current_model() -> _FlashHeadState | None:
    if not flashhead_enabled():
        return None
    identity = model_identity()
    if identity is None:
        return None
    model, config = identity
    from flashhead.assets import is_flashhead_config, load_assets

    if not is_flashhead_config(config):
        return None
    model_dir = resolve_model_dir(model)
    # Bad assets are bad input: fail the model load with the asset loader's message
    # (file, field, fix) rather than serve a FlashHead model without FlashHead.
    assets = load_assets(model_dir, config)
    from flashhead.settings import settings

    opts = settings()  # its problems are logged by the plugin, once per process
    # A fixed seed per model: tensor-parallel ranks must shadow the same rows (each shadowed
    # row is a collective there).
    seed = zlib.crc32(model.encode())
    # Always there: a request may ask for the check on its own rows even at FLASHHEAD_SHADOW=0.
    shadow = ShadowCheck(opts.shadow, opts.shadow_min_agreement, seed=seed)
    state = _FlashHeadState(model, model_dir, assets, served_model_name(), shadow)
    state.build_context, speculative = build_context()
    state.max_rows = max_logits_rows()
    if speculative:  # a drafter is built under the target's config, after the target
        state.primary = next(
            (
                s
                for s in _states
                if s.model == model and s.primary is None and s.build_context == state.build_context
            ),
            None,
        )
    _states.append(state)
    return state
