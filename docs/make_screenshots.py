"""Regenerate the README screenshots in docs/images/: stream.png, stream.gif, overlay.png, compare.png, studio.png,
dock.png.

    .venv/bin/python docs/make_screenshots.py [--out docs/images]

Runs a real server with the CPU `filter` processor, a synthetic test scene as the source (pushed by
a Python broadcaster, and as Chromium's fake camera for the studio), and the same headless Chromium
the browser tests use (tests/browser.py). stream.png is the README's first picture: the frame sent beside the
OBS overlay page showing it styled with each of the studio's presets (a strip of real overlay screenshots, no
mock-up); stream.gif the overlay page while a moving scene streams and the style steps through the presets. The
overlay is shown over a checkerboard, the usual way to
picture transparency. The studio is shot at 1280x800 as the browser shows it (no scrolling: the prompt must
be beside the preview), the dock at 350x700, a usual width for an OBS dock. Each PNG is shrunk to stay well
under 300 KB.
"""

from __future__ import annotations

import argparse
import io
import json
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

import cv2
import numpy as np
import simplejpeg
from PIL import Image, ImageDraw, ImageFont

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from service.pages import PRESETS  # noqa: E402
from tests.browser import FramePusher, frames_drawn, launch_chromium, open_page, wait_for_frames  # noqa: E402
from tests.helpers import running_server  # noqa: E402

MAX_BYTES = 300_000
STUDIO_VIEWPORT = {"width": 1280, "height": 800}
DOCK_VIEWPORT = {"width": 350, "height": 700}


