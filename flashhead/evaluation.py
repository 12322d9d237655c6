"""`flashhead eval`: how closely FlashHead follows the dense head on real text.

The model's body runs in transformers (CPU) over held-out text; at each position the dense head's
top-1 / top-5 tokens are compared with what `flashhead.head.FlashHead` (the code vLLM runs, torch
backend) scores for a number of probes p. Reported per p: the share of the vocabulary scored,
top-1 agreement, top-5 containment, and the smallest p reaching each agreement target.

Two corpora, both held out from `flashhead convert`'s calibration: prose (Python's pydoc topics,
or a user's file) and chat (the model's own greedy answers to held-out prompts, in its chat
template). Chat is what a server decodes, and where a prose-only calibration fails.

The p curve comes from the rank of the dense top-1 token's cluster under FlashHead's own stage 1
scores (int8 centroids or int4 head rows, as served): top-1 agrees at p exactly when that rank is below p (or the
token is an always-scored special token). The listed p values are also checked end to end
through `FlashHead.candidates`.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from flashhead.assets import FlashHeadAssets, load_assets
from flashhead.calibration.model import load_model
from flashhead.calibration.ranks import (
    ROW_BLOCK,
    agreement_at,
    cluster_ranks,
    dense_topk,
    probes_for,
)
from flashhead.evaluation_defaults import DEFAULT_PROBES, DEFAULT_TARGETS, FAMILIES


@dataclass
class ProbeResult:
    probes: int
    candidates: int  # tokens scored in stage 2 (p * cluster size + special tokens)
    share_of_vocab: float  # candidates / V
    # Bytes stages 1 and 2 read per row, as a share of the bf16 head's: candidates (bf16 rows)
    # + stage 1 (int8 centroids: half a row each; int4 head rows: a quarter of the head).
    share_of_head_bytes: float
    top1_agreement: float
    top5_containment: float


@dataclass
class EvalReport:
    model: str
    vocab_size: int
    n_clusters: int
    cluster_size: int
    configured_probes: int
    n_special: int
    n_tokens: int
    results: list[ProbeResult]
    probes_for_target: dict[str, int | None]  # "99.5%" -> smallest p, None if none reaches it
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


class Evaluator:
    """FlashHead (torch backend) on a head weight + assets, over given hidden states."""

    def __init__(self, weight: torch.Tensor, assets: FlashHeadAssets):
        from flashhead.head import FlashHead
        from flashhead.kernels.dispatch import backend_ops

        self.assets = assets
        self.weight = weight.float()
        self.head = FlashHead.build(self.weight, assets, backend="torch")
        self._reference = backend_ops("reference")  # exact fp32 stage 1 over the served format

    def stage1(self, h: torch.Tensor) -> torch.Tensor:
        from flashhead.head import stage1_keys

        return stage1_keys(self._reference, self.head.index, h.float(), None, None, {})

    def ranks(self, h: torch.Tensor, top: torch.Tensor) -> torch.Tensor:
        out = []
        specials = self.assets.special_token_ids
        for start in range(0, h.shape[0], ROW_BLOCK):
            blk = slice(start, start + ROW_BLOCK)
            out.append(
                cluster_ranks(self.stage1(h[blk]), self.assets.assignments, top[blk], specials)
            )
        return torch.cat(out)

    def measured(self, h: torch.Tensor, top: torch.Tensor, p: int) -> tuple[float, float]:
        """Top-1 agreement and top-5 containment through FlashHead.candidates, end to end."""
        agree = contained = 0.0
        for start in range(0, h.shape[0], ROW_BLOCK):
            blk = slice(start, start + ROW_BLOCK)
            cand = self.head.candidates(h[blk].float(), n_probes=p)
            best = cand.ids.gather(1, cand.scores.argmax(dim=1, keepdim=True)).squeeze(1)
            agree += float((best == top[blk, 0]).sum())
            hit = (cand.ids.unsqueeze(1) == top[blk].unsqueeze(2)).any(dim=2)
            contained += float(hit.float().mean(dim=1).sum())
        return agree / h.shape[0], contained / h.shape[0]

    def report(
        self,
        h: torch.Tensor,
        probes: Sequence[int] = DEFAULT_PROBES,
        targets: Sequence[float] = DEFAULT_TARGETS,
        *,
        model: str = "",
        check_end_to_end: bool = True,
    ) -> EvalReport:
        a = self.assets
        s = self.head.cluster_size
        top = dense_topk(h, self.weight, 5)
        ranks = self.ranks(h, top)
        results = []
        for p in sorted({min(int(p), a.n_clusters) for p in probes}):
            top1, top5 = agreement_at(ranks[:, 0], p), agreement_at(ranks, p)
            if check_end_to_end:
                top1, top5 = self.measured(h, top, p)
            cand = p * s + len(a.special_token_ids)
            results.append(
                ProbeResult(
                    probes=p,
                    candidates=cand,
                    share_of_vocab=cand / a.vocab_size,
                    share_of_head_bytes=(cand + _stage1_rows(a)) / a.vocab_size,
                    top1_agreement=top1,
                    top5_containment=top5,
                )
            )
        return EvalReport(
            model=model,
            vocab_size=a.vocab_size,
            n_clusters=a.n_clusters,
            cluster_size=s,
            configured_probes=a.n_probes,
            n_special=len(a.special_token_ids),
            n_tokens=int(h.shape[0]),
            results=results,
            probes_for_target={_pct(t): probes_for(ranks[:, 0], t) for t in targets},
        )


def _stage1_rows(a: FlashHeadAssets) -> float:
    """Stage 1's bytes in bf16 head rows (group scales and zeros not counted)."""
    return a.vocab_size / 4 if a.stage1 == "head_int4" else a.n_clusters / 2


