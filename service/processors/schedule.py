"""img2img on a distilled schedule: how many of its last steps run, the executed part, and x0 from a model output."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


def steps_to_run(num_steps: int, strength: float) -> int:
    """How many of the schedule's last steps img2img runs: ceil(num_steps * strength), within [1, num_steps]."""
    return min(num_steps, max(1, math.ceil(num_steps * strength - 1e-6)))


@dataclass(frozen=True)
class Schedule:
    """The executed part of a schedule: `timesteps` on the device, and len(timesteps) + 1 sigmas ending at 0."""

    timesteps: torch.Tensor
    sigmas: tuple[float, ...]
    prediction_type: str


def predicted_x0(output: torch.Tensor, sample: torch.Tensor, sigma: float, prediction_type: str) -> torch.Tensor:
    """The model's estimate of the clean latents, whatever it was trained to predict."""
    if prediction_type == "epsilon":
        return sample - sigma * output
    if prediction_type == "sample":
        return output
    if prediction_type == "v_prediction":
        return output * (-sigma / math.sqrt(sigma**2 + 1)) + sample / (sigma**2 + 1)
    raise ValueError(f"prediction_type {prediction_type!r} is not supported")
