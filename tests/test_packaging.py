"""The wheel users get from `pip install flashhead`: everything under the flashhead namespace,
the patchsets shipped as data, and the vLLM entry point in place."""

from __future__ import annotations

import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def wheel_names(tmp_path_factory: pytest.TempPathFactory) -> tuple[list[str], str]:
    out = tmp_path_factory.mktemp("wheel")
    # No build isolation: the venv's setuptools builds it, so the test needs no network.
    subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "wheel",
            "-q",
            "--no-deps",
            "--no-build-isolation",
            "-w",
            str(out),
            str(REPO),
        ],
        check=True,
        capture_output=True,
    )
    (whl,) = out.glob("flashhead-*.whl")
    with zipfile.ZipFile(whl) as z:
        names = z.namelist()
        entry_points = z.read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    return names, entry_points


def test_every_module_lives_under_flashhead(wheel_names):
    names, _ = wheel_names
    top = {n.split("/")[0] for n in names if not n.startswith("flashhead-")}
    assert top == {"flashhead"}


def test_kernels_compat_and_patchsets_are_mapped_into_the_package(wheel_names):
    names, _ = wheel_names
    for module in (
        "flashhead/kernels/reference.py",
        "flashhead/kernels/triton_ops.py",
        "flashhead/kernels/dispatch.py",
        "flashhead/compat/version.py",
        "flashhead/handlers/logits.py",
        "flashhead/patchsets/support.json",
        "flashhead/patchsets/schema.json",
    ):
        assert module in names
    shipped = {
        Path(n).name for n in names if n.startswith("flashhead/patchsets/") and n.endswith(".yaml")
    }
    in_repo = {p.name for p in (REPO / "patchsets").glob("*.yaml")}
    assert shipped == in_repo and shipped


def test_entry_points(wheel_names):
    _, entry_points = wheel_names
    assert "[vllm.general_plugins]\nflashhead = flashhead:register" in entry_points
    assert "[console_scripts]\nflashhead = flashhead.cli:main" in entry_points


def test_the_cli_parser_imports_neither_torch_nor_numpy():
    """`flashhead --help` / `--version` in a plain venv: torch costs over a second and, without
    numpy, prints an error; only the commands that compute import it."""
    code = (
        "import sys; from flashhead import cli; cli.build_parser(['--help']); "
        "heavy = sorted(m for m in ('torch', 'numpy', 'transformers', 'vllm') if m in sys.modules); "
        "print(','.join(heavy))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == ""


def test_every_package_of_the_source_tree_is_in_the_wheel(wheel_names):
    """A new subpackage (flashhead/engine/, flashhead/patchset/, ...) must be listed in
    pyproject's packages, or `pip install flashhead` lacks it."""
    names, _ = wheel_names
    root = REPO / "flashhead"
    wanted = {"flashhead/" + p.relative_to(root).as_posix() for p in root.rglob("__init__.py")}
    assert sorted(wanted - set(names)) == []
