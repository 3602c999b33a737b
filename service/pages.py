"""HTML pages: the studio, the OBS dock, the viewer and the OBS overlays, rendered from Jinja templates in `overlays/`.

The pages live in the `overlays` package (templates/ and static/, data only), found with importlib.resources so
a wheel install serves them as a checkout does; DREAMSTREAM_OVERLAYS_DIR points at another copy instead.

Every query value is checked here, before a template sees it. Values reach the page's JavaScript only
as one JSON block (`{{ client|tojson }}` inside `<script type="application/json">`), never raw into a
script, and a Content-Security-Policy that allows only our own script files makes any markup that did
slip through inert. A bad overlay option answers a readable 400 page: in an OBS source that error is
visible at once, where a silent fallback would hide the typo.

The dock takes the stream key in its URL (OBS's dock settings have nowhere else to put it): like a viewer
token it reaches the page only in that JSON block, is never sent as a referrer (`no-referrer`), is redacted
from the access log (service/auth.py), and the dock sends it only to this server, as a Bearer header.
"""

from __future__ import annotations

import importlib.resources
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, Response
from fastapi.staticfiles import StaticFiles
from fastapi.templating import Jinja2Templates

from service.config import PROCESSOR_TYPES, valid_stream_id

if TYPE_CHECKING:
    from service.state import DreamStream


def overlays_dir(override: str | None = None) -> Path:
    """Where the templates and static files are: `override` (Settings.overlays_dir, env DREAMSTREAM_OVERLAYS_DIR),
    else the installed `overlays` package.

    Beside the source tree as a last resort (an editable install made before `overlays` was a package,
    or a deployment that copies the folders without installing)."""
    if override:
        return Path(override)
    try:
        found = importlib.resources.files("overlays")
    except ModuleNotFoundError:
        return Path(__file__).resolve().parent.parent / "overlays"
    if not isinstance(found, Path):  # e.g. a zip import: Jinja and StaticFiles need a real folder
        raise RuntimeError(f"the overlays package must be installed as files on disk, found {found!r}")
    return found



FITS = ("cover", "contain", "fill")
MAX_FADE_MS = 10_000
MAX_TOKEN_CHARS = 512
# Processors a user may pick. `identity` (frames pass through untouched) is for tests and benchmarks: a
# page lists it only while a stream already uses it, so the control still shows the truth.
OFFERED_PROCESSORS = tuple(p for p in PROCESSOR_TYPES if p != "identity")
# One-click styles, shown by the studio and the dock: (label, prompt)
PRESETS = (
    ("Van Gogh", "Van Gogh style painting"),
    ("watercolor", "Monet-style watercolor"),
    ("cartoon", "cartoon, comic book style"),
    ("pencil sketch", "pencil sketch"),
    ("noir", "film noir, black and white"),
)
STREAM_ID_RULE = "1-64 characters of A-Z a-z 0-9 _ -"

# Our own scripts only; styles may be inline because OBS injects a browser source's "Custom CSS" as a
# <style> element. connect-src names ws:/wss: because older Chromium (OBS's CEF) does not match
# same-origin WebSockets with 'self'.
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
        "img-src 'self' data: blob:; media-src 'self' blob: mediastream:; connect-src 'self' ws: wss:; "
        "worker-src 'self'; object-src 'none'; base-uri 'none'; form-action 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",  # overlay URLs may carry a viewer token
    "Cache-Control": "no-store",
}


class RevalidatedStaticFiles(StaticFiles):
    """Static files the browser must revalidate (a cheap 304): an OBS source never reloads by itself,
    so a heuristically cached old script could outlive a server upgrade."""

    def file_response(self, *args: Any, **kwargs: Any) -> Response:
        response = super().file_response(*args, **kwargs)
        response.headers["Cache-Control"] = "no-cache"
        return response


class BadQuery(ValueError):
    """A query value we refuse; its message says what is allowed."""


def _flag(request: Request, name: str) -> bool:
    raw = request.query_params.get(name, "0").strip().lower()
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("", "0", "false", "no", "off"):
        return False
    raise BadQuery(f"{name} must be 1 or 0, got {raw[:40]!r}")


def _fit(request: Request, default: str) -> str:
    fit = request.query_params.get("fit", default)
    if fit not in FITS:
        raise BadQuery(f"fit must be cover, contain or fill, got {fit[:40]!r}")
    return fit


def _fade_ms(request: Request) -> int:
    raw = request.query_params.get("fade", "0").strip()
    if not raw.isdigit() or int(raw) > MAX_FADE_MS:
        raise BadQuery(f"fade must be a whole number of milliseconds from 0 to {MAX_FADE_MS}, got {raw[:40]!r}")
    return int(raw)


