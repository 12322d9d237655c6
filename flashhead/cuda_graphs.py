"""FlashHead's own CUDA graphs for the logits path.

vLLM computes logits outside its CUDA graphs (V1: after the captured forward; V2: in
``sample()``), so each FlashHead launch would pay the host's launch cost, several times over
(stage 1, the top-p select, the fill, stage 2). Here the whole logits path of one batch-size
bucket is captured once and replayed: a call costs a copy in, one replay and a copy out.

- Buckets: ``BUCKETS`` (vLLM's smallest capture sizes, up to 32 rows); a batch is padded up to
  the next one. Larger batches, a call made while some stream is capturing (a caller's own
  graph), and every call after a failed capture launch eagerly, each said once in the log.
- One graph per (bucket, greedy or sampled, hidden-state dtype, logit transform), captured on
  first use, after two warm-up runs on a side stream (Triton compiles there).
- Random numbers: a sampled graph draws the Gumbel noise of rows without a generator inside the
  graph, from torch's default CUDA generator (graph-safe: every replay advances its Philox
  offset). A seeded request's rows take theirs from the request's own (seed, position) host
  generator, drawn before the replay into a static input by the same code as the eager path
  (``flashhead.sampling_noise``): a seeded request repeats exactly, graphed or not.
- The inverse temperatures and which rows are seeded are static inputs too, uploaded only when
  they change (a steady decode batch uploads nothing).
- Nothing here reads a device value on the host: no sync on the decode path.

Knows nothing of vLLM.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from flashhead.sampling_noise import fill_seeded_rows, inverse_temperature, seeded_rows, to_device

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 24, 32)
WARMUP_RUNS = 2

_log = logging.getLogger("flashhead.cuda_graphs")

# body(h, inv_t, noise, out, transform) fills out [B, V] float32 from device tensors only.
Body = Callable[
    [torch.Tensor, torch.Tensor | None, torch.Tensor | None, torch.Tensor, object], None
]
# draw(n_rows, temperature, generators, out) fills out[:n_rows] with the rows' Gumbel noise.
Draw = Callable[[int, torch.Tensor, Sequence[torch.Generator | None] | None, torch.Tensor], None]
# upload(temperature, n_rows) -> [n_rows] float32 inverse temperatures on the device.
Upload = Callable[[torch.Tensor, int], torch.Tensor]


def _capturing() -> bool:
    # A CPU-only torch has no capture state to ask (the call raises there).
    return torch.cuda.is_available() and torch.cuda.is_current_stream_capturing()


def bucket_for(n_rows: int, buckets: Sequence[int] = BUCKETS) -> int | None:
    """The smallest bucket that holds `n_rows`, or None past the largest."""
    return next((b for b in buckets if b >= n_rows), None)


@dataclass
class _Captured:
    graph: torch.cuda.CUDAGraph
    h: torch.Tensor  # [bucket, d] static input
    out: torch.Tensor  # [bucket, V] float32 static output
    # Sampled graphs only: static inputs, and the host values they hold (uploaded on change).
    inv_t: torch.Tensor | None = None  # [bucket] float32
    seeded: torch.Tensor | None = None  # [bucket, 1] bool: the row's noise is seeded_noise's
    seeded_noise: torch.Tensor | None = None  # [bucket, c] float32
    uploaded: tuple | None = None  # (n_rows, temperatures, seeded rows) now in inv_t / seeded


class HeadGraphs:
    """The captured logits graphs of one head (one device, one stream at a time)."""

    def __init__(
        self,
        body: Body,
        *,
        hidden_size: int,
        n_clusters: int,
        vocab_size: int,
        device: torch.device,
        buckets: Sequence[int] = BUCKETS,
    ):
        self._body = body
        self.hidden_size, self.n_clusters, self.vocab_size = hidden_size, n_clusters, vocab_size
        self.device = torch.device(device)
        self.buckets = tuple(sorted(buckets))
        self._graphs: dict[tuple, _Captured] = {}
        self.failed = ""  # the capture error that turned graphs off for this head
        self.eager_reasons: set[str] = set()  # what sent calls eager (logged once each)

    @property
    def captured(self) -> list[tuple]:
        """(bucket, sampled, dtype, transform) of every graph captured so far."""
        return list(self._graphs)

    def logits(
        self,
        h: torch.Tensor,
        temperature: torch.Tensor | None,
        generators: Sequence[torch.Generator | None] | None,
        transform: object,
        dtype: torch.dtype,
    ) -> torch.Tensor | None:
        """[B, V] logits in `dtype` from a replay, a fresh tensor; None where the caller must
        launch eagerly (the reason is logged once)."""
        n_rows = int(h.shape[0])
        if self.failed:
            return None
        if _capturing():
            self._eager("capturing", "a logits call inside a caller's CUDA graph capture")
            return None
        bucket = bucket_for(n_rows, self.buckets)
        if bucket is None:
            self._eager(
                f"batch>{self.buckets[-1]}",
                f"a batch of more than {self.buckets[-1]} rows (the largest graph bucket)",
            )
            return None
        temps = None if temperature is None else temperature.reshape(-1).tolist()  # host
        sampled = temps is not None and any(t > 0 for t in temps)
        key = (bucket, sampled, h.dtype, transform)
        graph = self._graphs.get(key)
        if graph is None:
            graph = self._capture(key)
            if graph is None:
                return None
        graph.h[:n_rows].copy_(h)
        if sampled:
            self._fill_sampled(graph, n_rows, temperature, temps, generators)
        graph.graph.replay()
        # A copy out: the static output is overwritten by the next replay.
        return graph.out[:n_rows].to(dtype, copy=True)

    def _fill_sampled(self, graph, n_rows, temperature, temps, generators) -> None:
        seeded = tuple(seeded_rows([t > 0 for t in temps], generators))
        state = (n_rows, tuple(temps), seeded)
        if graph.uploaded != state:
            graph.inv_t[:n_rows].copy_(inverse_temperature(temperature, n_rows, self.device))
            mask = torch.zeros(graph.seeded.shape, dtype=torch.bool)
            mask[list(seeded)] = True
            graph.seeded.copy_(to_device(mask, self.device))
            graph.uploaded = state
        fill_seeded_rows(graph.seeded_noise, seeded, generators)

    def _capture(self, key: tuple) -> _Captured | None:
        bucket, sampled, dtype, transform = key
        dev = self.device
        try:
            h = torch.zeros(bucket, self.hidden_size, dtype=dtype, device=dev)
            out = torch.empty(bucket, self.vocab_size, dtype=torch.float32, device=dev)
            captured = _Captured(None, h, out)
            if sampled:
                captured.inv_t = torch.zeros(bucket, dtype=torch.float32, device=dev)
                captured.seeded = torch.zeros(bucket, 1, dtype=torch.bool, device=dev)
                captured.seeded_noise = torch.zeros(
                    bucket, self.n_clusters, dtype=torch.float32, device=dev
                )
            side = torch.cuda.Stream(dev)
            side.wait_stream(torch.cuda.current_stream(dev))
            with torch.cuda.stream(side):
                for _ in range(WARMUP_RUNS):
                    self._step(captured, transform)
            torch.cuda.current_stream(dev).wait_stream(side)
            captured.graph = torch.cuda.CUDAGraph()
            # thread_local: CUDA calls of the server's other threads do not break the capture.
            with torch.cuda.graph(captured.graph, capture_error_mode="thread_local"):
                self._step(captured, transform)
        except Exception as exc:
            self.failed = f"{type(exc).__name__}: {exc}"
            _log.warning(
                "FlashHead: capturing its CUDA graph (batch %d, %s) failed, so FlashHead "
                "launches eagerly from now on (slower, same tokens): %s",
                bucket,
                "sampled" if sampled else "greedy",
                self.failed,
            )
            return None
        self._graphs[key] = captured
        _log.info(
            "FlashHead: captured its CUDA graph for batches of up to %d rows (%s)",
            bucket,
            "sampled" if sampled else "greedy",
        )
        return captured

    def _step(self, c: _Captured, transform: object) -> None:
        """What a graph runs: the noise (sampled graphs) and the head's logits path."""
        noise = None
        if c.inv_t is not None:
            drawn = torch.empty_like(c.seeded_noise).exponential_().log_().neg_()
            noise = torch.where(c.seeded, c.seeded_noise, drawn)
        self._body(c.h, c.inv_t, noise, c.out, transform)

    def _eager(self, key: str, why: str) -> None:
        if key in self.eager_reasons:
            return
        self.eager_reasons.add(key)
        _log.info("FlashHead: %s launches eagerly (no FlashHead CUDA graph)", why)

    def describe(self) -> dict:
        return {
            "buckets": list(self.buckets),
            "captured": [
                {"batch": b, "sampled": s, "dtype": str(d).replace("torch.", "")}
                for b, s, d, _ in self._graphs
            ],
            "failed": self.failed,
            "eager": sorted(self.eager_reasons),
        }
