"""Frames as bytes <-> frames as pixels, and the size limits. The one place that decodes base64 or images.

JPEG goes through libjpeg-turbo (simplejpeg) on the hot path; PNG and WebP through Pillow. Sizes are
read from the header before any pixel is decoded, so a 40,000 x 40,000 JPEG costs a few bytes of
parsing, not gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import math
import re
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

from service.errors import ClientError

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_SIDE = 4096
DEFAULT_MAX_PIXELS = 3840 * 2160  # 4K UHD: what a frame may decode to
DEFAULT_PROCESS_SIDE = 960  # frames are shrunk to this long side while decoding (see `decode_probed`)
DEFAULT_QUALITY = 85  # JPEG quality of styled frames (the server's Settings.jpeg_quality defaults to it too)
_DATA_URL_RE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)


FrameError = ClientError  # a frame we refuse: code `bad_frame` or `too_large`


@dataclass(frozen=True)
class FrameInfo:
    format: str  # jpeg | png | webp
    width: int
    height: int
    # baseline/extended 8-bit 3-component JPEG: what nvJPEG's batched decoder takes (not progressive, CMYK)
    gpu_decodable: bool = False


def split_base64(text: str) -> tuple[bytes, bool]:
    """Bare base64 or a `data:image/...;base64,` URL -> (bytes, was_data_url)."""
    if not isinstance(text, str) or not text:
        raise FrameError("bad_frame", "frame must be a non-empty base64 string or data URL")
    is_url = text.startswith("data:")
    if is_url:
        match = _DATA_URL_RE.match(text)
        if not match:
            raise FrameError("bad_frame", "data URL must look like data:image/<type>;base64,<data>")
        text = text[match.end():]
    try:
        data = base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise FrameError("bad_frame", f"frame is not valid base64: {exc}") from None
    if not data:
        raise FrameError("bad_frame", "frame is empty")
    return data, is_url


def b64_size_ok(text: str, max_bytes: int) -> bool:
    """Whether base64 text can decode to at most `max_bytes` (checked before decoding it)."""
    return len(text) * 3 // 4 <= max_bytes + 3 + 200  # allow the data-URL prefix


# Structural caps, far above what real encoders write, that keep `probe` and the decoders cheap.
MAX_JPEG_SEGMENTS = 64  # markers before the first scan; browsers and cameras write about 10
MAX_JPEG_SCANS = 100  # progressive JPEGs have about 10; thousands make libjpeg spin (a known CPU bomb)
MAX_PNG_CHUNKS = 4096  # libpng writes 8 KiB IDATs: a 4 MiB PNG has about 500 chunks
_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
_JPEG_SOF = {0xC0, 0xC1, 0xC2, 0xC3, 0xC5, 0xC6, 0xC7, 0xC9, 0xCA, 0xCB, 0xCD, 0xCE, 0xCF}
_JPEG_STANDALONE = {0x01, *range(0xD0, 0xD8)}


def probe(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_side: int = DEFAULT_MAX_SIDE,
          max_pixels: int = DEFAULT_MAX_PIXELS) -> FrameInfo:
    """Check an encoded image against the limits from its header alone.

    A hand-written parser rather than `Image.open`: Pillow walks PNG chunks and JPEG markers in
    Python, so a crafted 4 MiB frame of tiny chunks held the event loop (and every viewer) for
    seconds. This one does a bounded amount of work per frame and rejects such files outright.
    """
    if len(data) > max_bytes:
        raise FrameError("too_large", f"frame is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise FrameError("bad_frame", "frame is empty")
    gpu_decodable = False
    if data[:3] == b"\xff\xd8\xff":
        fmt, (width, height, gpu_decodable) = "jpeg", _jpeg_size(data)
    elif data[:8] == _PNG_SIGNATURE:
        fmt, (width, height) = "png", _png_size(data)
    elif data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        fmt, (width, height) = "webp", _webp_size(data)
    else:
        raise FrameError("bad_frame", "frame is not a JPEG, PNG or WebP image")
    if width > max_side or height > max_side:
        raise FrameError("too_large", f"frame is {width}x{height}; the limit is {max_side} px a side")
    if width * height > max_pixels:
        raise FrameError("too_large", f"frame is {width}x{height} = {width * height / 1e6:.1f} MP; the limit is "
                                      f"{max_pixels / 1e6:.1f} MP (DREAMSTREAM_MAX_FRAME_PIXELS)")
    if width < 1 or height < 1:
        raise FrameError("bad_frame", "frame has no pixels")
    return FrameInfo(fmt, width, height, gpu_decodable)


def _bad(message: str) -> FrameError:
    return FrameError("bad_frame", message)


def _jpeg_size(data: bytes) -> tuple[int, int, bool]:
    """(width, height, gpu_decodable) from the SOF marker, walking at most MAX_JPEG_SEGMENTS markers to the
    first scan. gpu_decodable: baseline or extended sequential (SOF0/SOF1), 8-bit, 3 components (YCbCr)."""
    pos, size, end, simple = 2, None, len(data), False
    for _ in range(MAX_JPEG_SEGMENTS):
        if pos >= end or data[pos] != 0xFF:
            raise _bad("JPEG header is truncated or corrupt")
        while pos < end and data[pos] == 0xFF:  # fill bytes
            pos += 1
        if pos + 2 >= end:
            raise _bad("JPEG header is truncated")
        marker = data[pos]
        pos += 1
        if marker in _JPEG_STANDALONE:
            continue
        length = int.from_bytes(data[pos:pos + 2], "big")
        if length < 2:
            raise _bad("JPEG header is corrupt")
        if marker in _JPEG_SOF:
            if pos + 7 > end:
                raise _bad("JPEG frame header is truncated")
            size = int.from_bytes(data[pos + 5:pos + 7], "big"), int.from_bytes(data[pos + 3:pos + 5], "big")
            simple = marker in (0xC0, 0xC1) and data[pos + 2] == 8 and pos + 7 < end and data[pos + 7] == 3
        elif marker == 0xDA:  # start of scan: the header is over
            if size is None:
                raise _bad("JPEG has no frame header before its image data")
            if data.count(b"\xff\xda") > MAX_JPEG_SCANS:  # 0xFF is byte-stuffed inside scans: a fast exact count
                raise _bad(f"JPEG has more than {MAX_JPEG_SCANS} scans")
            return (*size, simple)
        pos += length
    raise _bad(f"JPEG has more than {MAX_JPEG_SEGMENTS} header segments")


def _png_size(data: bytes) -> tuple[int, int]:
    """(width, height) from IHDR, which must come first; at most MAX_PNG_CHUNKS chunks in all."""
    if len(data) < 33 or data[12:16] != b"IHDR":
        raise _bad("PNG header is truncated or corrupt")
    pos, end = 8, len(data)
    for _ in range(MAX_PNG_CHUNKS):
        if pos + 8 > end or data[pos + 4:pos + 8] == b"IEND":
            return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")
        pos += 12 + int.from_bytes(data[pos:pos + 4], "big")
    raise _bad(f"PNG has more than {MAX_PNG_CHUNKS} chunks")


def _webp_size(data: bytes) -> tuple[int, int]:
    """(width, height) from the first chunk: VP8X (extended), VP8L (lossless) or VP8 (lossy)."""
    kind = data[12:16]
    if len(data) < 30:
        raise _bad("WebP header is truncated")
    if kind == b"VP8X":
        return 1 + int.from_bytes(data[24:27], "little"), 1 + int.from_bytes(data[27:30], "little")
    if kind == b"VP8L" and data[20] == 0x2F:
        bits = int.from_bytes(data[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if kind == b"VP8 " and data[23:26] == b"\x9d\x01\x2a":
        return int.from_bytes(data[26:28], "little") & 0x3FFF, int.from_bytes(data[28:30], "little") & 0x3FFF
    raise _bad("WebP header is corrupt or of an unknown kind")


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """Encoded image -> RGB uint8 array (H, W, 3), after the limit checks of `probe`."""
    return decode_probed(data, probe(data, max_bytes, max_side))


def decode_probed(data: bytes, info: FrameInfo, max_side: int | None = None) -> np.ndarray:
    """`decode` for a frame whose header `probe` has already checked (its `info`): the header is not walked twice.

    `max_side`: shrink the frame so its long side is at most this. A JPEG shrinks while it is decoded (libjpeg's DCT
    scaling decodes a 4096 px frame at 1/2, 1/4 or 1/8 of the work), then to the exact size; PNG and WebP after."""
    scale = 1.0 if max_side is None else min(1.0, max_side / max(info.width, info.height))
    try:
        rgb = None
        if info.format == "jpeg":
            try:
                rgb = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=math.ceil(info.width * scale),
                                             min_height=math.ceil(info.height * scale))
            except ValueError:
                pass  # CMYK, progressive oddities: Pillow handles what libjpeg-turbo's fast path refuses
        if rgb is None:
            with Image.open(io.BytesIO(data), formats=[info.format.upper()]) as img:
                rgb = np.asarray(img.convert("RGB"))
    except FrameError:
        raise
    except Exception:
        raise FrameError("bad_frame", "frame could not be decoded (truncated or corrupt image)") from None
    if scale < 1.0:
        import cv2

        size = (max(1, round(info.width * scale)), max(1, round(info.height * scale)))
        if (rgb.shape[1], rgb.shape[0]) != size:
            rgb = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
    return rgb


def encode_jpeg(rgb: np.ndarray, quality: int = DEFAULT_QUALITY) -> bytes:
    rgb = np.ascontiguousarray(rgb, dtype=np.uint8)
    return simplejpeg.encode_jpeg(rgb, quality=quality, colorspace="RGB", colorsubsampling="420")


def to_jpeg(data: bytes, info: FrameInfo, quality: int = 85) -> bytes:
    """Any accepted frame as JPEG bytes: JPEG passes through untouched."""
    if info.format == "jpeg":
        return data
    return encode_jpeg(decode(data), quality)


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    return np.asarray(image.convert("RGB"))


def rgb_to_pil(rgb: np.ndarray) -> Image.Image:
    return Image.fromarray(np.ascontiguousarray(rgb, dtype=np.uint8), "RGB")


def jpeg_data_url(jpeg: bytes) -> str:
    return "data:image/jpeg;base64," + base64.b64encode(jpeg).decode("ascii")


def jpeg_base64(jpeg: bytes) -> str:
    return base64.b64encode(jpeg).decode("ascii")


def crop_box(w: int, h: int, width: int, height: int) -> tuple[int, int, int, int]:
    """(x0, y0, w, h) of the centred crop of a w x h image to the aspect ratio of width x height."""
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        return (w - new_w) // 2, 0, new_w, h
    if w / h < target:
        new_h = max(1, round(w / target))
        return 0, (h - new_h) // 2, w, new_h
    return 0, 0, w, h


def fit_to(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Center-crop to the target aspect ratio, then resize: what the diffusion models are fed."""
    import cv2

    x0, y0, w, h = crop_box(rgb.shape[1], rgb.shape[0], width, height)
    rgb = rgb[y0:y0 + h, x0:x0 + w]
    if rgb.shape[1] != width or rgb.shape[0] != height:
        interp = cv2.INTER_AREA if rgb.shape[1] > width else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (width, height), interpolation=interp)
    return np.ascontiguousarray(rgb)
