"""service/processors/gpu_jpeg.py's `fit` against `codec.fit_to`, the CPU reference: a frame decoded by nvJPEG must
reach the model as the same picture as one decoded on the CPU. `fit` is plain torch, so it runs here on CPU tensors."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from service import codec
from service.processors import gpu_jpeg

OUT_W, OUT_H = 512, 512


def gradient(width: int, height: int) -> np.ndarray:
    """A smooth RGB picture (H, W, 3) uint8: red across, green down, blue diagonally."""
    y, x = np.mgrid[0:height, 0:width]
    return np.stack(
        [x * 255 // (width - 1), y * 255 // (height - 1), (x + y) * 255 // (width + height - 2)], -1
    ).astype(np.uint8)


def checkerboard(width: int, height: int) -> np.ndarray:
    """1-pixel black/white squares: the worst case for aliasing when shrinking."""
    cells = (np.add.outer(np.arange(height), np.arange(width)) % 2 * 255).astype(np.uint8)
    return np.repeat(cells[..., None], 3, -1)


def both(rgb: np.ndarray, width: int = OUT_W, height: int = OUT_H) -> tuple[np.ndarray, np.ndarray]:
    """(codec.fit_to, gpu_jpeg.fit) of the same picture, both as float (h, w, 3)."""
    cpu = codec.fit_to(rgb, width, height)
    assert cpu.shape == (height, width, 3) and cpu.dtype == np.uint8
    out = gpu_jpeg.fit(torch.from_numpy(rgb), width, height)
    assert out.shape == (3, height, width) and out.dtype == torch.float32
    assert out.min().item() >= 0.0 and out.max().item() <= 255.0
    return cpu.astype(np.float32), out.permute(1, 2, 0).numpy()


def test_a_frame_already_the_right_size_is_untouched():
    rgb = gradient(OUT_W, OUT_H)
    cpu, dev = both(rgb)
    np.testing.assert_array_equal(dev, rgb.astype(np.float32))
    np.testing.assert_array_equal(cpu, dev)


@pytest.mark.parametrize("size, crop", [
    pytest.param((640, 512), np.s_[:, 64:576], id="wide-crops-the-sides"),
    pytest.param((512, 640), np.s_[64:576, :], id="tall-crops-top-and-bottom"),
    pytest.param((701, 512), np.s_[:, 94:606], id="odd-margin"),  # (701 - 512) // 2 = 94 on the left
])
def test_crop_only_takes_the_same_centre_exactly(size, crop):
    rgb = gradient(*size)
    cpu, dev = both(rgb)
    np.testing.assert_array_equal(cpu, dev)
    np.testing.assert_array_equal(dev, rgb[crop].astype(np.float32))


@pytest.mark.parametrize("size, target", [
    pytest.param((1024, 768), (OUT_W, OUT_H), id="downscale-and-crop"),
    pytest.param((1280, 720), (OUT_W, OUT_H), id="downscale-16x9"),
    pytest.param((256, 256), (OUT_W, OUT_H), id="upscale"),
    pytest.param((300, 200), (OUT_W, OUT_H), id="upscale-and-crop"),
    pytest.param((640, 480), (512, 384), id="downscale-4x3-no-crop"),
])
def test_resizing_agrees_with_the_cpu_path_within_a_few_grey_levels(size, target):
    cpu, dev = both(gradient(*size), *target)
    diff = np.abs(cpu - dev)
    assert diff.mean() < 2.0, diff.mean()
    assert diff.max() < 8.0, diff.max()


def test_shrinking_is_antialiased_like_cv2_inter_area():
    """Plain bilinear would turn a fine checkerboard into stripes (std ~32); both paths give flat grey."""
    cpu, dev = both(checkerboard(1024, 768))
    assert abs(dev.mean() - 127.5) < 1 and abs(cpu.mean() - 127.5) < 1
    assert dev.std() < 5, dev.std()
    assert cpu.std() < 20, cpu.std()


def test_the_gpu_path_is_not_offered_on_the_cpu():
    assert gpu_jpeg.available("cpu") is False
    assert gpu_jpeg.available(torch.device("cpu")) is False
