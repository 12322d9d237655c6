"""`flashhead bench`: dense head (F.linear + argmax) vs FlashHead (tokens mode, greedy).

Both run in the same process on the same random weights (clustered structure: tokens are noisy
copies of their cluster centre), interleaved call by call, so load from other processes hits
both alike; the report gives medians and the spread (25th-75th percentile). On CUDA each
method is captured in a CUDA graph when possible (as vLLM serves decode steps) and timed with
events; the byte floor is the bytes a method must read over the bandwidth of a large device
copy (bytes read + written).
"""

from __future__ import annotations

import math
import os
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch

from flashhead.assets import FlashHeadAssets
from flashhead.head import FlashHead
from flashhead.kernels import dispatch
from flashhead.settings import settings

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


@dataclass
class BenchConfig:
    vocab: int = 128256  # Llama-3.2
    hidden: int = 2048
    batches: Sequence[int] = (1, 8, 32)
    probes: int = 256
    cluster_size: int = 16
    dtype: str = "bf16"
    device: str = "cpu"
    threads: int | None = None
    iters: int = 30
    warmup: int = 3
    seed: int = 0
    graphs: bool = True

    def validate(self) -> None:
        if self.dtype not in DTYPES:
            raise ValueError(f"--dtype {self.dtype!r}: use one of {', '.join(DTYPES)}")
        if self.vocab < 1 or self.hidden < 1 or self.cluster_size < 1:
            raise ValueError("--vocab, --hidden and --cluster-size must be positive")
        n_clusters = math.ceil(self.vocab / self.cluster_size)
        if not 1 <= self.probes <= n_clusters:
            raise ValueError(
                f"--probes {self.probes}: must be in [1, {n_clusters}] "
                f"(V={self.vocab} / cluster size {self.cluster_size})"
            )
        if not self.batches or min(self.batches) < 1:
            raise ValueError("--batch: give positive batch sizes, e.g. 1,8,32")
        if self.iters < 1 or self.warmup < 0:
            raise ValueError("--iters must be >= 1")
        if self.device.startswith("cuda") and not torch.cuda.is_available():
            raise ValueError("--device cuda: no CUDA device visible to torch")


@dataclass
class BatchResult:
    batch: int
    dense_ms: float
    flash_ms: float
    ratio: float
    flash_path: str  # "flashhead" or "dense" (the dispatcher's choice at this batch size)
    dense_spread_ms: tuple[float, float]
    flash_spread_ms: tuple[float, float]
    flash_forced_ms: float | None = None  # FlashHead itself where the dispatcher chose dense
    agreement: float = 0.0  # share of rows where FlashHead's token == dense argmax
    dense_floor_share: float | None = None
    flash_floor_share: float | None = None
    flash_bytes: int = 0
    extra: dict = field(default_factory=dict)


def make_problem(cfg: BenchConfig) -> tuple[torch.Tensor, FlashHeadAssets]:
    """Random head weight [V, d] in the bench dtype on the bench device, plus assets."""
    gen = torch.Generator().manual_seed(cfg.seed)
    vocab, d, s = cfg.vocab, cfg.hidden, cfg.cluster_size
    c = math.ceil(vocab / s)
    assign = torch.randperm(vocab, generator=gen) % c
    centers = torch.randn(c, d, generator=gen)
    dtype = DTYPES[cfg.dtype]
    weight = torch.empty(vocab, d, dtype=dtype, device=cfg.device)
    sums = torch.zeros(c, d)
    chunk = 16384  # build in chunks: a full fp32 temporary would be 2x the head
    for start in range(0, vocab, chunk):
        a = assign[start : start + chunk]
        rows = centers[a] + 0.5 * torch.randn(len(a), d, generator=gen)
        weight[start : start + chunk] = rows.to(dtype)
        sums.index_add_(0, a, rows)
    counts = torch.bincount(assign, minlength=c).clamp_min(1).unsqueeze(1)
    assets = FlashHeadAssets(
        model_dir=Path("."),
        cache_dir=Path("."),
        centroids=sums / counts,
        assignments=assign,
        n_probes=cfg.probes,
        special_token_ids=[],
    )
    return weight, assets


