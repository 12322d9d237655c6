"""Hidden states from the model's own chat answers: the distribution a served model decodes in.

Prose read by teacher forcing is not what a chat server scores. At a decode step the head sees the
hidden state after the model's own previous tokens, inside its chat template. So the model answers
shipped user prompts (`prompts.txt`, split into two disjoint halves like the prose text) greedily
with its dense head, and the head inputs are taken at every position that predicts an answer
token: the last prompt position and the answer itself, up to the end-of-turn token.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

import torch

from flashhead.calibration.progress import Progress
from flashhead.calibration.texts import SPLITS

# Used when the tokenizer has no chat template (e.g. some GGUF exports).
_PLAIN_TEMPLATE = "User: {prompt}\nAssistant:"
_QA_TEMPLATE = "Q: {question}\nA:"
# Every shipped prompt set (129 calibration prompts, 60 questions) decodes as one batch: a CPU
# decode step costs about the same at 32 rows as at 129 (per-call GEMM overhead), and
# transformers' SDPA with a left-padding mask takes its slow path, so the answers are decoded
# with eager attention (SmolLM2: 17 s instead of 25.5 s for the calibration half).
ANSWER_BATCH = 160
ANSWER_ATTENTION = "eager"


@contextmanager
def attention(model: Any, implementation: str) -> Iterator[None]:
    """Run `model` with another transformers attention implementation inside the block (the
    teacher-forced windows stay on SDPA, faster there without padding)."""
    before = getattr(model.config, "_attn_implementation", None)
    switch = getattr(model, "set_attn_implementation", None)
    if before == implementation or before is None or switch is None:
        yield
        return
    try:
        switch(implementation)
    except (ValueError, ImportError):  # an architecture that refuses it: keep its own
        yield
        return
    try:
        yield
    finally:
        switch(before)


def chat_prompts(split: str) -> list[str]:
    """The calibration or evaluation half of the shipped user prompts (every other line)."""
    if split not in SPLITS:
        raise ValueError(f"unknown prompt split {split!r} (use {' or '.join(SPLITS)})")
    text = resources.files("flashhead.calibration").joinpath("prompts.txt").read_text("utf-8")
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    return lines[0::2] if split == "calibration" else lines[1::2]


def chat_prefix(tokenizer: Any, prompt: str, templated: bool | None = None) -> list[int]:
    """Token ids of `prompt` as one user turn, ready for the assistant's answer: the tokenizer's
    chat template, or `User: ...\nAssistant:` where it has none (or its template refuses a
    lone user turn). `templated`: `uses_chat_template(tokenizer)`, if the caller knows it."""
    if uses_chat_template(tokenizer) if templated is None else templated:
        ids = tokenizer.apply_chat_template(
            [{"role": "user", "content": prompt}], add_generation_prompt=True, tokenize=True
        )
        if isinstance(ids, dict) or hasattr(ids, "keys"):  # BatchEncoding in newer transformers
            ids = ids["input_ids"]
        return [int(t) for t in ids]
    ids = tokenizer(_PLAIN_TEMPLATE.format(prompt=prompt), add_special_tokens=True)["input_ids"]
    return [int(t) for t in ids]


def uses_chat_template(tokenizer: Any) -> bool:
    """Whether the tokenizer's own chat template formats a single user turn."""
    if not getattr(tokenizer, "chat_template", None):
        return False
    try:
        tokenizer.apply_chat_template(
            [{"role": "user", "content": "Hi"}], add_generation_prompt=True, tokenize=False
        )
    except Exception:  # a template that raises (jinja errors, role checks): use the plain form
        return False
    return True


def _stop_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for value in (
        getattr(model.generation_config, "eos_token_id", None),
        getattr(tokenizer, "eos_token_id", None),
    ):
        if isinstance(value, int):
            ids.add(value)
        elif isinstance(value, (list, tuple)):
            ids.update(int(v) for v in value)
    return ids


