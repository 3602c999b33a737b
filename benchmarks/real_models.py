"""Real-size models with random weights, in the same on-disk layouts as `tests/tiny_models.py`.

Real weights cannot be downloaded on the benchmark machines. A UNet, ControlNet or VAE built from
the real config with random weights does exactly the arithmetic of the trained one, so speed and
memory measured with these hold (the images are noise). Configs are those of ../shared/PERF.md.
Built straight on the GPU in fp16; the four Lightning files are hard links to one UNet file (random
weights either way), which saves 15 GB of disk and a minute of writing.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

BUILD_VERSION = 3
KEYS = ("sd15", "sd15_controlnet", "sdxl", "sdxl_controlnet", "lightning", "depth", "taesd", "taesdxl",
        "sdxl_vae_fp16")

SD15_UNET = dict(cross_attention_dim=768, sample_size=64)
SD_VAE = dict(
    block_out_channels=(128, 256, 512, 512), down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=2, sample_size=512,
)
SDXL_COMMON = dict(
    addition_embed_type="text_time", addition_embed_type_num_heads=64, addition_time_embed_dim=256,
    attention_head_dim=(5, 10, 20), block_out_channels=(320, 640, 1280), cross_attention_dim=2048,
    down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"), layers_per_block=2,
    projection_class_embeddings_input_dim=2816, use_linear_projection=True,
)
SDXL_UNET = dict(
    **SDXL_COMMON, sample_size=128, transformer_layers_per_block=(1, 2, 10),
    up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
)
# The `-small` depth ControlNet is a pruned copy; one transformer layer, in the lowest block only (273 M).
SDXL_CONTROLNET_SMALL = dict(**SDXL_COMMON, transformer_layers_per_block=(0, 0, 1))
CLIP_L = dict(hidden_size=768, intermediate_size=3072, num_attention_heads=12, num_hidden_layers=12)
CLIP_BIGG = dict(
    hidden_size=1280, intermediate_size=5120, num_attention_heads=20, num_hidden_layers=32,
    projection_dim=1280, hidden_act="gelu",
)


def _log(msg: str) -> None:
    print(f"[real_models] {msg}", file=sys.stderr, flush=True)


def _tokenizer(pad_token: str = "<|endoftext|>"):
    """A CLIP tokenizer with no download: every printable ASCII character, alone and ending a word, and no
    merges. Prompts get other ids than from CLIP's vocabulary, which random weights cannot tell apart, and are
    padded to 77 tokens as CLIP's are: the text encoders do the same work."""
    from transformers import CLIPTokenizer

    chars = [chr(c) for c in range(ord("!"), ord("~") + 1)]
    tokens = [*chars, *(c + "</w>" for c in chars), "<|startoftext|>", "<|endoftext|>"]
    return CLIPTokenizer(vocab={t: i for i, t in enumerate(tokens)}, merges=[], pad_token=pad_token,
                         model_max_length=77)