def _pct(t: float) -> str:
    return f"{100 * t:g}%"


# Every text family `flashhead eval` reports (see flashhead.calibration.texts for the text ones):
# "text" is the user's --text FILE. Convert calibrates on held-out-disjoint halves of prose,
# code, chat and self; docstrings, markdown and qa are never seen by convert at all.
CORPORA = FAMILIES  # the name of the --corpus option
_NEVER_CALIBRATED = ("docstrings", "markdown", "qa", "text")


def family_hidden_states(
    model: Any,
    tok: Any,
    family: str,
    *,
    n_tokens: int,
    answer_tokens: int = 64,
    text: str | None = None,
    progress: bool = True,
) -> tuple[torch.Tensor, str]:
    """([N, d] head inputs, description) of the evaluation half of `family`."""
    from flashhead.calibration.chat import chat_hidden_states, qa_hidden_states
    from flashhead.calibration.hidden import sample_hidden_states
    from flashhead.calibration.sampled import sampled_hidden_states
    from flashhead.calibration.texts import family_text

    if family == "text":
        if text is None:
            raise ValueError("the text family needs --text FILE")
        return sample_hidden_states(model, tok, text, n_tokens=n_tokens, progress=progress), (
            "the user's text"
        )
    if family == "chat":
        h = chat_hidden_states(
            model, tok, "evaluation", n_tokens=n_tokens, max_new_tokens=answer_tokens,
            progress=progress,
        )  # fmt: skip
        return h, f"own greedy answers (<= {answer_tokens} tokens) to the evaluation prompts"
    if family == "qa":
        h = qa_hidden_states(model, tok, n_tokens=n_tokens, progress=progress)
        return h, "own greedy answers to the held-out questions, as Q:/A: completions"
    if family == "self":
        h = sampled_hidden_states(model, tok, "evaluation", n_tokens=n_tokens, progress=progress)
        return h, "own samples at temperature 1 (evaluation seed)"
    what = {
        "prose": "stdlib pydoc topics (evaluation half)",
        "code": "stdlib module source (evaluation half)",
        "docstrings": "stdlib docstrings (evaluation half)",
        "markdown": "installed packages' markdown READMEs",
    }
    if family not in what:
        raise ValueError(f"unknown family {family!r} (use {', '.join(FAMILIES)} or text)")
    body = family_text(family, "evaluation")
    return sample_hidden_states(model, tok, body, n_tokens=n_tokens, progress=progress), what[
        family
    ]


def top1_at(rep: EvalReport, p: int) -> float:
    """Top-1 agreement of a report at p (the configured p is always among its rows)."""
    return next(r.top1_agreement for r in rep.results if r.probes == p)


def worst_first(reports: dict[str, EvalReport]) -> dict[str, EvalReport]:
    """The reports ordered by top-1 agreement at their configured p, lowest first."""
    return dict(sorted(reports.items(), key=lambda kv: top1_at(kv[1], kv[1].configured_probes)))


