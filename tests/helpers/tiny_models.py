"""Tiny local causal LMs for tests: no hub, a few seconds, loadable by transformers and vLLM.

The tokenizer is a byte-level BPE trained with `tokenizers` on local text (the Python standard
library's own sources), so any text round-trips and nothing is downloaded.
"""

from __future__ import annotations

import hashlib
import json
import os
import sysconfig
from collections.abc import Iterator
from pathlib import Path

__all__ = ["ARCHS", "build_tiny_model", "cached_tiny_model", "stdlib_text"]

ARCHS = ("llama", "qwen3")
SPECIAL_TOKENS = ["<|endoftext|>", "<|pad|>"]


def stdlib_text(max_bytes: int = 10_000_000) -> Iterator[str]:
    """Python sources of the standard library, in a fixed order (deterministic training)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    total = 0
    for path in sorted(root.rglob("*.py")):
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        yield text
        total += len(text)
        if total >= max_bytes:
            return


def _train_tokenizer(vocab_size: int, out_dir: Path):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(stdlib_text(), trainer=trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        unk_token="<|endoftext|>",
        pad_token="<|pad|>",
    )
    fast.save_pretrained(out_dir)
    return fast


def build_tiny_model(
    out_dir: str | os.PathLike[str],
    arch: str = "llama",
    vocab_size: int = 32000,
    hidden: int = 128,
    layers: int = 2,
    seed: int = 0,
    *,
    architecture_name: str | None = None,
    max_position_embeddings: int = 1024,
) -> Path:
    """Write a random-weight LlamaForCausalLM / Qwen3ForCausalLM with its tokenizer to `out_dir`.

    ``tie_word_embeddings=False`` (FlashHead needs its own lm_head), bf16 weights. The real
    vocabulary may come out slightly smaller than `vocab_size` if the corpus runs out of merges;
    the model's ``vocab_size`` is the tokenizer's length either way. `architecture_name`
    overrides ``config.architectures`` (e.g. "FlashHeadLlamaForCausalLM").
    """
    import torch
    import transformers

    if arch not in ARCHS:
        raise ValueError(f"arch must be one of {ARCHS}, got {arch!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = _train_tokenizer(vocab_size, out)
    vocab = len(tokenizer)
    heads = max(1, hidden // 32)
    common = dict(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_position_embeddings,
        tie_word_embeddings=False,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    if arch == "llama":
        config = transformers.LlamaConfig(**common)
        model_cls = transformers.LlamaForCausalLM
    else:
        config = transformers.Qwen3Config(**common, head_dim=hidden // heads)
        model_cls = transformers.Qwen3ForCausalLM
    torch.manual_seed(seed)
    model = model_cls(config).to(torch.bfloat16)
    model.save_pretrained(out, safe_serialization=True)
    if architecture_name is not None:
        cfg_path = out / "config.json"
        cfg = json.loads(cfg_path.read_text())
        cfg["architectures"] = [architecture_name]
        cfg_path.write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def cached_tiny_model(cache_root: str | os.PathLike[str], **kwargs) -> Path:
    """`build_tiny_model` once per argument set under `cache_root` (reused across test runs).

    The caller must not modify the returned folder; copy it first (shutil.copytree) if needed.
    """
    key = hashlib.sha256(json.dumps(kwargs, sort_keys=True, default=str).encode()).hexdigest()[:12]
    arch = kwargs.get("arch", "llama")
    target = Path(cache_root) / f"tiny-{arch}-{key}"
    if (target / ".complete").exists():
        return target
    tmp = target.with_name(target.name + f".tmp{os.getpid()}")
    build_tiny_model(tmp, **kwargs)
    (tmp / ".complete").write_text("ok\n")
    try:
        tmp.rename(target)
    except OSError:  # another process won the race: use theirs
        import shutil

        shutil.rmtree(tmp, ignore_errors=True)
    return target
