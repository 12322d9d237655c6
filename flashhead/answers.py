"""Whole greedy answers, FlashHead against dense: what a user of `vllm serve` sees.

Per-position agreement hides how errors add up: at 99.7 % top-1 agreement, a 48-token answer
still parts from the dense one about once in seven, and the token that parts is often a rare
name ("Canberra" -> "Sydney"). So `flashhead eval --answers N` asks the held-out questions
(`questions.txt`, never used by convert) and decodes each greedily twice in transformers: with
the dense head, and with the dense logits masked to FlashHead's candidates (the same retrieval
code vLLM runs, so only a retrieval miss can change a token, never rounding).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

import torch


@dataclass
class AnswerReport:
    form: str  # "chat template" or "Q:/A: completion"
    n_probes: int
    max_new_tokens: int
    questions: int
    identical: int
    first_token_identical: int
    differing: list[dict] = field(default_factory=list)  # question, dense, flashhead

    def to_dict(self) -> dict:
        return asdict(self)


def _prefixes(tok: Any, questions: list[str]) -> tuple[list[list[int]], str]:
    from flashhead.calibration.chat import chat_prefix, qa_prefix, uses_chat_template

    if uses_chat_template(tok):
        return [chat_prefix(tok, q, True) for q in questions], "chat template"
    return [qa_prefix(tok, q) for q in questions], "Q:/A: completion"


def _candidate_mask_hook(head: Any, n_probes: int):
    def hook(_module, args, out):
        h = args[0].reshape(-1, args[0].shape[-1])
        cand = head.candidates(h.float(), n_probes=n_probes)
        keep = torch.zeros(h.shape[0], out.shape[-1], dtype=torch.bool, device=out.device)
        ids = cand.ids.clamp_min(0)
        keep.scatter_(1, ids, cand.ids >= 0)
        flat = out.reshape(-1, out.shape[-1]).masked_fill(~keep, float("-inf"))
        return flat.reshape(out.shape)

    return hook


@torch.inference_mode()
def _greedy(model: Any, tok: Any, prefixes: list[list[int]], max_new: int, hook=None):
    """Greedy answers through convert's own batched decoder (`chat._answer`), with `hook` on the
    head's output while it runs; each answer without its stop token."""
    from flashhead.calibration.chat import _answer, _stop_ids

    stop = _stop_ids(model, tok)
    pad = tok.pad_token_id if tok.pad_token_id is not None else (min(stop) if stop else 0)
    handle = model.get_output_embeddings().register_forward_hook(hook) if hook else None
    try:
        answers = _answer(model, prefixes, max_new, stop, pad, [])
    finally:
        if handle is not None:
            handle.remove()
    return [a[:-1] if a and a[-1] in stop else a for a in answers]


def compare_answers(
    model: Any,
    tok: Any,
    head: Any,
    n_probes: int,
    *,
    limit: int = 20,
    max_new_tokens: int = 48,
) -> AnswerReport:
    """Greedy answers to the first `limit` held-out questions, dense vs FlashHead at n_probes."""
    from flashhead.calibration.chat import questions

    qs = questions()[:limit]
    prefixes, form = _prefixes(tok, qs)
    dense = _greedy(model, tok, prefixes, max_new_tokens)
    flash = _greedy(model, tok, prefixes, max_new_tokens, _candidate_mask_hook(head, n_probes))
    differing = [
        {"question": q, "dense": tok.decode(a), "flashhead": tok.decode(b)}
        for q, a, b in zip(qs, dense, flash)
        if a != b
    ]
    return AnswerReport(
        form=form,
        n_probes=n_probes,
        max_new_tokens=max_new_tokens,
        questions=len(qs),
        identical=sum(a == b for a, b in zip(dense, flash)),
        first_token_identical=sum(a[:1] == b[:1] for a, b in zip(dense, flash)),
        differing=differing,
    )


def format_answers(rep: AnswerReport) -> str:
    lines = [
        f"greedy answers to {rep.questions} held-out questions ({rep.form}, "
        f"{rep.max_new_tokens} tokens, n_probes {rep.n_probes}): {rep.identical}/{rep.questions} "
        f"identical to dense, first token {rep.first_token_identical}/{rep.questions}"
    ]
    for d in rep.differing:
        lines.append(f"  {d['question']}")
        lines.append(f"    dense:     {d['dense'].strip()[:160]!r}")
        lines.append(f"    FlashHead: {d['flashhead'].strip()[:160]!r}")
    return "\n".join(lines)
