"""Loading a model folder's body and tokenizer with transformers, offline."""

from __future__ import annotations

import os

import torch


def load_model(model_dir: str | os.PathLike, dtype: torch.dtype = torch.float32):
    """(transformers model, tokenizer) of a FlashHead (or plain HF) model folder, offline."""
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(
        str(model_dir), dtype=dtype, **_no_hub_kernels()
    ).eval()
    return model, tok


def _no_hub_kernels() -> dict[str, bool]:
    """transformers >= 5.25 swaps layers for Hugging Face hub kernels by default, fetched from
    the hub at load time; calibration runs offline on the plain layers. Older releases have no
    such default, and those before 4.52 reject the argument."""
    import transformers
    from packaging.version import Version

    return {"use_kernels": False} if Version(transformers.__version__) >= Version("5") else {}
