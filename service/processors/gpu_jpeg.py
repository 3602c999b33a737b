"""JPEG on the GPU (nvJPEG through torchvision) for processors that run on CUDA.

On the CPU a 512x512 frame costs ~1 ms to decode and ~1.5 ms to encode, and at 8 streams that is
~20 ms of host work in series with every batch. nvJPEG decodes and encodes a whole batch on the GPU in
a fraction of that, and only the compressed bytes cross the bus. `Engine` uses it when a processor says
`gpu_jpeg`; frames nvJPEG cannot take (PNG, WebP, progressive, CMYK, 12-bit: `codec.FrameInfo.gpu_decodable`)
and any frame of a batch whose GPU decode fails take the CPU path, which stays the reference.
"""

from __future__ import annotations

import logging
import warnings
from typing import Any

import numpy as np
import torch

from service.codec import crop_box

log = logging.getLogger("dreamstream.processors")


def _io() -> Any:
    import torchvision.io

    return torchvision.io


def available(device: torch.device | str) -> bool:
    """True when frames for `device` can be decoded and encoded there (a CUDA device and torchvision's nvJPEG)."""
    if torch.device(device).type != "cuda":
        return False
    try:
        io = _io()
        return hasattr(io, "decode_jpeg") and hasattr(io, "encode_jpeg")
    except Exception:  # torchvision missing or built without image ops
        return False


def decode(datas: list[bytes], device: torch.device | str) -> list[torch.Tensor]:
    """JPEG bytes -> RGB uint8 images (H, W, 3) on `device`, one batched nvJPEG call."""
    io = _io()
    tensors = [torch.frombuffer(bytearray(data), dtype=torch.uint8) for data in datas]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torchvision 0.29 marks its image ops deprecated (TorchCodec)
        images = io.decode_jpeg(tensors, mode=io.ImageReadMode.RGB, device=device)
    return [image.permute(1, 2, 0) for image in images]


def decode_or_none(datas: list[bytes], device: torch.device | str) -> list[torch.Tensor | None]:
    """`decode`, or None for every frame when nvJPEG refuses the batch: the caller decodes those on the CPU."""
    try:
        return list(decode(datas, device))
    except Exception as exc:
        log.warning("nvJPEG could not decode a batch of %d (%s); decoding it on the CPU", len(datas), exc)
        return [None] * len(datas)


def encode(images: list[torch.Tensor] | torch.Tensor, quality: int) -> list[bytes]:
    """RGB uint8 images (H, W, 3) on a CUDA device -> JPEG bytes, one batched nvJPEG call."""
    io = _io()
    chw = [image.permute(2, 0, 1).contiguous() for image in images]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        encoded = io.encode_jpeg(chw, quality=quality)
    return [np.asarray(data.cpu()).tobytes() for data in encoded]


def fit(image: torch.Tensor, width: int, height: int) -> torch.Tensor:
    """`codec.fit_to` on the device: centre-crop (H, W, 3) uint8 to the target aspect, resize; -> (3, h, w) float
    in [0, 255]. Downscaling is antialiased (as cv2's INTER_AREA averages); same-size frames are untouched."""
    x0, y0, w, h = crop_box(image.shape[1], image.shape[0], width, height)
    image = image[y0:y0 + h, x0:x0 + w]
    chw = image.permute(2, 0, 1).float()
    if chw.shape[1:] != (height, width):
        shrink = chw.shape[2] > width
        chw = torch.nn.functional.interpolate(chw[None], size=(height, width), mode="bilinear",
                                              antialias=shrink, align_corners=False)[0].clamp(0, 255)
    return chw