def evaluate(
    model_dir: str | os.PathLike,
    *,
    corpora: Sequence[str] = FAMILIES,
    text: str | None = None,
    probes: Sequence[int] = DEFAULT_PROBES,
    targets: Sequence[float] = DEFAULT_TARGETS,
    n_tokens: int = 4096,
    answer_tokens: int = 64,
    dtype: torch.dtype | None = None,
    progress: bool = True,
    check_end_to_end: bool = True,
    answers: int = 0,
) -> dict[str, EvalReport]:
    """Compare the heads on each text family's held-out half (worst family first; `text`, the
    user's file, is the extra family "text"), and with `answers` > 0 compare whole greedy answers
    to that many held-out questions (`flashhead.answers`), reported under "answers"."""
    names = list(dict.fromkeys(corpora))
    unknown = [c for c in names if c not in FAMILIES and c != "text"]
    if unknown or not names:
        raise ValueError(f"unknown corpus {unknown or names!r} (use {', '.join(FAMILIES)})")
    if text is not None and "text" not in names:
        names.append("text")
    model_dir = Path(model_dir)
    assets = load_assets(model_dir)
    if dtype is None:  # bfloat16 as vLLM serves it, where this machine computes it fast
        from flashhead.compute_dtype import fast_dtype

        dtype = fast_dtype("cpu")
    model, tok = load_model(model_dir, dtype=dtype)
    weight = model.get_output_embeddings().weight.detach()
    ev = Evaluator(weight, assets)
    probes = sorted(set(probes) | {assets.n_probes})  # every family is ranked at the served p
    reports = {}
    for family in names:
        try:
            h, what = family_hidden_states(
                model, tok, family, n_tokens=n_tokens, answer_tokens=answer_tokens, text=text,
                progress=progress,
            )  # fmt: skip
        except RuntimeError as exc:  # a family this machine has no text for (e.g. no READMEs)
            print(f"flashhead eval: {family}: skipped ({exc})", file=sys.stderr)
            continue
        rep = ev.report(
            h.float(), probes, targets, model=str(model_dir), check_end_to_end=check_end_to_end
        )
        rep.meta = {
            "corpus": family,
            "text": what,
            "calibrated_on": "never" if family in _NEVER_CALIBRATED else "the other half",
            "body_dtype": str(dtype).replace("torch.", ""),
        }
        reports[family] = rep
    out = worst_first(reports)
    if answers:
        from flashhead.answers import compare_answers

        out["answers"] = compare_answers(model, tok, ev.head, assets.n_probes, limit=answers)
    return out


def format_table(rep: EvalReport) -> str:
    corpus = f" [{rep.meta['corpus']}: {rep.meta['text']}]" if rep.meta.get("corpus") else ""
    lines = [
        f"{rep.model}{corpus}: V={rep.vocab_size}, {rep.n_clusters} clusters of "
        f"{rep.cluster_size}, {rep.n_special} special tokens, n_probes in config "
        f"{rep.configured_probes}, {rep.n_tokens} positions",
        f"{'p':>6} {'scored':>8} {'% of V':>7} {'+stage 1':>10} {'top-1':>8} {'top-5':>8}",
    ]
    for r in rep.results:
        lines.append(
            f"{r.probes:>6} {r.candidates:>8} {100 * r.share_of_vocab:>6.2f}% "
            f"{100 * r.share_of_head_bytes:>9.2f}% {100 * r.top1_agreement:>7.2f}% "
            f"{100 * r.top5_containment:>7.2f}%"
        )
    for target, p in rep.probes_for_target.items():
        if p is None:
            lines.append(f"top-1 agreement {target}: not reached")
        else:
            share = (p * rep.cluster_size + rep.n_special) / rep.vocab_size
            lines.append(f"top-1 agreement {target}: p >= {p} ({100 * share:.2f}% of V scored)")
    return "\n".join(lines)


def format_summary(reports: dict[str, EvalReport]) -> str:
    """One line per family at the configured p, worst first."""
    reps = {k: r for k, r in reports.items() if isinstance(r, EvalReport)}
    if not reps:
        return ""
    first = next(iter(reps.values()))
    p = first.configured_probes
    lines = [
        f"{first.model}: every family at the configured n_probes = {p} "
        f"({100 * (p * first.cluster_size + first.n_special) / first.vocab_size:.2f}% of V "
        "scored), worst first",
        f"{'family':<11} {'calibrated on':<14} {'positions':>9} {'top-1':>8} {'top-5':>8} "
        f"{'p for 99.5%':>11} {'p for 99.9%':>11}",
    ]
    for name, rep in reps.items():
        row = next(r for r in rep.results if r.probes == rep.configured_probes)
        need = [rep.probes_for_target.get(t) for t in ("99.5%", "99.9%")]
        lines.append(
            f"{name:<11} {rep.meta.get('calibrated_on', '-'):<14} {rep.n_tokens:>9} "
            f"{100 * row.top1_agreement:>7.2f}% {100 * row.top5_containment:>7.2f}% "
            + " ".join(f"{'-' if n is None else n:>11}" for n in need)
        )
    return "\n".join(lines)
