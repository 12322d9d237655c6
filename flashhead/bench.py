"""`flashhead bench`: the dense head against FlashHead, on the call vLLM makes.

Default (`mode="logits"`), per batch, the two calls a server's logits processor makes, timed
eagerly, as vLLM calls them (outside its CUDA graphs):
- dense: vLLM's stock head, `F.linear` in the model dtype, then soft cap and scale;
- FlashHead: `flashhead.handlers.step_logits.plan_logits`, the FlashHead logits processor's
  own per-step code (logits mode, model dtype; on a GPU it replays FlashHead's CUDA graphs).
On a GPU a second column times each method's device work captured whole in one CUDA graph
(what the call would cost with no host overhead). `mode="tokens"` times the head alone (greedy
token ids: F.linear + argmax against `FlashHead.tokens`), the figure of earlier releases.

Both methods run in one process on the same random weights (clustered structure: tokens are
noisy copies of their cluster centre), interleaved call by call, so load from other processes
hits both alike; the report gives medians and the spread (25th-75th percentile). GPU times
come from CUDA events. The byte floor is the bytes a method must move over the bandwidth of a
large device copy (bytes read + written).
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
MODES = ("logits", "tokens")
BUSY_CYCLES = 2_000_000  # ~1 ms of a GPU's clock: longer than any call's host overhead


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
    graphs: bool = True  # GPU: also time each method captured in one CUDA graph
    mode: str = "logits"  # logits: vLLM's call; tokens: the head alone, greedy token ids
    temperature: float = 0.0  # logits mode: > 0 times sampled rows (unseeded)
    soft_cap: float | None = None
    scale: float = 1.0
    stage1: str = "centroids"  # or "head-int4": every row its own cluster, scored at int4

    def validate(self) -> None:
        if self.mode not in MODES:
            raise ValueError(f"--mode {self.mode!r}: use one of {', '.join(MODES)}")
        if self.stage1 not in ("centroids", "head-int4"):
            raise ValueError(f"--stage1 {self.stage1!r}: use centroids or head-int4")
        if self.stage1 == "head-int4" and self.cluster_size != 1:
            raise ValueError("--stage1 head-int4 scores clusters of one token: --cluster-size 1")
        if self.temperature < 0 or (self.temperature > 0 and self.mode != "logits"):
            raise ValueError("--temperature must be >= 0, and > 0 only in logits mode")
        if self.soft_cap is not None and not self.soft_cap > 0:
            raise ValueError("--soft-cap must be > 0")
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
    dense_ms: float  # eager, as vLLM calls it
    flash_ms: float
    ratio: float
    flash_path: str  # "flashhead" or "dense" (the dispatcher's choice at this batch size)
    dense_spread_ms: tuple[float, float]
    flash_spread_ms: tuple[float, float]
    # GPU: the same call queued behind a 1 ms kernel (a model's forward still running, as when
    # vLLM's host reaches compute_logits): the host's launch overhead is hidden there.
    dense_behind_ms: float | None = None
    flash_behind_ms: float | None = None
    ratio_behind: float | None = None
    behind_over_graph: float | None = None  # FlashHead behind the forward / its graph time
    dense_graph_ms: float | None = None  # the same device work captured in one CUDA graph
    flash_graph_ms: float | None = None  # FlashHead itself, also where the dispatcher chose dense
    ratio_graph: float | None = None
    eager_over_graph: float | None = None  # FlashHead eager / its CUDA-graph time
    agreement: float | None = None  # share of greedy rows whose top-1 == dense top-1
    dense_floor_share: float | None = None  # of the eager time
    flash_floor_share: float | None = None  # of the eager time
    flash_graph_floor_share: float | None = None
    flash_bytes: int = 0
    dense_bytes: int = 0
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
    if cfg.stage1 == "head-int4":
        return weight, FlashHeadAssets(
            model_dir=Path("."),
            cache_dir=Path("."),
            centroids=torch.empty(vocab, 0),
            assignments=torch.arange(vocab),
            n_probes=cfg.probes,
            stage1="head_int4",
            hidden=d,
        )
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
    """Times one call (ms): perf_counter on CPU, CUDA events on a GPU; captures CUDA graphs."""

    def __init__(self, device: torch.device, graphs: bool):
        self.cuda = device.type == "cuda"
        self.graphs = graphs and self.cuda
        self.graph_used: dict[str, bool | str] = {}

    def prepare(self, name: str, fn: Callable, warmup: int) -> Callable:
        for _ in range(max(1, warmup)):
            fn()
        return fn

    def capture(self, name: str, fn: Callable, warmup: int) -> Callable | None:
        """`fn` captured whole in one CUDA graph (its replay), or None if capture fails."""
        self.prepare(name, fn, warmup)
        try:
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                fn()
            graph.replay()
            torch.cuda.synchronize()
        except Exception as exc:  # the graph column is extra: report why it is missing
            self.graph_used[name] = False
            self.graph_used[name + "_error"] = repr(exc)[:200]
            return None
        self.graph_used[name] = True
        return graph.replay

    def time(self, fn: Callable, behind: bool = False) -> float:
        """One call's time; `behind`: queued behind a ~1 ms kernel, timed from its end."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        if behind:
            torch.cuda._sleep(BUSY_CYCLES)
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


