"""Tiny random models in the real on-disk layouts, so the diffusion code paths run offline in seconds.

`build_tiny_models(root)` writes, under `root`:

| key | layout | what the processors use it as |
| --- | --- | --- |
| `sd15` | diffusers `StableDiffusionPipeline.save_pretrained` | `base_model` of standard |
| `sd15_controlnet` | diffusers `ControlNetModel` | `controlnet_model` of standard |
| `sdxl` | diffusers `StableDiffusionXLPipeline.save_pretrained` | `base_model` of lightning |
| `sdxl_controlnet` | diffusers `ControlNetModel` (SDXL, text_time) | `controlnet_model` of lightning |
| `lightning` | folder of the four `sdxl_lightning_*.safetensors` (`LIGHTNING_FILES`) | `lightning_unet` |
| `depth` | transformers `DepthAnythingForDepthEstimation` + `DPTImageProcessor` | `depth_model` |
| `taesd`, `taesdxl` | diffusers `AutoencoderTiny` | `tiny_vae` |
| `sdxl_vae_fp16` | diffusers `AutoencoderKL`, `force_upcast=False` (as `sdxl-vae-fp16-fix`) | lightning `vae_model` |

Every weight is random (seeded, so builds are reproducible): images come out as noise, but every
tensor takes the path the real models take. The tokenizer is a hand-written byte-level BPE vocabulary
(no download). A finished build leaves `tiny_models.json`; calling again on the same root returns at once,
which lets the benchmark, the Modal tests and the server tests share one build.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

BUILD_VERSION = 3
LIGHTNING_FILES = {
    1: "sdxl_lightning_1step_unet_x0.safetensors",
    2: "sdxl_lightning_2step_unet.safetensors",
    4: "sdxl_lightning_4step_unet.safetensors",
    8: "sdxl_lightning_8step_unet.safetensors",
}
_KEYS = ("sd15", "sd15_controlnet", "sdxl", "sdxl_controlnet", "lightning", "depth", "taesd", "taesdxl",
         "sdxl_vae_fp16")


def build_tiny_models(root: Path) -> dict[str, Path]:
    """Build (or reuse) the tiny model set under `root`; returns {key: path} as in the module docstring."""
    root = Path(root)
    paths = {key: root / key for key in _KEYS}
    manifest = root / "tiny_models.json"
    if manifest.exists() and json.loads(manifest.read_text()).get("version") == BUILD_VERSION:
        return paths

    import torch

    root.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(0)
    _write_tokenizer_files(root / "_tokenizer")
    _build_sd15(paths["sd15"], paths["sd15_controlnet"], root / "_tokenizer")
    _build_sdxl(paths["sdxl"], paths["sdxl_controlnet"], paths["lightning"], root / "_tokenizer")
    _build_depth(paths["depth"])
    for key in ("taesd", "taesdxl"):
        _tiny_autoencoder().save_pretrained(paths[key])
    _build_sdxl_vae_fp16(paths["sdxl_vae_fp16"])
    manifest.write_text(json.dumps({"version": BUILD_VERSION, "paths": {k: str(v) for k, v in paths.items()}}))
    return paths


def model_env(paths: dict[str, Path], controlnet: bool = True) -> dict[str, str]:
    """The DREAMSTREAM_* env vars that point both processors at the tiny models."""
    env = {
        "DREAMSTREAM_STANDARD_BASE_MODEL": str(paths["sd15"]),
        "DREAMSTREAM_LIGHTNING_BASE_MODEL": str(paths["sdxl"]),
        "DREAMSTREAM_LIGHTNING_UNET": str(paths["lightning"]),
        "DREAMSTREAM_LIGHTNING_VAE_MODEL": str(paths["sdxl_vae_fp16"]),
        "DREAMSTREAM_DEPTH_MODEL": str(paths["depth"]),
        "HF_HUB_OFFLINE": "1",
    }
    if controlnet:
        env["DREAMSTREAM_STANDARD_CONTROLNET_MODEL"] = str(paths["sd15_controlnet"])
        env["DREAMSTREAM_LIGHTNING_CONTROLNET_MODEL"] = str(paths["sdxl_controlnet"])
    return env


# --- text -----------------------------------------------------------------------------------------

def _byte_alphabet() -> list[str]:
    """GPT-2 / CLIP's printable stand-ins for the 256 byte values."""
    visible = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1))
    visible += list(range(ord("®"), ord("ÿ") + 1))
    codes = visible[:]
    extra = 0
    for byte in range(256):
        if byte not in visible:
            codes.append(256 + extra)
            extra += 1
    return [chr(c) for c in codes]


