"""Random numbers and temperatures of sampled rows, for both stages and every backend.

The Gumbel noise is drawn here, in torch, from each row's own generator (or torch's default
one), and handed to the kernels as an input: the torch and Triton paths pick the same tokens,
and a CUDA graph replays with fresh noise in its static input. Temperatures arrive on the host
(the step plan's) and go to the GPU without a device sync.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch


def draw_gumbel(
    n_rows: int,
    width: int,
    temperature: torch.Tensor | None,
    generators: Sequence[torch.Generator | None] | None,
    device: torch.device,
    out: torch.Tensor | None = None,
) -> torch.Tensor | None:
    """[B, width] float32 standard Gumbel noise where a row has T > 0, or None if none has.

    `temperature` lives on the host (the step plan's), so reading it costs no device sync. A
    row with a generator draws from it alone (a seeded request reruns identically); rows
    without one share one draw from torch's default generator on `device`. Greedy rows get
    that shared noise too (or zeros), which every consumer ignores where 1/T is 0: that spares
    an index upload. `out` ([B, width] float32 on `device`), when given, receives the noise."""
    if temperature is None:
        return None
    sampled = (temperature > 0).tolist()
    if not any(sampled):
        return None
    noise = out if out is not None else torch.empty(n_rows, width, device=device)
    seeded = seeded_rows(sampled, generators)
    if len(seeded) < sum(sampled):
        noise.exponential_().log_().neg_()
    else:
        noise.zero_()
    fill_seeded_rows(noise, seeded, generators)
    return noise


def seeded_rows(
    sampled: Sequence[bool], generators: Sequence[torch.Generator | None] | None
) -> list[int]:
    """The sampled rows that have a generator of their own."""
    if generators is None:
        return []
    return [b for b, on in enumerate(sampled) if on and generators[b] is not None]


def fill_seeded_rows(
    noise: torch.Tensor,
    rows: Sequence[int],
    generators: Sequence[torch.Generator | None],
) -> None:
    """Row b of `noise` from generator b alone, for each b in `rows`."""
    width = noise.shape[1]
    for b in rows:
        gen = generators[b]
        if gen.device == noise.device:
            noise[b].exponential_(generator=gen).log_().neg_()
            continue
        # A host generator (the step plan's, per seed and position) for device rows: draw into
        # pinned memory and upload without blocking the host (no sync on the decode path).
        pinned = noise.device.type == "cuda"
        row = torch.empty(width, dtype=torch.float32, pin_memory=pinned)
        row.exponential_(generator=gen).log_().neg_()
        noise[b].copy_(row, non_blocking=pinned)


def inverse_temperature(
    temperature: torch.Tensor | None, n_rows: int, device
) -> torch.Tensor | None:
    if temperature is None:
        return None
    t = torch.as_tensor(temperature, dtype=torch.float32).reshape(-1)
    if t.numel() != n_rows:
        raise ValueError(f"temperature has {t.numel()} entries for {n_rows} rows")
    # 1/T in float32 (both backends multiply by it); T <= 0 means greedy (inv_t = 0).
    inv_t = torch.where(t > 0, 1.0 / t.clamp_min(torch.finfo(torch.float32).tiny), 0.0)
    return to_device(inv_t, device)


def to_device(t: torch.Tensor, device) -> torch.Tensor:
    """`t` on `device`; a host tensor goes to a GPU through pinned memory without blocking the
    host (a plain copy from pageable memory synchronizes the stream)."""
    device = torch.device(device)
    if t.device == device or device.type != "cuda" or t.device.type != "cpu":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)
