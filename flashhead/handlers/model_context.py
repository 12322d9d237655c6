"""The model vLLM is building right now, as FlashHead's logits processor sees it: its path,
its FlashHead config keys, its served name, and the config it is built under."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any


def served_model_name() -> str:
    """The name vLLM's own metrics label the model being built with (``model_name``); "" when
    vLLM has no current config (the caller falls back to the model path)."""
    try:
        from vllm.config import get_current_vllm_config

        model_config = get_current_vllm_config().model_config
    except Exception:
        return ""
    name = getattr(model_config, "served_model_name", None) or getattr(model_config, "model", "")
    if isinstance(name, (list, tuple)):
        name = name[0] if name else getattr(model_config, "model", "")
    return str(name)


def build_context() -> tuple[int | None, bool]:
    """(identity of the VllmConfig being built under, whether it speculates). A processor
    built under the same speculating config as an earlier one of the same model is a drafter's
    (EAGLE / MTP heads are built under the target's config)."""
    try:
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
    except Exception:
        return None, False
    return id(config), getattr(config, "speculative_config", None) is not None


def max_logits_rows() -> int | None:
    """The most rows one logits call of the model being built can have: a row per scheduled
    request (``max_num_seqs``), times one plus its draft tokens under speculative decoding.
    None when vLLM has no current config."""
    try:
        from vllm.config import get_current_vllm_config

        config = get_current_vllm_config()
        seqs = int(config.scheduler_config.max_num_seqs)
    except Exception:
        return None
    spec = getattr(config, "speculative_config", None)
    drafts = int(getattr(spec, "num_speculative_tokens", 0) or 0) if spec is not None else 0
    return seqs * (1 + drafts)


def model_identity() -> tuple[str, Mapping[str, Any]] | None:
    """(model path, FlashHead-relevant config dict) of the model vLLM is building, if any.

    Multimodal configs keep the language model's keys in ``text_config``.
    """
    from vllm.config import get_current_vllm_config

    model_config = get_current_vllm_config().model_config
    if model_config is None:
        return None
    hf_config = model_config.hf_config
    candidates = [hf_config, getattr(hf_config, "text_config", None)]
    text_config = getattr(model_config, "hf_text_config", None)
    if text_config is not None:
        candidates.append(text_config)
    for cfg in candidates:
        if cfg is not None and getattr(cfg, "flash_head_cache_dir", None):
            return str(model_config.model), cfg.to_dict()
    return str(model_config.model), {}


def resolve_model_dir(model: str) -> Path:
    path = Path(model)
    if path.is_dir():
        return path
    # A hub id: only a local snapshot can be used (no download from a worker).
    from huggingface_hub import snapshot_download

    return Path(snapshot_download(model, local_files_only=True))
