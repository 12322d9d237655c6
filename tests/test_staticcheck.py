"""The static checker (`flashhead patchsets check/new/table`) against a small fake vLLM source
tree (tests/fixtures/fake_vllm_src) and, in the slow tests, against real vLLM sdists."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
import zipfile
from pathlib import Path

import pytest

from flashhead import registry, sdist, staticcheck, support_table
from flashhead.cli import main as cli_main
from flashhead.version_ranges import spec_text

FAKE = Path(__file__).resolve().parent / "fixtures" / "fake_vllm_src"
FAKE_SETS = FAKE / "patchsets"
MATCHING = FAKE_SETS / "fake-0.30.yaml"
DRIFTED = FAKE_SETS / "fake-0.35.yaml"


@pytest.fixture(scope="module")
def tree() -> staticcheck.SourceTree:
    return staticcheck.SourceTree(FAKE)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli_main(["patchsets", *argv])
    out, err = capsys.readouterr()
    return rc, out, err


def rows_by_target(rows) -> dict[str, staticcheck.TargetResult]:
    return {r.target: r for r in rows}


# ---- the index ---------------------------------------------------------------------------------
def test_resolves_methods_inherited_through_module_alias_imports(tree):
    found = tree.resolve("vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model")
    assert found is not None
    assert found.location == "vllm.v1.worker.runner_base:RunnerBase.execute_model"
    assert found.inherited_from == "vllm.v1.worker.runner_base:RunnerBase"
    assert staticcheck.signature_of(found, tree) == (
        "(self, scheduler_output, intermediate_tensors=None)"
    )


def test_resolves_properties_classmethods_and_assignments(tree):
    prop = tree.resolve(
        "vllm.model_executor.layers.logits_processor:LogitsProcessor.use_all_gather"
    )
    assert prop is not None and prop.kind == "property"
    hook = tree.resolve("vllm.model_executor.layers.logits_processor:LogitsProcessor.register_oot")
    assert hook.location == "vllm.model_executor.custom_op:PluggableLayer.register_oot"
    assert "classmethod" in hook.decorators
    reg = tree.resolve("vllm.model_executor.models.registry:ModelRegistry")
    assert reg is not None and reg.kind == "assignment"
    assert tree.resolve("vllm.model_executor.models.registry:NoSuchThing") is None
    assert tree.resolve("vllm.no.such.module:X") is None


def test_registry_table_excludes_previously_supported(tree):
    archs = tree.registry_architectures()
    assert archs == {"LlamaForCausalLM", "Gemma3ForConditionalGeneration"}


def test_tail_search_finds_a_moved_class(tree):
    hits = tree.find_by_tail("Runner.prepare")
    assert [t for t, _ in hits] == ["vllm.v1.worker.new_runner:Runner.prepare"]


def test_not_a_source_tree_names_the_directory(tmp_path):
    with pytest.raises(staticcheck.SourceTreeError, match=str(tmp_path)):
        staticcheck.SourceTree(tmp_path)


def test_version_read_from_the_tree(tree):
    assert staticcheck.tree_version(tree) == "0.40.0"


# ---- checking ----------------------------------------------------------------------------------
def test_matching_patchset_passes(capsys):
    rc, out, _ = run_cli(
        capsys,
        "check",
        "--vllm-source",
        str(FAKE),
        "--patchset-dir",
        str(FAKE_SETS),
        "--patchset",
        str(MATCHING),
    )
    assert rc == 0, out
    assert out.rstrip().endswith("OK")


def test_drifted_signature_fails_naming_target_and_difference(capsys):
    rc, out, _ = run_cli(
        capsys,
        "check",
        "--vllm-source",
        str(FAKE),
        "--patchset-dir",
        str(FAKE_SETS),
        "--patchset",
        str(DRIFTED),
    )
    assert rc == 1
    line = next(x for x in out.splitlines() if "LogitsProcessor.forward" in x and "MISMATCH" in x)
    assert "signature changed" in line
    assert "new: return_hidden" in line
    assert "(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False)" in out
    assert "skip_gather=False, *, return_hidden=False)" in out


def test_statuses_of_the_drifted_patchset(tree):
    rows = rows_by_target(staticcheck.check_patchset(registry.load_patchset(DRIFTED), tree))
    reg = "vllm.model_executor.models.registry:ModelRegistry"
    assert rows[f"{reg}[LlamaForCausalLM]"].status == "ok"
    assert rows[f"{reg}[Qwen3ForCausalLM]"].status == "missing"
    moved = rows["vllm.v1.worker.old_runner:Runner.prepare"]
    assert moved.status == "moved"
    assert moved.moved_to == "vllm.v1.worker.new_runner:Runner.prepare"
    assert moved.found == "(self, batch)"
    gone = rows["vllm.v1.worker.gpu_model_runner:GPUModelRunner._dummy_sampler_run"]
    assert gone.status == "missing"
    assert "rb.RunnerBase" in gone.detail
    hook = rows["vllm.model_executor.layers.logits_processor:PlainHead.register_oot"]
    assert hook.status == "missing" and "no register_oot" in hook.detail


def test_json_output(capsys):
    rc, out, _ = run_cli(
        capsys,
        "check",
        "--json",
        "--vllm-source",
        str(FAKE),
        "--patchset-dir",
        str(FAKE_SETS),
        "--patchset",
        str(DRIFTED),
    )
    report = json.loads(out)
    assert rc == 1 and report["ok"] is False
    assert report["mismatches"] == 5
    assert report["patchset_range"] == ">=0.35,<0.39"


def test_triage_proposes_the_nearest_patchset(capsys):
    # The fake tree says 0.40.0, which neither fake file covers: triage against fake-0.35.
    rc, out, _ = run_cli(
        capsys, "check", "--vllm-source", str(FAKE), "--patchset-dir", str(FAKE_SETS)
    )
    assert rc == 1
    assert "TRIAGE: no patchset covers vLLM 0.40.0; nearest is fake-0.35.yaml" in out
    assert "unchanged" in out and "moved" in out and "signature changed" in out
    assert "flashhead patchsets new --from" in out


def test_nearest_patchset_picks_by_version():
    sets = registry.load_patchsets(FAKE_SETS).patchsets
    assert staticcheck.nearest_patchset(sets, "0.50.0").name == "fake-0.35.yaml"
    assert staticcheck.nearest_patchset(sets, "0.9.0").name == "fake-0.30.yaml"
    assert staticcheck.nearest_patchset(sets, "0.36.0").name == "fake-0.35.yaml"


def test_gaps_and_overlaps_are_reported(tmp_path, capsys):
    text = MATCHING.read_text()
    (tmp_path / "a.yaml").write_text(text.replace('">=0.10.0,<0.35"', '">=0.10.0,<0.20"'))
    (tmp_path / "b.yaml").write_text(text.replace('">=0.10.0,<0.35"', '">=0.22,<0.35"'))
    sets = registry.load_patchsets(tmp_path).patchsets
    problems = staticcheck.check_coverage(sets, "0.10.0", "0.33.0")
    assert len(problems) == 1 and ">=0.20,<0.22" in problems[0]
    rc, out, _ = run_cli(
        capsys,
        "check",
        "--vllm-source",
        str(FAKE),
        "--patchset-dir",
        str(tmp_path),
        "--patchset",
        str(MATCHING),
    )
    assert rc == 1 and "RANGES no patchset selects vLLM >=0.20,<0.22" in out
    assert staticcheck.check_coverage(sets, "0.22.0", "0.33.0") == []


def test_bad_source_dir_is_an_input_error(tmp_path, capsys):
    rc, _, err = run_cli(capsys, "check", "--vllm-source", str(tmp_path))
    assert rc == 2 and "not a vLLM source tree" in err


# ---- new ---------------------------------------------------------------------------------------
def test_new_scaffolds_a_file_the_registry_loads(tmp_path, capsys):
    drifted_before = DRIFTED.read_bytes()
    out_file = tmp_path / "vllm-0.40.yaml"
    rc, out, _ = run_cli(
        capsys,
        "new",
        "--from",
        str(DRIFTED),
        "--vllm",
        "0.40.0",
        "--vllm-source",
        str(FAKE),
        "--out",
        str(out_file),
    )
    assert rc == 0, out
    loaded = registry.load_patchset(out_file)
    assert str(spec_text(loaded.vllm)) == ">=0.40,<0.41"
    text = out_file.read_text()
    assert (
        '"(self, lm_head, hidden_states, embedding_bias=None, skip_gather=False, *, '
        'return_hidden=False)"  # CHANGED in 0.40.0: was (self, lm_head, hidden_states, '
        "embedding_bias=None, skip_gather=False)"
    ) in text
    assert (
        'target: "vllm.v1.worker.new_runner:Runner.prepare"  # MOVED in 0.40.0: was '
        "vllm.v1.worker.old_runner:Runner.prepare"
    ) in text
    assert "# MISSING in 0.40.0" in text
    # The scaffold now matches the tree except for what is really gone.
    rows = staticcheck.check_patchset(loaded, staticcheck.SourceTree(FAKE))
    assert {r.status for r in rows if not r.ok} == {"missing"}
    # The old file is not touched.
    assert DRIFTED.read_bytes() == drifted_before
    assert '">=0.35,<0.39"' in DRIFTED.read_text()


def test_new_inside_a_range_prints_how_to_narrow_the_old_file(tmp_path, capsys):
    before = MATCHING.read_text()
    rc, out, _ = run_cli(
        capsys,
        "new",
        "--from",
        str(MATCHING),
        "--vllm",
        "0.33.0",
        "--vllm-source",
        str(FAKE),
        "--out",
        str(tmp_path / "x.yaml"),
    )
    assert rc == 0
    assert 'vllm: ">=0.10.0,<0.35" -> vllm: ">=0.10.0,<0.33"' in out
    assert registry.load_patchset(tmp_path / "x.yaml").matches("0.34.9")
    assert MATCHING.read_text() == before


def test_new_refuses_to_overwrite(tmp_path, capsys):
    target = tmp_path / "exists.yaml"
    target.write_text("keep")
    rc, _, err = run_cli(
        capsys,
        "new",
        "--from",
        str(DRIFTED),
        "--vllm",
        "0.40.0",
        "--vllm-source",
        str(FAKE),
        "--out",
        str(target),
    )
    assert rc == 2 and "exists" in err and target.read_text() == "keep"


# ---- table -------------------------------------------------------------------------------------
def test_table_combines_support_blocks_and_results(tmp_path):
    sets = registry.load_patchsets(FAKE_SETS).patchsets
    results = {"releases": {"0.33.0": {"static_check": "ok", "runtime_check": "ok"}}}
    rows = support_table.build_rows(sets, results, releases=["0.33.0", "0.36.0", "0.40.0"])
    assert rows[0].cells() == [
        "0.33.0",
        "fake-0.30.yaml",
        "ok",
        "ok",
        "flashhead",
        "absent",
        "dense",
        "dense",  # tensor parallel unset: the handler serves it dense
        "dense",
    ]
    assert rows[1].patchset == "fake-0.35.yaml" and rows[1].static_check == "not run"
    assert rows[2].patchset == "none"
    md = support_table.render_markdown(rows)
    assert md.startswith("| vLLM | patchset |")


def test_a_release_run_outside_the_static_list_gets_its_own_row():
    # The matrix runs the newest release of a family that loads here (0.11.1.post2), which the
    # static check does not read; only a run-time result adds a row, in version order.
    results = {
        "releases": {
            "0.11.1.post2": {"runtime_check": "ok (serves flashhead)"},
            "0.11.2": {"static_check": "ok", "runtime_check": "not installable: why"},
            "0.11.3": {"static_check": "ok"},
        }
    }
    releases = support_table.table_releases(results)
    assert set(releases) == set(support_table.CI_RELEASES) | {"0.11.1.post2"}
    assert releases.index("0.11.1.post2") + 1 == releases.index("0.11.2")
    rows = support_table.build_rows(registry.load_patchsets().patchsets, results)
    row = next(r for r in rows if r.release == "0.11.1.post2")
    assert (row.patchset, row.static_check, row.runtime_check) == (
        "vllm-0.11.yaml",
        "not run",
        "ok (serves flashhead)",
    )


def test_results_file_errors_name_the_file(tmp_path):
    bad = tmp_path / "support.json"
    bad.write_text("{not json")
    with pytest.raises(support_table.SupportTableError, match=str(bad)):
        support_table.load_results(bad)


def test_readme_block_roundtrip(tmp_path, capsys):
    readme = tmp_path / "README.md"
    readme.write_text(
        f"# x\n\n{support_table.README_START}\nold\n{support_table.README_END}\n\nrest\n"
    )
    common = ["table", "--patchset-dir", str(FAKE_SETS)]
    rc, _, err = run_cli(capsys, *common, "--check-readme", str(readme))
    assert rc == 1 and "stale" in err
    rc, _, _ = run_cli(capsys, *common, "--write-readme", str(readme))
    assert rc == 0
    rc, _, _ = run_cli(capsys, *common, "--check-readme", str(readme))
    assert rc == 0
    assert readme.read_text().endswith(f"{support_table.README_END}\n\nrest\n")


def test_readme_keeps_a_result_this_cpu_cannot_measure(tmp_path):
    """A release whose kernels die of SIGILL on CI's CPU (an AVX-512-only wheel on a machine
    without AVX-512) keeps the README's measured cell, with a note; any other change is stale."""
    sets = registry.load_patchsets().patchsets
    measured = {
        "releases": {"0.16.0": {"static_check": "ok", "runtime_check": "ok (serves flashhead)"}}
    }
    readme = support_table.render_markdown(support_table.build_rows(sets, measured))
    lacking = f"{support_table.CPU_LIMITED} (SIGILL; this CPU: avx avx2)"
    now = {"releases": {"0.16.0": {"static_check": "ok", "runtime_check": lacking}}}
    rows, notes = support_table.keep_readme_where_cpu_limited(
        support_table.build_rows(sets, now), readme
    )
    assert support_table.render_markdown(rows) == readme
    assert notes == [f"0.16.0: {lacking}; the README keeps 'ok (serves flashhead)'"]
    other = {"releases": {"0.16.0": {"static_check": "ok", "runtime_check": "smoke failed"}}}
    rows, notes = support_table.keep_readme_where_cpu_limited(
        support_table.build_rows(sets, other), readme
    )
    assert support_table.render_markdown(rows) != readme and not notes


