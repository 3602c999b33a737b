"""`--install-overlay`: a Browser Source in OBS that shows the styled stream (`/overlay/{stream_id}`)."""

from __future__ import annotations

import logging
from urllib.parse import quote, urlsplit, urlunsplit

from obs_plugin.obs_client import (
    STATUS_INVALID_INPUT_KIND,
    STATUS_RESOURCE_NOT_FOUND,
    ObsConnection,
    ObsFatal,
    ObsRequestError,
)
from obs_plugin.sources import BROWSER_SOURCE_KIND, OVERLAY_INPUT_NAME, program_scene, scene_names

log = logging.getLogger("dreamstream.obs")

INSTALL_BROWSER_SOURCE = (
    "Install OBS Studio from obsproject.com, the official PPA (ppa:obsproject/obs-studio) or "
    "Flathub (com.obsproject.Studio): they ship obs-browser. Distribution builds such as Debian's "
    "obs-studio leave it out. Or add the overlay URL as a Browser Source by hand in another OBS."
)


class BrowserSourceMissing(ObsFatal):
    pass


def http_base(server: str) -> str:
    """`ws://host:8000/x` -> `http://host:8000/x` (wss -> https); http(s) URLs pass through."""
    parts = urlsplit(server.rstrip("/"))
    scheme = {"ws": "http", "wss": "https"}.get(parts.scheme, parts.scheme)
    return urlunsplit((scheme, parts.netloc, parts.path, "", ""))


def overlay_url(server: str, stream_id: str, token: str | None = None) -> str:
    url = f"{http_base(server)}/overlay/{stream_id}"
    return f"{url}?token={quote(token, safe='')}" if token else url


def redact(url: str) -> str:
    """The URL with query values hidden, for logs: a viewer token must not end up in one."""
    parts = urlsplit(url)
    if not parts.query:
        return url
    query = "&".join(f"{pair.split('=', 1)[0]}=***" for pair in parts.query.split("&"))
    return urlunsplit((parts.scheme, parts.netloc, parts.path, query, ""))


def install_overlay(conn: ObsConnection, url: str, scene: str | None) -> str:
    """Create or update the "DreamStream Overlay" browser source in `scene`, sized to the canvas,
    and press its refresh button so a page already open picks up the new URL. Returns the scene.
    """
    kinds = conn.request("GetInputKindList", {"unversioned": True}).get("inputKinds", [])
    if BROWSER_SOURCE_KIND not in kinds:
        raise BrowserSourceMissing(
            f"this OBS has no Browser Source (GetInputKindList lacks {BROWSER_SOURCE_KIND!r}), so "
            "--install-overlay cannot add the overlay. "
            + INSTALL_BROWSER_SOURCE
        )
    scene = scene or program_scene(conn)
    scenes = scene_names(conn)
    if scene not in scenes:
        raise ObsFatal(f"--overlay-scene {scene!r} is not a scene in OBS; it has {', '.join(map(repr, scenes))}")
    video = conn.request("GetVideoSettings")
    settings = {"url": url, "width": int(video["baseWidth"]), "height": int(video["baseHeight"])}

    existing = _input_kind(conn, OVERLAY_INPUT_NAME)
    try:
        if existing is None:
            conn.request(
                "CreateInput",
                {"sceneName": scene, "inputName": OVERLAY_INPUT_NAME, "inputKind": BROWSER_SOURCE_KIND,
                 "inputSettings": settings, "sceneItemEnabled": True},
            )
            action = "created"
        elif not existing.startswith(BROWSER_SOURCE_KIND):
            raise ObsFatal(
                f"OBS already has an input named {OVERLAY_INPUT_NAME!r} of kind {existing!r}; "
                "rename or remove it so the overlay browser source can take that name"
            )
        else:
            conn.request("SetInputSettings", {"inputName": OVERLAY_INPUT_NAME, "inputSettings": settings})
            _ensure_in_scene(conn, scene)
            action = "updated"
    except ObsRequestError as exc:
        if exc.code == STATUS_INVALID_INPUT_KIND:
            raise BrowserSourceMissing(
                f"OBS refused to create a {BROWSER_SOURCE_KIND} (code {exc.code}: {exc.comment}). "
                + INSTALL_BROWSER_SOURCE
            ) from None
        raise ObsFatal(f"could not install the overlay: {exc}") from None
    conn.request("PressInputPropertiesButton", {"inputName": OVERLAY_INPUT_NAME, "propertyName": "refreshnocache"})
    log.info(
        "%s browser source %r in scene %r: %s at %dx%d (refreshed)",
        action, OVERLAY_INPUT_NAME, scene, redact(url), settings["width"], settings["height"],
    )
    return scene


def _input_kind(conn: ObsConnection, name: str) -> str | None:
    try:
        return str(conn.request("GetInputSettings", {"inputName": name}).get("inputKind", ""))
    except ObsRequestError as exc:
        if exc.code == STATUS_RESOURCE_NOT_FOUND:
            return None
        raise


def _ensure_in_scene(conn: ObsConnection, scene: str) -> None:
    try:
        conn.request("GetSceneItemId", {"sceneName": scene, "sourceName": OVERLAY_INPUT_NAME})
    except ObsRequestError as exc:
        if exc.code != STATUS_RESOURCE_NOT_FOUND:
            raise
        conn.request(
            "CreateSceneItem", {"sceneName": scene, "sourceName": OVERLAY_INPUT_NAME, "sceneItemEnabled": True}
        )
