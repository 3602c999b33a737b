"""The FastAPI app: `create_app(settings)` builds the server's state and mounts the routes.

The rooms, in the order a frame passes them (docs/ARCHITECTURE.md draws it): sockets.py (WebSocket endpoints)
-> hub.py (streams, newest frame wins) -> scheduler.py (batches) -> backends.py (where processing runs) ->
engine.py (bytes in, JPEG out) -> processors/. The state they share lives in state.py, the HTTP API in api.py,
the pages in pages.py, and how the app is served in server.py.
"""

from __future__ import annotations

from contextlib import asynccontextmanager
from typing import Any

from fastapi import FastAPI

from service import auth
from service.api import register_api
from service.backends import ProcessorBackend
from service.config import Settings
from service.docs_page import register_docs
from service.pages import register_pages
from service.server import drain_before_exit
from service.sockets import broadcaster_socket, viewer_socket
from service.state import DreamStream
from service.version import package_version

__all__ = ["DreamStream", "create_app"]


def create_app(settings: Settings | None = None, backend: ProcessorBackend | None = None) -> FastAPI:
    settings = settings or Settings.from_env()
    auth.install_log_redaction()
    ds = DreamStream(settings, backend)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        undo = drain_before_exit(ds.drain)
        await ds.startup()
        try:
            yield
        finally:
            await ds.shutdown()  # drains first when no signal did (Modal, a host stopping the app itself)
            undo()

    app = FastAPI(title="DreamStream", version=package_version(), lifespan=lifespan,
                  docs_url=None, redoc_url=None)  # served by docs_page.py from our own files
    app.state.dreamstream = ds
    register_api(app)
    register_docs(app)
    app.add_api_websocket_route("/ws/broadcaster/{stream_id}", broadcaster_socket)
    app.add_api_websocket_route("/ws/viewer/{stream_id}", viewer_socket)
    register_pages(app, ds)
    return app


def __getattr__(name: str) -> Any:
    """`uvicorn service.app:app` builds the app from the environment on first access, not on import."""
    if name == "app":
        globals()["app"] = application = create_app()
        return application
    raise AttributeError(name)