# ---- sdist fetching (local index: no network) --------------------------------------------------
def _fake_release(links: Path) -> None:
    links.mkdir()
    src = links / "src"
    (src / "vllm-9.9.1" / "vllm" / "sub").mkdir(parents=True)
    (src / "vllm-9.9.1" / "vllm" / "__init__.py").write_text("")
    (src / "vllm-9.9.1" / "vllm" / "sub" / "mod.py").write_text("def f(a, b=1):\n    pass\n")
    (src / "vllm-9.9.1" / "setup.py").write_text("raise SystemExit('never built')\n")
    (src / "vllm-9.9.1" / "vllm" / "kernel.cu").write_text("// not python\n")
    with tarfile.open(links / "vllm-9.9.1.tar.gz", "w:gz") as tf:
        tf.add(src / "vllm-9.9.1", arcname="vllm-9.9.1")
    # 9.9.2 published a wheel only (like 0.15.x).
    with zipfile.ZipFile(links / "vllm-9.9.2-py3-none-any.whl", "w") as zf:
        zf.writestr("vllm/__init__.py", "")
        zf.writestr("vllm/wheel_only.py", "X = 1\n")
        zf.writestr("vllm-9.9.2.dist-info/METADATA", "Name: vllm\nVersion: 9.9.2\n")


