"""The patchset schema: the pydantic models are the rules, patchsets/schema.json is their
published form (editors), and both agree on the shipped files and on bad ones."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import yaml

from flashhead import cli
from flashhead.patchset import schema
from flashhead.registry import PatchsetError, default_patchset_dir, loads_patchset

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "patchsets" / "schema.json"
SHIPPED = sorted((ROOT / "patchsets").glob("vllm-*.yaml"))


def test_published_schema_is_the_models_schema():
    assert PUBLISHED.read_text(encoding="utf-8") == schema.json_schema_text(), (
        "run: flashhead patchsets schema --write patchsets/schema.json"
    )


def test_schema_ships_in_the_package():
    assert (default_patchset_dir() / "schema.json").is_file()


def test_cli_check_reports_a_stale_file(tmp_path, capsys):
    stale = tmp_path / "schema.json"
    stale.write_text("{}\n")
    assert cli.main(["patchsets", "schema", "--check", str(stale)]) == 1
    assert "flashhead patchsets schema --write" in capsys.readouterr().out
    assert cli.main(["patchsets", "schema", "--write", str(stale)]) == 0
    assert cli.main(["patchsets", "schema", "--check", str(stale)]) == 0


def test_every_shipped_file_names_the_schema_for_editors():
    for path in SHIPPED:
        first = path.read_text(encoding="utf-8").splitlines()[0]
        assert first == "# yaml-language-server: $schema=schema.json", path.name


def test_the_kind_decides_which_fields_a_patch_takes():
    fields = {k: set(m.model_fields) for k, m in schema.PATCH_MODELS.items()}
    assert "architectures" in fields["register_architecture"]
    assert not {"architectures"} & (fields["wrap"] | fields["replace"] | fields["register_oot"])
    assert "handler" not in fields["register_architecture"]
    assert schema.KINDS_NEEDING_SIGNATURE == ("wrap", "replace")
    assert schema.KINDS_WITH_HANDLER == ("wrap", "replace", "register_oot")


jsonschema = pytest.importorskip("jsonschema")


@pytest.mark.parametrize("path", SHIPPED, ids=[p.name for p in SHIPPED])
def test_json_schema_accepts_every_shipped_file(path):
    data = yaml.safe_load(path.read_text(encoding="utf-8"))
    jsonschema.validate(data, json.loads(PUBLISHED.read_text()))


def _edited(old: str, new: str) -> str:
    text = SHIPPED[-1].read_text(encoding="utf-8")
    assert old in text
    return text.replace(old, new, 1)


@pytest.mark.parametrize(
    "old, new",
    [
        ("serve: flashhead", "serve: maybe"),
        ("    kind: wrap", "    kind: monkey"),
        ("    why:", "    colour: red\n    why:"),
        ("    required: true", "    required: 1"),
        ("    process: [worker]", "    process: [gpu]"),
        ("schema: 1", "schema: 2"),
        ("  v1_runner: flashhead", "  v3_runner: flashhead"),
    ],
)
def test_json_schema_and_models_reject_the_same_mistakes(old, new):
    text = _edited(old, new)
    with pytest.raises(PatchsetError):
        loads_patchset(text, "f.yaml")
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(yaml.safe_load(text), json.loads(PUBLISHED.read_text()))
