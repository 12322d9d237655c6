"""Hidden states at the LM head's input, from a transformers model run over real text.

The head itself is skipped: a pre-hook on the output embedding records its input and stops the
forward pass, so a 262k-token head costs nothing here (it dominates Gemma-3-270M's forward).
"""

from __future__ import annotations

from typing import Any

import torch

from flashhead.calibration.progress import Progress


class _Captured(Exception):
    pass


def token_windows(tokenizer: Any, text: str, n_tokens: int, window: int) -> list[list[int]]:
    """`window`-token pieces of `text` (each starting with BOS when the model has one), at most
    `n_tokens` tokens in all, spread evenly over the whole text: a family's text is a series of
    documents (topics, modules, READMEs), and the first few alone would stand for all of them."""
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    body = window - (1 if bos is not None else 0)
    pieces = [ids[start : start + body] for start in range(0, len(ids), body)]
    pieces = [p for p in pieces if len(p) >= min(16, body)]
    if not pieces:
        raise ValueError("the text is too short: it gives no token window")
    wanted = max(1, -(-n_tokens // window))
    if len(pieces) > wanted:
        pieces = [pieces[i * len(pieces) // wanted] for i in range(wanted)]
    return [([bos] if bos is not None else []) + p for p in pieces]


@torch.inference_mode()
def sample_hidden_states(
    model: Any,
    tokenizer: Any,
    text: str,
    *,
    n_tokens: int = 8192,
    window: int = 512,
    batch: int = 8,
    progress: bool = True,
    label: str = "hidden states",
) -> torch.Tensor:
    """[N, d] float32 inputs of the LM head, N <= n_tokens, from teacher-forced windows."""
    head = model.get_output_embeddings()
    grabbed: list[torch.Tensor] = []

    def grab(_module, args):
        grabbed.append(args[0].detach().float().reshape(-1, args[0].shape[-1]))
        raise _Captured

    windows = token_windows(tokenizer, text, n_tokens, window)
    handle = head.register_forward_pre_hook(grab)
    device = next(model.parameters()).device
    try:
        with Progress(label, total=len(windows), enabled=progress) as bar:
            for start in range(0, len(windows), batch):
                group = windows[start : start + batch]
                width = max(len(w) for w in group)
                ids = torch.zeros(len(group), width, dtype=torch.long)
                mask = torch.zeros(len(group), width, dtype=torch.long)
                for i, w in enumerate(group):
                    ids[i, : len(w)] = torch.tensor(w)
                    mask[i, : len(w)] = 1
                try:
                    model(input_ids=ids.to(device), attention_mask=mask.to(device), use_cache=False)
                except _Captured:
                    pass
                h = grabbed.pop().reshape(len(group), width, -1)
                grabbed.append(h[mask.bool()])  # drop padding positions
                bar.update(len(group))
    finally:
        handle.remove()
    return torch.cat(grabbed)[:n_tokens].cpu()
