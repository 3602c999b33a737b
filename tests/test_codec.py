"""service/codec.py on real encoded images: what `probe` lets through, which frames nvJPEG may take, and the
limits a client runs into (the FrameError code it is sent)."""

from __future__ import annotations

import io

import numpy as np
import pytest
import simplejpeg
from PIL import Image

from service import codec
from service.codec import FrameError
from tests.helpers import gradient_jpeg

SIZE = (80, 48)  # width, height: not square, so a swapped width/height shows


def pillow_image(mode: str, fmt: str, size: tuple[int, int] = SIZE, **save_args) -> bytes:
    """`size` (width, height) of a gradient in `mode`, encoded by Pillow as `fmt`."""
    w, h = size
    y, x = np.mgrid[0:h, 0:w]
    rgb = np.stack([x * 255 // (w - 1), y * 255 // (h - 1), (x + y) * 255 // (w + h - 2)], -1).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(rgb, "RGB").convert(mode).save(buf, fmt, **save_args)
    return buf.getvalue()


def sof_marker(jpeg: bytes) -> int:
    """The frame-header marker byte (0xC0 baseline, 0xC2 progressive, ...), to show a case is what it says."""
    for marker in (0xC0, 0xC1, 0xC2):
        if b"\xff" + bytes([marker]) in jpeg:
            return marker
    raise AssertionError("no SOF0/1/2 marker")


@pytest.mark.parametrize("make", [
    pytest.param(lambda: pillow_image("RGB", "JPEG", quality=90), id="pillow-baseline"),
    pytest.param(lambda: simplejpeg.encode_jpeg(np.full((SIZE[1], SIZE[0], 3), 120, np.uint8), colorspace="RGB"),
                 id="simplejpeg-420"),
    pytest.param(lambda: simplejpeg.encode_jpeg(np.full((SIZE[1], SIZE[0], 3), 120, np.uint8), colorspace="RGB",
                                                colorsubsampling="444"), id="simplejpeg-444"),
])
def test_baseline_colour_jpegs_are_gpu_decodable(make):
    data = make()
    assert sof_marker(data) == 0xC0
    info = codec.probe(data)
    assert (info.format, info.width, info.height, info.gpu_decodable) == ("jpeg", *SIZE, True)


def test_extended_sequential_jpeg_is_gpu_decodable():
    """SOF1 (extended sequential, 8-bit) is the same Huffman decoding as baseline: nvJPEG takes it."""
    baseline = pillow_image("RGB", "JPEG")
    extended = baseline.replace(b"\xff\xc0", b"\xff\xc1", 1)
    assert simplejpeg.decode_jpeg(extended, colorspace="RGB").shape == (SIZE[1], SIZE[0], 3)  # still a real image
    info = codec.probe(extended)
    assert (info.width, info.height, info.gpu_decodable) == (*SIZE, True)


@pytest.mark.parametrize("mode, save_args, marker", [
    pytest.param("RGB", {"progressive": True}, 0xC2, id="progressive"),
    pytest.param("CMYK", {}, 0xC0, id="cmyk"),
    pytest.param("L", {}, 0xC0, id="greyscale"),
])
def test_jpegs_nvjpeg_cannot_batch_are_not_gpu_decodable_but_still_accepted(mode, save_args, marker):
    data = pillow_image(mode, "JPEG", **save_args)
    assert sof_marker(data) == marker
    info = codec.probe(data)
    assert (info.format, info.width, info.height, info.gpu_decodable) == ("jpeg", *SIZE, False)
    assert codec.decode(data).shape == (SIZE[1], SIZE[0], 3)  # the CPU path takes them


def test_a_12_bit_jpeg_header_is_not_gpu_decodable():
    """Read from the header alone (libjpeg-turbo here is 8-bit, so the pixels are never decoded)."""
    data = bytearray(pillow_image("RGB", "JPEG"))
    sof = data.index(b"\xff\xc0")
    assert data[sof + 4] == 8  # the sample precision byte
    data[sof + 4] = 12
    info = codec.probe(bytes(data))
    assert (info.width, info.height, info.gpu_decodable) == (*SIZE, False)


@pytest.mark.parametrize("fmt, mode, save_args", [
    pytest.param("PNG", "RGB", {}, id="png"),
    pytest.param("WEBP", "RGB", {}, id="webp-lossy"),
    pytest.param("WEBP", "RGB", {"lossless": True}, id="webp-lossless"),
    pytest.param("WEBP", "RGBA", {}, id="webp-alpha"),
])
def test_png_and_webp_are_never_gpu_decodable(fmt, mode, save_args):
    data = pillow_image(mode, fmt, **save_args)
    info = codec.probe(data)
    assert (info.format, info.width, info.height, info.gpu_decodable) == (fmt.lower(), *SIZE, False)


def test_a_jpeg_with_metadata_before_its_frame_header_keeps_its_size_and_gpu_flag():
    """Camera and phone JPEGs carry EXIF and ICC segments ahead of SOF0."""
    from PIL import ImageCms

    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    exif = Image.Exif()
    exif[0x010F] = "DreamStream test camera"  # Make
    data = pillow_image("RGB", "JPEG", exif=exif.tobytes(), icc_profile=icc)
    assert data.index(b"Exif") < data.index(b"\xff\xc0")
    info = codec.probe(data)
    assert (info.width, info.height, info.gpu_decodable) == (*SIZE, True)


@pytest.mark.parametrize("data, code", [
    pytest.param(b"", "bad_frame", id="empty"),
    pytest.param(b"GIF89a" + bytes(64), "bad_frame", id="gif"),
    pytest.param(b"hello, this is not an image at all", "bad_frame", id="text"),
    pytest.param(gradient_jpeg((64, 64))[:20], "bad_frame", id="truncated-jpeg"),
])
def test_probe_refuses_what_is_not_an_image(data, code):
    with pytest.raises(FrameError) as err:
        codec.probe(data)
    assert err.value.code == code


def test_probe_refuses_too_many_bytes_before_reading_them():
    data = gradient_jpeg((64, 64))
    assert codec.probe(data, max_bytes=len(data)).width == 64
    with pytest.raises(FrameError) as err:
        codec.probe(data, max_bytes=len(data) - 1)
    assert err.value.code == "too_large"
    assert str(len(data)) in err.value.message


@pytest.mark.parametrize("size", [(codec.DEFAULT_MAX_SIDE + 1, 8), (8, codec.DEFAULT_MAX_SIDE + 1)])
def test_probe_refuses_too_many_pixels_a_side(size):
    data = simplejpeg.encode_jpeg(np.zeros((size[1], size[0], 3), np.uint8), colorspace="RGB")
    with pytest.raises(FrameError) as err:
        codec.probe(data)
    assert err.value.code == "too_large"
    assert f"{size[0]}x{size[1]}" in err.value.message
    # exactly at the limit is fine
    at_limit = tuple(min(side, codec.DEFAULT_MAX_SIDE) for side in size)
    ok = simplejpeg.encode_jpeg(np.zeros((at_limit[1], at_limit[0], 3), np.uint8), colorspace="RGB")
    assert (codec.probe(ok).width, codec.probe(ok).height) == at_limit


def test_a_huge_declared_size_is_refused_from_the_header_alone():
    """A 40,000 x 40,000 JPEG header costs a few bytes to refuse, not gigabytes of pixels."""
    data = bytearray(pillow_image("RGB", "JPEG"))
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = (40_000).to_bytes(2, "big") * 2
    with pytest.raises(FrameError) as err:
        codec.decode(bytes(data))
    assert err.value.code == "too_large"