@pytest.fixture
def local_index(tmp_path, monkeypatch) -> Path:
    links = tmp_path / "links"
    _fake_release(links)
    monkeypatch.setenv("PIP_NO_INDEX", "1")
    monkeypatch.setenv("PIP_FIND_LINKS", str(links))
    monkeypatch.setenv("PIP_CONFIG_FILE", os.devnull)
    monkeypatch.setenv("FLASHHEAD_CACHE", str(tmp_path / "cache"))
    return tmp_path


def test_fetch_extracts_only_python_files_and_caches(local_index, monkeypatch):
    path = sdist.fetch_source("9.9.1")
    assert path == local_index / "cache" / "vllm-src" / "9.9.1"
    files = sorted(p.relative_to(path).as_posix() for p in path.rglob("*") if p.is_file())
    assert files == [".complete", "vllm/__init__.py", "vllm/sub/mod.py"]
    assert sdist.source_info(path)["kind"] == "sdist"
    # Cached: no index needed any more.
    monkeypatch.setenv("PIP_FIND_LINKS", str(local_index / "nowhere"))
    assert sdist.fetch_source("9.9.1") == path


def test_fetch_falls_back_to_the_wheel(local_index):
    path = sdist.fetch_source("9.9.2")
    assert (path / "vllm" / "wheel_only.py").is_file()
    assert sdist.source_info(path)["kind"] == "wheel"


