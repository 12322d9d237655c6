"""Log lines the e2e tests look for, and the env that keeps the core head off its dense GEMM."""

from __future__ import annotations

SERVING_LINE = "FlashHead: serving decode steps of"
FLASHHEAD_PATH_LINE = "served (path: flashhead)"
DISPATCHER_DENSE_LINE = "served (path: dense-by-dispatcher)"
# kernels/dispatch.py hands a CPU batch to the dense head once B * K >= 2V; with every cluster
# probed K = V, so exactness runs would test the dense GEMM, not FlashHead. 0 = never dense.
NEVER_DENSE = {"FLASHHEAD_DENSE_MIN_BATCH": "0"}


def assert_flashhead_path_only(log: str) -> None:
    """The FlashHead candidate path served the decode steps, the dispatcher's dense head none."""
    assert SERVING_LINE in log, log[-3000:]
    assert FLASHHEAD_PATH_LINE in log, log[-3000:]
    assert DISPATCHER_DENSE_LINE not in log, log[-3000:]
