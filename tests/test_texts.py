"""Text families (flashhead.calibration.texts), spread token windows, and the model's own samples."""

from __future__ import annotations

import pytest
import torch

from flashhead.calibration.hidden import token_windows
from flashhead.calibration.sampled import sampled_hidden_states
from flashhead.calibration.texts import (
    CALIBRATION_TEXT_FAMILIES,
    TEXT_FAMILIES,
    _stdlib_modules,
    family_text,
)


def test_every_family_has_text_and_the_halves_are_disjoint():
    for family in TEXT_FAMILIES:
        cal, ev = family_text(family, "calibration"), family_text(family, "evaluation")
        assert len(ev) > 20_000, family
        assert cal != ev, family
    cal_mods, ev_mods = _stdlib_modules("calibration"), _stdlib_modules("evaluation")
    assert not set(cal_mods) & set(ev_mods) and len(ev_mods) >= 10
    # A chunk of evaluation code never appears in the calibration code.
    probe = family_text("code", "evaluation")[5000:5200]
    assert probe and probe not in family_text("code", "calibration")
    with pytest.raises(ValueError, match="unknown text family"):
        family_text("poetry", "evaluation")
    with pytest.raises(ValueError, match="calibration or evaluation"):
        family_text("code", "train")


def test_convert_never_reads_the_evaluation_only_families():
    assert set(CALIBRATION_TEXT_FAMILIES) == {"prose", "code"}
    assert {"docstrings", "markdown"} <= set(TEXT_FAMILIES) - set(CALIBRATION_TEXT_FAMILIES)


def test_markdown_family_reads_package_readmes_but_not_our_own():
    md = family_text("markdown", "evaluation") + family_text("markdown", "calibration")
    assert "```" in md or "](http" in md  # markdown code blocks or links
    assert "FlashHead for vLLM, as a plugin" not in md


class _WordTokenizer:
    """Token i = the i-th word: positions in the text are token ids."""

    bos_token_id = 10_000_000

    def __call__(self, text, add_special_tokens=False):
        return {"input_ids": list(range(len(text.split())))}


def test_token_windows_spread_over_the_whole_text():
    tok = _WordTokenizer()
    text = "w " * 6000
    windows = token_windows(tok, text, n_tokens=512, window=128)
    assert len(windows) == 4 and all(w[0] == tok.bos_token_id for w in windows)
    starts = [w[1] for w in windows]
    assert starts == sorted(starts) and starts[-1] > 3000  # not just the first windows
    assert all(w[1:] == list(range(w[1], w[1] + 127)) for w in windows)  # contiguous pieces
    # A short text gives all of itself.
    short = token_windows(tok, "w " * 300, n_tokens=100_000, window=128)
    assert [t for w in short for t in w[1:]] == list(range(300))


def test_own_samples_are_seeded_per_split_and_leave_the_global_rng_alone(tiny):
    model, tok = tiny
    torch.manual_seed(123)
    before = torch.rand(1)
    torch.manual_seed(123)
    a = sampled_hidden_states(model, tok, "calibration", n_tokens=96, length=16, progress=False)
    after = torch.rand(1)
    assert torch.equal(before, after)  # the caller's random stream is untouched
    b = sampled_hidden_states(model, tok, "calibration", n_tokens=96, length=16, progress=False)
    c = sampled_hidden_states(model, tok, "evaluation", n_tokens=96, length=16, progress=False)
    assert a.shape == (96, 64) and a.dtype == torch.float32
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)
    with pytest.raises(ValueError, match="unknown split"):
        sampled_hidden_states(model, tok, "train", n_tokens=16, progress=False)


def test_convert_and_eval_share_calibration_and_never_import_each_other():
    """convert -> calibration <- evaluation (issue 15): no cycle hidden in a function import."""
    import ast
    from pathlib import Path

    root = Path(__file__).resolve().parents[1] / "flashhead"

    def imports(path: Path) -> set[str]:
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(a.name for a in node.names)
        return names

    convert = set().union(*(imports(p) for p in (root / "convert").glob("*.py")))
    calibration = set().union(*(imports(p) for p in (root / "calibration").glob("*.py")))
    evaluation = imports(root / "evaluation.py") | imports(root / "answers.py")
    assert not {m for m in convert if m.startswith(("flashhead.evaluation", "flashhead.answers"))}
    assert not {m for m in evaluation if m.startswith("flashhead.convert")}
    assert not {
        m
        for m in calibration
        if m.startswith(("flashhead.convert", "flashhead.evaluation", "flashhead.answers"))
    }
