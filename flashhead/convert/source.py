"""The model `flashhead convert` starts from: a Hugging Face folder or a GGUF file.

`open_source(path)` returns a `SourceModel` that knows the head weight ([V, d], the LM head or the
tied input embedding), the config, the special tokens, and how to put the model's files into the
output folder (`materialize`). An HF folder's weights are hard-linked (copied across devices),
never rewritten; a GGUF file is dequantized by transformers and saved as one safetensors file.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
WEIGHT_INDEXES = ("model.safetensors.index.json", "pytorch_model.bin.index.json")
# Checkpoint names of the output head, then of input embeddings a tied head reuses.
HEAD_KEYS = ("lm_head.weight", "language_model.lm_head.weight", "embed_out.weight")
EMBED_KEY_SUFFIXES = (
    "embed_tokens.weight",
    "wte.weight",
    "word_embeddings.weight",
    "tok_embeddings.weight",
)


class ConvertError(ValueError):
    """Bad `flashhead convert` input; the message names the file and the fix."""


def _env_offline() -> None:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def _text_value(cfg: Mapping, key: str, default: Any = None) -> Any:
    if key in cfg and cfg[key] is not None:
        return cfg[key]
    text = cfg.get("text_config")
    if isinstance(text, Mapping) and text.get(key) is not None:
        return text[key]
    return default


def _ids(value: Any) -> list[int]:
    if isinstance(value, bool) or value is None:
        return []
    if isinstance(value, int):
        return [value]
    if isinstance(value, (list, tuple)):
        return [int(v) for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


def base_architecture(cfg: Mapping, where: Path) -> str:
    archs = cfg.get("architectures")
    if not isinstance(archs, list) or not archs or not isinstance(archs[0], str):
        raise ConvertError(
            f'{where}: architectures: expected a list such as ["LlamaForCausalLM"], found '
            f"{archs!r}. Fix: add the model's transformers class name to config.json"
        )
    arch = archs[0]
    return arch[len("FlashHead") :] if arch.startswith("FlashHead") else arch


def flashhead_architecture(arch: str) -> str:
    """LlamaForCausalLM -> FlashHeadLlamaForCausalLM (vLLM refuses it without the plugin)."""
    return arch if arch.startswith("FlashHead") else f"FlashHead{arch}"


@dataclass
class SourceModel:
    path: Path
    kind: str  # "hf" | "gguf"
    config: dict  # config.json as it will be written (before the FlashHead keys)
    head_weight: torch.Tensor  # [V, d], the source dtype
    special_token_ids: list[int]
    _model: Any = field(default=None, repr=False)  # transformers model (GGUF only)
    _tokenizer: Any = field(default=None, repr=False)

    @property
    def architecture(self) -> str:
        return base_architecture(self.config, self.path)

    def transformers_model(self, dtype: torch.dtype = torch.float32) -> Any:
        """The model as a transformers module (for sampling hidden states)."""
        if self._model is not None:
            return self._model
        _env_offline()
        from transformers import AutoModelForCausalLM

        return AutoModelForCausalLM.from_pretrained(str(self.path), dtype=dtype)

    def tokenizer(self) -> Any:
        if self._tokenizer is None:
            _env_offline()
            from transformers import AutoTokenizer

            self._tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        return self._tokenizer

    def materialize(self, out: Path) -> None:
        """Put weights, tokenizer and generation config into `out` (config.json is the caller's)."""
        if self.kind == "hf":
            _link_or_copy_folder(self.path, out, skip=_flashhead_cache_names(self.config))
        else:
            _save_gguf_model(self._model, self._tokenizer, out)


def _flashhead_cache_names(cfg: Mapping) -> set[str]:
    # Re-converting a FlashHead model must not carry the old clustering along.
    cache = cfg.get("flash_head_cache_dir")
    return {Path(cache).parts[0]} if isinstance(cache, str) and cache else set()


def _link_or_copy_folder(src: Path, out: Path, skip: set[str]) -> None:
    for entry in sorted(src.iterdir()):
        name = entry.name
        if name == "config.json" or name in skip or name.startswith("."):
            continue
        if entry.is_dir():
            continue  # e.g. `original/` checkpoints; vLLM and transformers read the top level
        target = out / name
        if name.endswith(WEIGHT_SUFFIXES) or name in WEIGHT_INDEXES:
            try:
                os.link(entry, target)  # weights are never rewritten: share the bytes
                continue
            except OSError:
                pass
        shutil.copy2(entry, target)


def _checkpoint_keys(folder: Path) -> dict[str, Path]:
    """Tensor name -> file holding it, for safetensors checkpoints (sharded or not)."""
    from safetensors import safe_open

    index = folder / "model.safetensors.index.json"
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (OSError, ValueError, KeyError) as exc:
            raise ConvertError(
                f"{index}: weight_map: unreadable ({exc}). Fix: repair or regenerate the index"
            ) from exc
        return {k: folder / v for k, v in weight_map.items()}
    keys: dict[str, Path] = {}
    for file in sorted(folder.glob("*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            for k in f.keys():
                keys[k] = file
    return keys


def _pick_head_key(keys: Mapping[str, Path], cfg: Mapping, folder: Path) -> str:
    for k in HEAD_KEYS:
        if k in keys:
            return k
    heads = [k for k in keys if k.endswith("lm_head.weight")]
    if heads:
        return heads[0]
    tied = _text_value(cfg, "tie_word_embeddings", True)
    embeds = sorted((k for k in keys if k.endswith(EMBED_KEY_SUFFIXES)), key=len)
    if tied and embeds:
        return embeds[0]
    raise ConvertError(
        f"{folder}: no LM head in the checkpoint (looked for {', '.join(HEAD_KEYS)}"
        + (f" and the tied embedding {', '.join(EMBED_KEY_SUFFIXES)}" if tied else "")
        + "). Fix: point to a causal LM folder with safetensors weights"
    )


def _special_ids(tokenizer: Any, cfg: Mapping, gen_cfg: Mapping, vocab: int) -> list[int]:
    ids: set[int] = set()
    if tokenizer is not None:
        ids.update(int(i) for i in getattr(tokenizer, "all_special_ids", []) or [])
        for attr in ("eos_token_id", "bos_token_id"):
            ids.update(_ids(getattr(tokenizer, attr, None)))
    for source in (cfg, gen_cfg):
        for key in ("eos_token_id", "bos_token_id"):
            ids.update(_ids(_text_value(source, key)))
    return sorted(i for i in ids if 0 <= i < vocab)


def _open_hf(folder: Path) -> SourceModel:
    from safetensors import safe_open

    cfg_path = folder / "config.json"
    if not cfg_path.is_file():
        raise ConvertError(
            f"{cfg_path}: no such file. Fix: point to a Hugging Face model folder (config.json "
            "plus *.safetensors) or to a .gguf file"
        )
    try:
        cfg = json.loads(cfg_path.read_text())
    except (OSError, ValueError) as exc:
        raise ConvertError(f"{cfg_path}: not valid JSON ({exc}). Fix: repair config.json") from exc
    if not isinstance(cfg, dict):
        raise ConvertError(f"{cfg_path}: expected a JSON object. Fix: repair config.json")
    base_architecture(cfg, cfg_path)
    keys = _checkpoint_keys(folder)
    if not keys:
        raise ConvertError(
            f"{folder}: no *.safetensors weights. Fix: convert the checkpoint to safetensors "
            "(pickle .bin files are not read, they can run code)"
        )
    key = _pick_head_key(keys, cfg, folder)
    with safe_open(str(keys[key]), framework="pt") as f:
        weight = f.get_tensor(key)
    gen_path = folder / "generation_config.json"
    gen_cfg = json.loads(gen_path.read_text()) if gen_path.is_file() else {}
    src = SourceModel(path=folder, kind="hf", config=cfg, head_weight=weight, special_token_ids=[])
    try:
        tokenizer = src.tokenizer()
    except Exception:  # no tokenizer files: fall back to the config's ids
        tokenizer = None
    src.special_token_ids = _special_ids(tokenizer, cfg, gen_cfg, weight.shape[0])
    return src


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """transformers builds a fresh `gguf.GGUFReader` for the config, the tokenizer and the
    weights, each parsing the whole vocabulary (2.5-4.6 s for SmolLM2, ~10 s for Gemma-3 on 2
    cores), and a fresh `gguf.get_tensor_name_map` for every module of the model (~400 for
    SmolLM2, ~4 s). Within this block each is built once per argument set and shared: transformers
    only reads them. Both are looked up on the `gguf` module at call time."""
    try:
        import gguf
    except ImportError:
        yield
        return
    originals = {name: getattr(gguf, name, None) for name in ("GGUFReader", "get_tensor_name_map")}
    built: dict[tuple, Any] = {}

    def shared(name: str, make: Any) -> Any:
        def build_once(*args: Any, **kwargs: Any) -> Any:
            key = (name, tuple(os.fspath(a) if isinstance(a, Path) else a for a in args))
            key += tuple(sorted(kwargs.items()))
            try:
                if key not in built:
                    built[key] = make(*args, **kwargs)
                return built[key]
            except TypeError:  # an unhashable argument: build it as transformers would
                return make(*args, **kwargs)

        return build_once

    for name, make in originals.items():
        if make is not None:
            setattr(gguf, name, shared(name, make))
    try:
        yield
    finally:
        for name, make in originals.items():
            if make is not None:
                setattr(gguf, name, make)
        built.clear()


def _open_gguf(file: Path, dtype: torch.dtype) -> SourceModel:
    _env_offline()
    try:
        from transformers import AutoModelForCausalLM, AutoTokenizer
    except ImportError as exc:
        raise ConvertError(
            f"{file}: reading GGUF needs transformers, gguf and accelerate "
            "(pip install 'flashhead[convert]')"
        ) from exc
    try:
        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(file.parent), gguf_file=file.name)
            model = AutoModelForCausalLM.from_pretrained(
                str(file.parent), gguf_file=file.name, dtype=dtype
            )
    except ImportError as exc:
        raise ConvertError(
            f"{file}: {exc}. Fix: pip install gguf accelerate (or 'flashhead[convert]')"
        ) from exc
    except (ValueError, OSError, KeyError) as exc:
        raise ConvertError(
            f"{file}: transformers cannot read this GGUF ({exc}). Fix: use a GGUF of an "
            "architecture transformers supports, or convert from a Hugging Face folder"
        ) from exc
    _restore_special_token_template(tokenizer, file)
    model.eval()
    # The diff against the class defaults, as save_pretrained would write it.
    cfg = json.loads(model.config.to_json_string(use_diff=True))
    cfg.pop("quantization_config", None)  # vLLM would otherwise try GGUF quantization
    cfg["architectures"] = [type(model).__name__]
    cfg.pop("_name_or_path", None)
    weight = model.get_output_embeddings().weight.detach()
    gen_cfg = model.generation_config.to_dict() if model.generation_config is not None else {}
    return SourceModel(
        path=file,
        kind="gguf",
        config=cfg,
        head_weight=weight,
        special_token_ids=_special_ids(tokenizer, cfg, gen_cfg, weight.shape[0]),
        _model=model,
        _tokenizer=tokenizer,
    )


def _gguf_flags(file: Path) -> dict:
    from flashhead.convert.gguf_meta import GGUFMetaError, gguf_scalars

    try:
        return gguf_scalars(file)
    except GGUFMetaError:  # transformers read it, so only our header scan disagrees: flags unset
        return {}


def _restore_special_token_template(tokenizer: Any, file: Path) -> None:
    """transformers' GGUF tokenizer drops `tokenizer.ggml.add_bos_token` (Gemma needs its BOS:
    without it the model degenerates, in vLLM too). Put BOS/EOS back into the post-processor."""
    flags = _gguf_flags(file)
    add_bos = bool(flags.get("tokenizer.ggml.add_bos_token")) and tokenizer.bos_token is not None
    add_eos = bool(flags.get("tokenizer.ggml.add_eos_token")) and tokenizer.eos_token is not None
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if not (add_bos or add_eos) or backend is None:
        return
    ids = tokenizer("a")["input_ids"]
    if (not add_bos or ids[:1] == [tokenizer.bos_token_id]) and (
        not add_eos or ids[-1:] == [tokenizer.eos_token_id]
    ):
        return
    from tokenizers import processors

    pre = f"{tokenizer.bos_token} " if add_bos else ""
    post = f" {tokenizer.eos_token}" if add_eos else ""
    specials = []
    if add_bos:
        specials.append((tokenizer.bos_token, tokenizer.bos_token_id))
    if add_eos and tokenizer.eos_token != tokenizer.bos_token:
        specials.append((tokenizer.eos_token, tokenizer.eos_token_id))
    backend.post_processor = processors.TemplateProcessing(
        single=f"{pre}$A{post}", pair=f"{pre}$A{post} {pre}$B{post}", special_tokens=specials
    )


def _save_gguf_model(model: Any, tokenizer: Any, out: Path) -> None:
    # save_pretrained refuses GGUF-loaded models ("quantized with gguf"), so write by hand.
    from safetensors.torch import save_file

    sd = model.state_dict()
    if getattr(model.config, "tie_word_embeddings", False):
        sd.pop("lm_head.weight", None)  # tied: safetensors refuses shared tensors
    sd = {k: v.detach().contiguous().clone() for k, v in sd.items()}
    save_file(sd, str(out / "model.safetensors"), metadata={"format": "pt"})
    if model.generation_config is not None:
        model.generation_config.to_json_file(str(out / "generation_config.json"))
    tokenizer.save_pretrained(str(out))


def open_source(
    path: str | os.PathLike, *, gguf_dtype: torch.dtype = torch.bfloat16
) -> SourceModel:
    """Open a Hugging Face model folder or a .gguf file. Raises ConvertError on bad input."""
    p = Path(path)
    if not p.exists():
        raise ConvertError(f"{p}: no such file or folder. Fix: check the SRC path")
    if p.is_file():
        if p.suffix.lower() != ".gguf":
            raise ConvertError(
                f"{p}: not a .gguf file. Fix: pass a GGUF file or a Hugging Face model folder"
            )
        return _open_gguf(p, gguf_dtype)
    return _open_hf(p)
