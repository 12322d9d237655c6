"""Chat calibration: the shipped prompts, the chat prefix, and the hidden states of the model's own
answers (checked against a teacher-forced pass over prompt + answer)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest
import torch

from flashhead.calibration.chat import (
    ANSWER_ATTENTION,
    attention,
    chat_hidden_states,
    chat_prefix,
    chat_prompts,
    uses_chat_template,
)

REPO = Path(__file__).resolve().parents[1]


def _demo_questions() -> list[str]:
    text = (REPO / "scripts" / "demo.py").read_text()
    block = re.search(r"QUESTIONS = (\[.*?\])", text, re.S)
    assert block, "scripts/demo.py no longer lists its questions as `QUESTIONS = [...]`"
    return ast.literal_eval(block.group(1))


def test_prompt_halves_are_disjoint_and_keep_the_demo_held_out():
    cal, ev = chat_prompts("calibration"), chat_prompts("evaluation")
    assert len(cal) >= 120 and len(ev) >= 120
    assert not set(cal) & set(ev)
    assert len(set(cal)) == len(cal)
    # The demo's questions judge FlashHead on chat: none may be calibrated on.
    questions = _demo_questions()
    assert questions and not set(questions) & set(cal)
    with pytest.raises(ValueError, match="calibration or evaluation"):
        chat_prompts("train")


def test_chat_prefix_uses_the_template_or_a_plain_fallback(tiny):
    _, tok = tiny
    plain = tok.decode(chat_prefix(tok, "Name a color."))
    assert "User: Name a color." in plain and plain.rstrip().endswith("Assistant:")
    tok.chat_template = (
        "{% for m in messages %}<|endoftext|>{{ m['role'] }}: {{ m['content'] }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|endoftext|>assistant:{% endif %}"
    )
    try:
        templated = tok.decode(chat_prefix(tok, "Name a color."))
    finally:
        tok.chat_template = None
    assert templated == "<|endoftext|>user: Name a color.\n<|endoftext|>assistant:"
    # A template that refuses a lone user turn falls back to the plain form.
    tok.chat_template = "{{ raise_exception('Conversation roles must alternate') }}"
    try:
        assert not uses_chat_template(tok)
        assert tok.decode(chat_prefix(tok, "Name a color.")) == plain
    finally:
        tok.chat_template = None


@torch.inference_mode()
def test_answer_positions_match_a_teacher_forced_pass(tiny):
    model, tok = tiny
    h = chat_hidden_states(
        model, tok, "calibration", n_tokens=40, max_new_tokens=8, batch=3, progress=False
    )
    assert h.shape == (40, 64) and h.dtype == torch.float32
    w = model.get_output_embeddings().weight.float()
    # Rebuild the first three answers by hand: greedy decode, one prompt at a time.
    rows, offset, grabbed = [], 0, []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, args: grabbed.append(args[0])
    )
    try:
        rebuilt = [
            _greedy_then_teacher_forced(model, tok, p, grabbed)
            for p in chat_prompts("calibration")[:3]
        ]
    finally:
        hook.remove()
    for answer, teacher in rebuilt:
        rows.append(teacher)
        got = h[offset : offset + len(answer)]
        offset += len(answer)
        # Each captured row predicts the next answer token under the dense head.
        assert (got @ w.T).argmax(dim=1).tolist() == answer
    teacher = torch.cat(rows)[: min(40, offset)]
    assert torch.allclose(h[: teacher.shape[0]], teacher, atol=1e-4, rtol=1e-4)


def _greedy_then_teacher_forced(model, tok, prompt, grabbed):
    """Greedy answer (<= 8 tokens), one prompt alone; then the head inputs of one
    teacher-forced pass over prompt + answer at the answer positions."""
    ids = chat_prefix(tok, prompt)
    answer = []
    for _ in range(8):
        nxt = int(model(input_ids=torch.tensor([ids + answer])).logits[0, -1].argmax())
        answer.append(nxt)
        if nxt == tok.eos_token_id:
            break
    grabbed.clear()
    model(input_ids=torch.tensor([ids + answer]))
    return answer, grabbed[-1][0, len(ids) - 1 : len(ids) - 1 + len(answer)]


def test_answers_decode_with_their_attention_and_the_model_gets_its_own_back(tiny):
    model, tok = tiny
    before = model.config._attn_implementation
    assert before != ANSWER_ATTENTION  # the tiny model loads with SDPA, as convert's does
    seen = []
    hook = model.get_output_embeddings().register_forward_pre_hook(
        lambda _m, _a: seen.append(model.config._attn_implementation)
    )
    try:
        chat_hidden_states(
            model, tok, "calibration", n_tokens=8, max_new_tokens=4, batch=2, progress=False
        )
    finally:
        hook.remove()
    assert seen and set(seen) == {ANSWER_ATTENTION}
    assert model.config._attn_implementation == before
    with pytest.raises(RuntimeError, match="inside"):
        with attention(model, ANSWER_ATTENTION):
            raise RuntimeError("inside")
    assert model.config._attn_implementation == before