def flash_bytes(head: FlashHead, batch: int, logits_elt: int = 0) -> int:
    """Bytes FlashHead must move for `batch` rows: stage 1 once (int8 centroids + scales, or
    int4 rows + group scales and zeros), p*s rows (+ special clusters) per row; with
    `logits_elt` (logits mode) the [B, V] logits written."""
    idx = head.index
    elt = idx.wc.element_size()
    stage1 = idx.cent_q.numel() + idx.cent_scale.numel() * 4
    if idx.rows4 is not None:
        r = idx.rows4
        stage1 = r.q.numel() + (r.scale.numel() + r.zero.numel()) * 2  # bf16 as the kernels read
    rows = (head.n_probes + idx.n_special_clusters) * head.cluster_size
    out = batch * head.vocab_size * logits_elt
    return stage1 + batch * rows * (idx.hidden_size * elt + 4) + out  # + int32 slot id per row


def _call_pair(
    cfg: BenchConfig, head: FlashHead, weight: torch.Tensor, h: torch.Tensor
) -> tuple[Callable, Callable, Callable]:
    """(dense, FlashHead as served, FlashHead's own device work) on the static input `h`."""
    batch = h.shape[0]
    if cfg.mode == "tokens":

        def own_tokens():
            return head._run(h, None, None, None, want_tokens=True, want_scores=False)[2]

        return (
            lambda: torch.nn.functional.linear(h, weight).argmax(dim=-1),
            lambda: head.tokens(h),
            own_tokens,
        )
    from flashhead.handlers.plan import RowDecision, RowKind, StepPlan
    from flashhead.handlers.step_logits import logit_transform, plan_logits
    from flashhead.sampling_noise import draw_gumbel, inverse_temperature

    transform = logit_transform(cfg.scale, cfg.soft_cap)

    def stock(x: torch.Tensor) -> torch.Tensor:  # vLLM's LogitsProcessor, TP=1, unquantized
        logits = torch.nn.functional.linear(x, weight)
        return logits if transform is None else transform.apply(logits)

    kind = RowKind.SAMPLED if cfg.temperature > 0 else RowKind.GREEDY
    plan = StepPlan([RowDecision(kind, cfg.temperature)] * batch, source="bench")
    temp = torch.full((batch,), cfg.temperature) if cfg.temperature > 0 else None
    inv_t = inverse_temperature(temp, batch, h.device)
    noise = draw_gumbel(batch, head.n_clusters, temp, None, h.device)
    out = torch.empty(batch, head.vocab_size, dtype=torch.float32, device=h.device)

    def own_logits():  # the device work of one call, with its static inputs already in place
        head._flash_logits_into(h, inv_t, noise, out, transform)
        return out.to(h.dtype)

    return (lambda: stock(h), lambda: plan_logits(head, h, plan, stock, transform), own_logits)


def _key(name: str, behind: bool) -> str:
    return name + "_behind" if behind else name


