"""The sampling and mixed-load checks the parallel e2e modules share: seeded requests repeat,
temperature differs from greedy, and concurrent greedy / seeded / logprobs requests come back
valid."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from helpers.server import VllmServer, run_concurrently


def assert_seeded_repeats_and_mixed_load_valid(
    server: VllmServer, prompts: Sequence[str], n_tokens: int, n_requests: int
) -> None:
    vocab = json.loads((Path(server.model) / "config.json").read_text())["vocab_size"]

    def sample(prompt: str, **params) -> list[int]:
        body = {"max_tokens": n_tokens, "ignore_eos": True, **params}
        return list(server.complete(prompt, **body)["choices"][0]["token_ids"])

    seeded = [sample(p, temperature=0.8, seed=7) for p in prompts[:3]]
    assert [sample(p, temperature=0.8, seed=7) for p in prompts[:3]] == seeded
    assert seeded != [sample(p, temperature=0.0) for p in prompts[:3]]

    def request(i: int) -> dict:
        kind = i % 3
        params: dict = {"max_tokens": 12}
        if kind == 0:
            params.update(temperature=0.0)
        elif kind == 1:
            params.update(temperature=0.9, seed=i)
        else:
            params.update(temperature=0.0, logprobs=2)
        choice = server.complete(prompts[i % len(prompts)], **params)["choices"][0]
        return {"kind": kind, "choice": choice}

    for r in run_concurrently([lambda i=i: request(i) for i in range(n_requests)]):
        ids = r["choice"]["token_ids"]
        assert ids and all(0 <= t < vocab for t in ids), r
        if r["kind"] == 2:
            assert len(r["choice"]["logprobs"]["top_logprobs"]) == len(ids), r
