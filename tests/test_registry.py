"""Patchset YAML: validation messages (file:line: field: problem (fix)), selection, ranges."""

from __future__ import annotations

from pathlib import Path

import pytest
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from flashhead import settings
from flashhead.compat.version import release_for_matching
from flashhead.registry import (
    PatchSet,
    PatchsetError,
    check_ranges,
    default_patchset_dir,
    load_patchset,
    load_patchsets,
    loads_patchset,
    patchset_dir,
    select_patchset,
)

GOOD = """\
schema: 1
vllm: ">=0.29,<0.34"
description: "test"
serve: flashhead
support:
  v1_runner: flashhead
  v2_runner: dense
patches:
  - id: architectures
    kind: register_architecture
    target: "vllm.model_executor.models.registry:ModelRegistry"
    architectures:
      FlashHeadLlamaForCausalLM: LlamaForCausalLM
    always: true
    process: any
    why: "archs"
    remove_when: "never"
  - id: logits
    kind: wrap
    target: "vllm.model_executor.layers.logits_processor:LogitsProcessor.forward"
    handler: "flashhead.handlers.observe:count_logits_calls"
    signature: "(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False)"
    requires:
      - target: "vllm.model_executor.layers.logits_processor:LogitsProcessor._get_logits"
        signature: "(self, hidden_states, lm_head, embedding_bias, skip_gather=False)"
    process: [worker]
    required: false
    why: "observe"
    remove_when: "never"
"""


def test_good_file_loads(tmp_path):
    path = tmp_path / "vllm-0.29.yaml"
    path.write_text(GOOD)
    ps = load_patchset(path)
    assert (
        ps.name == "vllm-0.29.yaml"
        and ps.vllm == SpecifierSet(">=0.29,<0.34")
        and ps.vllm_line == 2
    )
    assert ps.support == {"v1_runner": "flashhead", "v2_runner": "dense"}
    arch, logits = ps.patches
    assert arch.always and arch.process is None and arch.required and arch.line == 9
    assert arch.architectures == {"FlashHeadLlamaForCausalLM": "LlamaForCausalLM"}
    assert logits.process == ("worker",) and not logits.required
    assert logits.module == "vllm.model_executor.layers.logits_processor"
    assert logits.qualname == "LogitsProcessor.forward"
    assert (
        logits.requires[0].qualname == "LogitsProcessor._get_logits"
        and logits.requires[0].line == 24
    )
    assert logits.where == f"{path}:18"


def edit(old: str, new: str) -> str:
    assert old in GOOD
    return GOOD.replace(old, new, 1)


