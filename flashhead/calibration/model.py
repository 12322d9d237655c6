"""Loading a model folder's body and tokenizer with transformers, offline."""

from __future__ import annotations

import os

import torch


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer) of a FlashHead (or plain HF) model folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=dtype).eval()
    return model, tok
