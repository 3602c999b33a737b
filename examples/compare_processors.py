"""Original | standard | lightning side by side, each labelled with its time per frame.

    python examples/compare_processors.py --image photo.jpg --prompt "Van Gogh style painting" --out compare.png

Models come from the options' env vars (DREAMSTREAM_STANDARD_BASE_MODEL, DREAMSTREAM_LIGHTNING_UNET, ...,
see the README), so the same command runs against the hub, a local mirror or tiny test models.
Each processor styles the image once to warm up and once more for the time on the label (the
steady-state cost a live stream pays, not the one-off first call). A processor that cannot load gets a
panel with its error instead, so the picture always shows what happened.
"""

from __future__ import annotations

import argparse
import gc
import sys
import textwrap
import time
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # run from anywhere without installing

from service.codec import fit_to, pil_to_rgb, rgb_to_pil  # noqa: E402
from service.diffusion_processor import get_diffusion_processor  # noqa: E402

CAPTION_H = 56


def style_with(kind: str, image: Image.Image, args: argparse.Namespace) -> tuple[Image.Image | None, str]:
    """(styled image, label) or (None, the error) for one processor type."""
    steps = args.standard_steps if kind == "standard" else args.lightning_steps
    options = {"width": args.width, "height": args.height}
    if args.device:
        options["device"] = args.device
    try:
        start = time.perf_counter()
        proc = get_diffusion_processor(kind, style_prompt=args.prompt, strength=args.strength, num_steps=steps,
                                       use_controlnet=not args.no_controlnet, **options)
        load_s = time.perf_counter() - start
        proc.process(image)  # warm-up
        start = time.perf_counter()
        styled = proc.process(image)
        frame_ms = (time.perf_counter() - start) * 1000
        label = (f"{kind}: {frame_ms:.0f} ms/frame ({proc.num_steps} steps x {args.strength:g}, "
                 f"{proc.describe().get('device')}; load {load_s:.1f} s)")
        del proc
        return styled, label
    except Exception as exc:  # noqa: BLE001 - shown in the picture, which is the point
        return None, f"{kind} failed: {type(exc).__name__}: {exc}"
    finally:
        gc.collect()
        _free_gpu_memory()


def _free_gpu_memory() -> None:
    """Let the second processor have the GPU memory the first one used."""
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


def panel(image: Image.Image | None, label: str, size: tuple[int, int], font: ImageFont.ImageFont) -> Image.Image:
    width, height = size
    out = Image.new("RGB", (width, height + CAPTION_H), (24, 24, 24))
    draw = ImageDraw.Draw(out)
    if image is not None:
        out.paste(image.resize(size), (0, 0))
        text = textwrap.fill(label, width=max(20, width // 9))
        draw.multiline_text((6, height + 4), text, fill=(240, 240, 240), font=font, spacing=2)
    else:
        draw.rectangle((0, 0, width, height), fill=(60, 20, 20))
        draw.multiline_text((8, 8), textwrap.fill(label, width=max(20, width // 9)), fill=(255, 200, 200),
                            font=font, spacing=2)
        draw.text((6, height + 4), label.split(":")[0], fill=(255, 120, 120), font=font)
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, type=Path, help="input image (JPEG/PNG/WebP)")
    parser.add_argument("--prompt", required=True, help="style prompt for both processors")
    parser.add_argument("--out", type=Path, default=Path("compare.png"), help="where to write the comparison")
    parser.add_argument("--strength", type=float, default=0.7)
    parser.add_argument("--standard-steps", type=int, default=25)
    parser.add_argument("--lightning-steps", type=int, default=4, choices=(1, 2, 4, 8))
    parser.add_argument("--width", type=int, default=512)
    parser.add_argument("--height", type=int, default=512)
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: cuda when present)")
    parser.add_argument("--no-controlnet", action="store_true", help="plain img2img, no depth ControlNet")
    args = parser.parse_args(argv)

    original = rgb_to_pil(fit_to(pil_to_rgb(Image.open(args.image)), args.width, args.height))
    font = ImageFont.load_default(size=14)
    size = (args.width, args.height)
    panels = [panel(original, "original", size, font)]
    for kind in ("standard", "lightning"):
        styled, label = style_with(kind, original, args)
        print(label, flush=True)
        panels.append(panel(styled, label, size, font))
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * p.width, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
