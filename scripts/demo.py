#!/usr/bin/env python3
"""The demo's serving part (scripts/demo.sh builds the venv and the model first).

    python scripts/demo.py MODEL_DIR --flashhead PATH/TO/flashhead [--chat] [--tokens 48]

1. Two servers side by side on the same folder: FlashHead and dense (FLASHHEAD_ENABLED=0). The
   same greedy questions go to both servers at once, and to each one at a time (a bf16 CPU
   model's own greedy answers change with what shares the batch); the answers are printed side
   by side. The questions ask FlashHead for the shadow check on their rows
   (`"vllm_xargs": {"flashhead_shadow": 1}`): the dense head scores each of them too.
2. `flashhead doctor --url` on the FlashHead server: its rows by path and the shadow
   agreement for exactly these requests, and the doctor for the model folder.
3. Decode tokens/s at batch 1 and 8: on the dense server, then on the FlashHead server (the
   timing requests do not ask for the shadow check, which scores every row twice).
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
sys.path.insert(0, str(REPO / "scripts"))

from bench_e2e import PROMPTS, measure  # noqa: E402
from helpers.server import VllmServer, run_concurrently, start_all  # noqa: E402

# Chosen before any run, and kept: the last three ask for rare words (a mountain, a city, a
# novelist), where a FlashHead miss would change a fact. Earlier probe rules changed two of
# them ("Mount Kilimanjaro" -> "Mount Kenya", "Herman Melville" -> "Captain Jeb Stuart").
QUESTIONS = [
    "What is the capital of France?",
    "Give me three tips for staying focused while studying.",
    "What is the tallest mountain in Africa?",
    "What is the capital of Australia?",
    "Who wrote Moby-Dick?",
]
BATCHES = [1, 8]
LOGS = Path("/tmp")


def ask(server: VllmServer, question: str, chat: bool, tokens: int, shadow: bool = False) -> str:
    # The shadow check on this request's rows: a FlashHead server compares each with the dense
    # head (and counts it on /metrics); a dense server ignores it.
    extra = {"vllm_xargs": {"flashhead_shadow": 1}} if shadow else {}
    if chat:
        r = server.post(
            "/v1/chat/completions",
            {"messages": [{"role": "user", "content": question}], "max_tokens": tokens,
             "temperature": 0, **extra},
        )  # fmt: skip
        return r["choices"][0]["message"]["content"].strip()
    # A base model without a chat template (Gemma-3-270M's GGUF): the Q:/A: form of
    # `flashhead eval --answers`, up to the end of the answer's line.
    r = server.complete(
        f"Q: {question}\nA:", max_tokens=tokens, temperature=0, stop=["\n"], **extra
    )
    return r["choices"][0]["text"].strip()


def started(label: str, server: VllmServer) -> None:
    server.bench_prompts = PROMPTS  # the decode-rate prompts of scripts/bench_e2e.py
    print(f"  {label}: vllm serve {server.name} on {server.url} (log {server.log_path})")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--flashhead", required=True, help="the venv's flashhead CLI")
    ap.add_argument("--chat", action="store_true", help="ask through the chat template")
    ap.add_argument("--tokens", type=int, default=48, help="greedy tokens per answer")
    ap.add_argument("--bench-tokens", type=int, default=48)
    args = ap.parse_args()
    t0 = time.monotonic()

    flash = VllmServer(args.model, LOGS / "flashhead-demo-flashhead.log")
    dense = VllmServer(
        args.model, LOGS / "flashhead-demo-dense.log", env={"FLASHHEAD_ENABLED": "0"}
    )
    print("\n--- starting two servers on the same folder", flush=True)
    started("FlashHead                  ", flash)
    started("dense, FLASHHEAD_ENABLED=0 ", dense)
    rates: dict[str, dict[int, float]] = {}
    # The doctor imports vLLM (tens of seconds on 2 cores): it runs while the servers start.
    doctor = subprocess.Popen(
        [args.flashhead, "doctor", "--model", str(args.model)],
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    try:
        start_all([flash, dense])
        flash_answers, dense_answers = run_concurrently(
            [
                lambda: [ask(flash, q, args.chat, args.tokens, shadow=True) for q in QUESTIONS],
                lambda: [ask(dense, q, args.chat, args.tokens) for q in QUESTIONS],
            ]
        )
        answers = list(zip(QUESTIONS, flash_answers, dense_answers))
        # Logged at the first decode step FlashHead serves, so only after a request.
        line = next(
            (x for x in flash.log().splitlines() if "FlashHead: serving decode steps" in x), None
        )
        print(f"\nserver log: {line.strip() if line else 'FlashHead did NOT serve decode steps'}")
        print("\n--- the same greedy questions, FlashHead and dense side by side")
        for q, flash_answer, plain in answers:
            print(f"\nQ: {q}  [{'identical' if flash_answer == plain else 'DIFFERENT'}]")
            print(f"  FlashHead: {flash_answer}")
            print(f"  dense:     {plain}")
        same = sum(f == d for _, f, d in answers)
        print(f"\n{same}/{len(answers)} answers identical to the dense head's")

        print("\n--- what the FlashHead server counted for these requests", flush=True)
        time.sleep(0.6)  # the worker writes its counters every 0.25 s
        subprocess.run([args.flashhead, "doctor", "--url", flash.url], check=False)
        print("\n--- flashhead doctor --model", flush=True)
        print(doctor.communicate()[0], end="", flush=True)

        print(f"\n--- decode tokens/s at batch {BATCHES} (dense first)", flush=True)
        rates["dense"] = rate_of(measure(dense, BATCHES, args.bench_tokens, 2))
        dense.stop()
        rates["flashhead"] = rate_of(measure(flash, BATCHES, args.bench_tokens, 2))
    finally:
        for server in (flash, dense):
            server.stop()
        if doctor.poll() is None:
            doctor.kill()

    print("\n--- decode tokens/s (this machine; +-20 % run to run when it is busy)")
    print(f"  {'batch':<8}{'FlashHead':>12}{'dense':>12}{'FlashHead / dense':>20}")
    for b in BATCHES:
        f, d = rates["flashhead"][b], rates["dense"][b]
        print(f"  {b:<8}{f:>12.1f}{d:>12.1f}{f / d:>19.2f}x")
    print(f"\ndemo serving part: {time.monotonic() - t0:.0f} s")
    return 0


def rate_of(res: dict) -> dict[int, float]:
    return {b: res[b]["decode_tok_s"] for b in res}


if __name__ == "__main__":
    sys.exit(main())
