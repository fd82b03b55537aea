"""The import contracts of pyproject.toml ([tool.importlinter]) hold for the package, and they
catch what they are for: a copy of the package with one deliberately wrong import fails them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.test_server import ROOT

LINT_IMPORTS = Path(sys.executable).with_name("lint-imports")


def lint_imports(package_parent: Path) -> subprocess.CompletedProcess[str]:
    """`lint-imports` over the package found in `package_parent`, with the project's config."""
    env = {**os.environ, "PYTHONPATH": str(package_parent)}
    return subprocess.run(
        [str(LINT_IMPORTS), "--config", str(ROOT / "pyproject.toml"), "--no-cache"],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=package_parent,
    )


def test_the_package_keeps_its_contracts() -> None:
    done = lint_imports(ROOT)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "0 broken" in done.stdout


@pytest.fixture(scope="module")
def copy_of_the_package(tmp_path_factory: pytest.TempPathFactory) -> Path:
    parent = tmp_path_factory.mktemp("package")
    shutil.copytree(
        ROOT / "interpql",
        parent / "interpql",
        ignore=shutil.ignore_patterns("node_modules", "data", "__pycache__", "*.map"),
    )
    return parent


@pytest.mark.parametrize(
    ("module", "wrong_import", "broken"),
    [
        ("schema/scalars.py", "import torch", "The schema reaches the model"),
        ("schema/scalars.py", "from interpql.loaders import registry", "The schema reaches"),
        ("resolvers/search.py", "from interpql.backends import base", "Resolvers import no"),
        ("loaders/cache.py", "from interpql.resolvers import context", "One direction"),
        ("backends/losses.py", "from interpql.demo import corpus", "The demo's build code"),
        ("specs.py", "from interpql.loaders import registry", "Shared modules import no layer"),
    ],
)
def test_a_wrong_import_breaks_a_contract(
    copy_of_the_package: Path, module: str, wrong_import: str, broken: str
) -> None:
    path = copy_of_the_package / "interpql" / module
    original = path.read_text()
    # After the module's docstring and future import: an ordinary top-level import.
    head, marker, rest = original.partition("from __future__ import annotations\n")
    path.write_text(head + marker + wrong_import + "\n" + rest)
    try:
        done = lint_imports(copy_of_the_package)
    finally:
        path.write_text(original)
    assert done.returncode != 0, done.stdout
    assert f"{broken}" in done.stdout and "BROKEN" in done.stdout, done.stdout