def _clip(tokenizer, with_projection: bool, **config):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = CLIPTextConfig(
        vocab_size=49408, max_position_embeddings=77, bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id, **config,
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(cfg)


def build_real_models(root: Path, device: str = "cuda") -> dict[str, Path]:
    """Build (or reuse) the real-size random model set under `root`; returns {key: path}."""
    import torch
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        EulerDiscreteScheduler,
        PNDMScheduler,
        StableDiffusionPipeline,
        StableDiffusionXLPipeline,
        UNet2DConditionModel,
    )

    from service.processors.lightning import CHECKPOINTS  # the file names of ByteDance's release

    root = Path(root)
    paths = {key: root / key for key in KEYS}
    manifest = root / "real_models.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("version") == BUILD_VERSION:
        return paths
    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    started = time.monotonic()
    tok, tok2 = _tokenizer(), _tokenizer(pad_token="!")
    dtype = torch.float16

    with torch.device(device):
        _log("SD 1.5: UNet, ControlNet, VAE, CLIP-L")
        unet = UNet2DConditionModel(**SD15_UNET).to(dtype)
        pipe = StableDiffusionPipeline(
            vae=AutoencoderKL(**SD_VAE).to(dtype), text_encoder=_clip(tok, False, **CLIP_L).to(dtype),
            tokenizer=tok, unet=unet, safety_checker=None, feature_extractor=None, requires_safety_checker=False,
            scheduler=PNDMScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
                steps_offset=1, set_alpha_to_one=False,
            ),
        )
        pipe.save_pretrained(paths["sd15"])
        _controlnet(cross_attention_dim=768).to(dtype).save_pretrained(paths["sd15_controlnet"])
        del pipe, unet
        torch.cuda.empty_cache()

        _log("SDXL: UNet (2.6 B), small depth ControlNet, VAE, CLIP-L + bigG")
        unet = UNet2DConditionModel(**SDXL_UNET).to(dtype)
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 1024}).to(dtype)
        vae.register_to_config(force_upcast=False)
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=_clip(tok, False, **CLIP_L).to(dtype),
            text_encoder_2=_clip(tok2, True, **CLIP_BIGG).to(dtype), tokenizer=tok, tokenizer_2=tok2, unet=unet,
            scheduler=EulerDiscreteScheduler(
                beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
                timestep_spacing="leading",
            ),
        )
        pipe.save_pretrained(paths["sdxl"])
        _controlnet(**SDXL_CONTROLNET_SMALL).to(dtype).save_pretrained(paths["sdxl_controlnet"])
        from safetensors.torch import save_file

        paths["lightning"].mkdir(parents=True, exist_ok=True)
        first = paths["lightning"] / CHECKPOINTS[1]
        save_file({k: v.contiguous() for k, v in unet.state_dict().items()}, str(first))
        for steps, name in CHECKPOINTS.items():
            if steps != 1 and not (paths["lightning"] / name).exists():
                os.link(first, paths["lightning"] / name)
        del pipe, unet, vae
        torch.cuda.empty_cache()

        _log("SDXL VAE, fp16-safe (as madebyollin/sdxl-vae-fp16-fix: lightning's default vae_model)")
        vae = AutoencoderKL(**{**SD_VAE, "sample_size": 1024, "scaling_factor": 0.13025}).to(dtype)
        vae.register_to_config(force_upcast=False)
        vae.save_pretrained(paths["sdxl_vae_fp16"])
        del vae

        _log("Depth-Anything-V2-Small, TAESD, TAESDXL")
        _build_depth_small(paths["depth"])
        AutoencoderTiny().to(dtype).save_pretrained(paths["taesd"])
        AutoencoderTiny().to(dtype).save_pretrained(paths["taesdxl"])

    manifest.write_text(json.dumps({"version": BUILD_VERSION, "paths": {k: str(v) for k, v in paths.items()}}))
    _log(f"built in {time.monotonic() - started:.0f} s under {root}")
    return paths


FAKE_REVISION = "0" * 40


def hub_cache(root: Path, paths: dict[str, Path]) -> Path:
    """A Hugging Face cache folder (for HF_HUB_CACHE) holding the set's TAESD and TAESDXL as `madebyollin/taesd` and
    `madebyollin/taesdxl`, so a processor that loads those defaults by hub id (`tiny_encoder`) finds them offline, as
    it would on a machine that downloaded them once. The files are symlinks into the set."""
    cache = Path(root) / "hf-hub-cache"
    for key in ("taesd", "taesdxl"):
        repo = cache / f"models--madebyollin--{key}"
        snapshot = repo / "snapshots" / FAKE_REVISION
        snapshot.mkdir(parents=True, exist_ok=True)
        (repo / "refs").mkdir(exist_ok=True)
        (repo / "refs" / "main").write_text(FAKE_REVISION)
        for file in Path(paths[key]).iterdir():
            link = snapshot / file.name
            if not link.exists():
                link.symlink_to(file.resolve())
    return cache


def _controlnet(**config):
    """A ControlNet whose zero convolutions hold small random weights, as training leaves them: with the
    zeros of a fresh init its residuals vanish, and equivalence checks could not see the ControlNet."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel(**config)
    with torch.no_grad():
        for conv in [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                     controlnet.controlnet_cond_embedding.conv_out]:
            conv.weight.normal_(0, 0.02)
    return controlnet


def _build_depth_small(folder: Path) -> None:
    from transformers import DepthAnythingConfig, DepthAnythingForDepthEstimation, Dinov2Config, DPTImageProcessor

    backbone = Dinov2Config(
        image_size=518, patch_size=14, hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
        intermediate_size=1536, out_features=["stage3", "stage6", "stage9", "stage12"], reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=384, neck_hidden_sizes=[48, 96, 192, 384],
        fusion_hidden_size=64, head_hidden_size=32, reassemble_factors=[4, 2, 1, 0.5],
    )
    DepthAnythingForDepthEstimation(config).half().save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 518, "width": 518}, keep_aspect_ratio=True, ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False,
    ).save_pretrained(folder)


if __name__ == "__main__":
    built = build_real_models(Path(sys.argv[1] if len(sys.argv) > 1 else "/tmp/real-models"))
    print(json.dumps({k: str(v) for k, v in built.items()}, indent=2))
