"""Frames as bytes <-> frames as pixels, and the size limits. The one place that decodes base64 or images.

JPEG goes through libjpeg-turbo (simplejpeg) on the hot path; PNG and WebP through Pillow. Sizes are
read from the header before any pixel is decoded, so a 40,000 x 40,000 JPEG costs a few bytes of
parsing, not gigabytes.
"""

from __future__ import annotations

import base64
import binascii
import io
import re
from dataclasses import dataclass

import numpy as np
import simplejpeg
from PIL import Image

DEFAULT_MAX_BYTES = 4 * 1024 * 1024
DEFAULT_MAX_SIDE = 4096
_DATA_URL_RE = re.compile(r"^data:image/[a-zA-Z0-9.+-]+;base64,", re.ASCII)
_FORMATS = {"JPEG": "jpeg", "PNG": "png", "WEBP": "webp", "MPO": "jpeg"}


class FrameError(ValueError):
    """A frame we refuse. `code` is the protocol error code: `bad_frame` or `too_large`."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code
        self.message = message

    def __reduce__(self) -> tuple[type[FrameError], tuple[str, str]]:
        """Pickle by (code, message): a FrameError comes back from the Modal GPU pool as a return value."""
        return type(self), (self.code, self.message)


@dataclass(frozen=True)
class FrameInfo:
    format: str  # jpeg | png | webp
    width: int
    height: int


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


def probe(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_side: int = DEFAULT_MAX_SIDE) -> FrameInfo:
    """Check an encoded image against the limits from its header alone."""
    if len(data) > max_bytes:
        raise FrameError("too_large", f"frame is {len(data)} bytes; the limit is {max_bytes}")
    if not data:
        raise FrameError("bad_frame", "frame is empty")
    try:
        with Image.open(io.BytesIO(data)) as img:
            fmt, (width, height) = img.format, img.size
    except Image.DecompressionBombError:
        raise FrameError("too_large", f"frame dimensions exceed {max_side} px a side") from None
    except Exception:
        raise FrameError("bad_frame", "frame is not a JPEG, PNG or WebP image") from None
    if fmt not in _FORMATS:
        raise FrameError("bad_frame", f"frame format {fmt} is not supported; send JPEG, PNG or WebP")
    if width > max_side or height > max_side:
        raise FrameError("too_large", f"frame is {width}x{height}; the limit is {max_side} px a side")
    if width < 1 or height < 1:
        raise FrameError("bad_frame", "frame has no pixels")
    return FrameInfo(_FORMATS[fmt], width, height)


def decode(data: bytes, max_bytes: int = DEFAULT_MAX_BYTES, max_side: int = DEFAULT_MAX_SIDE) -> np.ndarray:
    """Encoded image -> RGB uint8 array (H, W, 3), after the limit checks of `probe`."""
    info = probe(data, max_bytes, max_side)
    try:
        if info.format == "jpeg":
            try:
                return simplejpeg.decode_jpeg(data, colorspace="RGB")
            except ValueError:
                pass  # CMYK, progressive oddities: Pillow handles what libjpeg-turbo's fast path refuses
        with Image.open(io.BytesIO(data)) as img:
            return np.asarray(img.convert("RGB"))
    except FrameError:
        raise
    except Exception:
        raise FrameError("bad_frame", "frame could not be decoded (truncated or corrupt image)") from None


def encode_jpeg(rgb: np.ndarray, quality: int = 85) -> bytes:
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


def fit_to(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Center-crop to the target aspect ratio, then resize: what the diffusion models are fed."""
    import cv2

    h, w = rgb.shape[:2]
    target = width / height
    if w / h > target:
        new_w = max(1, round(h * target))
        x0 = (w - new_w) // 2
        rgb = rgb[:, x0:x0 + new_w]
    elif w / h < target:
        new_h = max(1, round(w / target))
        y0 = (h - new_h) // 2
        rgb = rgb[y0:y0 + new_h]
    if rgb.shape[1] != width or rgb.shape[0] != height:
        interp = cv2.INTER_AREA if rgb.shape[1] > width else cv2.INTER_LINEAR
        rgb = cv2.resize(rgb, (width, height), interpolation=interp)
    return np.ascontiguousarray(rgb)
