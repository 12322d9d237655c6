"""Backend choice for the FlashHead core: `KernelOptions.backend` = triton|torch|auto (default
auto; `FLASHHEAD_BACKEND` in `flashhead.settings`).

A CPU server measures where its own dense head wins instead (flashhead/crossover.py); the rule
below decides beyond the batch sizes it tried, and wherever nothing was measured.

auto = Triton for CUDA tensors when Triton imports, torch otherwise. The torch backend on CPU
hands large batches to the dense head (`F.linear`): per-row FlashHead scores K = (p + special
clusters) * s rows per row, so once B * K >= 2 * V (B >= 63 at the Llama-3.2 shape) the dense
GEMM, which reads the head once for all rows, is expected to win. On the GPU (Triton) both are
bandwidth-bound: dense once B * K >= V (B >= 32 at that shape). `KernelOptions.dense_min_batch`
(`FLASHHEAD_DENSE_MIN_BATCH`) overrides the rule with a fixed batch size (0 = never dense).
`describe_backend()` reports all of this (the doctor shows it).
"""

from __future__ import annotations

import functools
from types import SimpleNamespace
from typing import Any

import torch

from flashhead.kernels.options import BACKENDS, DEFAULT_OPTIONS, KernelOptions

# Named in messages only: flashhead.settings reads them.
ENV_BACKEND = "FLASHHEAD_BACKEND"
ENV_DENSE_MIN_BATCH = "FLASHHEAD_DENSE_MIN_BATCH"
# The dense GEMM reads the head once for all rows but does B x V row-dots; FlashHead reads and
# scores B x K candidate rows. On 1-2 CPU threads a bf16 GEMM row-dot costs about as much as a
# FlashHead row read, so dense wins once FlashHead scores about two heads' worth of rows.
DENSE_ROW_FACTOR = 2
# On a GPU each row's top-p select runs in one program over all its centroid keys: measured on
# an H200, 8016 keys (Llama-3.2, clusters of 16) take 22 us against a 123 us dense head, but
# 65536 keys (Gemma-3-270M, clusters of 4) spill out of registers and took 230 us against 82 us.
# Heads with more clusters than this are served dense on a GPU (FLASHHEAD_DENSE_MIN_BATCH=0
# overrides); their FlashHead needs a multi-program select, or a conversion with larger clusters.
GPU_MAX_FAST_CLUSTERS = 16384


class BackendError(ValueError):
    pass


def requested_backend(explicit: str | None = None, options: KernelOptions = DEFAULT_OPTIONS) -> str:
    value = explicit if explicit not in (None, "auto") else options.backend
    value = (value or "auto").strip().lower()
    if value not in BACKENDS:
        raise BackendError(
            f"{ENV_BACKEND}={value!r} is not a FlashHead backend; use one of {', '.join(BACKENDS)}"
        )
    return value


@functools.lru_cache(maxsize=1)
def triton_status() -> tuple[bool, str]:
    """(importable, version or import error)."""
    try:
        import triton
    except Exception as exc:  # a broken triton install must not break the torch path
        return False, f"unavailable ({exc.__class__.__name__}: {exc})"
    return True, getattr(triton, "__version__", "?")


def interpreting() -> bool:
    """Whether Triton runs its interpreter (TRITON_INTERPRET=1), as Triton itself decides."""
    if not triton_status()[0]:
        return False
    from flashhead.kernels.triton_mode import triton_interpreting

    return triton_interpreting()


def resolve_backend(
    explicit: str | None,
    device: torch.device | str | None,
    options: KernelOptions = DEFAULT_OPTIONS,
) -> str:
    """The backend that will run on `device`: 'triton' or 'torch'. Raises BackendError when
    triton is forced where it cannot run."""
    if explicit == "reference":  # exact fp32 torch math, for tests and comparisons only
        return "reference"
    want = requested_backend(explicit, options)
    dev = torch.device(device) if device is not None else torch.device("cpu")
    ok, info = triton_status()
    triton_runs = ok and (dev.type == "cuda" or interpreting())
    if want == "triton":
        if not triton_runs:
            where = (
                "Triton is " + info
                if not ok
                else f"device {dev} (Triton needs CUDA or TRITON_INTERPRET=1)"
            )
            raise BackendError(f"{ENV_BACKEND}=triton cannot run here: {where}; use torch or auto")
        return "triton"
    if want == "torch":
        return "torch"
    return "triton" if ok and dev.type == "cuda" else "torch"


def prefer_dense(
    backend: str,
    device: torch.device | str,
    n_rows: int,
    candidate_rows: int | None = None,
    vocab: int | None = None,
    dense_min_batch: int | None = None,
    n_clusters: int | None = None,
    measured_min_batch: int | None = None,
) -> bool:
    """True where the dense head beats FlashHead (`dense_reason` says why)."""
    return bool(
        dense_reason(
            backend,
            device,
            n_rows,
            candidate_rows,
            vocab,
            dense_min_batch,
            n_clusters,
            measured_min_batch,
        )
    )


