"""flashhead.compute_dtype: bf16 only where this machine computes it fast."""

from __future__ import annotations

import torch

from flashhead import compute_dtype


def test_bf16_only_where_the_cpu_has_fast_bf16(monkeypatch):
    for avx512_bf16, amx, want in ((True, False, True), (False, True, True), (False, False, False)):
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda v=avx512_bf16: v)
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda v=amx: v, raising=False)
        compute_dtype.bf16_is_fast.cache_clear()
        assert compute_dtype.bf16_is_fast("cpu") is want
        assert compute_dtype.fast_dtype("cpu") == (torch.bfloat16 if want else torch.float32)
    assert compute_dtype.fast_dtype("cuda") == torch.bfloat16  # GPUs: always fast
    compute_dtype.bf16_is_fast.cache_clear()


def test_test_servers_ask_for_float32_only_where_bf16_is_slow(monkeypatch):
    from tests.helpers import server

    monkeypatch.setattr(compute_dtype, "bf16_is_fast", lambda device="cpu": False)
    assert server.cpu_dtype_args(()) == ("--dtype", "float32")
    assert server.cpu_dtype_args(("--dtype", "bfloat16")) == ()  # the caller's choice stands
    monkeypatch.setattr(compute_dtype, "bf16_is_fast", lambda device="cpu": True)
    assert server.cpu_dtype_args(()) == ()
