"""The browser side's routes: GraphiQL's page and its local assets, the CDN fallback, the viewer."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from pathlib import Path

import httpx
import pytest

from interpql import web
from interpql.browser_policy import from_this_server


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


PAGES = ("/viewer", "/graph", "/explore")


async def test_every_answer_carries_the_security_headers(client: httpx.AsyncClient) -> None:
    """No answer said nosniff, refused framing or set a Content-Security-Policy."""
    for path in PAGES:
        page = await client.get(path)
        assert page.status_code == 200, path
        policy = page.headers["content-security-policy"]
        assert "frame-ancestors 'none'" in policy and "script-src 'self';" in policy, path
        assert "'unsafe-inline'" not in policy.partition("style-src")[0], path
        assert page.headers["x-frame-options"] == "DENY"
        assert page.headers["x-content-type-options"] == "nosniff"
        assert page.headers["referrer-policy"] == "same-origin"
    answer = await client.post("/graphql", json={"query": "{ models { name } }"})
    assert answer.headers["x-content-type-options"] == "nosniff"
    assert "content-security-policy" not in answer.headers  # a policy is for documents
    refused = await client.post("/graphql", json={}, headers={"Host": "evil.example"})
    assert refused.status_code == 400 and refused.headers["x-content-type-options"] == "nosniff"


async def test_graphiqls_inline_script_is_allowed_by_its_hash(
    client: httpx.AsyncClient, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    page = await client.get("/graphql", headers={"Accept": "text/html"})
    [script] = re.findall(r"<script>(.*?)</script>", page.text, re.DOTALL)
    digest = base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()
    policy = page.headers["content-security-policy"]
    assert f"script-src 'self' 'sha256-{digest}';" in policy
    # The CDN page loads from unpkg with inline scripts: framing is all it is refused.
    monkeypatch.setattr(web, "VENDOR", tmp_path)
    cdn = await client.get("/graphql", headers={"Accept": "text/html"})
    assert cdn.headers["content-security-policy"] == "frame-ancestors 'none'"


INFER = {"query": '{ model(name: "small") { infer(input: {prompt: "a b c d"}) { loss } } }'}


@pytest.mark.parametrize(
    ("headers", "served"),
    [
        ({}, True),  # curl, scripts, gateways: no browser
        ({"Origin": "http://localhost:5173"}, True),  # --cors-origin-regex allows it
        ({"Origin": "http://localhost", "Sec-Fetch-Site": "same-origin"}, True),
        ({"Sec-Fetch-Site": "same-site"}, True),
        ({"Origin": "https://evil.example"}, False),
        ({"Origin": "null"}, False),  # a sandboxed frame, a file:// page
        ({"Sec-Fetch-Site": "cross-site", "Sec-Fetch-Mode": "no-cors"}, False),  # <img src>
    ],
    ids=["no browser", "allowed origin", "same origin", "same site", "foreign", "null", "tag"],
)
async def test_other_sites_pages_cannot_make_the_server_compute(
    client: httpx.AsyncClient, headers: dict[str, str], served: bool
) -> None:
    """CORS kept a foreign page from reading the answer, not from running the forward pass:
    GET /graphql?query=... from any site ran it."""
    for answer in (
        await client.get("/graphql", params=INFER, headers=headers),
        await client.post("/graphql", json=INFER, headers=headers),
    ):
        if served:
            assert answer.status_code == 200, answer.text
            assert answer.json()["data"]["model"]["infer"]["loss"] > 0, answer.json()
        else:
            assert answer.status_code == 403
            [error] = answer.json()["errors"]
            assert error["extensions"]["code"] == "ORIGIN_NOT_ALLOWED"


async def test_a_link_followed_from_another_site_opens_graphiql(client: httpx.AsyncClient) -> None:
    navigation = {
        "Sec-Fetch-Site": "cross-site",
        "Sec-Fetch-Mode": "navigate",
        "Accept": "text/html",
    }
    page = await client.get("/graphql", headers=navigation)
    assert page.status_code == 200 and "graphiql" in page.text.lower()


@pytest.mark.parametrize(
    ("origin", "host", "same"),
    [
        ("http://myhost:8000", "myhost:8000", True),
        ("https://myhost", "myhost:8000", True),  # behind a proxy that ends TLS
        ("http://MyHost:8000", "myhost", True),
        ("http://[::1]:8000", "[::1]:8000", True),
        ("http://other:8000", "myhost:8000", False),
        ("http://myhost.evil.example", "myhost", False),
        ("http://myhost:99999", "myhost:8000", False),
        ("null", "myhost", False),
    ],
)
def test_an_origin_from_this_server(origin: str, host: str, same: bool) -> None:
    """A page served on a name of its own (--allowed-host) opened no WebSocket: only the
    --cors-origin-regex origins (localhost) were let through."""
    assert from_this_server(origin, host) is same


@pytest.mark.parametrize(
    ("method", "path", "status", "code"),
    [
        ("GET", "/nonexistent", 404, "NOT_FOUND"),
        ("GET", "/static/nothing.js", 404, "NOT_FOUND"),
        ("PATCH", "/graphql", 405, "METHOD_NOT_ALLOWED"),
        ("PUT", "/viewer", 405, "METHOD_NOT_ALLOWED"),
    ],
)
async def test_other_routes_answer_json_errors_with_codes(
    client: httpx.AsyncClient, method: str, path: str, status: int, code: str
) -> None:
    """The README promised NOT_FOUND and METHOD_NOT_ALLOWED; Starlette answered plain text."""
    answer = await client.request(method, path, headers={"Accept": "application/json"})
    assert answer.status_code == status
    [error] = answer.json()["errors"]
    assert error["extensions"]["code"] == code
    if status == 405:
        assert "GET" in answer.headers["allow"]