def _hidden_states(cfg: BenchConfig, weight: torch.Tensor, batch: int, n_sets: int) -> list:
    """Hidden states near token rows (like a trained model's), a few sets to rotate through."""
    gen = torch.Generator().manual_seed(cfg.seed + batch)
    out = []
    for _ in range(n_sets):
        rows = torch.randint(0, cfg.vocab, (batch,), generator=gen)
        h = weight[rows.to(weight.device)].float().cpu() + 0.3 * torch.randn(
            batch, cfg.hidden, generator=gen
        )
        out.append((h / math.sqrt(cfg.hidden)).to(device=weight.device, dtype=weight.dtype))
    return out


def _quantiles(times: list[float]) -> tuple[float, tuple[float, float]]:
    ts = sorted(times)
    q = statistics.quantiles(ts, n=4) if len(ts) >= 2 else [ts[0], ts[0], ts[0]]
    return statistics.median(ts), (q[0], q[2])


class _Timer:
    """Times one call (ms): perf_counter on CPU; CUDA graph replay + events on GPU."""

    def __init__(self, device: torch.device, graphs: bool):
        self.cuda = device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.graph_used: dict[str, bool] = {}

    def prepare(self, name: str, fn: Callable[[], torch.Tensor], warmup: int) -> Callable:
        for _ in range(max(1, warmup)):
            fn()
        if not self.graphs:
            self.graph_used[name] = False
            return fn
        try:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # capture is an optimisation: time eagerly if it fails
            self.graph_used[name] = False
            self.graph_used[name + "_error"] = repr(exc)[:200]
            return fn
        self.graph_used[name] = True
        return graph.replay

    def time(self, fn: Callable) -> float:
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end)


