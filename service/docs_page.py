"""`/docs` and `/redoc`: the OpenAPI pages with their scripts served by this server, not a CDN, so they work offline.

FastAPI's documented self-hosting recipe (`docs_url=None, redoc_url=None`, then `get_swagger_ui_html` /
`get_redoc_html` pointed at our own copies); the files are the ones the `fastapi-offline` package ships (Swagger
UI 5, which reads the OpenAPI 3.1 FastAPI writes, and ReDoc). These pages get a CSP of their own: the pages' CSP
(pages.py) allows no inline script, and FastAPI's Swagger page starts Swagger UI with one, so that one script is
allowed by its hash and nothing else inline runs; nothing is fetched from anywhere but this server.
"""

from __future__ import annotations

import base64
import hashlib
import re
from pathlib import Path

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

ASSETS = "/docs-assets"  # beside /static (the pages' folder), not under it: that mount would shadow this one
ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"


def _csp(html: str) -> str:
    inline = re.findall(r"<script>(.*?)</script>", html, re.S)
    hashes = "".join(f" 'sha256-{base64.b64encode(hashlib.sha256(s.encode()).digest()).decode()}'" for s in inline)
    return (
        f"default-src 'self'; script-src 'self'{hashes}; style-src 'self' 'unsafe-inline'; img-src 'self' data:; "
        "worker-src 'self' blob:; connect-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'; "
        "frame-ancestors 'none'"
    )


def _page(response: HTMLResponse) -> HTMLResponse:
    body = bytes(response.body).decode()
    headers = {"Content-Security-Policy": _csp(body), "X-Content-Type-Options": "nosniff", "Cache-Control": "no-store"}
    return HTMLResponse(body, headers=headers)


def register_docs(app: FastAPI) -> None:
    """Serve Swagger UI at /docs and ReDoc at /redoc from our own files; build the app with `docs_url=None,
    redoc_url=None`. Paths take the request's root_path (a server behind a path prefix)."""
    app.mount(ASSETS, StaticFiles(directory=str(ASSETS_DIR)), name="docs-assets")

    async def docs(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_swagger_ui_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            swagger_js_url=f"{root}{ASSETS}/swagger-ui-bundle.js",
            swagger_css_url=f"{root}{ASSETS}/swagger-ui.css",
            swagger_favicon_url=f"{root}{ASSETS}/favicon.png",
            oauth2_redirect_url=None,
            swagger_ui_parameters={"validatorUrl": None},  # its default is a badge image from validator.swagger.io
        ))

    async def redoc(request: Request) -> HTMLResponse:
        root = request.scope.get("root_path", "")
        return _page(get_redoc_html(
            openapi_url=f"{root}{app.openapi_url}",
            title=f"{app.title} - API",
            redoc_js_url=f"{root}{ASSETS}/redoc.standalone.js",
            redoc_favicon_url=f"{root}{ASSETS}/favicon.png",
            with_google_fonts=False,
        ))

    app.add_api_route("/docs", docs, methods=["GET"], include_in_schema=False)
    app.add_api_route("/redoc", redoc, methods=["GET"], include_in_schema=False)
