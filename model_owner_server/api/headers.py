"""Security headers on every response (API and console), added by one ASGI middleware.

Every response: `X-Content-Type-Options: nosniff` (a JSON body or a download is never sniffed into HTML),
`Referrer-Policy: no-referrer` (console URLs carry ids), `X-Frame-Options: DENY` (no clickjacking of the
console's buttons). Console pages get a Content-Security-Policy that allows only the console's own files;
its two inline exceptions are pinned by hash (`CONSOLE_INLINE`); /v1 answers get `default-src 'none'`.
HSTS only where the server is reached over https (the request's scheme, or an https SCALEOT_PUBLIC_URL behind
a TLS-terminating proxy): sent over plain http it would be ignored, or pin a host that has no https.
A header a route set itself is kept.
"""

from __future__ import annotations

import base64
import hashlib

from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

# The only inline code the console runs, allowed by hash rather than by 'unsafe-inline' (an injected
# <script> or handler would not match): the emulator page's click-to-select command boxes, and the
# indicator <style> that the vendored htmx inserts at start-up (tests check both against the sources).
HTMX_INDICATOR_CSS = (
    ".htmx-indicator{opacity:0;visibility: hidden} "
    ".htmx-request .htmx-indicator, .htmx-request.htmx-indicator{opacity:1;visibility: visible;"
    "transition: opacity 200ms ease-in}"
)
CONSOLE_INLINE = {"script": ("this.select()",), "style": (HTMX_INDICATOR_CSS,)}


def csp_hash(source: str) -> str:
    return "'sha256-" + base64.b64encode(hashlib.sha256(source.encode()).digest()).decode() + "'"


CONSOLE_CSP = "; ".join(
    (
        "default-src 'self'",
        # 'unsafe-hashes': hashes may also match inline event handlers (onclick=...), only those listed.
        "script-src 'self' 'unsafe-hashes' " + " ".join(csp_hash(s) for s in CONSOLE_INLINE["script"]),
        "style-src 'self' " + " ".join(csp_hash(s) for s in CONSOLE_INLINE["style"]),
        "img-src 'self' data:",
        "object-src 'none'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    )
)
API_CSP = "default-src 'none'; frame-ancestors 'none'"
HSTS = "max-age=31536000"
COMMON = (
    ("x-content-type-options", "nosniff"),
    ("referrer-policy", "no-referrer"),
    ("x-frame-options", "DENY"),
)


class SecurityHeadersMiddleware:
    """Adds the headers above to every HTTP response. `public_url`: SCALEOT_PUBLIC_URL (https -> HSTS)."""

    def __init__(self, app: ASGIApp, public_url: str | None = None) -> None:
        self.app = app
        self.always_https = (public_url or "").lower().startswith("https://")

    def headers_for(self, scope: Scope) -> list[tuple[str, str]]:
        path: str = scope.get("path", "")
        extra = list(COMMON)
        if path == "/console" or path.startswith("/console/"):
            extra.append(("content-security-policy", CONSOLE_CSP))
        elif path.startswith("/v1/"):  # /docs (Swagger UI from a CDN, inline start-up script) is left alone
            extra.append(("content-security-policy", API_CSP))
        if self.always_https or scope.get("scheme") == "https":
            extra.append(("strict-transport-security", HSTS))
        return extra

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        extra = self.headers_for(scope)

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                headers = MutableHeaders(scope=message)
                for name, value in extra:
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_with_headers)
