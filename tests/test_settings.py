"""flashhead.settings: every FLASHHEAD_* variable parsed in one place, one boolean rule, bad
values named and never fatal; the docs table and the code never drift apart."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from flashhead import settings
from flashhead.kernels.options import KernelOptions
from flashhead.settings import VARIABLES, parse

REPO = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "raw, value",
    [("1", True), ("true", True), ("YES", True), (" on ", True), ("0", False), ("False", False)]
    + [("no", False), ("OFF", False)],
)
def test_one_boolean_rule_for_every_switch(raw, value):
    for name, attribute in (
        ("FLASHHEAD_ENABLED", "enabled"),
        ("FLASHHEAD_CPU_COMPILE", "cpu_compile"),
    ):
        s = parse({name: raw})
        assert getattr(s, attribute) is value and s.problems == ()


def test_unset_and_empty_mean_the_defaults():
    assert parse({}) == parse({v.name: "" for v in VARIABLES}) == settings.Settings()
    assert parse({}).kernel_options() == KernelOptions()


def test_a_bad_kill_switch_value_serves_dense_and_says_so():
    s = parse({"FLASHHEAD_ENABLED": "disable"})
    assert s.enabled is False
    assert s.problems == (
        "FLASHHEAD_ENABLED='disable' is not a boolean (1/0, true/false, yes/no, on/off); "
        "serving dense until it is one",
    )


@pytest.mark.parametrize(
    "name, raw, attribute, fallback, words",
    [
        ("FLASHHEAD_BACKEND", "cuda-magic", "backend", "auto", "auto, triton, torch"),
        ("FLASHHEAD_DENSE_MIN_BATCH", "lots", "dense_min_batch", None, "whole number"),
        ("FLASHHEAD_DENSE_MIN_BATCH", "-2", "dense_min_batch", None, "whole number"),
        ("FLASHHEAD_CPU_COMPILE", "maybe", "cpu_compile", True, "not a boolean"),
        ("FLASHHEAD_TRITON_SELECT", "heap", "triton_select", "bisect", "bisect, radix"),
        ("FLASHHEAD_TRITON_S1", "16,32", "triton_stage1_blocks", None, "5 comma-separated"),
        ("FLASHHEAD_TRITON_S2", "a,b,c,d", "triton_stage2_blocks", None, "4 comma-separated"),
        ("FLASHHEAD_LOG_LEVEL", "loud", "log_level", "INFO", "DEBUG, INFO"),
        ("FLASHHEAD_SHADOW", "2", "shadow", 0.0, "between 0 and 1"),
    ],
)
def test_bad_values_fall_back_and_name_variable_value_and_fix(
    name, raw, attribute, fallback, words
):
    s = parse({name: raw})
    assert getattr(s, attribute) == fallback
    assert len(s.problems) == 1
    assert s.problems[0].startswith(f"{name}={raw!r}") and words in s.problems[0]
    s.kernel_options()  # whatever was written, the kernels get valid options


def test_good_values_reach_the_kernel_options():
    s = parse(
        {
            "FLASHHEAD_BACKEND": "Torch",
            "FLASHHEAD_DENSE_MIN_BATCH": "6",
            "FLASHHEAD_CPU_COMPILE": "off",
            "FLASHHEAD_TRITON_SELECT": "radix",
            "FLASHHEAD_TRITON_S1": "16,32,256,4,4",
            "FLASHHEAD_TRITON_S2": "4,512,4,2",
            "FLASHHEAD_TRITON_SEL": "8",
            "FLASHHEAD_LOG_LEVEL": "debug",
        }
    )
    assert s.problems == () and s.log_level == "DEBUG"
    assert s.kernel_options() == KernelOptions(
        backend="torch",
        dense_min_batch=6,
        cpu_compile=False,
        triton_select="radix",
        triton_stage1_blocks=(16, 32, 256, 4, 4),
        triton_stage2_blocks=(4, 512, 4, 2),
        triton_select_warps=8,
    )


def test_parsed_once_per_process(monkeypatch):
    monkeypatch.setenv("FLASHHEAD_SHADOW", "0.5")
    first = settings.settings()
    monkeypatch.setenv("FLASHHEAD_SHADOW", "0.25")
    assert settings.settings() is first and first.shadow == 0.5
    settings.reset_for_tests()
    assert settings.settings().shadow == 0.25


def test_every_variable_is_an_attribute_and_names_are_unique():
    names = [v.name for v in VARIABLES]
    assert len(set(names)) == len(names)
    fields = set(settings.Settings.__dataclass_fields__)
    assert {v.attribute for v in VARIABLES} == fields - {"problems"}


def test_design_doc_table_is_the_settings_table():
    text = (REPO / "docs" / "DESIGN.md").read_text()
    block = re.search(
        r"<!-- settings-table:start -->\n(.*?)<!-- settings-table:end -->", text, re.S
    )
    assert block, "docs/DESIGN.md lost its settings-table markers"
    assert block.group(1) == settings.variables_table(), (
        "docs/DESIGN.md's settings table differs from flashhead.settings.VARIABLES; paste "
        "the output of `python -c 'from flashhead.settings import variables_table as t; "
        'print(t(), end="")\'` between the markers'
    )


_ENV_READ = re.compile(
    r"""(environ(\.get)?\s*[\[(]|getenv\s*\()\s*(['"]FLASHHEAD_|[A-Z_]+_ENV\b)"""
)


def test_no_module_but_settings_reads_a_flashhead_variable():
    """Reads only: setting FLASHHEAD_METRICS_DIR for child processes is metrics.py's job."""
    offenders = []
    for root in ("flashhead", "kernels", "compat"):
        for path in sorted((REPO / root).rglob("*.py")):
            if path.name == "settings.py" and path.parent.name == "flashhead":
                continue
            for n, line in enumerate(path.read_text().splitlines(), 1):
                if _ENV_READ.search(line) and "] =" not in line:
                    offenders.append(f"{path.relative_to(REPO)}:{n}: {line.strip()}")
    assert offenders == []


def test_the_kernels_read_no_environment():
    for path in sorted((REPO / "kernels").glob("*.py")):
        text = path.read_text()
        if path.name == "triton_mode.py":  # Triton's own switch, for Triton < 3.4 only
            assert text.count("os.environ") == 1
            continue
        assert "os.environ" not in text and "getenv" not in text, path.name