def scene(w: int, h: int, t: float = 0.0) -> np.ndarray:
    """A small landscape (sky, sun, hills, a house): edges and colours for the filters to work on."""
    y = np.linspace(0, 1, h)[:, None, None]
    sky = (1 - y) * np.array([70, 130, 220]) + y * np.array([250, 190, 140])
    img = np.broadcast_to(sky, (h, w, 3)).astype(np.uint8).copy()
    sun = (int(w * (0.25 + 0.1 * np.sin(t))), int(h * 0.3))
    cv2.circle(img, sun, h // 9, (255, 220, 90), -1, cv2.LINE_AA)
    x = np.arange(w)
    for base, amp, freq, colour in ((0.62, 0.06, 2.1, (60, 120, 70)), (0.75, 0.05, 3.3, (40, 95, 50))):
        ridge = (h * (base + amp * np.sin(x / w * freq * np.pi + 1.3))).astype(np.int32)
        pts = np.concatenate([np.stack([x, ridge], 1), [[w - 1, h - 1], [0, h - 1]]]).astype(np.int32)
        cv2.fillPoly(img, [pts], colour, cv2.LINE_AA)
    hx, hy, s = int(w * 0.62), int(h * 0.62), h // 7
    cv2.rectangle(img, (hx, hy), (hx + s, hy + s), (200, 80, 60), -1)
    cv2.fillPoly(img, [np.array([[hx - s // 6, hy], [hx + s // 2, hy - s // 2], [hx + s + s // 6, hy]])], (90, 50, 40))
    cv2.rectangle(img, (hx + s // 3, hy + s // 2), (hx + 2 * s // 3, hy + s), (60, 40, 30), -1)
    return img


def write_y4m(path: Path, w: int, h: int, frames: int = 60) -> None:
    """A looping clip for Chromium's fake camera (--use-file-for-fake-video-capture)."""
    with open(path, "wb") as f:
        f.write(f"YUV4MPEG2 W{w} H{h} F30:1 Ip A1:1 C420jpeg\n".encode())
        for i in range(frames):
            yuv = cv2.cvtColor(scene(w, h, 2 * np.pi * i / frames), cv2.COLOR_RGB2YUV_I420)
            f.write(b"FRAME\n" + yuv.tobytes())


def checkerboard(w: int, h: int, cell: int = 24) -> Image.Image:
    yy, xx = np.mgrid[0:h, 0:w]
    grey = np.where(((xx // cell) + (yy // cell)) % 2 == 0, 205, 160).astype(np.uint8)
    return Image.fromarray(np.stack([grey] * 3 + [np.full_like(grey, 255)], -1), "RGBA")


def save(png: bytes, path: Path, width: int, transparent: bool = False) -> None:
    image = Image.open(io.BytesIO(png)).convert("RGBA")
    if transparent:
        backdrop = checkerboard(*image.size)
        backdrop.alpha_composite(image)
        image = backdrop
    image = image.convert("RGB").resize((width, round(image.height * width / image.width)), Image.LANCZOS)
    for colours in (None, 256, 128):
        out = image if colours is None else image.quantize(colours, method=Image.Quantize.MEDIANCUT, dither=0)
        buf = io.BytesIO()
        out.save(buf, "PNG", optimize=True)
        if buf.tell() < MAX_BYTES:
            break
    path.write_bytes(buf.getvalue())
    print(f"{path}: {out.size[0]}x{out.size[1]}, {buf.tell() // 1024} KB")


def label(image: Image.Image, text: str) -> Image.Image:
    """A tile's caption in a dark pill in its top-left corner, as the compare page labels its sides."""
    draw = ImageDraw.Draw(image)
    try:
        font = ImageFont.truetype("/usr/share/fonts/truetype/dejavu/DejaVuSans-Bold.ttf", 17)
    except OSError:
        font = ImageFont.load_default()
    box = draw.textbbox((18, 12), text, font=font)
    draw.rounded_rectangle((box[0] - 9, box[1] - 6, box[2] + 9, box[3] + 6), 12, fill=(20, 22, 28))
    draw.text((18, 12), text, font=font, fill=(240, 240, 240))
    return image


def strip(http: str, ws: str, browser, frame: bytes, tile: tuple[int, int], path: Path) -> None:
    """What you send, then the overlay page (as OBS shows it) with each preset: 3 x 2 tiles."""
    tiles = [label(Image.fromarray(simplejpeg.decode_jpeg(frame)).resize(tile, Image.LANCZOS), "what you send")]
    with FramePusher(ws, "demo-strip", frame, fps=15), open_page(
        browser, f"{http}/overlay/demo-strip?fit=cover", {"width": tile[0], "height": tile[1]}
    ) as page:
        wait_for_frames(page, at_least=5)
        for name, prompt in PRESETS:
            set_style(http, "demo-strip", prompt)
            wait_for_frames(page, at_least=frames_drawn(page) + 15)
            time.sleep(0.3)
            shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
            tiles.append(label(shot, f"overlay: {name}"))
    gap, cols = 8, 3
    rows = (len(tiles) + cols - 1) // cols
    sheet = Image.new("RGB", (cols * tile[0] + (cols + 1) * gap, rows * tile[1] + (rows + 1) * gap), (16, 18, 24))
    for i, image in enumerate(tiles):
        sheet.paste(image, (gap + (i % cols) * (tile[0] + gap), gap + (i // cols) * (tile[1] + gap)))
    buf = io.BytesIO()
    sheet.save(buf, "PNG")
    save(buf.getvalue(), path, sheet.width)


def animation(http: str, ws: str, browser, tile: tuple[int, int], path: Path, seconds_per_style: float = 1.6) -> None:
    """The overlay page (as OBS shows it) while a moving scene streams and the style steps through the presets:
    an animated GIF, a few frames a second, each labelled with its preset."""
    frames: list[Image.Image] = []
    moving = lambda t: simplejpeg.encode_jpeg(scene(768, 432, t), quality=90, colorspace="RGB")  # noqa: E731
    with FramePusher(ws, "demo-anim", moving(0.0), fps=15) as pusher, open_page(
        browser, f"{http}/overlay/demo-anim?fit=cover", {"width": tile[0], "height": tile[1]}
    ) as page:
        wait_for_frames(page, at_least=5)
        start = time.monotonic()
        for name, prompt in PRESETS:
            set_style(http, "demo-anim", prompt)
            wait_for_frames(page, at_least=frames_drawn(page) + 8)
            until = time.monotonic() + seconds_per_style
            while time.monotonic() < until:
                pusher.frame = moving(1.5 * (time.monotonic() - start))
                shot = Image.open(io.BytesIO(page.screenshot())).convert("RGB")
                frames.append(label(shot, name).quantize(96, method=Image.Quantize.MEDIANCUT, dither=0))
                time.sleep(0.1)
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=150, loop=0, optimize=True)
    print(f"{path}: {tile[0]}x{tile[1]}, {len(frames)} frames, {path.stat().st_size // 1024} KB")


def set_style(http: str, stream_id: str, prompt: str) -> None:
    """The `config` message over HTTP, as a Stream Deck button would send it."""
    body = json.dumps({"prompt": prompt}).encode()
    request = urllib.request.Request(f"{http}/api/streams/{stream_id}/config", body, method="POST",
                                     headers={"Content-Type": "application/json"})  # a form type is refused
    urllib.request.urlopen(request, timeout=5).close()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=ROOT / "docs" / "images")
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    square = simplejpeg.encode_jpeg(scene(640, 480), quality=92, colorspace="RGB")
    wide = simplejpeg.encode_jpeg(scene(768, 432), quality=92, colorspace="RGB")
    with tempfile.TemporaryDirectory() as tmp:
        camera = Path(tmp) / "scene.y4m"
        write_y4m(camera, 640, 360)
        with (
            running_server(Path(tmp), processor="filter") as srv,
            launch_chromium([f"--use-file-for-fake-video-capture={camera}"]) as browser,
        ):
            strip(srv.http, srv.ws, browser, wide, (400, 225), args.out / "stream.png")
            animation(srv.http, srv.ws, browser, (480, 270), args.out / "stream.gif")

            with (
                FramePusher(srv.ws, "demo", square, fps=15),
                open_page(browser, f"{srv.http}/overlay/demo?fit=contain&debug=1") as page,
            ):
                wait_for_frames(page, at_least=5)
                set_style(srv.http, "demo", "cartoon, comic book style")
                wait_for_frames(page, at_least=30)
                time.sleep(0.5)
                save(page.screenshot(omit_background=True), args.out / "overlay.png", 960, transparent=True)

            with (
                FramePusher(srv.ws, "demo-compare", wide, fps=15),
                open_page(browser, f"{srv.http}/overlay/demo-compare/compare", {"width": 1600, "height": 520}) as page,
            ):
                wait_for_frames(page, "#original", at_least=5)
                set_style(srv.http, "demo-compare", "pencil sketch")
                wait_for_frames(page, "#original", at_least=20)
                wait_for_frames(page, "#styled", at_least=20)
                time.sleep(0.5)
                save(page.screenshot(), args.out / "compare.png", 1200)

            with open_page(browser, f"{srv.http}/?stream=studio-demo&autostart=1", STUDIO_VIEWPORT) as page:
                wait_for_frames(page, "#preview", at_least=30, timeout_ms=30_000)
                page.click("#presets button[data-prompt='cartoon, comic book style']")
                time.sleep(2.5)  # new style on screen, stats settled
                save(page.screenshot(), args.out / "studio.png", STUDIO_VIEWPORT["width"])

                with open_page(browser, f"{srv.http}/dock/studio-demo", DOCK_VIEWPORT) as dock:
                    wait_for_frames(dock, "#preview", at_least=10, timeout_ms=20_000)
                    dock.click("#presets button[data-prompt='pencil sketch']")
                    time.sleep(2.5)
                    save(dock.screenshot(full_page=True), args.out / "dock.png", DOCK_VIEWPORT["width"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
