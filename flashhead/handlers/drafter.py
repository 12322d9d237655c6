"""Wrapper around vLLM's speculative-decoding drafter (``SpecDecodeBaseProposer._greedy_sample``).

A drafter proposes tokens that the target model then verifies, so the head that scores the
drafts can change how many are accepted, never the output. Where the drafter's own logits
processor is a FlashHead one, the greedy draft is FlashHead's argmax: an all-greedy step plan
opens around the call. That is the case for a draft model that is itself a FlashHead model
(vLLM builds it under the draft's config: the draft's assets, checked against the draft's
``lm_head``), and for an EAGLE / MTP head (built under the target's config: the processor then
serves only the target's own FlashHead on the target's very ``lm_head`` weight, see
``logits._FlashHeadState._primary_head``). A plain draft model is scored dense by vLLM, and that
is said once per drafter when a FlashHead model is served in the process.

Wrapt wrapper ``(wrapped, instance, args, kwargs)``; it only reads proposer state.
"""

from __future__ import annotations

import logging
from typing import Any

from flashhead.handlers import logits as _logits
from flashhead.handlers.plan import greedy_plan, plan_scope


def drafter_name(proposer: Any) -> str:
    """The draft model's path or name, as vLLM's speculative config holds it."""
    spec = getattr(proposer, "speculative_config", None)
    draft = getattr(spec, "draft_model_config", None)
    method = getattr(spec, "method", None) or "?"
    model = getattr(draft, "model", None)
    return f"{model} ({method})" if model else str(method)


def _flashhead_drafter(proposer: Any) -> bool:
    processor = getattr(getattr(proposer, "model", None), "logits_processor", None)
    return getattr(processor, "_flashhead", None) is not None


def greedy_sample(wrapped, instance, args, kwargs):
    hidden_states = args[0] if args else kwargs["hidden_states"]
    if getattr(instance, "use_local_argmax_reduction", False) or getattr(
        instance, "use_heterogeneous_vocab", False
    ):
        return wrapped(*args, **kwargs)  # vocab-sharded or remapped drafts: vLLM's own path
    if not _flashhead_drafter(instance):
        if _logits.flashhead_models_in_process():
            _logits.log_once(
                f"draft-dense:{id(instance)}",
                logging.INFO,
                "FlashHead: draft tokens of %s scored dense: the drafter's head is not a "
                "FlashHead model's (drafts only propose; the verification rows are FlashHead's)",
                drafter_name(instance),
            )
        return wrapped(*args, **kwargs)
    rows = int(hidden_states.shape[0])
    with plan_scope(greedy_plan(rows, source="v1-draft")):
        return wrapped(*args, **kwargs)
