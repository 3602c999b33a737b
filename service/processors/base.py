"""What every processor is: frames in, styled frames out, for one stream or a batch of several."""

from __future__ import annotations

import logging
import time
from abc import ABC, abstractmethod
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from service.codec import pil_to_rgb, rgb_to_pil
from service.config import check_steps, parse_flag

log = logging.getLogger("dreamstream.processors")


@dataclass(frozen=True)
class FrameRequest:
    """One frame of one stream with that stream's own settings. A batch mixes streams freely."""

    image: Any  # RGB uint8 (H, W, 3): a numpy array, or a torch tensor on the GPU (nvJPEG-decoded)
    prompt: str
    strength: float = 0.7
    num_steps: int = 25
    seed: int = 42
    use_controlnet: bool = True


def check_settings(style_prompt: Any, strength: Any, num_steps: Any) -> None:
    """The argument checks every processor makes (ValueError naming the argument); torch-free, so
    `create_processor` runs them before importing a processor's module."""
    if not isinstance(style_prompt, str):
        raise ValueError("style_prompt must be a string")
    if isinstance(strength, bool) or not isinstance(strength, (int, float)) or not 0 < strength <= 1:
        raise ValueError(f"strength must be a number in (0, 1], got {strength!r}")
    if isinstance(num_steps, bool) or not isinstance(num_steps, int) or num_steps < 1:
        raise ValueError(f"num_steps must be a positive integer, got {num_steps!r}")


def check_lightning_steps(num_steps: int) -> None:
    check_steps("lightning", num_steps)


class Processor(ABC):
    """Base of the filter, standard and lightning processors.

    Not thread-safe: the server gives each processor to one worker thread.
    """

    name: str = "base"
    default_steps: int = 1
    # True: `Engine` may hand over frames decoded on the processor's GPU and take its output there
    # (`process_batch_on_device`), encoding JPEG with nvJPEG (service/processors/gpu_jpeg.py).
    gpu_jpeg: bool = False

    def __init__(
        self,
        style_prompt: str = "Van Gogh style painting",
        strength: float = 0.7,
        num_steps: int | None = None,
        use_controlnet: bool = True,
        seed: int = 42,
    ) -> None:
        num_steps = self.default_steps if num_steps is None else num_steps
        check_settings(style_prompt, strength, num_steps)
        self.check_steps(num_steps)
        self.style_prompt = style_prompt
        self.strength = float(strength)
        self.num_steps = num_steps
        self.use_controlnet = bool(use_controlnet)
        self.seed = int(seed)
        self.device = "cpu"

    def check_steps(self, num_steps: int) -> None:
        """Raise ValueError for a step count this processor cannot run."""

    def request(self, image: np.ndarray, prompt: str | None = None) -> FrameRequest:
        return FrameRequest(
            image=image,
            prompt=self.style_prompt if prompt is None else prompt,
            strength=self.strength,
            num_steps=self.num_steps,
            seed=self.seed,
            use_controlnet=self.use_controlnet,
        )

    def process(self, image: Image.Image, prompt: str | None = None) -> Image.Image:
        """Restyle one PIL image with this processor's own settings."""
        return rgb_to_pil(self.process_batch([self.request(pil_to_rgb(image), prompt)])[0])

    @abstractmethod
    def process_batch(self, requests: list[FrameRequest]) -> list[np.ndarray]:
        """Restyle several frames (possibly of different streams) at once; same order out."""

    def warmup(self) -> None:
        """Do slow one-off work (compilation, first CUDA launch) before the first viewer waits on it."""

    def optimise_progress(self) -> dict[str, Any]:
        """Work that goes on after warm-up to make the processor faster (background compiles), if any."""
        return {"state": "off"}

    def wait_optimised(self, timeout: float | None = None) -> bool:
        return True

    def describe(self) -> dict[str, Any]:
        return {"processor": self.name, "device": self.device}


class IdentityProcessor(Processor):
    """Returns frames untouched: for relay benchmarks and tests of the plumbing.

    Option `test_faults` (env DREAMSTREAM_TEST_FAULTS=1), TEST ONLY: see `inject_test_fault`."""

    name = "identity"

    def __init__(self, *args: Any, test_faults: Any = False, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.test_faults = parse_flag(test_faults, "test_faults")

    def process_batch(self, requests: list[FrameRequest]) -> list[np.ndarray]:
        if self.test_faults:
            # Processors are not thread-safe: with test faults on, a second thread inside this instance fails
            # loudly, so tests can prove the server never lets one in (service/backends.py, quarantine).
            if getattr(self, "_busy", False):
                raise RuntimeError("test fault check: this processor was entered by a second thread")
            self._busy = True
            try:
                for request in requests:
                    inject_test_fault(request.prompt)
            finally:
                self._busy = False
        return [r.image for r in requests]


def inject_test_fault(prompt: str) -> None:
    """TEST ONLY, and only with DREAMSTREAM_TEST_FAULTS=1: lets a test make a real server's processor
    fail. The prompt `fault:raise` raises; `fault:sleep=S` blocks the worker for S seconds (a hang
    when S is past DREAMSTREAM_PROCESSING_TIMEOUT). Any other prompt does nothing."""
    if prompt == "fault:raise":
        raise RuntimeError("injected test fault")
    if prompt.startswith("fault:sleep="):
        time.sleep(float(prompt.partition("=")[2]))