@torch.inference_mode()
def _answer(
    model: Any,
    prefixes: list[list[int]],
    max_new_tokens: int,
    stop: set[int],
    pad: int,
    steps: list[torch.Tensor],
) -> list[list[int]]:
    """Greedy answers (dense head), batched with left padding and a KV cache. The head's pre-hook
    fills `steps` with one [B, d] head input per generated token, so no second pass is needed."""
    width = max(len(p) for p in prefixes)
    ids = torch.full((len(prefixes), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, p in enumerate(prefixes):
        ids[i, width - len(p) :] = torch.tensor(p)
        mask[i, width - len(p) :] = 1
    device = next(model.parameters()).device
    out = model.generate(
        input_ids=ids.to(device),
        attention_mask=mask.to(device),
        max_new_tokens=max_new_tokens,
        do_sample=False,
        num_beams=1,
        pad_token_id=pad,
        eos_token_id=sorted(stop) or None,
        # The answers must be the dense greedy ones, whatever the model's generation_config says.
        temperature=None,
        top_p=None,
        top_k=None,
        repetition_penalty=None,
    )
    answers = []
    for row in out[:, width:].tolist():
        kept = []
        for t in row:
            kept.append(t)
            if t in stop:
                break
        answers.append(kept)
    return answers


def questions() -> list[str]:
    """The shipped held-out questions (`questions.txt`): short factual questions whose answers
    are names, places and numbers. Evaluation-only: convert never reads them."""
    text = resources.files("flashhead.calibration").joinpath("questions.txt").read_text("utf-8")
    return [line.strip() for line in text.splitlines() if line.strip()]


def qa_prefix(tokenizer: Any, question: str) -> list[int]:
    """`Q: ...\nA:` completion form (what a base model without a chat template is asked)."""
    ids = tokenizer(_QA_TEMPLATE.format(question=question), add_special_tokens=True)["input_ids"]
    return [int(t) for t in ids]


@torch.inference_mode()
def answer_hidden_states(
    model: Any,
    tokenizer: Any,
    prefixes: list[list[int]],
    *,
    n_tokens: int = 4096,
    max_new_tokens: int = 64,
    batch: int = ANSWER_BATCH,
    progress: bool = True,
    label: str = "answers",
) -> torch.Tensor:
    """[N, d] float32 head inputs at the answer positions of the model's own greedy answers to
    `prefixes`, N <= n_tokens, prefixes taken in order until n_tokens are reached."""
    stop = _stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id
    if pad is None:
        pad = min(stop) if stop else 0
    steps: list[torch.Tensor] = []

    def grab(_module, args):
        # [B, L, d] at the prefill (or [B, 1, d] when only the last position is kept), then
        # [B, 1, d] per step: the last position predicts the next answer token.
        steps.append(args[0][:, -1].detach().float().cpu())

    handle = model.get_output_embeddings().register_forward_pre_hook(grab)
    collected: list[torch.Tensor] = []
    total = 0
    # About max_new_tokens / 2 positions per prompt; the bar counts prompts.
    expected = min(len(prefixes), max(1, 2 * n_tokens // max(1, max_new_tokens)))
    try:
        with (
            Progress(label, total=expected, enabled=progress) as bar,
            attention(model, ANSWER_ATTENTION),
        ):
            for start in range(0, len(prefixes), batch):
                if total >= n_tokens:
                    break
                group = prefixes[start : start + batch]
                steps.clear()
                answers = _answer(model, group, max_new_tokens, stop, pad, steps)
                h = torch.stack(steps, dim=1)  # [B, steps, d]; step t predicts answer token t
                for i, a in enumerate(answers):
                    collected.append(h[i, : len(a)])
                    total += len(a)
                bar.update(len(group))
    finally:
        handle.remove()
    if not collected:
        raise ValueError("no answers were generated")
    return torch.cat(collected)[:n_tokens]


def chat_hidden_states(
    model: Any,
    tokenizer: Any,
    split: str,
    *,
    n_tokens: int = 4096,
    max_new_tokens: int = 64,
    batch: int = ANSWER_BATCH,
    progress: bool = True,
    label: str = "chat answers",
) -> torch.Tensor:
    """Head inputs at the model's own greedy chat answers to the `split` half of the shipped
    prompts, in its chat template (see `answer_hidden_states`)."""
    templated = uses_chat_template(tokenizer)
    prefixes = [chat_prefix(tokenizer, p, templated) for p in chat_prompts(split)]
    return answer_hidden_states(
        model,
        tokenizer,
        prefixes,
        n_tokens=n_tokens,
        max_new_tokens=max_new_tokens,
        batch=batch,
        progress=progress,
        label=label,
    )


def qa_hidden_states(
    model: Any,
    tokenizer: Any,
    *,
    n_tokens: int = 4096,
    max_new_tokens: int = 48,
    progress: bool = True,
    label: str = "Q/A answers",
) -> torch.Tensor:
    """Head inputs at the model's own greedy answers to the held-out `questions()`, asked in the
    `Q: ...\nA:` completion form (see `answer_hidden_states`)."""
    prefixes = [qa_prefix(tokenizer, q) for q in questions()]
    return answer_hidden_states(
        model,
        tokenizer,
        prefixes,
        n_tokens=n_tokens,
        max_new_tokens=max_new_tokens,
        progress=progress,
        label=label,
    )
