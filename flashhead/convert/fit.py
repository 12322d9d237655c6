"""Clusters and centroids fitted to the hidden-state distribution (the default `--centroids fit`).

Stage 1 ranks clusters by h . c_k, and what it should rank by is the best logit inside each
cluster, max_{v in k} h . w_v. Both halves of the method use hidden states H sampled from the
model itself (`sample_calibration`: prose read by teacher forcing, plus the model's own answers
to chat prompts, which is what a server decodes):

1. Clusters: balanced euclidean k-means on the rows W sqrt(E[h h^T]) (`whitening`), so a row's
   distance to its centroid is the expected squared logit error over real hidden states.
2. Centroids: the ridge least-squares fit of the per-cluster maxima,

       C = argmin ||H C^T - M||^2 + lam ||C - C_mean||^2,   M[n, k] = max_{v in k} h_n . w_v

   one d x d solve for all clusters at once. The ridge pulls clusters the text rarely exercises
   back to the plain mean of their rows.

3. Probes: `cross_validated_probes` estimates, per source (prose, code, chat), the p that
   reaches a top-1 agreement target on that source's positions with the centroids fitted on
   the other sources only: the shift that text unlike the calibration text brings.

Measured on SmolLM2-135M and Gemma-3-270M (held-out prompts and text, `flashhead eval`): fitting
on prose alone needed p = 1042 (SmolLM2) and 417 (Gemma) for 99.5% top-1 agreement on chat
answers; with chat answers in the calibration and the whitened clusters, ~190-230 and ~150.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from flashhead.compute_dtype import fast_dtype

_ROWS_PER_BLOCK = 256
SOURCES = ("prose", "code", "chat", "self")


@dataclass
class Calibration:
    """Hidden states at the head's input, with the source each row came from."""

    h: torch.Tensor  # [N, d] float32
    source: torch.Tensor  # [N] int64 index into SOURCES


