"""`flashhead convert` from a GGUF file: a tiny Llama GGUF written here with the `gguf` package
(F32 tensors, byte-level BPE tokenizer, tied head), read back through transformers."""

from __future__ import annotations

import json
import os
from pathlib import Path

import gguf
import pytest
import torch
from helpers.tiny_models import cached_tiny_model
from safetensors import safe_open

from flashhead.assets import load_assets
from flashhead.convert import ConvertOptions, convert

V, D, LAYERS, HEADS, KV_HEADS, FF = 1024, 64, 2, 2, 1, 128


def write_tiny_gguf(path: Path, tokenizer_dir: Path, seed: int = 0) -> dict[str, torch.Tensor]:
    """A 2-layer Llama with a tied head as GGUF; returns its tensors by GGUF name."""
    tok = json.loads((tokenizer_dir / "tokenizer.json").read_text())
    vocab = tok["model"]["vocab"]
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    assert len(tokens) == V
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {a["content"]: a["id"] for a in tok["added_tokens"]}

    g = torch.Generator().manual_seed(seed)

    def rand(*shape: int, scale: float = 0.05) -> torch.Tensor:
        return torch.randn(*shape, generator=g) * scale

    head_dim = D // HEADS
    tensors = {"token_embd.weight": rand(V, D, scale=1.0), "output_norm.weight": torch.ones(D)}
    for i in range(LAYERS):
        b = f"blk.{i}."
        tensors.update(
            {
                b + "attn_norm.weight": torch.ones(D),
                b + "ffn_norm.weight": torch.ones(D),
                b + "attn_q.weight": rand(D, D),
                b + "attn_k.weight": rand(KV_HEADS * head_dim, D),
                b + "attn_v.weight": rand(KV_HEADS * head_dim, D),
                b + "attn_output.weight": rand(D, D),
                b + "ffn_gate.weight": rand(FF, D),
                b + "ffn_up.weight": rand(FF, D),
                b + "ffn_down.weight": rand(D, FF),
            }
        )
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny")
    w.add_context_length(256)
    w.add_embedding_length(D)
    w.add_block_count(LAYERS)
    w.add_feed_forward_length(FF)
    w.add_head_count(HEADS)
    w.add_head_count_kv(KV_HEADS)
    w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(10000.0)
    w.add_layer_norm_rms_eps(1e-5)
    w.add_vocab_size(V)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(specials["<|endoftext|>"])
    w.add_eos_token_id(specials["<|endoftext|>"])
    w.add_pad_token_id(specials["<|pad|>"])
    w.add_add_bos_token(True)  # like Gemma's GGUF: transformers' GGUF tokenizer drops it
    for name, t in tensors.items():
        w.add_tensor(name, t.numpy().astype("float32"))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return tensors


@pytest.fixture(scope="module")
def tiny_gguf(tmp_path_factory) -> tuple[Path, dict[str, torch.Tensor], list[int]]:
    cache = Path(os.environ.get("FLASHHEAD_TEST_CACHE", tmp_path_factory.mktemp("tiny-cache")))
    tok_dir = cached_tiny_model(cache, vocab_size=V, hidden=D, layers=2)
    path = tmp_path_factory.mktemp("gguf") / "tiny-f32.gguf"
    tensors = write_tiny_gguf(path, tok_dir)
    tok = json.loads((tok_dir / "tokenizer.json").read_text())
    special_ids = sorted(a["id"] for a in tok["added_tokens"])
    return path, tensors, special_ids


def test_gguf_to_a_flashhead_folder(tiny_gguf, tmp_path):
    path, tensors, special_ids = tiny_gguf
    out = tmp_path / "fh"
    res = convert(
        path,
        out,
        ConvertOptions(stage1="centroids", centroids="mean", iterations=2, progress=False),
    )
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architectures"] == ["FlashHeadLlamaForCausalLM"]
    assert "quantization_config" not in cfg
    assert cfg["tie_word_embeddings"] is True
    assert res.vocab_size == V and res.hidden_size == D
    with safe_open(str(out / "model.safetensors"), framework="pt") as f:
        keys = set(f.keys())
        emb = f.get_tensor("model.embed_tokens.weight")
    assert "lm_head.weight" not in keys  # tied: safetensors refuses shared tensors
    assert emb.dtype == torch.bfloat16
    assert torch.allclose(emb.float(), tensors["token_embd.weight"], atol=1e-2, rtol=1e-2)
    assets = load_assets(out)
    assert torch.bincount(assets.assignments).tolist() == [4] * (V // 4)  # the default size
    assert set(special_ids) <= set(assets.special_token_ids)
    # The saved tokenizer still adds BOS (as the GGUF's tokenizer.ggml.add_bos_token says).
    from transformers import AutoTokenizer

    ids = AutoTokenizer.from_pretrained(out)("def f(x):")["input_ids"]
    bos = special_ids[0]  # <|endoftext|> is the first added token
    assert ids[0] == bos and bos not in ids[1:]


def test_gguf_folder_reloads_in_transformers_and_fits(tiny_gguf, tmp_path):
    """The written folder is a plain HF model (the fit samples hidden states from it)."""
    from transformers import AutoModelForCausalLM

    path, tensors, _ = tiny_gguf
    out = tmp_path / "fh"
    res = convert(
        path,
        out,
        ConvertOptions(
            stage1="centroids",
            iterations=2,
            calibration_tokens=512,
            chat_tokens=512,
            code_tokens=512,
            sample_tokens=512,
            progress=False,
        ),
    )  # centroids=fit, probes=auto
    assert 1 <= res.n_probes <= V // 4
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32)
    w = model.get_output_embeddings().weight
    assert torch.allclose(w, tensors["token_embd.weight"], atol=1e-2, rtol=1e-2)


def test_header_scan_reads_the_same_scalars_as_gguf_reader(tiny_gguf, tmp_path):
    from flashhead.convert.gguf_meta import GGUFMetaError, gguf_scalars

    path, _, _ = tiny_gguf
    reader = gguf.GGUFReader(str(path))
    want = {
        k: f.contents()
        for k, f in reader.fields.items()
        if not k.startswith("GGUF.") and f.types and f.types[0] != gguf.GGUFValueType.ARRAY
    }
    got = gguf_scalars(path)
    assert got == want
    assert got["tokenizer.ggml.add_bos_token"] is True  # the flag convert restores
    data = path.read_bytes()
    cut = tmp_path / "cut.gguf"
    cut.write_bytes(data[:4096])  # inside the token list
    with pytest.raises(GGUFMetaError, match="truncated or corrupt"):
        gguf_scalars(cut)
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + data[4:4096])
    with pytest.raises(GGUFMetaError, match="not a GGUF file"):
        gguf_scalars(bad)


def test_reading_a_gguf_parses_it_once_and_leaves_the_gguf_module_as_it_was(tiny_gguf):
    from flashhead.convert.source import open_source

    path, tensors, _ = tiny_gguf
    reader, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    parsed = []

    class CountingReader(reader):
        def __init__(self, *args, **kwargs):
            parsed.append(args[0])
            super().__init__(*args, **kwargs)

    gguf.GGUFReader = CountingReader
    try:
        src = open_source(path)
        assert gguf.GGUFReader is CountingReader  # restored to what it was before
    finally:
        gguf.GGUFReader = reader
    assert len(parsed) == 1  # transformers asks three times: config, tokenizer, weights
    assert gguf.get_tensor_name_map is name_map
    w = tensors["token_embd.weight"]
    assert torch.allclose(src.head_weight.float(), w, atol=1e-2, rtol=1e-2)