def _write_tokenizer_files(folder: Path) -> None:
    """A CLIP-style byte-level BPE vocabulary: every byte, every byte ending a word, a few merges."""
    folder.mkdir(parents=True, exist_ok=True)
    chars = _byte_alphabet()
    vocab: dict[str, int] = {}
    for token in chars + [c + "</w>" for c in chars]:
        vocab[token] = len(vocab)
    merges = ["t h", "th e</w>", "a r", "ar t</w>", "i n", "in g</w>"]
    for merge in merges:
        vocab.setdefault(merge.replace(" ", ""), len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")


def _tokenizer(folder: Path, pad_token: str = "<|endoftext|>"):
    from transformers import CLIPTokenizer

    vocab = json.loads((folder / "vocab.json").read_text())
    merges = [tuple(line.split()) for line in (folder / "merges.txt").read_text().splitlines()[1:]]
    return CLIPTokenizer(vocab=vocab, merges=merges, pad_token=pad_token, model_max_length=77)


def _text_encoder(tokenizer, hidden: int, with_projection: bool):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        hidden_size=hidden, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2,
        vocab_size=len(tokenizer), max_position_embeddings=77, projection_dim=hidden,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, hidden_act="gelu",
    )
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


# --- images ---------------------------------------------------------------------------------------

def _vae():
    """Four blocks like the real VAE, so latents are 1/8 of the image as the processors expect."""
    from diffusers import AutoencoderKL

    return AutoencoderKL(
        block_out_channels=(8, 8, 8, 8), down_block_types=("DownEncoderBlock2D",) * 4,
        up_block_types=("UpDecoderBlock2D",) * 4, latent_channels=4, layers_per_block=1,
        norm_num_groups=4, sample_size=64,
    )


def _tiny_autoencoder():
    from diffusers import AutoencoderTiny

    return AutoencoderTiny(
        encoder_block_out_channels=(8, 8, 8, 8), decoder_block_out_channels=(8, 8, 8, 8),
        num_encoder_blocks=(1, 1, 1, 1), num_decoder_blocks=(1, 1, 1, 1), latent_channels=4,
    )


def _controlnet(unet):
    """A ControlNet shaped like `unet`. Its zero convolutions get random weights, as training would give
    them: zeros would make the ControlNet invisible and `use_controlnet` untestable."""
    import torch
    from diffusers import ControlNetModel

    controlnet = ControlNetModel.from_unet(unet, conditioning_embedding_out_channels=(8, 8, 8, 8))
    zero_convs = [*controlnet.controlnet_down_blocks, controlnet.controlnet_mid_block,
                  controlnet.controlnet_cond_embedding.conv_out]
    with torch.no_grad():
        for conv in zero_convs:
            conv.weight.normal_(0, 0.3)
    return controlnet


def _build_sd15(folder: Path, controlnet_folder: Path, tokenizer_files: Path) -> None:
    from diffusers import PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel

    tokenizer = _tokenizer(tokenizer_files)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
        attention_head_dim=4, norm_num_groups=4,
    )
    # SD 1.5's own scheduler config: the processors re-derive their sampler from it.
    scheduler = PNDMScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", skip_prk_steps=True,
        steps_offset=1, set_alpha_to_one=False,
    )
    pipe = StableDiffusionPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32, with_projection=False), tokenizer=tokenizer,
        unet=unet, scheduler=scheduler, safety_checker=None, feature_extractor=None,
        requires_safety_checker=False,
    )
    pipe.save_pretrained(folder)
    _controlnet(unet).save_pretrained(controlnet_folder)