def device_bandwidth(device: torch.device) -> float | None:
    """Bytes/s of a 1 GiB device-to-device copy, counting bytes read + written."""
    if device.type != "cuda":
        return None
    src = torch.empty(1 << 30, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(10):
        start.record()
        dst.copy_(src)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    del src, dst
    return 2 * (1 << 30) / statistics.median(times)


def flash_bytes(head: FlashHead, batch: int) -> int:
    """Bytes FlashHead must read for `batch` rows: int8 centroids + scales once, p*s rows
    (+ special clusters) per row."""
    idx = head.index
    elt = idx.wc.element_size()
    stage1 = idx.cent_q.numel() + idx.cent_scale.numel() * 4
    rows = (head.n_probes + idx.n_special_clusters) * head.cluster_size
    return stage1 + batch * rows * (idx.hidden_size * elt + 4)  # + one int32 slot id per row


def run_bench(cfg: BenchConfig, log: Callable[[str], None] | None = None) -> dict:
    cfg.validate()
    device = torch.device(cfg.device)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    load_before = _loadavg()
    weight, assets = make_problem(cfg)
    t0 = time.perf_counter()
    head = FlashHead.build(weight, assets)
    build_s = time.perf_counter() - t0
    head_bytes = weight.numel() * weight.element_size()
    bandwidth = device_bandwidth(device)
    timer = _Timer(device, cfg.graphs)
    results = []
    for batch in cfg.batches:
        hs = _hidden_states(cfg, weight, batch, n_sets=4 if device.type == "cuda" else 1)
        h_static = hs[0].clone()

        def dense(h=h_static):
            return torch.nn.functional.linear(h, weight).argmax(dim=-1)

        def flash(h=h_static):
            return head.tokens(h)

        def forced(h=h_static):
            _, _, tokens = head._run(h, None, None, None, want_tokens=True, want_scores=False)
            return tokens

        path = "dense" if head.uses_dense(batch, device) else "flashhead"
        methods = {"dense": dense, "flash": flash}
        if path == "dense":
            methods["forced"] = forced
        agree = []
        for h in hs:
            h_static.copy_(h)
            agree.append((forced() == dense()).float().mean().item())
        runners = {
            name: timer.prepare(f"{name}@{batch}", fn, cfg.warmup) for name, fn in methods.items()
        }
        times: dict[str, list[float]] = {name: [] for name in methods}
        names = list(methods)
        for it in range(cfg.iters):
            h_static.copy_(hs[it % len(hs)])
            order = names if it % 2 == 0 else names[::-1]  # interleave, alternate who goes first
            for name in order:
                times[name].append(timer.time(runners[name]))
        dense_ms, dense_spread = _quantiles(times["dense"])
        flash_ms, flash_spread = _quantiles(times["flash"])
        res = BatchResult(
            batch=batch,
            dense_ms=dense_ms,
            flash_ms=flash_ms,
            ratio=dense_ms / flash_ms,
            flash_path=path,
            dense_spread_ms=dense_spread,
            flash_spread_ms=flash_spread,
            agreement=sum(agree) / len(agree),
            flash_bytes=flash_bytes(head, batch),
        )
        if "forced" in times:
            res.flash_forced_ms = _quantiles(times["forced"])[0]
        if bandwidth:
            res.dense_floor_share = head_bytes / bandwidth * 1e3 / dense_ms
            # FlashHead's own time, also where the dispatcher served the batch dense.
            own_ms = res.flash_forced_ms if res.flash_forced_ms is not None else flash_ms
            res.flash_floor_share = res.flash_bytes / bandwidth * 1e3 / own_ms
        results.append(res)
        if log:
            log(_format_row(res))
    info = {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "backend": head.backend,
        "dispatcher": dispatch.describe_backend(device, settings().kernel_options()),
        "head": head.describe(),
        "head_bytes": head_bytes,
        "cluster_major_bytes": head.cluster_major_bytes,
        "cluster_major_vs_head": head.cluster_major_bytes / head_bytes,
        "extra_bytes": head.extra_bytes,
        "extra_vs_head": head.extra_bytes / head_bytes,
        "build_s": build_s,
        "bandwidth_gbs": bandwidth / 1e9 if bandwidth else None,
        "cuda_graphs": timer.graph_used if timer.cuda else None,
        "results": [asdict(r) for r in results],
        # 1-minute load average before and after: other processes make CPU timings noisy.
        "loadavg_1min": [load_before, _loadavg()],
    }
    return info


def _loadavg() -> float | None:
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def _device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    import platform

    return f"cpu ({platform.processor() or platform.machine()})"


def _format_row(r: BatchResult) -> str:
    line = (
        f"B={r.batch:<4d} dense {r.dense_ms:8.3f} ms  flashhead {r.flash_ms:8.3f} ms "
        f"({r.flash_path})  ratio {r.ratio:5.2f}x  agree {r.agreement:.3f}"
    )
    if r.flash_forced_ms is not None:
        line += f"  [FlashHead itself {r.flash_forced_ms:.3f} ms: dispatcher chose dense]"
    if r.flash_floor_share is not None:
        line += f"  floor share dense {r.dense_floor_share:.0%} flashhead {r.flash_floor_share:.0%}"
    return line


def format_report(info: dict) -> str:
    cfg = info["config"]
    lines = [
        f"flashhead bench: V={cfg['vocab']} d={cfg['hidden']} s={cfg['cluster_size']} "
        f"p={cfg['probes']} {cfg['dtype']} on {info['device_name']}, {info['threads']} thread(s), "
        f"{cfg['iters']} interleaved iterations (medians)",
        f"backend: {info['backend']} ({info['dispatcher'].get('reason', '')}); "
        + (
            f"dense fallback: {info['dispatcher']['dense_fallback']}"
            if "dense_fallback" in info["dispatcher"]
            else ""
        ),
        f"memory: cluster-major copy {info['cluster_major_bytes'] / 2**20:.1f} MiB "
        f"({info['cluster_major_vs_head']:.3f}x the head's {info['head_bytes'] / 2**20:.1f} MiB); "
        f"with int8 centroids {info['extra_bytes'] / 2**20:.1f} MiB ({info['extra_vs_head']:.3f}x)",
    ]
    if info.get("loadavg_1min") and None not in info["loadavg_1min"]:
        lines.append(
            "load average (1 min) before/after: {:.2f} / {:.2f} (CPU timings are noisy when "
            "other processes run)".format(*info["loadavg_1min"])
        )
    if info.get("bandwidth_gbs"):
        lines.append(f"device copy bandwidth: {info['bandwidth_gbs']:.0f} GB/s (read + write)")
    for r in info["results"]:
        lines.append(_format_row(BatchResult(**r)))
    return "\n".join(lines)
