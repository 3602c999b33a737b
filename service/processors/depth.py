"""Depth maps for the depth ControlNets, estimated from each frame on the processor's own device.

Two families, chosen by `depth_model`:
- a transformers depth-estimation model (`AutoModelForDepthEstimation`: Depth-Anything-V2, DPT, ...),
  the default because it is small (25 M params) and sharp;
- controlnet-aux's MiDaS DPT-Hybrid from `lllyasviel/Annotators` (what the SD 1.5 depth ControlNet
  was trained on), picked when the id or path mentions `Annotators` or `midas`, or the folder holds
  its checkpoint.

Both take a batch of frames already on the device and return a batch of depth maps, so a frame
never goes back to the CPU between the camera and the ControlNet. Output: (B, 3, H, W) in [0, 1],
near = bright, at the frame's own size (what the ControlNet's conditioning input expects).
"""

from __future__ import annotations

import logging
from typing import Any

import torch
import torch.nn.functional as F

from service.processors.models import ModelSource, fetch_file, load_model

log = logging.getLogger("dreamstream.processors")

MIDAS_FILE = "dpt_hybrid-midas-501f0c75.pt"


def _normalize(depth: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """(B, h, w) raw depth -> (B, 3, H, W) in [0, 1] per image, as the depth ControlNets were trained on."""
    depth = F.interpolate(depth[:, None].float(), size=size, mode="bilinear", align_corners=False)
    flat = depth.flatten(1)
    low, high = flat.min(dim=1).values, flat.max(dim=1).values
    depth = (depth - low[:, None, None, None]) / (high - low).clamp_min(1e-6)[:, None, None, None]
    return depth.expand(-1, 3, -1, -1)


def _input_size(height: int, width: int, short_side: int, multiple: int) -> tuple[int, int]:
    """Scale the frame so its short side is `short_side`, keep the aspect ratio, round to `multiple`."""
    scale = short_side / min(height, width)
    return (max(multiple, round(height * scale / multiple) * multiple),
            max(multiple, round(width * scale / multiple) * multiple))


class TransformersDepth:
    """Any `AutoModelForDepthEstimation`; resizing and normalising happen on the device, not in PIL."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        from transformers import AutoImageProcessor, AutoModelForDepthEstimation

        self.model = load_model(
            source,
            lambda ref, local: AutoModelForDepthEstimation.from_pretrained(ref, dtype=dtype, local_files_only=local),
            what="(depth estimator)",
        ).to(device).eval().requires_grad_(False)
        try:
            proc: Any = load_model(
                source, lambda ref, local: AutoImageProcessor.from_pretrained(ref, local_files_only=local))
        except Exception:  # noqa: BLE001 - the defaults below are DPT's own
            proc = None
        size = getattr(proc, "size", None)
        height = getattr(size, "height", None) or (size.get("height") if isinstance(size, dict) else None)
        self.short_side = int(height or 384)
        multiple = getattr(proc, "ensure_multiple_of", None) or getattr(self.model.config, "patch_size", None)
        self.multiple = int(multiple or 1)
        mean = getattr(proc, "image_mean", None) or (0.5, 0.5, 0.5)
        std = getattr(proc, "image_std", None) or (0.5, 0.5, 0.5)
        self.mean = torch.tensor(mean, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.std = torch.tensor(std, device=device, dtype=dtype).view(1, 3, 1, 1)
        self.dtype = dtype
        log.info("depth_model: %s on %s/%s at %d px (short side)", source.describe(), device,
                 str(dtype).removeprefix("torch."), self.short_side)

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move the model and its normalisation to `device` in `dtype` (DiffusionProcessor.to)."""
        self.model.to(device=device, dtype=dtype)
        self.mean, self.std, self.dtype = self.mean.to(device, dtype), self.std.to(device, dtype), dtype

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        """(B, 3, H, W) in [0, 1] -> (B, 3, H, W) depth in [0, 1]."""
        size = _input_size(pixels.shape[-2], pixels.shape[-1], self.short_side, self.multiple)
        x = F.interpolate(pixels.to(self.dtype), size=size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return _normalize(self.model(pixel_values=x).predicted_depth, tuple(pixels.shape[-2:]))


class MidasDepth:
    """controlnet-aux's MiDaS DPT-Hybrid, called on tensors rather than through its PIL/numpy wrapper."""

    def __init__(self, source: ModelSource, device: torch.device, dtype: torch.dtype) -> None:
        checkpoint = fetch_file(source, MIDAS_FILE)
        from controlnet_aux.midas.api import MiDaSInference  # heavy import: only when MiDaS is asked for

        self.model = MiDaSInference(model_type="dpt_hybrid", model_path=str(checkpoint)).to(device, dtype).eval()
        self.dtype = dtype
        log.info("depth_model: MiDaS DPT-Hybrid %s on %s/%s", source.describe(), device,
                 str(dtype).removeprefix("torch."))

    def to(self, device: torch.device | str, dtype: torch.dtype) -> None:
        """Move the model to `device` in `dtype` (DiffusionProcessor.to)."""
        self.model.to(device=device, dtype=dtype)
        self.dtype = dtype

    def __call__(self, pixels: torch.Tensor) -> torch.Tensor:
        size = _input_size(pixels.shape[-2], pixels.shape[-1], 384, 32)
        x = F.interpolate(pixels.to(self.dtype), size=size, mode="bicubic", align_corners=False)
        return _normalize(self.model(x.clamp(0, 1) * 2 - 1), tuple(pixels.shape[-2:]))


def is_midas(source: ModelSource) -> bool:
    text = source.value.lower()
    if "annotators" in text or "midas" in text:
        return True
    return source.is_local and (source.path / MIDAS_FILE).is_file()


def load_depth_estimator(source: ModelSource, device: torch.device, dtype: torch.dtype):
    """The estimator `depth_model` names, loaded once per processor."""
    cls = MidasDepth if is_midas(source) else TransformersDepth
    return cls(source, device, dtype)
