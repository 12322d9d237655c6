#!/usr/bin/env python3
"""What counting FlashHead's rows for /metrics costs in real vLLM decode steps.

    python scripts/bench_counting.py MODEL_DIR [--tokens 128] [--rounds 8]

Two servers cannot resolve 1 % on a busy 2-core machine (they differ by more than that from run
to run), so this runs one vLLM engine in this process (VLLM_ENABLE_V1_MULTIPROCESSING=0) and
alternates, round after round in A B B A order, greedy batch-1 decoding with the counting call
in place and with it replaced by a no-op, and times the counting call inside the steps. Decode rate per round: (long - short) tokens over
(t_long - t_short), which cancels prefill and scheduling. Prints the median rate each way, the
ratio, and the spread of the ratio over round pairs. FLASHHEAD_SHADOW is left as the
environment sets it (0 by default: counting only).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

SHORT = 16
PROMPTS = ["The history of the printing press", "def quicksort(xs):", "Once upon a time,"]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--rounds", type=int, default=8, help="rounds each way (even: A B B A ...)")
    args = ap.parse_args()
    if not (args.model / "config.json").is_file():
        ap.error(f"{args.model}/config.json: not found (pass a FlashHead model folder)")
    if args.tokens <= SHORT:
        ap.error(f"--tokens must be > {SHORT}")
    os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
    os.environ.setdefault("VLLM_CPU_KVCACHE_SPACE", "1")

    from vllm import LLM, SamplingParams

    import flashhead.handlers.logits as logits_handler

    llm = LLM(str(args.model), enforce_eager=True, max_model_len=512, seed=0)
    real = logits_handler.count_and_shadow
    calls = {"on": 0, "seconds": 0.0}

    def counting(*a, **k):
        t0 = time.perf_counter()
        try:
            return real(*a, **k)
        finally:
            calls["seconds"] += time.perf_counter() - t0
            calls["on"] += 1

    def no_op(*a, **k):
        return None

    def timed(n: int, prompt: str) -> float:
        params = SamplingParams(max_tokens=n, temperature=0.0, ignore_eos=True)
        t0 = time.perf_counter()
        out = llm.generate([prompt], params, use_tqdm=False)
        dt = time.perf_counter() - t0
        if len(out[0].outputs[0].token_ids) != n:
            raise RuntimeError(f"asked for {n} tokens, got {len(out[0].outputs[0].token_ids)}")
        return dt

    def rate(mode: str, prompt: str) -> float:
        logits_handler.count_and_shadow = counting if mode == "on" else no_op
        try:
            t_short = timed(SHORT, prompt)
            t_long = timed(args.tokens, prompt)
        finally:
            logits_handler.count_and_shadow = real
        return (args.tokens - SHORT) / max(t_long - t_short, 1e-9)

    rate("on", PROMPTS[0])  # warm-up (first-call packing, allocator)
    calls.update(on=0, seconds=0.0)
    on_seconds = 0.0
    rates: dict[str, list[float]] = {"on": [], "off": []}
    order = ["on", "off", "off", "on"]
    for r in range(args.rounds * 2):
        mode = order[r % 4]
        t0 = time.perf_counter()
        rates[mode].append(rate(mode, PROMPTS[(r // 2) % len(PROMPTS)]))
        if mode == "on":
            on_seconds += time.perf_counter() - t0
    if calls["on"] == 0:
        print("FlashHead did not serve this model's decode steps: nothing was counted")
        return 1
    on, off = statistics.median(rates["on"]), statistics.median(rates["off"])
    pairs = [a / b for a, b in zip(rates["on"], rates["off"])]
    print(f"model {args.model}, batch 1, {args.tokens} tokens, {args.rounds} rounds each way")
    print(
        f"  counting on : {on:7.2f} tok/s (median; all {', '.join(f'{x:.1f}' for x in rates['on'])})"
    )
    print(
        f"  counting off: {off:7.2f} tok/s (median; all {', '.join(f'{x:.1f}' for x in rates['off'])})"
    )
    print(
        f"  on / off: {on / off:.4f} (round pairs: min {min(pairs):.3f}, median "
        f"{statistics.median(pairs):.3f}, max {max(pairs):.3f}); {calls['on']} counted calls"
    )
    # The counting call timed inside the real decode steps (the writer thread, which runs only
    # after a change, shows in the rates above, not here).
    per_call = calls["seconds"] / calls["on"] * 1e6
    print(
        f"  the counting call itself: {per_call:.1f} us per logits call, "
        f"{calls['seconds'] / on_seconds:.3%} of the counted rounds' time"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