BAD = [
    # (yaml text, expected "line: field: problem" fragment, expected fix fragment)
    (
        "schema: 1\nvllm: '>=0.29'\n  - x\npatches: []\n",
        "3: (yaml): syntax error",
        "fix the YAML syntax",
    ),
    ("", "1: (file): empty patchset", "add schema"),
    ("- 1\n- 2\n", "1: : expected a mapping", "key: value"),
    (edit("schema: 1\n", "schema: 2\n"), "1: schema: unsupported schema 2", "schema: 1"),
    (edit("schema: 1\n", ""), "1: schema: missing", "add `schema:`"),
    (
        edit('description: "test"\n', 'description: "test"\ncolour: red\n'),
        "4: colour: unknown field",
        "allowed here",
    ),
    (
        edit('vllm: ">=0.29,<0.34"', 'vllm: ">=0.29,<<0.34"'),
        "2: vllm: bad version range",
        "PEP 440",
    ),
    (
        edit('vllm: ">=0.29,<0.34"', 'vllm: ">=0.34,<0.29"'),
        "2: vllm: range '>=0.34,<0.29' matches no version",
        "fix the bounds",
    ),
    (
        edit('vllm: ">=0.29,<0.34"', "vllm: 0.29"),
        "2: vllm: expected a version range string",
        ">=0.29",
    ),
    (
        edit('vllm: ">=0.29,<0.34"', 'vllm: ""'),
        "2: vllm: expected a version range string",
        ">=0.29",
    ),
    (
        edit("serve: flashhead", "serve: maybe"),
        "4: serve: unknown value 'maybe'",
        "flashhead, dense",
    ),
    (edit("serve: flashhead", "serve: dense"), "4: reason: required when serve: dense", "say why"),
    (
        edit("  v2_runner: dense", "  v2_runner: yes"),
        "7: support.v2_runner: unknown value True",
        "flashhead, dense, absent",
    ),
    (
        edit("  v2_runner: dense", "  v3_runner: dense"),
        "7: support.v3_runner: unknown field",
        "v1_runner",
    ),
    (
        edit("  - id: logits", "  - id: architectures"),
        "18: patches[1].id: duplicate id 'architectures' (first at line 9)",
        "own id",
    ),
    (
        edit("  - id: logits", "  - id: Logits_2"),
        "18: patches[1].id: bad id 'Logits_2'",
        "lowercase",
    ),
    (
        edit("    kind: wrap", "    kind: monkey"),
        "19: patches[1](logits).kind: unknown kind 'monkey'",
        "wrap, replace",
    ),
    (
        edit('target: "vllm.model_executor.layers', 'target: "vllm/model_executor/layers'),
        "20: patches[1](logits).target: bad target",
        "module.path:Qualified.name",
    ),
    (
        edit('    target: "vllm.model_executor.models.registry:ModelRegistry"\n', ""),
        "9: patches[0](architectures).target: missing",
        "module.path:Qualified.name",
    ),
    (
        edit('"flashhead.handlers.observe:count_logits_calls"', '"mypkg.handlers:f"'),
        "21: patches[1](logits).handler: handler module 'mypkg.handlers' is outside the flashhead package",
        "flashhead.*",
    ),
    (
        edit('"flashhead.handlers.observe:count_logits_calls"', '"flashhead.handlers.observe"'),
        "21: patches[1](logits).handler: bad handler",
        "flashhead.handlers.<module>:<function>",
    ),
    (
        edit('    handler: "flashhead.handlers.observe:count_logits_calls"\n', ""),
        "18: patches[1](logits).handler: missing (kind wrap needs one)",
        "add `handler:",
    ),
    (
        edit('skip_gather=False)"\n    requires', 'skip_gather: bool = False)"\n    requires'),
        "22: patches[1](logits).signature:",
        "without annotations",
    ),
    (
        edit('skip_gather=False)"\n    requires', 'skip_gather=False"\n    requires'),
        "22: patches[1](logits).signature:",
        "parentheses",
    ),
    (
        edit(
            '    signature: "(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False)"\n',
            "",
        ),
        "18: patches[1](logits).signature: missing",
        "signature:",
    ),
    (
        edit('        signature: "(self, hidden_states', '        sig: "(self, hidden_states'),
        "25: patches[1](logits).requires[0].sig: unknown field",
        "target, signature",
    ),
    (
        edit("    required: false", "    required: maybe"),
        "27: patches[1](logits).required: expected true or false, got str 'maybe'",
        "true or false",
    ),
    (
        edit("    always: true", "    always: 1"),
        "14: patches[0](architectures).always: expected true or false, got int 1",
        "true or false",
    ),
    (
        edit("    process: [worker]", "    process: [gpu]"),
        "26: patches[1](logits).process: unknown process kind(s) ['gpu']",
        "api, engine, worker, main",
    ),
    (
        edit("    process: [worker]", "    process: []"),
        "26: patches[1](logits).process: expected `any` or a non-empty list",
        "api, engine",
    ),
    (edit('    why: "observe"\n', ""), "18: patches[1](logits).why: missing", "add `why:`"),
    (
        edit('    remove_when: "never"\n  - id: logits', "  - id: logits"),
        "9: patches[0](architectures).remove_when: missing",
        "never",
    ),
    (
        edit('    why: "observe"', '    why: ""'),
        "28: patches[1](logits).why: must not be empty",
        "sentence",
    ),
    (
        edit('    why: "observe"', "    why: 3"),
        "28: patches[1](logits).why: expected a string, got int 3",
        "quote",
    ),
    (
        edit(
            "      FlashHeadLlamaForCausalLM: LlamaForCausalLM",
            "      FlashHeadLlamaForCausalLM: [x]",
        ),
        "13: patches[0](architectures).architectures.FlashHeadLlamaForCausalLM: bad base architecture",
        "LlamaForCausalLM",
    ),
    (
        edit("    architectures:\n      FlashHeadLlamaForCausalLM: LlamaForCausalLM\n", ""),
        "9: patches[0](architectures).architectures: missing",
        "NewArch: BaseArch",
    ),
    (
        edit("    process: [worker]", "    process: [worker]\n    architectures: {A: B}"),
        "27: patches[1](logits).architectures: not used by kind wrap",
        "remove it",
    ),
    (
        edit("    process: [worker]", "    process: [worker]\n    signature_of: 3x"),
        "27: patches[1](logits).signature_of: bad member name",
        "method name",
    ),
    (
        edit("    always: true\n", "    always: true\n    always: false\n"),
        "15: patches[0](architectures).always: duplicate key",
        "keep one",
    ),
    (edit("schema: 1", "schema: !!python/object:os.system 1"), "1: (yaml):", "remove YAML tags"),
]


@pytest.mark.parametrize(
    "text, where, fix",
    BAD,
    ids=[b[1].split(":")[1].strip() + "@" + b[1].split(":")[0] for b in BAD],
)
def test_bad_yaml_messages(tmp_path, text, where, fix):
    path = tmp_path / "vllm-0.29.yaml"
    path.write_text(text)
    with pytest.raises(PatchsetError) as info:
        load_patchset(path)
    messages = [str(p) for p in info.value.problems]
    expected = f"{path}:{where}"
    hits = [m for m in messages if m.startswith(expected)]
    assert hits, f"{expected!r} not in {messages}"
    assert fix in hits[0], hits[0]
    assert hits[0].endswith(")"), "every message ends with its fix in parentheses"