def test_fetch_unknown_release_says_so(local_index):
    with pytest.raises(sdist.SdistError, match="vllm==9.9.9: no such release"):
        sdist.fetch_source("9.9.9")


def test_fetch_in_parallel_processes(local_index):
    code = "from flashhead import sdist; print(sdist.fetch_source('9.9.1'))"
    procs = [
        subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
        for _ in range(3)
    ]
    outs = [p.communicate(timeout=120)[0].strip() for p in procs]
    assert all(p.returncode == 0 for p in procs)
    assert len(set(outs)) == 1
    assert (Path(outs[0]) / "vllm" / "sub" / "mod.py").is_file()
    leftovers = [p.name for p in Path(outs[0]).parent.iterdir() if p.name.startswith(".9.9.1.")]
    assert all(name.endswith(".lock") for name in leftovers)


# ---- real releases -----------------------------------------------------------------------------
@pytest.mark.slow
@pytest.mark.parametrize("version", ["0.27.1", "0.32.0"])
def test_real_release_passes_the_static_check(version, capsys):
    """Fetches the sdist (cached in ~/.cache/flashhead) and checks the shipped patchsets."""
    rc, out, _ = run_cli(capsys, "check", "--vllm-version", version)
    assert rc == 0, out
    assert f"vLLM {version} source:" in out


