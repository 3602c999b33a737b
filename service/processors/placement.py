"""Where a diffusion processor runs: its fast path for its device (`set_up_fast_path`, from the constructor and from
`DiffusionProcessor.to`) and the move of its models to another device (`move_models`, from `to`).

A processor built on one device (the CPU, where Modal's memory snapshot can hold it) and moved ends up as one built on
the other: its models and tensors there in the dtype a build there gives them, caches that depend on the dtype
dropped, the device's own tiny-encoder default applied, a new Accelerator wrapping the class's own model calls.
"""

from __future__ import annotations

from typing import Any

import torch

from service.config import parse_flag
from service.processors import gpu_jpeg
from service.processors.accel import Accelerator
from service.processors.fusion import moved
from service.processors.vae import load_encoder, vae_dtype, wants_tiny_encoder

# the model calls the fast path wraps: (its name in `Accelerator.functions`, the method, runs repeated blocks)
ACCELERATED = (("unet+controlnet", "unet_with_control", True), ("vae_encode", "vae_encode", False),
               ("vae_decode", "vae_decode", False), ("depth", "estimate_depth", False))


def set_up_fast_path(proc: Any) -> None:
    """The fast path for `proc.device`: a new Accelerator from the `compile` and `batch_sizes` options as given, its
    optimisations of the models loaded, and the four model calls it wraps, each around the class's own method (never
    around an earlier wrapper); nvJPEG where the device has it."""
    proc.accel = Accelerator.from_options(proc.options.get("compile"), proc.options.get("batch_sizes"), proc.device)
    # nvJPEG: Engine hands the processor frames decoded on the GPU and encodes its output there
    proc.gpu_jpeg = parse_flag(proc.options.get("gpu_jpeg"), "gpu_jpeg", True) and gpu_jpeg.available(proc.device)
    proc.accel.optimize(proc.unet, proc.vae, proc.encoder_vae if proc.encoder_vae is not proc.vae else None,
                        proc.controlnet)
    # The fast path plugs in here and nowhere else: these four model calls, as the mode runs them.
    for name, method, has_blocks in ACCELERATED:
        vars(proc).pop(method, None)  # an earlier wrapper goes: `getattr` gives the class's own method again
        setattr(proc, method, proc.accel.function(name, getattr(proc, method), has_blocks=has_blocks))


def move_models(proc: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Every model the processor holds (UNet, VAE, encoder VAE, ControlNet, text encoders, depth estimator) and
    tensor (lightning's time ids) to `device`, in `dtype` (the VAE in its own: `vae_dtype`); the streams' noise
    moved; prompt embeddings and schedules made again there on first use."""
    tiny_encoder = proc.encoder_vae is not proc.vae
    proc.device, proc.dtype = str(device), dtype  # a plain string, as Processor promises
    proc.vae_dtype = vae_dtype(proc, proc.vae)
    proc.encoder_dtype = dtype if tiny_encoder else proc.vae_dtype
    own_dtype = {"vae": proc.vae_dtype, "encoder_vae": proc.encoder_dtype}
    for name, value in list(vars(proc).items()):
        if isinstance(value, torch.nn.Module):
            setattr(proc, name, moved(value, device, own_dtype.get(name, dtype)))
        elif isinstance(value, tuple) and value and all(isinstance(v, torch.nn.Module) for v in value):
            setattr(proc, name, tuple(moved(v, device, dtype) for v in value))
        elif isinstance(value, torch.Tensor):
            setattr(proc, name, value.to(device, dtype if value.is_floating_point() else value.dtype))
    if proc.depth is not None:
        proc.depth.to(device, dtype)
    if wants_tiny_encoder(proc) != tiny_encoder:  # lightning's default differs between CUDA and the CPU
        load_encoder(proc)
    for key in list(proc._noise):  # drawn on the CPU in fp32: the same noise on any device
        proc._noise[key] = proc._noise[key].to(device)
    proc._prompts.clear()  # encoded again by the moved text encoders, in the new dtype
    proc._schedules.clear()


def memory_note(device: str) -> str:
    """What the GPU holds, for the log ("; GPU memory: ..."), on a CUDA device; nothing elsewhere."""
    if not str(device).startswith("cuda"):
        return ""
    return (f"; GPU memory: {torch.cuda.memory_allocated(device) / 2**30:.1f} GiB allocated, "
            f"{torch.cuda.memory_reserved(device) / 2**30:.1f} GiB reserved")