def _top1(result: torch.Tensor) -> torch.Tensor:
    return result if result.dim() == 1 else result.argmax(dim=-1)


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
    elt = weight.element_size()
    head_bytes = weight.numel() * elt
    bandwidth = device_bandwidth(device)
    timer = _Timer(device, cfg.graphs)
    results = []
    for batch in cfg.batches:
        hs = _hidden_states(cfg, weight, batch, n_sets=4 if device.type == "cuda" else 1)
        h_static = hs[0].clone()
        dense, flash, own = _call_pair(cfg, head, weight, h_static)
        path = "dense" if head.uses_dense(batch, device) else "flashhead"
        agree = []
        for h in hs:
            h_static.copy_(h)
            if cfg.temperature == 0:
                agree.append((_top1(flash()) == _top1(dense())).float().mean().item())
        eager = {"dense": dense, "flash": flash}
        graphed = {"dense_graph": dense, "flash_graph": own} if timer.graphs else {}
        runners = {name: timer.prepare(name, fn, cfg.warmup) for name, fn in eager.items()}
        for name, fn in graphed.items():
            replay = timer.capture(f"{name}@{batch}", fn, cfg.warmup)
            if replay is not None:
                runners[name] = replay
        # Two rounds, each interleaved (alternating who goes first): on an idle GPU (and the
        # graphs), then behind a busy GPU; kept apart so that neither disturbs the other.
        rounds = [[(name, False) for name in runners]]
        if timer.cuda:
            rounds.append([(name, True) for name in eager])
        times: dict[str, list[float]] = {_key(n, b): [] for timed in rounds for n, b in timed}
        for timed in rounds:
            for it in range(cfg.iters):
                h_static.copy_(hs[it % len(hs)])
                order = timed if it % 2 == 0 else timed[::-1]
                for name, behind in order:
                    times[_key(name, behind)].append(timer.time(runners[name], behind))
        med = {name: _quantiles(ts) for name, ts in times.items()}
        res = BatchResult(
            batch=batch,
            dense_ms=med["dense"][0],
            flash_ms=med["flash"][0],
            ratio=med["dense"][0] / med["flash"][0],
            flash_path=path,
            dense_spread_ms=med["dense"][1],
            flash_spread_ms=med["flash"][1],
            agreement=sum(agree) / len(agree) if agree else None,
            flash_bytes=flash_bytes(head, batch, (8 + elt) if cfg.mode == "logits" else 0),
            dense_bytes=head_bytes + batch * head.vocab_size * elt,
        )
        if "flash_behind" in med:
            res.dense_behind_ms = med["dense_behind"][0]
            res.flash_behind_ms = med["flash_behind"][0]
            res.ratio_behind = res.dense_behind_ms / res.flash_behind_ms
        if "dense_graph" in med and "flash_graph" in med:
            res.dense_graph_ms = med["dense_graph"][0]
            res.flash_graph_ms = med["flash_graph"][0]
            res.ratio_graph = res.dense_graph_ms / res.flash_graph_ms
            res.eager_over_graph = res.flash_ms / res.flash_graph_ms
            if res.flash_behind_ms is not None:
                res.behind_over_graph = res.flash_behind_ms / res.flash_graph_ms
        if bandwidth:
            ms = bandwidth / 1e3  # bytes per ms
            res.dense_floor_share = res.dense_bytes / ms / res.dense_ms
            res.flash_floor_share = res.flash_bytes / ms / res.flash_ms
            if res.flash_graph_ms:
                res.flash_graph_floor_share = res.flash_bytes / ms / res.flash_graph_ms
        results.append(res)
        if log:
            log(_format_row(res))
    return {
        "config": {k: (list(v) if isinstance(v, tuple) else v) for k, v in asdict(cfg).items()},
        "device_name": _device_name(device),
        "torch": torch.__version__,
        "triton": dispatch.triton_status()[1],
        "threads": torch.get_num_threads(),
        "backend": head.backend,
        "dispatcher": dispatch.describe_backend(device, settings().kernel_options()),
        "triton_select": settings().kernel_options().triton_select,
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
        f"({r.flash_path})  ratio {r.ratio:5.2f}x  agree "
        + ("n/a (sampled)" if r.agreement is None else f"{r.agreement:.3f}")
    )
    if r.flash_behind_ms is not None:
        line += (
            f"  | behind a forward: dense {r.dense_behind_ms:.3f} ms, flashhead "
            f"{r.flash_behind_ms:.3f} ms ({r.ratio_behind:.2f}x)"
        )
    if r.flash_graph_ms is not None:
        line += (
            f"  | CUDA graphs: dense {r.dense_graph_ms:.3f} ms, FlashHead itself "
            f"{r.flash_graph_ms:.3f} ms ({r.ratio_graph:.2f}x); eager/graph {r.eager_over_graph:.2f}"
        )
    if r.flash_floor_share is not None:
        line += f"  floor share dense {r.dense_floor_share:.0%} flashhead {r.flash_floor_share:.0%}"
    return line


def format_report(info: dict) -> str:
    cfg = info["config"]
    what = (
        "vLLM's logits call, eager (dense: F.linear; FlashHead: the logits processor's step)"
        if cfg["mode"] == "logits"
        else "the head alone, greedy token ids (dense: F.linear + argmax; FlashHead.tokens)"
    )
    rows = f"sampled rows, T={cfg['temperature']:g}" if cfg["temperature"] else "greedy rows"
    lines = [
        f"flashhead bench: V={cfg['vocab']} d={cfg['hidden']} s={cfg['cluster_size']} "
        f"p={cfg['probes']} {cfg['dtype']} on {info['device_name']}, {info['threads']} thread(s), "
        f"{cfg['iters']} interleaved iterations (medians)",
        f"timed: {what}; {rows}",
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