def dense_reason(
    backend: str,
    device: torch.device | str,
    n_rows: int,
    candidate_rows: int | None = None,
    vocab: int | None = None,
    dense_min_batch: int | None = None,
    n_clusters: int | None = None,
    measured_min_batch: int | None = None,
) -> str:
    """Why the dense head serves this batch, or "" where FlashHead does. Torch backend on CPU:
    when the rows FlashHead scores for the batch (`n_rows * candidate_rows`) reach
    DENSE_ROW_FACTOR heads (`vocab` rows each). Triton: when those rows reach one head (both
    are bandwidth-bound, and FlashHead reads at least as many bytes), or at any batch for a
    head of more than GPU_MAX_FAST_CLUSTERS clusters. `dense_min_batch` replaces the rule:
    dense from that many rows on (0 = never). `measured_min_batch` (a server timed its own dense
    head against FlashHead: flashhead/crossover.py) comes before the rule, not before
    `dense_min_batch`."""
    on_cpu_torch = backend == "torch" and torch.device(device).type == "cpu"
    if backend != "triton" and not on_cpu_torch:
        return ""
    if dense_min_batch is not None:
        if dense_min_batch > 0 and n_rows >= dense_min_batch:
            return f"{n_rows} rows >= {ENV_DENSE_MIN_BATCH}={dense_min_batch}"
        return ""
    if measured_min_batch is not None and n_rows >= measured_min_batch:
        return (
            f"{n_rows} rows >= {measured_min_batch}: the server's dense head was timed within "
            f"10 % of FlashHead, or faster, from {measured_min_batch} rows"
        )
    if backend == "triton" and n_clusters is not None and n_clusters > GPU_MAX_FAST_CLUSTERS:
        return (
            f"{n_clusters} clusters > {GPU_MAX_FAST_CLUSTERS}: on a GPU the per-row top-p "
            "select over that many stage-1 keys (centroids, or int4 head rows) costs more than "
            "the dense head"
        )
    if candidate_rows is None or vocab is None:
        return ""
    factor = DENSE_ROW_FACTOR if on_cpu_torch else 1
    if n_rows * candidate_rows >= factor * vocab:
        return (
            f"{n_rows} rows x {candidate_rows} candidates >= {factor} x V={vocab}: the dense "
            "head reads fewer bytes"
        )
    return ""


def backend_ops(backend: str, options: KernelOptions = DEFAULT_OPTIONS) -> Any:
    """Object with `probe_keys(...)`, `probe_keys_int4(...)`, `select_probes(...)`,
    `candidate_scores(...)` and `candidate_logits(...)` for the chosen backend, with `options`
    bound."""
    if backend == "triton":
        from flashhead.kernels import triton_ops

        return SimpleNamespace(
            probe_keys=functools.partial(triton_ops.probe_keys, options=options),
            probe_keys_int4=functools.partial(triton_ops.probe_keys_int4, options=options),
            select_probes=functools.partial(triton_ops.select_probes, options=options),
            candidate_scores=functools.partial(triton_ops.candidate_scores, options=options),
            candidate_logits=functools.partial(triton_ops.candidate_logits, options=options),
        )
    from flashhead.kernels import reference

    if backend == "reference":
        return SimpleNamespace(
            probe_keys=reference.probe_keys,
            probe_keys_int4=reference.probe_keys_int4,
            select_probes=reference.select_probes,
            candidate_scores=reference.candidate_scores,
            candidate_logits=reference.candidate_logits,
        )

    return SimpleNamespace(
        probe_keys=functools.partial(reference.probe_keys, fast=True),
        probe_keys_int4=functools.partial(reference.probe_keys_int4, fast=True),
        select_probes=reference.select_probes,
        candidate_scores=functools.partial(
            reference.candidate_scores, fast=True, compile=options.cpu_compile
        ),
        candidate_logits=functools.partial(
            reference.candidate_logits, fast=True, compile=options.cpu_compile
        ),
    )


def describe_backend(
    device: torch.device | str | None = None, options: KernelOptions = DEFAULT_OPTIONS
) -> dict:
    """What the dispatcher would pick on `device` (default: cuda if available, else cpu)."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    dev = torch.device(device)
    ok, info = triton_status()
    report: dict = {"device": str(dev), "requested": None, "backend": None, "triton": info}
    try:
        report["requested"] = requested_backend(None, options)
        backend = resolve_backend(None, dev, options)
    except BackendError as exc:
        report["backend"] = None
        report["error"] = str(exc)
        return report
    report["backend"] = backend
    if backend == "triton":
        report["reason"] = (
            "CUDA tensors and Triton importable"
            if report["requested"] == "auto"
            else f"{ENV_BACKEND}=triton"
        )
    elif report["requested"] == "torch":
        report["reason"] = f"{ENV_BACKEND}=torch"
    else:
        report["reason"] = "no CUDA device" if dev.type != "cuda" else f"Triton {info}"
    if backend == "triton":
        report["gpu_max_clusters"] = (
            f"heads of more than {GPU_MAX_FAST_CLUSTERS} clusters use the dense head "
            f"(the per-row top-p select costs more there; {ENV_DENSE_MIN_BATCH}=0 overrides)"
        )
    if backend == "triton" or dev.type == "cpu":
        limit = options.dense_min_batch
        report["dense_min_batch"] = limit
        if limit is None:
            rule = (
                f"batches where B x K >= {DENSE_ROW_FACTOR if backend == 'torch' else 1} x V use "
                f"the dense head (K = candidate rows per row; {ENV_DENSE_MIN_BATCH} overrides)"
            )
            if backend == "torch" and dev.type == "cpu":
                rule = (
                    "a server times its own dense head against FlashHead at the first step and "
                    "hands it the batches where dense is within 10 % of FlashHead or faster "
                    "(logged with the timings); "
                    "beyond the sizes it tried, " + rule
                )
            report["dense_fallback"] = rule
        else:
            report["dense_fallback"] = (
                f"batches of {limit}+ rows use the dense head ({ENV_DENSE_MIN_BATCH})"
                if limit > 0
                else f"never ({ENV_DENSE_MIN_BATCH}=0)"
            )
        if backend == "torch":
            from flashhead.kernels.reference import cpu_compile_status

            report["cpu_gather_dot"] = cpu_compile_status(options.cpu_compile)
    return report


__all__ = [
    "BACKENDS",
    "BackendError",
    "backend_ops",
    "describe_backend",
    "dense_reason",
    "prefer_dense",
    "requested_backend",
    "resolve_backend",
]
