"""What browsers are told and refused: security headers on every answer, and GraphQL requests
that other sites' pages make.

Headers. Every HTTP answer says `nosniff` (a JSON answer is never run as a script), may not be
framed by another site (clickjacking the explorer's buttons), and sends no referrer off this
origin. HTML pages get a Content-Security-Policy that lets them load only this server's files
and talk only to it: a text that ever slipped through into markup could run no script. The
GraphiQL page's one inline script is allowed by its hash; strawberry's CDN page (served when
the local assets are not installed) sets its own, looser policy.

Cross-origin requests. CORS keeps another site's page from reading an answer, not from making
the server compute it: a page anywhere can send `GET /graphql?query=...` (an image tag, a
no-cors fetch) and spend this server's forward passes. Browsers say where a request comes from
(`Origin`, and `Sec-Fetch-Site` on every request), so such requests are refused, 403
ORIGIN_NOT_ALLOWED, before they run. Requests with neither header (curl, scripts, gateways,
other servers) are not browsers' and pass; pages served under this server's own name and the origins
--cors-origin-regex allows pass too.
"""

from __future__ import annotations

import base64
import hashlib
import re
import urllib.parse

from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from interpql.errors import shown
from interpql.host_check import host_name

_COMMON = (
    (b"x-content-type-options", b"nosniff"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"same-origin"),
)
# 'self' covers same-origin WebSockets (ws:, wss:) in CSP Level 3, as browsers now implement it.
_PAGE_POLICY = (
    "default-src 'self'; script-src 'self'{scripts}; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; font-src 'self' data:; connect-src 'self'; worker-src 'self' blob:; "
    "object-src 'none'; base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)
# For a page that must load from a CDN (strawberry's GraphiQL fallback): framing refused only.
LOOSE_PAGE_POLICY = "frame-ancestors 'none'"

_INLINE_SCRIPT = re.compile(r"<script>(.*?)</script>", re.DOTALL)


def page_policy(html: str = "") -> str:
    """The Content-Security-Policy of a page whose inline scripts are those of `html`."""
    hashes = "".join(
        f" 'sha256-{base64.b64encode(hashlib.sha256(script.encode()).digest()).decode()}'"
        for script in _INLINE_SCRIPT.findall(html)
    )
    return _PAGE_POLICY.format(scripts=hashes)


class SecurityHeaders:
    """Adds the headers above to every HTTP answer (a CSP to HTML ones that set none)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self._default_policy = page_policy().encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = list(message.get("headers") or [])
                names = {name.lower() for name, _ in headers}
                headers += [(name, value) for name, value in _COMMON if name not in names]
                content_type = dict(headers).get(b"content-type", b"")
                if (
                    content_type.startswith(b"text/html")
                    and b"content-security-policy" not in names
                ):
                    headers.append((b"content-security-policy", self._default_policy))
                message = {**message, "headers": headers}
            await send(message)

        await self.app(scope, receive, with_headers)


def from_this_server(origin: str, host_header: str) -> bool:
    """Whether a browser's Origin header names the host it was sent to (its Host header).

    The names alone are compared: behind a proxy that ends TLS the server sees http and the
    proxy's port while the page is https on 443, and a page elsewhere cannot be served under
    this server's name anyway (AllowedHosts refuses names it does not answer to)."""
    try:
        named = urllib.parse.urlsplit(origin)
        named.port  # noqa: B018 - a port that is no number: no origin a browser sends
    except ValueError:
        return False
    return bool(named.hostname) and named.hostname == host_name(host_header)


def cross_origin_refusal(scope: Scope, allowed: re.Pattern[str]) -> str | None:
    """Why another site's page may not run this request, or None."""
    headers = Headers(scope=scope)
    origin = headers.get("origin")
    if origin is not None:
        if origin != "null" and (
            allowed.fullmatch(origin) is not None
            or from_this_server(origin, headers.get("host", ""))
        ):
            return None
        return (
            f"Requests from pages at {shown(origin, 64)} are not served: start the server with "
            "--cors-origin-regex matching that origin to allow them."
        )
    # An image or script tag elsewhere; not a link the user followed (a navigation gets the
    # GraphiQL page, and runs nothing).
    if (
        headers.get("sec-fetch-site") == "cross-site"
        and headers.get("sec-fetch-mode") != "navigate"
    ):
        return "Requests made by other sites' pages are not served."
    return None
