"""Original | standard | lightning | filter side by side, each labelled with its time per frame.

    .venv/bin/python examples/compare_processors.py --image photo.jpg --prompt "Van Gogh style painting"

Models come from the options' env vars (DREAMSTREAM_STANDARD_BASE_MODEL, DREAMSTREAM_LIGHTNING_UNET, ...,
see the README), so the same command runs against the hub, a local mirror or tiny test models.
Each processor styles the image once to warm up and once more for the time on the label (the
steady-state cost a live stream pays, not the one-off first call). A processor that cannot load gets a
panel with its error instead, so the picture always shows what happened. The CPU `filter` panel needs
no weights, so even a machine without a GPU or models sees a styled picture. Exit status 1 when every
diffusion panel failed (the sheet is still written), with the reasons on stderr; 0 otherwise.
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
from service.processors.filter import style_for_prompt  # noqa: E402

CAPTION_H = 56
DIFFUSION_KINDS = ("standard", "lightning")


def _processor_arguments(kind: str, args: argparse.Namespace) -> dict:
    """What `get_diffusion_processor` takes for `kind`: the filter has no steps to choose and no model options."""
    if kind == "filter":
        return {}
    options = {"num_steps": args.standard_steps if kind == "standard" else args.lightning_steps,
               "use_controlnet": not args.no_controlnet, "width": args.width, "height": args.height}
    if args.device:
        options["device"] = args.device
    return options


def style_with(kind: str, image: Image.Image, args: argparse.Namespace) -> tuple[Image.Image | None, str]:
    """(styled image, label) or (None, the error) for one processor type."""
    try:
        start = time.perf_counter()
        proc = get_diffusion_processor(kind, style_prompt=args.prompt, strength=args.strength,
                                       **_processor_arguments(kind, args))
        load_s = time.perf_counter() - start
        proc.process(image)  # warm-up
        start = time.perf_counter()
        styled = proc.process(image)
        frame_ms = (time.perf_counter() - start) * 1000
        how = f"{style_for_prompt(args.prompt)} look" if kind == "filter" else f"{proc.num_steps} steps"
        label = (f"{kind}: {frame_ms:.0f} ms/frame ({how} x {args.strength:g}, "
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
        draw.multiline_text((6, height + 4), _fit(label, width, CAPTION_H - 4, font), fill=(240, 240, 240),
                            font=font, spacing=2)
    else:
        draw.rectangle((0, 0, width, height), fill=(60, 20, 20))
        draw.multiline_text((8, 8), _fit(label, width - 8, height - 16, font), fill=(255, 200, 200), font=font,
                            spacing=2)
        draw.text((6, height + 4), label.split(":")[0], fill=(255, 120, 120), font=font)
    return out


def _fit(text: str, width: int, height: int, font: ImageFont.ImageFont) -> str:
    """`text` wrapped to `width` px, each of its lines on its own, cut with "..." where `height` px run out
    (the terminal has the whole message)."""
    lines = [wrapped for line in text.splitlines() for wrapped in textwrap.wrap(line, width=max(20, width // 9))]
    line_h = font.getbbox("Ag")[3] + 2
    room = max(1, height // line_h)
    if len(lines) > room:
        lines = [*lines[: room - 1], "... (the rest is on the terminal)"]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--image", required=True, type=Path, help="input image (JPEG/PNG/WebP)")
    parser.add_argument("--prompt", required=True, help="style prompt for every processor")
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
    failures = []
    for kind in (*DIFFUSION_KINDS, "filter"):
        styled, label = style_with(kind, original, args)
        print(label, flush=True)
        panels.append(panel(styled, label, size, font))
        if styled is None and kind in DIFFUSION_KINDS:
            failures.append(label)
    sheet = Image.new("RGB", (sum(p.width for p in panels), panels[0].height))
    for i, p in enumerate(panels):
        sheet.paste(p, (i * p.width, 0))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    sheet.save(args.out)
    print(f"wrote {args.out}")
    if len(failures) == len(DIFFUSION_KINDS):
        reasons = "; ".join(failure.splitlines()[0].rstrip(":") for failure in failures)
        print(f"error: every diffusion panel failed ({reasons}; the fix is above); {args.out} shows the CPU filter "
              "only", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