@pytest.mark.slow
def test_real_triage_of_an_uncovered_release_is_fast(tmp_path, capsys):
    """Triage a real release against a patchset dir that does not cover it (from cache: < 60 s)."""
    import shutil
    import time

    shipped = registry.default_patchset_dir()
    for f in shipped.glob("*.yaml"):
        if not registry.load_patchset(f).matches("0.32.0"):
            shutil.copy(f, tmp_path / f.name)
    sdist.fetch_source("0.32.0")
    start = time.monotonic()
    rc, out, _ = run_cli(
        capsys, "check", "--vllm-version", "0.32.0", "--patchset-dir", str(tmp_path)
    )
    assert time.monotonic() - start < 60
    assert rc == 1 and "TRIAGE: no patchset covers vLLM 0.32.0" in out
    assert "unchanged" in out


def test_version_given_with_a_source_selects_the_patchset(capsys, tmp_path):
    common = ["check", "--vllm-source", str(FAKE), "--patchset-dir", str(FAKE_SETS)]
    rc, out, _ = run_cli(capsys, *common, "--vllm-version", "0.36.0")
    assert rc == 1 and "patchset: " in out and "fake-0.35.yaml (>=0.35,<0.39" in out
    rc, out, _ = run_cli(capsys, *common, "--vllm-version", "0.20.0")
    assert rc == 0 and "fake-0.30.yaml" in out
    # A tree that does not say its release needs --vllm-version.
    bare = tmp_path / "src"
    (bare / "vllm").mkdir(parents=True)
    (bare / "vllm" / "__init__.py").write_text("")
    rc, _, err = run_cli(capsys, "check", "--vllm-source", str(bare))
    assert rc == 2 and "--vllm-version" in err


def test_instance_attributes_set_in_methods_resolve(tree):
    runner = "vllm.v1.worker.gpu_model_runner:GPUModelRunner"
    for name in ("requests", "speculative_config"):
        found = tree.resolve(f"{runner}.{name}")
        assert found is not None and found.kind == "attribute", name
    assert tree.resolve(f"{runner}.input_batch") is None


def test_requiring_an_instance_only_attribute_fails_like_the_live_check(tree):
    """The engine's live check only sees class-level names: the static check must agree."""
    spec = registry.PatchSpec(
        id="x",
        kind="wrap",
        target="vllm.v1.worker.gpu_model_runner:GPUModelRunner.execute_model",
        requires=(
            registry.Requirement("vllm.v1.worker.gpu_model_runner:GPUModelRunner.requests"),
            registry.Requirement(
                "vllm.model_executor.layers.logits_processor:LogitsProcessor.use_all_gather"
            ),
        ),
    )
    rows = rows_by_target(staticcheck.check_patch(spec, tree))
    attr = rows["vllm.v1.worker.gpu_model_runner:GPUModelRunner.requests"]
    assert attr.status == "missing" and "only assigned on instances" in attr.detail
    assert rows["vllm.model_executor.layers.logits_processor:LogitsProcessor.use_all_gather"].ok
