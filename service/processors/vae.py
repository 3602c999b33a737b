"""The diffusion processors' VAEs: which one decodes (tiny, a given one, the base model's own; in which dtype), and
what encodes the img2img input (the VAE itself, or the tiny VAE's encoder). Each function sets the VAE attributes of
`proc`, the DiffusionProcessor being built (service/processors/diffusion.py calls them from its constructor)."""

from __future__ import annotations

import logging
from typing import Any

import torch

from service.config import parse_flag
from service.processors.models import load_model, model_source

log = logging.getLogger("dreamstream.processors")


def cast(module: torch.nn.Module, dtype: torch.dtype) -> Any:
    """`module.to(dtype)` without diffusers' override, which warns on every cast of models we built ourselves."""
    return torch.nn.Module.to(module, dtype=dtype)


def vae_dtype(proc: Any, vae: Any) -> torch.dtype:
    """The dtype `vae` runs in for `proc`: fp32 where the processor runs in fp16, `upcast_vae` is set and the VAE's
    config says `force_upcast` (the stock SDXL VAE overflows in fp16), else the processor's own."""
    says_upcast = bool(getattr(vae.config, "force_upcast", False))
    return torch.float32 if proc.upcast_vae and proc.dtype == torch.float16 and says_upcast else proc.dtype


def load_vae(proc: Any) -> None:
    """`tiny_vae` when set (`vae_model` is then not loaded), else `vae_model`, else base_model's own VAE.

    A full VAE whose config says `force_upcast` runs in fp32 where the processor runs in fp16 and
    `upcast_vae` is set (the stock SDXL VAE overflows in fp16); any other VAE in the processor's dtype.
    """
    from diffusers import AutoencoderKL, AutoencoderTiny

    from service.processors.models import DEFAULTS

    tiny, full = proc.sources["tiny_vae"], proc.sources.get("vae_model")
    if tiny is not None:
        vae = proc.load_component("tiny_vae", AutoencoderTiny, dtype_kw="torch_dtype", dtype=torch.float32)
        which = f"tiny_vae {tiny.describe()}" + (f"; vae_model {full.value} not loaded" if full else "")
    elif full is not None:
        vae = proc.load_component("vae_model", AutoencoderKL, dtype_kw="torch_dtype", dtype=torch.float32)
        which = f"vae_model {full.describe()}"
    else:
        vae = proc.load_component("base_model", AutoencoderKL, "vae", "torch_dtype", dtype=torch.float32)
        base = proc.sources["base_model"]
        which = f"the base model's own VAE ({base.value if base else '?'}, subfolder vae)"
    proc.vae_dtype = vae_dtype(proc, vae)
    upcast = proc.vae_dtype != proc.dtype
    if upcast:
        fix = DEFAULTS.get(proc.name, {}).get("vae_model", "an fp16-safe VAE")
        why = (f"its config says force_upcast (fp16 SDXL VAEs overflow); vae_model={fix} or tiny_vae=True "
               "run in fp16")
    elif proc.upcast_vae and proc.dtype == torch.float16 and tiny is None:
        why = "the processor's dtype; its config does not say force_upcast"
    else:
        why = "the processor's dtype"
    log.info("vae: %s, %s in %s: %s", which, type(vae).__name__,
             str(proc.vae_dtype).removeprefix("torch."), why)
    proc.vae = cast(vae, proc.vae_dtype)
    proc.latent_scale = float(vae.config.scaling_factor)
    proc.latent_shift = float(getattr(vae.config, "shift_factor", None) or 0.0)


def wants_tiny_encoder(proc: Any) -> bool:
    """Whether the tiny VAE's encoder encodes `proc`'s input (see `load_encoder`): the `tiny_encoder` option, else
    the processor's default on CUDA; never when `tiny_vae` is set (the tiny VAE does both already)."""
    raw = proc.options.get("tiny_encoder")
    value = None if raw is None else parse_flag(raw, "tiny_encoder")  # True/False, or 1/0, on/off (env, --option)
    if proc.sources["tiny_vae"] is not None:
        return False
    if value is not None:
        return value
    return bool(proc.tiny_encoder_default and str(proc.device).startswith("cuda"))


def load_encoder(proc: Any) -> None:
    """What encodes the img2img input: the VAE itself, or, with a full VAE, the tiny VAE's encoder.

    Option `tiny_encoder`: True / False, default True for lightning on CUDA. The full SDXL VAE's encoder costs
    ~4 ms a 512 px frame even compiled, TAESDXL's ~0.5 ms, and its latents approximate the full encoder's
    (it was trained to). Lightning's default 2 steps x 0.7 start from sigma ~14.6, where the input latents
    are 1/15 of what the UNet sees, so their small error is lost in the noise; the full decoder keeps the
    output's quality. The model is `tiny_vae`'s default (madebyollin/taesdxl, 10 MB). By default, when it
    cannot be had (offline and not cached) the full encoder is used and the log says why; asked for
    explicitly, that is an error.
    """
    proc.encoder_vae, proc.encoder_dtype = proc.vae, proc.vae_dtype
    proc.encoder_scale, proc.encoder_shift = proc.latent_scale, proc.latent_shift
    if not wants_tiny_encoder(proc):
        return
    from diffusers import AutoencoderTiny

    from service.processors.models import ModelUnavailableError

    source = model_source(proc.name, "tiny_vae", True, proc.offline)
    assert source is not None
    try:
        tiny = load_model(source, lambda ref, local: AutoencoderTiny.from_pretrained(
            ref, local_files_only=local, torch_dtype=proc.dtype), what="(tiny_encoder: its encoder only)")
    except ModelUnavailableError as exc:
        if proc.options.get("tiny_encoder") is not None:  # asked for explicitly
            raise
        log.warning("tiny_encoder: %s; encoding with the full VAE instead (a few ms slower a frame)", exc)
        return
    tiny.decoder = torch.nn.Identity()  # only the encoder is used
    proc.encoder_vae = cast(tiny.to(proc.device).eval().requires_grad_(False), proc.dtype)
    proc.encoder_dtype = proc.dtype
    proc.encoder_scale = float(tiny.config.scaling_factor)
    proc.encoder_shift = float(getattr(tiny.config, "shift_factor", None) or 0.0)
    log.info("tiny_encoder: the img2img input is encoded with %s's encoder, decoded with the full VAE",
             source.describe())
