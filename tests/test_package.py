"""`pip install interpql` gives the whole server, offline: the wheel is built from this checkout
(PyPA build), installed into a fresh venv outside it (torch pinned to the CPU build), and its
`interpql serve` drives GraphiQL, the node viewer, the explorer and the graph page in Debian's
chromium with every request to anything but the server refused. The pages' assets (built by npm
here) come from the wheel alone."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import zipfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from playwright.sync_api import BrowserContext, Page, expect

from interpql import __version__, web
from tests.processes import serve_process
from tests.test_browser import chromium, offline_page, screenshot
from tests.test_server import ROOT

WHEEL_LIMIT = 30 * 2**20
PROMPT = "import os\nimport sys\nimport"


@pytest.fixture(scope="module")
def venv(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A fresh venv, outside the checkout, with the wheel built from it installed."""
    assert web.graphiql_assets_installed(), "run `make test`: it builds the vendored assets"
    assert (web.STATIC / "explore" / "explore.js").is_file(), "run `make test`: it builds it"
    root = tmp_path_factory.mktemp("installed")
    subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--outdir", str(root / "dist"), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [wheel] = (root / "dist").glob("interpql-*.whl")
    assert wheel.stat().st_size <= WHEEL_LIMIT
    names = zipfile.ZipFile(wheel).namelist()
    for name in web.GRAPHIQL_ASSETS:
        assert f"interpql/static/vendor/{name}" in names
    assert "interpql/static/explore/explore.js" in names
    assert not any("__pycache__" in n or n.startswith("tests/") for n in names)
    env = clean_env()
    subprocess.run([sys.executable, "-m", "venv", str(root / "venv")], check=True, env=env)
    pip = [str(root / "venv" / "bin" / "pip"), "install", "--quiet"]
    subprocess.run([*pip, "torch==2.13.0"], check=True, cwd=root, env=env)
    constraints = ["-c", str(ROOT / "constraints.txt")]
    subprocess.run([*pip, *constraints, str(wheel)], check=True, cwd=root, env=env)
    return root


def test_the_sdist_holds_what_building_and_testing_it_needs(tmp_path: Path) -> None:
    """It held the test files but not their helpers (conftest, tests/processes.py, ...), nor
    schema.graphql, the Makefile or the explorer's sources."""
    subprocess.run(
        [sys.executable, "-m", "build", "--sdist", "--outdir", str(tmp_path), str(ROOT)],
        check=True,
        capture_output=True,
    )
    [sdist] = tmp_path.glob("interpql-*.tar.gz")
    with tarfile.open(sdist) as archive:
        names = {name.partition("/")[2] for name in archive.getnames()}
    needed = {"Makefile", "constraints.txt", "schema.graphql", "README.md", "LICENSE", ".ci/run"}
    needed |= {"explorer/src/main.ts", "explorer/package-lock.json", "tests/conftest.py"}
    needed |= {"tests/federation/package-lock.json", "clients/typescript/package-lock.json"}
    # Every module of tests/ that a test imports.
    for test in (ROOT / "tests").glob("*.py"):
        for module in re.findall(r"^from tests\.(\w+) import", test.read_text(), re.MULTILINE):
            needed.add(f"tests/{module}.py")
    assert needed <= names, sorted(needed - names)
    assert not any("node_modules" in n or "__pycache__" in n for n in names)


def clean_env() -> dict[str, str]:
    """The environment without anything pointing back into the checkout."""
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


@pytest.fixture(scope="module")
def installed(venv: Path) -> Iterator[str]:
    command = [str(venv / "venv" / "bin" / "interpql")]
    with serve_process(
        "--explanation-store",
        str(venv / "explanations.sqlite"),
        command=command,
        cwd=venv,
        env=clean_env(),
        drain_output=True,
    ) as (url, _):
        yield url


def test_the_installed_package_knows_its_version(venv: Path) -> None:
    interpql = venv / "venv" / "bin" / "interpql"
    shown = subprocess.run(
        [str(interpql), "--version"], capture_output=True, text=True, cwd=venv, env=clean_env()
    )
    assert shown.stdout.strip() == f"interpql {__version__}"
    python = venv / "venv" / "bin" / "python"
    code = (
        "import importlib.metadata, interpql; "
        "print(interpql.__version__, importlib.metadata.version('interpql'), interpql.__file__)"
    )
    found = subprocess.run(
        [str(python), "-c", code], capture_output=True, text=True, cwd=venv, env=clean_env()
    ).stdout.split()
    assert found[:2] == [__version__, __version__]
    assert Path(found[2]).is_relative_to(venv / "venv")  # the installed copy, not the checkout


@pytest.fixture(scope="module")
def browser(tmp_path_factory: pytest.TempPathFactory) -> Iterator[BrowserContext]:
    with chromium(tmp_path_factory.mktemp("chromium-profile"), timeout_ms=30_000) as context:
        yield context


@pytest.fixture
def page(browser: BrowserContext, installed: str) -> Iterator[Page]:
    with offline_page(browser, installed) as page:
        yield page


def model_name(url: str) -> str:
    answer = httpx.post(url + "/graphql", json={"query": "{ models { name } }"}).json()
    name: str = answer["data"]["models"][0]["name"]
    return name


def test_graphiql_answers_a_query(page: Page, installed: str) -> None:
    page.goto(installed + "/graphql")
    editor = page.locator(".graphiql-query-editor .CodeMirror").first
    expect(editor).to_be_visible()
    editor.click()
    page.keyboard.press("Control+A")
    page.keyboard.press("Delete")
    page.keyboard.insert_text("{\n  models { name nLayers }\n}\n")
    page.keyboard.press("Control+Enter")
    expect(page.locator(".graphiql-response")).to_contain_text(f'"name": "{model_name(installed)}"')
    screenshot(page, "installed-graphiql.png")


def test_the_viewer_shows_a_node(page: Page, installed: str) -> None:
    node = f"{model_name(installed)}/mlp_neuron/0/0"
    page.goto(f"{installed}/viewer?node={node}&prompt=hello world")
    expect(page.locator("#status")).to_have_text(node)
    expect(page.locator("#live .token")).to_have_count(2)


def test_the_explorer_shows_the_node_table(page: Page, installed: str) -> None:
    page.goto(f"{installed}/explore?{httpx.QueryParams({'prompt': PROMPT})}")
    expect(page.locator('#view[data-view="table"]')).to_be_visible()
    expect(page.locator("table.node-table tbody tr").first).to_be_visible()
    screenshot(page, "installed-explore.png")


def test_the_graph_page_draws_a_graph(page: Page, installed: str) -> None:
    model = model_name(installed)
    graph = httpx.post(
        installed + "/graphql",
        json={
            "query": "query($m: String!, $p: String!) { model(name: $m) { attributionGraph("
            'input: {prompt: $p, dictionary: "transcoder"}) { id nodes { id } } } }',
            "variables": {"m": model, "p": PROMPT},
        },
        timeout=60,
    ).json()["data"]["model"]["attributionGraph"]
    params = httpx.QueryParams({"model": model, "dictionary": "transcoder", "prompt": PROMPT})
    page.goto(f"{installed}/graph?{params}")
    expect(page.locator("#status")).to_have_text(graph["id"])
    expect(page.locator("#graph .node")).to_have_count(len(graph["nodes"]))
    screenshot(page, "installed-graph.png")