def _secret(request: Request, name: str) -> str:
    """A viewer token or stream key from the query: passed to the page as data, only its length checked."""
    value = request.query_params.get(name, "")
    if len(value) > MAX_TOKEN_CHARS:
        raise BadQuery(f"{name} must be at most {MAX_TOKEN_CHARS} characters")
    return value


def _token(request: Request) -> str:
    return _secret(request, "token")


def _stream_id(stream_id: str) -> str:
    if not valid_stream_id(stream_id):
        raise BadQuery(f"stream id must be {STREAM_ID_RULE}, got {stream_id[:70]!r}")
    return stream_id


def _server_info(ds: DreamStream) -> dict[str, Any]:
    """What the control pages show about the server: its default processor, on what device and why, which
    processors it can run (`processor_states`, /healthz's `processors`, None from a server without them),
    and whether it wants a stream key and a viewer token."""
    health = ds.health()
    return {
        "processor": health["processor"],
        "device": health["device"],
        "reason": health.get("reason") or "",
        "status": health["status"],
        "error": health.get("error"),
        "config": ds.default_config.to_dict(),
        "processors": list(OFFERED_PROCESSORS),
        "processor_states": health.get("processors"),
        "presets": [{"label": label, "prompt": prompt} for label, prompt in PRESETS],
        "needs_key": ds.settings.keys_enabled,
        "needs_token": ds.settings.viewer_token is not None,
    }


def register_pages(app: FastAPI, ds: DreamStream) -> None:
    folder = overlays_dir(ds.settings.overlays_dir)
    templates = Jinja2Templates(directory=str(folder / "templates"))
    app.mount("/static", RevalidatedStaticFiles(directory=str(folder / "static")), name="static")

    def render(request: Request, name: str, client: dict[str, Any], status: int = 200) -> HTMLResponse:
        """`client` is everything the page's script may read; the template gets it whole and as fields."""
        response = templates.TemplateResponse(request, name, {"client": client, **client}, status_code=status)
        response.headers.update(SECURITY_HEADERS)
        return response

    def refuse(request: Request, exc: BadQuery) -> HTMLResponse:
        return render(request, "error.html", {"message": str(exc), "path": request.url.path}, status=400)

    @app.get("/", response_class=HTMLResponse)
    async def studio(request: Request) -> HTMLResponse:
        stream = request.query_params.get("stream", "main")
        notice = None
        if not valid_stream_id(stream):
            notice = f"stream id {stream[:70]!r} is not valid ({STREAM_ID_RULE}); using 'main'"
            stream = "main"
        try:
            autostart = _flag(request, "autostart")
        except BadQuery as exc:
            notice, autostart = str(exc), False
        client = {"page": "studio", "stream_id": stream, "autostart": autostart, "notice": notice, **_server_info(ds)}
        return render(request, "studio.html", client)

    def stream_page(template: str, options: Callable[[Request], dict[str, Any]]) -> Callable[..., Any]:
        """A page about one stream: its id from the path, its options from `options(request)`."""

        async def page(request: Request, stream_id: str) -> HTMLResponse:
            try:
                client = {"page": template.removesuffix(".html"), "stream_id": _stream_id(stream_id)}
                client.update(options(request))
            except BadQuery as exc:
                return refuse(request, exc)
            return render(request, template, client)

        return page

    def viewer_options(request: Request) -> dict[str, Any]:
        return {"fit": _fit(request, "contain"), "token": _token(request)}

    def overlay_options(request: Request) -> dict[str, Any]:
        return {
            "fit": _fit(request, "cover"),
            "fade_ms": _fade_ms(request),
            "debug": _flag(request, "debug"),
            "token": _token(request),
        }

    def compare_options(request: Request) -> dict[str, Any]:
        return {"debug": _flag(request, "debug"), "token": _token(request)}

    def dock_options(request: Request) -> dict[str, Any]:
        return {"token": _token(request), "key": _secret(request, "key"), **_server_info(ds)}

    html = {"response_class": HTMLResponse}
    app.get("/view/{stream_id}", **html)(stream_page("viewer.html", viewer_options))
    app.get("/overlay/{stream_id}", **html)(stream_page("overlay.html", overlay_options))
    app.get("/overlay/{stream_id}/compare", **html)(stream_page("compare.html", compare_options))
    app.get("/dock/{stream_id}", **html)(stream_page("dock.html", dock_options))
