"""Int4 rows: every head row quantized to 4 bits with per-group asymmetric scales.

A second stage-1 representation beside the int8 centroids: scoring each vocabulary row at int4
(groups of 32/64) keeps the dense top-1 token within the top 41 of 49152 on every held-out text
family, where the centroids miss rare tokens.

Layout: `q[i, j]` packs two columns of row i, column j in the low nibble and column j + d/2 in
the high nibble, so a kernel unpacks one packed tile into two contiguous halves of the row. A
group never straddles the halves (the group divides d/2), so each half of a packed tile of
`group` columns has one scale and one zero. `value = q * scale + zero`, q in 0..15.

Only torch here: both backends (`reference`, `triton_ops`) import this module.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

INT4_GROUP_SIZES = (64, 32, 16)  # preferred first; 16 is the smallest K of an NVIDIA tl.dot
_BLOCK_ELEMENTS = 1 << 22  # rows per block * d: ~16 MB per fp32 temporary (not 4 x 670 MB)


@dataclass
class Int4Rows:
    """[n, d] rows at int4, groups of `group` columns with a float32 scale and zero each."""

    q: torch.Tensor  # [n, d // 2] uint8: low nibble = column j, high nibble = column j + d//2
    scale: torch.Tensor  # [n, G] float32, G = d // group
    zero: torch.Tensor  # [n, G] float32; value = q * scale + zero, q in 0..15 (asymmetric)
    group: int

    def __post_init__(self) -> None:
        if self.q.dim() != 2 or self.q.dtype != torch.uint8:
            raise ValueError(f"q must be 2-D uint8, got {self.q.dtype} {list(self.q.shape)}")
        d = self.hidden_size
        if self.group <= 0 or (d // 2) % self.group:
            raise ValueError(f"group {self.group} must divide d/2 = {d // 2}")
        want = (self.n_rows, d // self.group)
        for name in ("scale", "zero"):
            t = getattr(self, name)
            if tuple(t.shape) != want or t.dtype != torch.float32:
                raise ValueError(
                    f"{name} must be float32 {list(want)}, got {t.dtype} {list(t.shape)}"
                )

    @property
    def n_rows(self) -> int:
        return int(self.q.shape[0])

    @property
    def hidden_size(self) -> int:
        return 2 * int(self.q.shape[1])

    @property
    def n_groups(self) -> int:
        return self.hidden_size // self.group

    def slice(self, start: int, stop: int) -> Int4Rows:
        """Rows start..stop-1 (views, no copy)."""
        return Int4Rows(
            self.q[start:stop], self.scale[start:stop], self.zero[start:stop], self.group
        )

    def to(self, device: torch.device | str) -> Int4Rows:
        return Int4Rows(self.q.to(device), self.scale.to(device), self.zero.to(device), self.group)


def int4_group_size(d: int) -> int:
    """The largest of 64, 32, 16 that divides d // 2, so that no group straddles the two
    nibble halves of a packed row."""
    if d > 0 and d % 2 == 0:
        for group in INT4_GROUP_SIZES:
            if (d // 2) % group == 0:
                return group
    raise ValueError(
        f"int4 rows need an even hidden size whose half is a multiple of 16 "
        f"(groups of {', '.join(map(str, INT4_GROUP_SIZES))} must not straddle the nibble "
        f"halves); got d={d}"
    )


def _rows_per_block(d: int) -> int:
    return max(1, _BLOCK_ELEMENTS // max(1, d))


def quantize_int4_rows(w: torch.Tensor, group: int | None = None) -> Int4Rows:
    """Quantize every row of `w` [n, d] to int4, per (row, group): lo = min, hi = max,
    scale = (hi - lo) / 15, q = round((w - lo) / scale) clamped to 0..15, zero = lo.

    A group whose values are all equal gets scale 1 and q 0, so it dequantizes to lo exactly.
    Computed in float32 on w's device, in blocks of rows."""
    if w.dim() != 2:
        raise ValueError(f"w must be 2-D [n, d], got {list(w.shape)}")
    n, d = w.shape
    if group is None:
        group = int4_group_size(d)
    elif group <= 0 or d % 2 or (d // 2) % group:
        raise ValueError(f"group {group} must divide d/2 (d={d})")
    half, n_groups = d // 2, d // group
    q = torch.empty(n, half, dtype=torch.uint8, device=w.device)
    scale = torch.empty(n, n_groups, dtype=torch.float32, device=w.device)
    zero = torch.empty_like(scale)
    step = _rows_per_block(d)
    for start in range(0, n, step):
        stop = min(n, start + step)
        x = w[start:stop].float().reshape(stop - start, n_groups, group)
        lo = x.amin(dim=2, keepdim=True)
        hi = x.amax(dim=2, keepdim=True)
        s = (hi - lo) / 15
        s = torch.where(s > 0, s, torch.ones_like(s))  # constant group: q = 0, value = lo
        # Out of place first: for a float32 `w`, `x` may be a view of the caller's weights.
        codes = (x - lo).div_(s).round_().clamp_(0, 15).to(torch.uint8)
        codes = codes.view(stop - start, d)
        q[start:stop] = codes[:, :half] | (codes[:, half:] << 4)
        scale[start:stop] = s.view(stop - start, n_groups)
        zero[start:stop] = lo.view(stop - start, n_groups)
    return Int4Rows(q, scale, zero, group)


def unpack_int4(q: torch.Tensor) -> torch.Tensor:
    """[n, d] uint8 codes 0..15 from the packed [n, d // 2] (low nibbles first, then high)."""
    return torch.cat([q & 15, q >> 4], dim=1)


def dequantize_int4_rows(rows: Int4Rows, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[n, d] values `q * scale + zero` (computed in float32, returned in `dtype`)."""
    n, d, group = rows.n_rows, rows.hidden_size, rows.group
    out = torch.empty(n, d, dtype=dtype, device=rows.q.device)
    step = _rows_per_block(d)
    for start in range(0, n, step):
        stop = min(n, start + step)
        codes = unpack_int4(rows.q[start:stop]).float().view(stop - start, -1, group)
        val = codes * rows.scale[start:stop, :, None] + rows.zero[start:stop, :, None]
        out[start:stop] = val.view(stop - start, d)
    return out


__all__ = [
    "INT4_GROUP_SIZES",
    "Int4Rows",
    "dequantize_int4_rows",
    "int4_group_size",
    "quantize_int4_rows",
    "unpack_int4",
]
