"""HTML pages: the studio, the viewer and the OBS overlays, rendered from Jinja templates in `overlays/`.

Query values reach templates only through Jinja's autoescape and `tojson`, never raw into a script.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.config import valid_stream_id

if TYPE_CHECKING:
    from service.app import DreamStream

OVERLAYS_DIR = Path(os.environ.get("DREAMSTREAM_OVERLAYS_DIR", Path(__file__).resolve().parent.parent / "overlays"))


def _page_context(ds: DreamStream, request: Request, **extra: Any) -> dict[str, Any]:
    info = ds.backend.describe()
    return {
        "request": request,
        "processor": info["processor"],
        "device": info["device"],
        "reason": info["reason"],
        "config": ds.default_config.to_dict(),
        **extra,
    }


def register_pages(app: FastAPI, ds: DreamStream) -> None:
    templates = Jinja2Templates(directory=str(OVERLAYS_DIR / "templates"))
    app.mount("/static", StaticFiles(directory=str(OVERLAYS_DIR / "static")), name="static")

    def bad_stream(stream_id: str) -> HTMLResponse | None:
        if valid_stream_id(stream_id):
            return None
        return HTMLResponse("stream id must be 1-64 characters of A-Z a-z 0-9 _ -", status_code=400)

    @app.get("/", response_class=HTMLResponse)
    async def studio(request: Request, stream: str = "main", autostart: int = 0) -> HTMLResponse:
        if not valid_stream_id(stream):
            stream = "main"
        ctx = _page_context(ds, request, stream_id=stream, autostart=bool(autostart))
        return templates.TemplateResponse(request, "studio.html", ctx)

    @app.get("/view/{stream_id}", response_class=HTMLResponse)
    async def viewer(request: Request, stream_id: str) -> HTMLResponse:
        if (bad := bad_stream(stream_id)) is not None:
            return bad
        return templates.TemplateResponse(request, "viewer.html", _page_context(ds, request, stream_id=stream_id))

    @app.get("/overlay/{stream_id}", response_class=HTMLResponse)
    async def overlay(
        request: Request, stream_id: str, fit: str = "cover", fade: int = 0, debug: int = 0, token: str = ""
    ) -> HTMLResponse:
        if (bad := bad_stream(stream_id)) is not None:
            return bad
        fit = fit if fit in ("cover", "contain", "fill") else "cover"
        ctx = _page_context(
            ds, request, stream_id=stream_id, fit=fit, fade=max(0, min(fade, 5000)), debug=bool(debug), token=token
        )
        return templates.TemplateResponse(request, "overlay.html", ctx)

    @app.get("/overlay/{stream_id}/compare", response_class=HTMLResponse)
    async def compare(request: Request, stream_id: str, token: str = "", debug: int = 0) -> HTMLResponse:
        if (bad := bad_stream(stream_id)) is not None:
            return bad
        ctx = _page_context(ds, request, stream_id=stream_id, token=token, debug=bool(debug))
        return templates.TemplateResponse(request, "compare.html", ctx)