def _sdxl_unet():
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), attention_head_dim=(2, 4),
        use_linear_projection=True, addition_embed_type="text_time", addition_time_embed_dim=8,
        transformer_layers_per_block=(1, 1), projection_class_embeddings_input_dim=6 * 8 + 32,
        cross_attention_dim=64, norm_num_groups=4,
    )


def _build_sdxl(folder: Path, controlnet_folder: Path, lightning_folder: Path, tokenizer_files: Path) -> None:
    import torch
    from diffusers import EulerDiscreteScheduler, StableDiffusionXLPipeline
    from safetensors.torch import save_file

    tokenizer, tokenizer_2 = _tokenizer(tokenizer_files), _tokenizer(tokenizer_files, pad_token="!")
    unet = _sdxl_unet()
    scheduler = EulerDiscreteScheduler(
        beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", steps_offset=1,
        timestep_spacing="leading",
    )
    pipe = StableDiffusionXLPipeline(
        vae=_vae(), text_encoder=_text_encoder(tokenizer, 32, with_projection=False),
        text_encoder_2=_text_encoder(tokenizer_2, 32, with_projection=True), tokenizer=tokenizer,
        tokenizer_2=tokenizer_2, unet=unet, scheduler=scheduler,
    )
    pipe.vae.register_to_config(force_upcast=True)  # as the real SDXL VAE says
    pipe.save_pretrained(folder)
    _controlnet(unet).save_pretrained(controlnet_folder)
    # One distinct UNet per step count, as ByteDance ships them: a swap must visibly change the weights.
    lightning_folder.mkdir(parents=True, exist_ok=True)
    for steps, name in LIGHTNING_FILES.items():
        torch.manual_seed(100 + steps)
        state = {k: v.contiguous() for k, v in _sdxl_unet().state_dict().items()}
        save_file(state, str(lightning_folder / name))


def _build_sdxl_vae_fp16(folder: Path) -> None:
    """A stand-alone VAE in the layout of `madebyollin/sdxl-vae-fp16-fix` (config.json + weights at the root),
    whose config, like that one's, does not ask for force_upcast."""
    import torch

    torch.manual_seed(7)  # its own weights: a frame decoded by it differs from one decoded by sdxl's VAE
    vae = _vae()
    vae.register_to_config(force_upcast=False)
    vae.save_pretrained(folder)


def _build_depth(folder: Path) -> None:
    from transformers import (
        DepthAnythingConfig,
        DepthAnythingForDepthEstimation,
        Dinov2Config,
        DPTImageProcessor,
    )

    backbone = Dinov2Config(
        image_size=28, patch_size=14, hidden_size=16, num_hidden_layers=4, num_attention_heads=2,
        intermediate_size=32, out_features=["stage1", "stage2", "stage3", "stage4"],
        reshape_hidden_states=False,
    )
    config = DepthAnythingConfig(
        backbone_config=backbone, patch_size=14, reassemble_hidden_size=16,
        neck_hidden_sizes=[8, 8, 16, 16], fusion_hidden_size=8, head_hidden_size=8,
        reassemble_factors=[4, 2, 1, 0.5],
    )
    DepthAnythingForDepthEstimation(config).eval().save_pretrained(folder)
    DPTImageProcessor(
        size={"height": 28, "width": 28}, keep_aspect_ratio=True, ensure_multiple_of=14,
        image_mean=[0.485, 0.456, 0.406], image_std=[0.229, 0.224, 0.225], do_pad=False,
    ).save_pretrained(folder)


if __name__ == "__main__":
    built = build_tiny_models(Path(sys.argv[1] if len(sys.argv) > 1 else "tiny-models"))
    print(json.dumps({k: str(v) for k, v in built.items()}, indent=2))