def cluster_max_logits(
    h: torch.Tensor, weight: torch.Tensor, assignments: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per hidden state: [N, c] float32 largest logit among each cluster's tokens, and [N] the
    dense head's top-1 token id (bf16 logits: near-ties may resolve differently than fp32)."""
    n_clusters = int(assignments.max()) + 1
    sizes = torch.bincount(assignments, minlength=n_clusters)
    s = int(sizes.max())
    if int(sizes.min()) != s:
        raise ValueError("cluster_max_logits needs equal cluster sizes")
    order = torch.argsort(assignments, stable=True)
    # bf16 where it is fast (flashhead.compute_dtype): the targets need ~3 significant digits.
    dtype = fast_dtype(weight.device)
    w = weight[order].to(dtype)
    out = torch.empty(h.shape[0], n_clusters, dtype=torch.float32)
    top1 = torch.empty(h.shape[0], dtype=torch.int64)
    for start in range(0, h.shape[0], _ROWS_PER_BLOCK):
        logits = h[start : start + _ROWS_PER_BLOCK].to(dtype) @ w.T
        out[start : start + _ROWS_PER_BLOCK] = logits.view(-1, n_clusters, s).amax(dim=2).float()
        top1[start : start + _ROWS_PER_BLOCK] = order[logits.argmax(dim=1)]
    return out, top1


def whitening(h: torch.Tensor) -> torch.Tensor:
    """[d, d] sqrt(E[h h^T]): multiply head rows by it to cluster them by expected logit error."""
    h = h.float()
    second = h.T @ h / max(1, h.shape[0])
    evals, evecs = torch.linalg.eigh(second)
    return (evecs * evals.clamp_min(0).sqrt()) @ evecs.T


@dataclass
class NormalEquations:
    """H^T H [d, d] and H^T M [d, c] of the centroid fit, and the same products per left-out
    group (`fit_groups`): the costly part (Gemma-3: 1 TFLOP for H^T M), computed once per row
    and shared by the final fit and the probe estimates, which subtract their group's part."""

    gram: torch.Tensor
    ht_targets: torch.Tensor
    parts: dict[int, tuple[torch.Tensor, torch.Tensor]]

    def __iter__(self):  # (gram, ht_targets) = normal, as the plain solve takes them
        return iter((self.gram, self.ht_targets))

    def without(self, group: int) -> tuple[torch.Tensor, torch.Tensor]:
        gram, ht = self.parts[group]
        return self.gram - gram, self.ht_targets - ht


def fit_groups(source: torch.Tensor, folds: int = 4) -> torch.Tensor:
    """[N] the group each calibration row is left out with: its source, or with a single
    source, its contiguous fold."""
    return source if source.unique().numel() > 1 else _folds(source, folds)


def normal_equations(
    h: torch.Tensor, max_logits: torch.Tensor, groups: torch.Tensor | None = None
) -> NormalEquations:
    """The products of the centroid fit (see `NormalEquations`), summed over `groups`."""
    if groups is None:
        groups = torch.zeros(h.shape[0], dtype=torch.int64)
    parts = {}
    for g in groups.unique().tolist():
        rows = torch.nonzero(groups == g).flatten()
        if rows.numel() and int(rows[-1] - rows[0]) + 1 == rows.numel():  # contiguous: a view
            h_g, m_g = (
                h[int(rows[0]) : int(rows[-1]) + 1],
                max_logits[int(rows[0]) : int(rows[-1]) + 1],
            )
        else:
            h_g, m_g = h[rows], max_logits[rows]
        parts[int(g)] = (h_g.T @ h_g, h_g.T @ m_g)
    gram = sum(p[0] for p in parts.values())
    ht = sum(p[1] for p in parts.values())
    return NormalEquations(gram, ht, parts)


def _solve_normal(
    gram: torch.Tensor, ht_targets: torch.Tensor, mean: torch.Tensor, ridge: float
) -> torch.Tensor:
    lam = ridge * float(gram.diagonal().mean())
    if not math.isfinite(lam) or lam <= 0:
        lam = 1e-6
    rhs = ht_targets + lam * mean.T
    eye = torch.eye(gram.shape[0], dtype=gram.dtype)
    return torch.linalg.solve(gram + lam * eye, rhs).T.contiguous()


def _solve(
    h: torch.Tensor, targets: torch.Tensor, mean: torch.Tensor, ridge: float
) -> torch.Tensor:
    return _solve_normal(*normal_equations(h, targets), mean, ridge)


def fit_centroids(
    h: torch.Tensor,
    weight: torch.Tensor,
    assignments: torch.Tensor,
    *,
    ridge: float = 1e-2,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    normal: NormalEquations | None = None,
) -> torch.Tensor:
    """[c, d] float32 centroids with h . c_k ~ the best logit of cluster k (see module doc).

    `ridge` is relative to the mean eigenvalue of H^T H, so it does not depend on N or scale.
    `targets`: `cluster_max_logits(h, weight, assignments)` when the caller already has it (it
    is the costly part: N x V x d)."""
    from flashhead.convert.clustering import centroids_for

    h = h.float()
    mean = centroids_for(weight.float(), assignments, "mean")
    if normal is None:
        max_logits, _ = (
            targets if targets is not None else cluster_max_logits(h, weight, assignments)
        )
        normal = normal_equations(h, max_logits)
    return _solve_normal(*normal, mean, ridge)


def _folds(source: torch.Tensor, k: int) -> torch.Tensor:
    """[N] fold id: each source's rows cut into k contiguous blocks (rows of one answer or one
    text window are adjacent, so they stay together)."""
    fold = torch.empty_like(source)
    for s in source.unique():
        rows = torch.nonzero(source == s).flatten()
        fold[rows] = torch.arange(rows.numel()) * k // rows.numel()
    return fold


def left_out_ranks(
    cal: Calibration,
    weight: torch.Tensor,
    assignments: torch.Tensor,
    special_token_ids: list[int],
    *,
    folds: int = 4,
    ridge: float = 1e-2,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    normal: NormalEquations | None = None,
) -> torch.Tensor:
    """[N] rank of each calibration row's dense top-1 cluster under centroids fitted without
    that row's source (or, with a single source, without its `folds` block), scored as served
    (int8 centroids). `targets` and `normal` as in `fit_centroids`."""
    from flashhead.calibration.ranks import cluster_ranks
    from flashhead.convert.clustering import centroids_for
    from flashhead.head import quantize_centroids
    from flashhead.kernels.reference import probe_keys

    h = cal.h.float()
    mean = centroids_for(weight.float(), assignments, "mean")
    max_logits, top1 = (
        targets if targets is not None else cluster_max_logits(h, weight, assignments)
    )
    group = fit_groups(cal.source, folds)
    if (
        normal is None
        or not isinstance(normal, NormalEquations)
        or set(normal.parts) != set(group.unique().tolist())
    ):
        normal = normal_equations(h, max_logits, group)
    ranks = torch.empty(h.shape[0], dtype=torch.int64)
    for g in group.unique():
        rows = torch.nonzero(group == g).flatten()
        # The fit without these rows: the full normal equations minus their share.
        fitted = _solve_normal(*normal.without(int(g)), mean, ridge)
        cent_q, scale = quantize_centroids(fitted)
        cent_f = cent_q.float()  # upcast once per fit; probe_keys would redo it every block
        for start in range(0, rows.numel(), _ROWS_PER_BLOCK):
            r = rows[start : start + _ROWS_PER_BLOCK]
            keys = probe_keys(h[r], cent_f, scale)
            ranks[r] = cluster_ranks(keys, assignments, top1[r, None], special_token_ids)[:, 0]
    return ranks


def cross_validated_probes(
    cal: Calibration,
    weight: torch.Tensor,
    assignments: torch.Tensor,
    special_token_ids: list[int],
    target: float,
    *,
    folds: int = 4,
    ridge: float = 1e-2,
    targets: tuple[torch.Tensor, torch.Tensor] | None = None,
    normal: NormalEquations | None = None,
) -> dict[str, int]:
    """Per source with enough rows: a 90 % upper confidence bound (block bootstrap,
    `probe_count.block_bootstrap`) on the smallest p whose top-1 agreement reaches `target` on
    that source's rows when the centroids are fitted on the *other* sources only, scored as
    served (int8 centroids). Leaving a whole source out is what text unlike the calibration text
    does to the ranking; rows held out of their own source (k-fold) miss that shift and gave
    about half the p that never-seen text needs (docs/convert.md). With a single source, its
    rows are cut into `folds` blocks instead. `targets` as in `fit_centroids`."""
    from flashhead.convert.probe_count import block_bootstrap

    ranks = left_out_ranks(
        cal, weight, assignments, special_token_ids, folds=folds, ridge=ridge, targets=targets,
        normal=normal,
    )  # fmt: skip
    n_clusters = int(assignments.max()) + 1
    out = {}
    for i, name in enumerate(SOURCES):
        mine = ranks[cal.source == i]
        if mine.numel() >= 256:  # fewer rows cannot resolve a 99.5-99.9% target
            # A 90 % upper confidence bound, not the empirical quantile: at 99.9 % over 4096
            # rows that quantile is the 5th worst rank, and it moved 2.4x across k-means seeds
            # and calibration subsets (docs/convert.md, "A probe count that holds").
            out[name] = min(n_clusters, block_bootstrap(mine, target))
    return out


def sample_calibration(
    model_dir,
    *,
    prose_tokens: int,
    chat_tokens: int,
    code_tokens: int = 0,
    sample_tokens: int = 0,
    text: str | None = None,
    answer_tokens: int = 32,
    progress: bool = True,
) -> Calibration:
    """Head inputs from the model in `model_dir` (bf16 body, as vLLM serves it), from the
    calibration half of each source: `prose_tokens` positions of the stdlib prose (or of
    `text`), `code_tokens` of stdlib source code, `chat_tokens` of the model's greedy answers to
    the shipped prompts, and `sample_tokens` of its own free samples at temperature 1."""
    from flashhead.calibration.chat import chat_hidden_states, uses_chat_template
    from flashhead.calibration.hidden import sample_hidden_states
    from flashhead.calibration.model import load_model
    from flashhead.calibration.sampled import sampled_hidden_states
    from flashhead.calibration.texts import family_text

    model, tok = load_model(model_dir, dtype=fast_dtype("cpu"))
    parts, sources = [], []

    def add(name: str, h: torch.Tensor) -> None:
        parts.append(h)
        sources.append(torch.full((h.shape[0],), SOURCES.index(name)))

    if prose_tokens:
        prose = family_text("prose", "calibration") if text is None else text
        label = "calibration text"
        add("prose", sample_hidden_states(model, tok, prose, n_tokens=prose_tokens,
                                          progress=progress, label=label))  # fmt: skip
    if code_tokens:
        code = family_text("code", "calibration")
        add("code", sample_hidden_states(model, tok, code, n_tokens=code_tokens,
                                         progress=progress, label="calibration code"))  # fmt: skip
    if chat_tokens:
        if progress:
            form = (
                "its chat template"
                if uses_chat_template(tok)
                else "the plain 'User: ...\\nAssistant:' form (the tokenizer has no usable "
                "chat template)"
            )
            print(f"flashhead convert: chat calibration prompts in {form}", file=sys.stderr)
        chat = chat_hidden_states(
            model,
            tok,
            "calibration",
            n_tokens=chat_tokens,
            max_new_tokens=answer_tokens,
            progress=progress,
            label="chat answers",
        )
        add("chat", chat)
    if sample_tokens:
        add("self", sampled_hidden_states(model, tok, "calibration", n_tokens=sample_tokens,
                                          progress=progress))  # fmt: skip
    del model
    if not parts:
        raise ValueError("no calibration positions requested")
    return Calibration(h=torch.cat(parts).float(), source=torch.cat(sources))


def auto_probes(
    per_source: dict[str, int], n_clusters: int, cluster_size: int, margin: float, max_share: float
) -> tuple[int, bool]:
    """(p, capped): the largest per-source p times `margin`, rounded up to a multiple of 8, and
    at most `max_share` of the vocabulary (capped=True when that bound decided)."""
    need = max(per_source.values()) if per_source else n_clusters
    p = int(math.ceil(need * margin / 8) * 8)
    cap = max(1, int(max_share * n_clusters * cluster_size) // cluster_size)
    capped = p > cap
    return max(1, min(n_clusters, p, cap)), capped
