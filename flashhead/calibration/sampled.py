"""Hidden states from text the model writes itself: free sampling at temperature 1.

Shipped text and shipped prompts cover what their authors thought of. The model's own samples
cover its own distribution, names, numbers, code, markup and all, with no data set: each sequence
starts from BOS and one random vocabulary token (so starts are spread over the whole vocabulary,
rare tokens included) and continues at temperature 1 with no top-k or top-p. The head inputs of
every sampled position are kept. Calibration and evaluation draw from different seeds.
"""

from __future__ import annotations

from typing import Any

import torch

from flashhead.calibration.progress import Progress
from flashhead.calibration.texts import SPLITS

_SEEDS = {"calibration": 0, "evaluation": 1}


def _start_tokens(tokenizer: Any, vocab: int, n: int, generator: torch.Generator) -> torch.Tensor:
    special = set(int(t) for t in getattr(tokenizer, "all_special_ids", []) or [])
    out = []
    while len(out) < n:
        for t in torch.randint(0, vocab, (2 * n,), generator=generator).tolist():
            if t not in special and len(out) < n:
                out.append(t)
    return torch.tensor(out, dtype=torch.long)


@torch.inference_mode()
def sampled_hidden_states(
    model: Any,
    tokenizer: Any,
    split: str,
    *,
    n_tokens: int = 4096,
    length: int = 64,
    batch: int = 64,
    progress: bool = True,
    label: str = "own samples",
) -> torch.Tensor:
    """[N, d] float32 head inputs at every sampled position, N = n_tokens (or fewer for a model
    that cannot generate `length` tokens)."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r} (use {' or '.join(SPLITS)})")
    head = model.get_output_embeddings()
    vocab = int(head.weight.shape[0])
    bos = getattr(tokenizer, "bos_token_id", None)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    generator = torch.Generator().manual_seed(_SEEDS[split])
    device = next(model.parameters()).device
    steps: list[torch.Tensor] = []

    def grab(_module, args):
        steps.append(args[0][:, -1].detach().float().cpu())

    handle = head.register_forward_pre_hook(grab)
    collected: list[torch.Tensor] = []
    total = 0
    batch = max(1, min(batch, -(-n_tokens // length)))
    rounds = -(-n_tokens // (batch * length))
    try:
        with Progress(label, total=rounds, enabled=progress) as bar:
            for r in range(rounds):
                starts = _start_tokens(tokenizer, vocab, batch, generator)[:, None]
                ids = (
                    starts if bos is None else torch.cat([torch.full_like(starts, bos), starts], 1)
                )
                steps.clear()
                # The sampling noise must not depend on (or disturb) the caller's global RNG.
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(_SEEDS[split] * 1_000_003 + r)
                    model.generate(
                        input_ids=ids.to(device),
                        attention_mask=torch.ones_like(ids).to(device),
                        max_new_tokens=length,
                        min_new_tokens=length,
                        do_sample=True,
                        temperature=1.0,
                        top_k=0,
                        top_p=1.0,
                        min_p=None,
                        repetition_penalty=None,
                        pad_token_id=pad,
                    )
                h = torch.stack(steps, dim=1)  # [B, steps, d]
                collected.append(h.reshape(-1, h.shape[-1]))
                total += h.shape[0] * h.shape[1]
                bar.update(1)
    finally:
        handle.remove()
    return torch.cat(collected)[:n_tokens]
