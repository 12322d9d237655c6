"""Run ``vllm.LLM`` on one model and write its outputs as JSON (used in a subprocess).

    python _offline_run.py MODEL OUT.json [--max-tokens N] [--warmup-tokens N]

Requests (all in one ``generate`` call each): greedy prompts, seeded sampled prompts twice,
and greedy prompts with logprobs. ``--warmup-tokens`` first sends the greedy prompts for that
many tokens (traffic for the shadow guard to judge); their outputs are not kept. The JSON also
holds FlashHead's counters as ``/metrics`` would show them (``flashhead_metrics``).
"""

from __future__ import annotations

import argparse
import json

PROMPTS = ["def foo(x):", "import os\nimport sys", "class Point:", "for i in range(10):"]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("out")
    ap.add_argument("--max-tokens", type=int, default=12)
    ap.add_argument("--prompts", type=int, default=len(PROMPTS))
    ap.add_argument("--warmup-tokens", type=int, default=0)
    args = ap.parse_args()

    from vllm import LLM, SamplingParams

    llm = LLM(
        model=args.model,
        enforce_eager=True,
        max_model_len=256,
        max_num_seqs=4,
        dtype="float32",
    )
    n = args.max_tokens
    prompts = PROMPTS[: args.prompts]

    def ids(outputs):
        return [list(o.outputs[0].token_ids) for o in outputs]

    if args.warmup_tokens:
        llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=args.warmup_tokens))
    greedy = ids(llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=n)))
    seeded_params = [
        SamplingParams(temperature=0.8, top_p=0.9, top_k=50, seed=10 + i, max_tokens=n)
        for i in range(len(prompts))
    ]
    seeded = ids(llm.generate(prompts, seeded_params))
    seeded_again = ids(llm.generate(prompts[::-1], seeded_params[::-1]))[::-1]
    lp_out = llm.generate(prompts[:2], SamplingParams(temperature=0.0, max_tokens=4, logprobs=3))
    logprobs = [
        [{str(t): lp.logprob for t, lp in step.items()} for step in o.outputs[0].logprobs]
        for o in lp_out
    ]
    counters = _flashhead_counters()
    with open(args.out, "w") as f:
        json.dump(
            {
                "greedy": greedy,
                "seeded": seeded,
                "seeded_again": seeded_again,
                "logprob_ids": ids(lp_out),
                "logprobs": logprobs,
                "flashhead_metrics": counters,
            },
            f,
        )


def _flashhead_counters() -> dict:
    import time

    from flashhead import metrics

    directory = metrics.metrics_dir()
    if not directory:
        return {}
    time.sleep(3 * metrics.FLUSH_INTERVAL_S)  # the engine process writes on its own clock
    return metrics.read_directory(directory)


if __name__ == "__main__":
    main()
