"""The browser side: GraphiQL on assets installed from npm, the node viewer at /viewer and the
attribution graph page at /graph (drawn with d3, from the same npm folder), and the explorer at
/explore (built from explorer/ by Vite; the server adds its first model's name to the page).

`npm ci` in interpql/static (run by `make serve` and `make test`) installs GraphiQL, React and
ReactDOM into static/node_modules; this module serves the few built files the GraphiQL page loads,
so GraphiQL works with no internet. Without them, GET /graphql falls back to strawberry's page,
which loads the same libraries from a CDN.
"""

from __future__ import annotations

import html
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, HTMLResponse, PlainTextResponse, Response
from starlette.routing import BaseRoute, Route

STATIC = Path(__file__).parent / "static"
NODE_MODULES = STATIC / "node_modules"

# What the GraphiQL page loads, by the name it loads it under, inside NODE_MODULES.
GRAPHIQL_ASSETS = {
    "react.production.min.js": "react/umd/react.production.min.js",
    "react-dom.production.min.js": "react-dom/umd/react-dom.production.min.js",
    "graphiql.min.js": "graphiql/graphiql.min.js",
    "graphiql.min.css": "graphiql/graphiql.min.css",
    "d3.min.js": "d3/dist/d3.min.js",  # the graph page's drawing
}
VIEWER_ASSETS = ("viewer.js", "viewer.css", "graph.js", "graph.css", "explore.css")
# The explorer's script, built from explorer/ by Vite (`make serve`, `make test`).
BUILT_ASSETS = {"explore.js": "explore/explore.js"}


def graphiql_assets_installed() -> bool:
    return all((NODE_MODULES / path).is_file() for path in GRAPHIQL_ASSETS.values())


def graphiql_page() -> str:
    return (STATIC / "graphiql.html").read_text()


def _asset_path(name: str) -> Path | None:
    if name in GRAPHIQL_ASSETS:
        return NODE_MODULES / GRAPHIQL_ASSETS[name]
    if name in VIEWER_ASSETS:
        return STATIC / name
    if name in BUILT_ASSETS:
        return STATIC / BUILT_ASSETS[name]
    return None


async def static_asset(request: Request) -> Response:
    path = _asset_path(request.path_params["name"])
    if path is None or not path.is_file():
        return PlainTextResponse("Not found.", status_code=404)
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
