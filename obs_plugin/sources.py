"""Which OBS source to capture, and whether capturing it would feed our own overlay back into itself."""

from __future__ import annotations

from obs_plugin.obs_client import STATUS_RESOURCE_NOT_FOUND, ObsConnection, ObsFatal, ObsRequestError

OVERLAY_INPUT_NAME = "DreamStream Overlay"
OVERLAY_PATH_MARK = "/overlay/"
BROWSER_SOURCE_KIND = "browser_source"
_SCENE_SOURCE_TYPE = "OBS_SOURCE_TYPE_SCENE"
_MAX_DEPTH = 8


class SourceNotFound(ObsFatal):
    pass


class FeedbackLoop(ObsFatal):
    pass


def scene_names(conn: ObsConnection) -> list[str]:
    return [scene["sceneName"] for scene in conn.request("GetSceneList").get("scenes", [])]


def input_names(conn: ObsConnection) -> list[str]:
    return [item["inputName"] for item in conn.request("GetInputList").get("inputs", [])]


def program_scene(conn: ObsConnection) -> str:
    reply = conn.request("GetCurrentProgramScene")
    # obs-websocket 5.1 names it currentProgramSceneName; 5.3+ adds sceneName
    return reply.get("currentProgramSceneName") or reply["sceneName"]


def describe_sources(conn: ObsConnection) -> str:
    """`scenes: 'A', 'B'; inputs: 'Cam'` - what the user could have meant."""

    def quoted(names: list[str]) -> str:
        return ", ".join(repr(name) for name in names) or "(none)"

    return f"scenes: {quoted(scene_names(conn))}; inputs: {quoted(input_names(conn))}"


def resolve_source(conn: ObsConnection, name: str | None) -> tuple[str, bool]:
    """(source name, is_scene). No name means the current program scene."""
    if name is None:
        return program_scene(conn), True
    if name in scene_names(conn):
        return name, True
    if name in input_names(conn):
        return name, False
    raise SourceNotFound(
        f"OBS has no scene or input named {name!r}. It has {describe_sources(conn)}. "
        "Pass one of them with --source (names are case-sensitive)."
    )


def find_overlay(conn: ObsConnection, source: str, is_scene: bool) -> str | None:
    """The path to our overlay inside `source` ("'Main' > 'Nested' > 'DreamStream Overlay'"), or None.

    Our overlay shows the styled copy of what we capture; capturing it too would restyle the
    restyled frames, over and over. Nested scenes and groups are searched as well.
    """
    if not is_scene:
        return repr(source) if _is_overlay(conn, source, None) else None
    return _search_scene(conn, source, group=False, seen=set(), depth=0)


def _search_scene(conn: ObsConnection, scene: str, group: bool, seen: set[str], depth: int) -> str | None:
    if scene in seen or depth > _MAX_DEPTH:
        return None
    seen.add(scene)
    request = "GetGroupSceneItemList" if group else "GetSceneItemList"
    for item in conn.request(request, {"sceneName": scene}).get("sceneItems", []):
        name = item.get("sourceName", "")
        if item.get("isGroup"):
            inner = _search_scene(conn, name, group=True, seen=seen, depth=depth + 1)
        elif item.get("sourceType") == _SCENE_SOURCE_TYPE:
            inner = _search_scene(conn, name, group=False, seen=seen, depth=depth + 1)
        else:
            inner = repr(name) if _is_overlay(conn, name, item.get("inputKind")) else None
        if inner:
            return f"{scene!r} > {inner}"
    return None


def _is_overlay(conn: ObsConnection, name: str, kind: str | None) -> bool:
    if name == OVERLAY_INPUT_NAME:
        return True
    if kind is not None and not kind.startswith(BROWSER_SOURCE_KIND):
        return False
    try:
        reply = conn.request("GetInputSettings", {"inputName": name})
    except ObsRequestError as exc:
        if exc.code == STATUS_RESOURCE_NOT_FOUND:
            return False
        raise
    if not str(reply.get("inputKind", "")).startswith(BROWSER_SOURCE_KIND):
        return False
    return OVERLAY_PATH_MARK in str(reply.get("inputSettings", {}).get("url", ""))


def check_no_feedback(conn: ObsConnection, source: str, is_scene: bool) -> None:
    path = find_overlay(conn, source, is_scene)
    if path:
        raise FeedbackLoop(
            f"refusing to capture {source!r}: it shows the DreamStream overlay ({path}), so its "
            "restyled output would be captured and restyled again (a feedback loop). Capture the scene "
            "or input under the overlay instead (put your camera etc. in their own scene, nest that "
            "scene in the one that holds the overlay, and pass it with --source)."
        )
