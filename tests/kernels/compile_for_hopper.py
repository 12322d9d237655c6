"""Compile every FlashHead Triton kernel for an H100/H200 (sm_90) without a GPU.

The interpreter runs the kernels' Python, not Triton's compiler, so a kernel can pass every
interpreted test and still fail to compile on a GPU (a reassigned constexpr did once). Run as a
subprocess (TRITON_INTERPRET must be off when the kernels are decorated): prints one line per
compiled variant, exits 1 on the first compile error. Uses Triton's bundled ptxas.
"""

from __future__ import annotations

import os
import sys

os.environ["TRITON_INTERPRET"] = "0"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from flashhead.kernels import triton_ops as t  # noqa: E402

TARGET = GPUTarget("cuda", 90, 32)


def variants():
    keys = {"keys_ptr": "*fp32", "out_ptr": "*i64", "C": "i32", "P": "i32", "N_SPECIAL": "i32"}
    keys |= {"stride_k": "i32", "stride_o": "i32", "BLOCK": "constexpr", "BLOCK_S": "constexpr"}
    for kernel in (t._select_kernel, t._select_radix_kernel):
        for block, warps in ((8192, 16), (65536, 16), (64, 4)):
            yield kernel, keys, {"BLOCK": block, "BLOCK_S": 16}, warps
    for h in ("*bf16", "*fp32"):
        sig = {"h_ptr": h, "q_ptr": "*i8", "scale_ptr": "*fp32", "invt_ptr": "*fp32"}
        sig |= {"noise_ptr": "*fp32", "out_ptr": "*fp32", "B": "i32", "C": "i32", "D": "i32"}
        sig |= {"stride_h": "i32", "stride_q": "i32", "stride_n": "i32", "stride_o": "i32"}
        sig |= {k: "constexpr" for k in ("HAS_NOISE", "BLOCK_B", "BLOCK_C", "BLOCK_D", "DOT_MODE")}
        for noise in (False, True):
            const = {"HAS_NOISE": noise, "BLOCK_B": 16, "BLOCK_C": 32, "BLOCK_D": 256}
            yield t._probe_keys_kernel, sig, const | {"DOT_MODE": 1 if h == "*bf16" else 2}, 4
    ptrs = ("h_ptr", "wc_ptr", "slot_ids_ptr", "slot_home_ptr", "probes_ptr", "invt_ptr")
    ptrs += ("noise_ptr", "scores_ptr", "best_ptr", "count_ptr", "tokens_ptr", "logits_ptr")
    types = ("*bf16", "*bf16", "*i32", "*i32", "*i64", "*fp32", "*fp32", "*fp32", "*i64", "*i32")
    sig = dict(zip(ptrs, types + ("*i64", "*fp32"), strict=True))
    for name in ("N_PROG", "D", "P", "P_REG", "stride_h", "stride_w", "stride_p", "stride_n"):
        sig[name] = "i32"
    sig |= {"stride_s": "i32", "stride_l": "i32", "logit_scale": "fp32", "soft_cap": "fp32"}
    flags = ("HAS_SPECIAL", "HAS_NOISE", "WANT_SCORES", "WANT_BEST", "WANT_LOGITS")
    sig |= {k: "constexpr" for k in ("S", "SP", "ROWS", "BLOCK_D", "BLOCK_PR", *flags)}
    sig |= {"HAS_SOFTCAP": "constexpr", "HAS_SCALE": "constexpr"}
    base = {"S": 16, "SP": 16, "ROWS": 4, "BLOCK_D": 1024, "BLOCK_PR": 256, "HAS_SPECIAL": True}
    modes = {
        "tokens": dict(HAS_NOISE=True, WANT_SCORES=False, WANT_BEST=True, WANT_LOGITS=False),
        "scores": dict(HAS_NOISE=False, WANT_SCORES=True, WANT_BEST=False, WANT_LOGITS=False),
        "logits": dict(HAS_NOISE=False, WANT_SCORES=False, WANT_BEST=False, WANT_LOGITS=True),
    }
    for mode in modes.values():
        const = base | mode | {"HAS_SOFTCAP": mode["WANT_LOGITS"], "HAS_SCALE": mode["WANT_LOGITS"]}
        yield t._candidates_kernel, sig, const, 4


def main() -> int:
    for kernel, sig, const, warps in variants():
        name = kernel.__name__ if hasattr(kernel, "__name__") else kernel.fn.__name__
        src = ASTSource(kernel, sig, constexprs=const)
        try:
            compiled = triton.compile(src, target=TARGET, options={"num_warps": warps})
        except Exception as exc:
            print(f"FAILED {name} {const}: {type(exc).__name__}: {exc}")
            return 1
        print(f"ok {name} {const} shared={compiled.metadata.shared}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
