"""The browser side's routes: GraphiQL's page and its local assets, the CDN fallback, the viewer."""

from __future__ import annotations

import json
from pathlib import Path

import httpx
import pytest

from interpql import web


async def test_graphiql_page_loads_local_assets(client: httpx.AsyncClient) -> None:
    assert web.graphiql_assets_installed(), "run `make test` (npm ci in interpql/static)"
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert '<script src="/static/graphiql.min.js">' in page.text
    assert "https://" not in page.text
    for name in web.GRAPHIQL_ASSETS:
        asset = await client.get(f"/static/{name}")
        assert asset.status_code == 200, name
        assert asset.headers["content-type"].startswith(
            "text/css" if name.endswith(".css") else "text/javascript"
        )


async def test_graphiql_falls_back_to_the_cdn_page_without_assets(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(web, "VENDOR", tmp_path)
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    assert page.status_code == 200
    assert "unpkg.com/graphiql" in page.text
    assert (await client.get("/static/graphiql.min.js")).status_code == 404


def test_vendored_assets_are_npms_files_with_their_licenses(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    monkeypatch.setattr(web, "VENDOR", tmp_path / "vendor")
    web.vendor_assets()
    for name, path in web.GRAPHIQL_ASSETS.items():
        assert (tmp_path / "vendor" / name).read_bytes() == (web.NODE_MODULES / path).read_bytes()
    notices = (tmp_path / "vendor" / "LICENSES.txt").read_text()
    for package in web.VENDORED_PACKAGES:
        version = json.loads((web.NODE_MODULES / package / "package.json").read_text())["version"]
        assert f"{package} {version}" in notices
    assert notices.count("Permission is hereby granted") >= 4  # MIT (react, graphiql, graphql)


@pytest.mark.parametrize(
    "path", ["/static/package.json", "/static/viewer.html", "/static/..%2Fweb.py", "/static/x"]
)
async def test_only_listed_assets_are_served(client: httpx.AsyncClient, path: str) -> None:
    assert (await client.get(path)).status_code == 404


async def test_viewer_page_and_its_assets(client: httpx.AsyncClient) -> None:
    page = await client.get("/viewer")
    assert page.status_code == 200 and "node viewer" in page.text
    script = await client.get("/static/viewer.js")
    assert script.status_code == 200
    assert "topActivations { tokens activations normalizedActivations }" in script.text
    assert "bestExplanation { text score }" in script.text
    assert (await client.get("/static/viewer.css")).status_code == 200
    # The request helper the viewer and the graph page share, loaded before their scripts.
    helper = await client.get("/static/api.js")
    assert helper.status_code == 200 and 'fetch("/graphql"' in helper.text
    assert page.text.index("/static/api.js") < page.text.index("/static/viewer.js")
