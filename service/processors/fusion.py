"""Fused attention projections: one matmul for each attention layer's q/k/v, with the separate weights kept as
views of the fused one (so lightning's in-place checkpoint swap still reaches them)."""

from __future__ import annotations

import torch


def fuse_projections(module: torch.nn.Module) -> int:
    """One matmul for each attention layer's q/k/v (self-attention) or k/v (cross-attention) projections.

    At batch 1 the SDXL UNet's projections are 256 x 1280 x 1280 matmuls, too small to fill the GPU: three of
    them in a row cost about what one three times as wide does. diffusers' `fuse_projections` adds the fused
    layer beside the separate ones; here the separate weights then become views of the fused weight, so the
    memory is not doubled and loading a state dict into the separate names (lightning's checkpoint swap) lands
    in the fused weight too. Only layers on the default processor (AttnProcessor2_0) are fused; returns how many.
    """
    try:
        from diffusers.models.attention_processor import Attention, AttnProcessor2_0, FusedAttnProcessor2_0
    except ImportError:
        return 0
    count = 0
    for attn in module.modules():
        if (not isinstance(attn, Attention) or getattr(attn, "fused_projections", False)
                or type(attn.processor) is not AttnProcessor2_0 or getattr(attn, "to_q", None) is None):
            continue
        with torch.no_grad():
            attn.fuse_projections()
        _share_fused_weight(attn)
        attn.set_processor(FusedAttnProcessor2_0())
        count += 1
    return count


def _share_fused_weight(attn: torch.nn.Module) -> None:
    """The separate q/k/v (or k/v) weights of a fused attention layer become views of its fused weight."""
    fused = attn.to_kv if attn.is_cross_attention else attn.to_qkv
    parts = (attn.to_k, attn.to_v) if attn.is_cross_attention else (attn.to_q, attn.to_k, attn.to_v)
    fused.requires_grad_(False)
    start = 0
    for part in parts:
        rows = part.weight.shape[0]
        part.weight = torch.nn.Parameter(fused.weight.data[start:start + rows], requires_grad=False)
        if part.bias is not None:
            part.bias = torch.nn.Parameter(fused.bias.data[start:start + rows], requires_grad=False)
        start += rows


def moved(module: torch.nn.Module, device: torch.device | str, dtype: torch.dtype) -> torch.nn.Module:
    """`module` moved to `device` and cast to `dtype` (floating-point tensors only), in place, its fused layers
    still sharing one weight: `Module.to` copies each parameter on its own, which would leave the separate q/k/v
    weights as copies that lightning's checkpoint swap fills while the fused matmul reads the stale fused one."""
    torch.nn.Module.to(module, device=device, dtype=dtype)  # not diffusers' override, which warns on casts
    for attn in module.modules():
        if getattr(attn, "fused_projections", False):
            _share_fused_weight(attn)
    return module


def fused_keys(module: torch.nn.Module) -> set[str]:
    """The state-dict names `fuse_projections` added (absent from any checkpoint of the unfused model)."""
    return {name for name, _ in module.named_parameters(remove_duplicate=False)
            if name.rsplit(".", 2)[-2:-1] in (["to_qkv"], ["to_kv"])}