def test_all_problems_of_a_file_are_reported_in_line_order():
    text = edit("    kind: wrap", "    kind: monkey").replace('    why: "observe"', '    why: ""')
    with pytest.raises(PatchsetError) as info:
        loads_patchset(text, "f.yaml")
    lines = [p.line for p in info.value.problems]
    assert len(lines) == 2 and lines == sorted(lines)


def write_set(directory: Path, name: str, spec: str) -> None:
    (directory / name).write_text(GOOD.replace('">=0.29,<0.34"', f'"{spec}"'))


def test_load_patchsets_collects_problems_and_keeps_good_files(tmp_path):
    write_set(tmp_path, "vllm-0.26.yaml", ">=0.26,<0.29")
    (tmp_path / "vllm-0.29.yaml").write_text("schema: 1\nvllm: [\n")
    (tmp_path / "notes.txt").write_text("ignored")
    result = load_patchsets(tmp_path)
    assert [p.name for p in result.patchsets] == ["vllm-0.26.yaml"]
    assert [p.name for p in result.failed_files] == ["vllm-0.29.yaml"]
    assert result.problems and result.problems[0].file.endswith("vllm-0.29.yaml")


def test_missing_directory_is_a_problem_not_an_exception(tmp_path):
    result = load_patchsets(tmp_path / "nope")
    assert result.patchsets == [] and "patchset directory not found" in str(result.problems[0])


def test_patchset_dir_override(monkeypatch, tmp_path):
    monkeypatch.setenv("FLASHHEAD_PATCHSET_DIR", str(tmp_path))
    assert patchset_dir() == tmp_path
    monkeypatch.delenv("FLASHHEAD_PATCHSET_DIR")
    settings.reset_for_tests()  # parsed once per process: as a new process would see it
    assert patchset_dir() == default_patchset_dir()
    assert (default_patchset_dir() / "__init__.py").exists()


@pytest.mark.parametrize(
    "specs, fragments",
    [
        ([">=0.26,<0.29", ">=0.29,<0.34"], []),
        ([">=0.26,<0.30", ">=0.29,<0.34"], ["overlaps vllm-0.26.yaml", "both match [0.29, 0.30)"]),
        ([">=0.26,<=0.29", ">=0.29,<0.34"], ["both match [0.29, 0.29]"]),
        ([">=0.26,<0.29", ">0.28.9,<0.34"], ["overlaps"]),
        ([">=0.26", ">=0.29,<0.34"], ["overlaps"]),
        (["==0.26.*", "~=0.26.1"], ["overlaps"]),
        (["==0.26.*", ">=0.27"], []),
        (["~=0.26.1", ">=0.27"], []),
        (["==0.28.0", ">=0.28.1,<0.30"], []),
        ([">=0.26,<0.29", ">=0.29,<0.34,!=0.30"], []),
    ],
)
def test_check_ranges(tmp_path, specs, fragments):
    sets = []
    for i, spec in enumerate(specs):
        sets.append(
            PatchSet(
                path=tmp_path / f"vllm-0.{26 + 3 * i}.yaml",
                vllm=SpecifierSet(spec),
                patches=(),
                vllm_line=2,
            )
        )
    problems = check_ranges(sets)
    if not fragments:
        assert problems == []
    else:
        assert len(problems) == 1
        assert problems[0].startswith(f"{tmp_path}/vllm-0.29.yaml:2: vllm: range")
        for fragment in fragments:
            assert fragment in problems[0]


def test_check_ranges_reports_empty_ranges(tmp_path):
    ps = PatchSet(
        path=tmp_path / "a.yaml", vllm=SpecifierSet(">=0.30,<0.30"), patches=(), vllm_line=2
    )
    point = PatchSet(
        path=tmp_path / "b.yaml", vllm=SpecifierSet("==0.31,!=0.31"), patches=(), vllm_line=2
    )
    problems = check_ranges([ps, point])
    assert len(problems) == 2 and all("matches no version" in p for p in problems)


def test_selection_with_dev_and_local_versions(tmp_path):
    write_set(tmp_path, "vllm-0.26.yaml", ">=0.26,<0.29")
    write_set(tmp_path, "vllm-0.29.yaml", ">=0.29,<0.34")
    sets = load_patchsets(tmp_path).patchsets
    pick = {
        v: getattr(select_patchset(sets, release_for_matching(Version(v))), "name", None)
        for v in [
            "0.28.9",
            "0.29.0.dev3+gabc",
            "0.33.1.dev5+g1",
            "0.34.0.dev1",
            "0.25.0",
            "0.32.0+cpu",
        ]
    }
    assert pick == {
        "0.28.9": "vllm-0.26.yaml",
        "0.29.0.dev3+gabc": "vllm-0.29.yaml",  # its release is 0.29.0, not "before 0.29"
        "0.33.1.dev5+g1": "vllm-0.29.yaml",
        "0.34.0.dev1": None,
        "0.25.0": None,
        "0.32.0+cpu": "vllm-0.29.yaml",
    }
