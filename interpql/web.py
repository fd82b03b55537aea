"""The browser side: GraphiQL on assets installed from npm, the node viewer at /viewer and the
attribution graph page at /graph (drawn with d3, from the same npm folder), and the explorer at
/explore (built from explorer/ by Vite; the server adds its first model's name to the page).

`npm ci` in interpql/static (run by `make serve`, `make test` and `make dist`) installs GraphiQL,
React, ReactDOM and d3 into static/node_modules, and `vendor_assets` copies the few built files
the pages load into static/vendor/ with their licenses: what the package carries, so that a
pip-installed server works with no internet. Without them, GET /graphql falls back to
strawberry's page, which loads the same libraries from a CDN.
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path

from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, Response
from starlette.routing import BaseRoute, Route

STATIC = Path(__file__).parent / "static"
NODE_MODULES = STATIC / "node_modules"
VENDOR = STATIC / "vendor"

# What the GraphiQL and graph pages load, by the name they load it under (in VENDOR), from where
# npm puts it in NODE_MODULES.
GRAPHIQL_ASSETS = {
    "react.production.min.js": "react/umd/react.production.min.js",
    "react-dom.production.min.js": "react-dom/umd/react-dom.production.min.js",
    "graphiql.min.js": "graphiql/graphiql.min.js",
    "graphiql.min.css": "graphiql/graphiql.min.css",
    "d3.min.js": "d3/dist/d3.min.js",  # the graph page's drawing
}
VIEWER_ASSETS = ("api.js", "viewer.js", "viewer.css", "graph.js", "graph.css", "explore.css")
# The explorer's script, built from explorer/ by Vite (`make serve`, `make test`).
BUILT_ASSETS = {"explore.js": "explore/explore.js"}


# Whose code the vendored files are, for their licenses.
VENDORED_PACKAGES = ("react", "react-dom", "graphiql", "graphql", "d3")


def graphiql_assets_installed() -> bool:
    return all((VENDOR / name).is_file() for name in GRAPHIQL_ASSETS)


def vendor_assets() -> None:
    """Copies the npm-built files the pages load from NODE_MODULES into VENDOR, with the
    licenses of the packages they come from (VENDOR/LICENSES.txt). Run at build time."""
    VENDOR.mkdir(exist_ok=True)
    for name, path in GRAPHIQL_ASSETS.items():
        shutil.copyfile(NODE_MODULES / path, VENDOR / name)
    notices = []
    for package in VENDORED_PACKAGES:
        version = json.loads((NODE_MODULES / package / "package.json").read_text())["version"]
        [license_file] = sorted((NODE_MODULES / package).glob("LICENSE*"))[:1]
        notices.append(f"{package} {version}\n\n{license_file.read_text().strip()}\n")
    (VENDOR / "LICENSES.txt").write_text(
        "The files in this folder are copied from these npm packages, under their licenses:\n\n"
        + "\n\n".join(notices)
    )


def graphiql_page() -> str:
    return (STATIC / "graphiql.html").read_text()


def _asset_path(name: str) -> Path | None:
    if name in GRAPHIQL_ASSETS:
        return VENDOR / name
    if name in VIEWER_ASSETS:
        return STATIC / name
    if name in BUILT_ASSETS:
        return STATIC / BUILT_ASSETS[name]
    return None


async def static_asset(request: Request) -> Response:
    path = _asset_path(request.path_params["name"])
    if path is None or not path.is_file():
        raise HTTPException(404)  # answered as every unknown route is (server.py)
    return FileResponse(path, headers={"Cache-Control": "no-cache"})


async def viewer(_: Request) -> HTMLResponse:
    return HTMLResponse((STATIC / "viewer.html").read_text())


def explore_page(model: str) -> str:
    """The explorer's page, opening on `model` unless its URL names another."""
    return (STATIC / "explore.html").read_text().replace("{{MODEL}}", html.escape(model))


async def graph_page(_: Request) -> HTMLResponse:
    return HTMLResponse((STATIC / "graph.html").read_text())


def routes() -> list[BaseRoute]:
    return [
        Route("/viewer", viewer),
        Route("/graph", graph_page),
        Route("/static/{name}", static_asset),
    ]
