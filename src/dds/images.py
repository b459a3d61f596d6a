"""Reading, checking, resizing and writing images; every failure is one clear sentence."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from dds.atomic import atomic_path
from dds.errors import DDSError

MAX_PIXELS = 40_000_000  # larger images are refused as possible decompression bombs
MIN_SIDE = 8


def check_image_file(path: str | Path) -> Path:
    """One sentence for a path that cannot hold an image: missing, a folder, or empty."""
    path = Path(path)
    if not path.exists():
        raise DDSError(f"input '{path}' does not exist; check the path")
    if path.is_dir():
        raise DDSError(f"input '{path}' is a folder where an image file was expected")
    if path.stat().st_size == 0:
        raise DDSError(f"input '{path}' is an empty file; give a PNG or JPEG image")
    return path


def load_image(path: str | Path) -> Image.Image:
    """Open an image file as RGB, refusing anything that is not a readable, sane image."""
    path = check_image_file(path)
    # Image.open reads only the header, so the declared size is refused before any decoding.
    # No process-wide setting is touched (two edits may load images at once); PIL's own
    # DecompressionBombError only fires far above MAX_PIXELS.
    try:
        with Image.open(path) as im:
            if im.size[0] * im.size[1] > MAX_PIXELS:
                raise Image.DecompressionBombError(im.size)
            check_size(im.size, str(path))
            im.load()
            return to_rgb(upright(im))
    except DDSError:
        raise
    except Image.DecompressionBombError:
        raise DDSError(
            f"input '{path}' declares more than {MAX_PIXELS:,} pixels and is refused as a "
            "possible decompression bomb; downscale it first"
        ) from None
    except UnidentifiedImageError:
        raise DDSError(f"input '{path}' is not an image file PIL can read; give a PNG or JPEG") from None
    except (OSError, SyntaxError, ValueError) as e:
        raise DDSError(f"input '{path}' is damaged or truncated ({e}); re-export the image") from None


def upright(im: Image.Image) -> Image.Image:
    """The image as it is meant to be seen: EXIF orientation applied (a phone's portrait photo
    is stored sideways with an orientation tag), the tag dropped."""
    return ImageOps.exif_transpose(im)


def check_size(size: tuple[int, int], name: str = "image") -> None:
    w, h = size
    if w * h > MAX_PIXELS:
        raise DDSError(
            f"{name} is {w}x{h}, more than {MAX_PIXELS:,} pixels, and is refused as a possible "
            "decompression bomb; downscale it first"
        )
    if min(w, h) < MIN_SIDE:
        raise DDSError(f"{name} is {w}x{h}; each side must have at least {MIN_SIDE} pixels")


def to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode (L, LA, P, RGBA, I;16, I, F, CMYK) to 8-bit RGB; alpha over white."""
    if im.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        a = np.asarray(im, dtype=np.float64)
        hi = 65535.0 if im.mode.startswith("I;16") or a.max() > 255 else 255.0
        if im.mode == "F":
            hi = max(float(a.max()), 1.0) if a.max() > 1 else 1.0
        a = np.clip(a / hi * 255.0 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "L")
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        rgba = im.convert("RGBA")
        bg = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        return Image.alpha_composite(bg, rgba).convert("RGB")
    return im.convert("RGB")


def working_size(size: tuple[int, int], long_side: int, multiple: int = 8) -> tuple[int, int]:
    """(w, h) scaled so the long side is `long_side`, both sides rounded to `multiple`."""
    w, h = size
    s = long_side / max(w, h)
    nw = max(multiple, int(round(w * s / multiple)) * multiple)
    nh = max(multiple, int(round(h * s / multiple)) * multiple)
    return nw, nh


def center_crop_square(im: Image.Image) -> Image.Image:
    w, h = im.size
    s = min(w, h)
    left, top = (w - s) // 2, (h - s) // 2
    return im.crop((left, top, left + s, top + s))


def prepare(im: Image.Image, long_side: int, crop: bool = False, multiple: int = 8) -> Image.Image:
    """Resize (never crop unless `crop`) so both sides are multiples of `multiple`."""
    if crop:
        im = center_crop_square(im)
    target = working_size(im.size, long_side, multiple)
    return im if im.size == target else im.resize(target, Image.Resampling.LANCZOS)


def pil_to_tensor(im: Image.Image) -> torch.Tensor:
    """RGB PIL image -> (1,3,H,W) float32 in [-1,1]."""
    a = np.asarray(im.convert("RGB"), dtype=np.float32) / 127.5 - 1.0
    return torch.from_numpy(a).permute(2, 0, 1).unsqueeze(0).contiguous()


def tensor_to_pil(x: torch.Tensor) -> Image.Image:
    """(3,H,W) or (1,3,H,W) in [-1,1] -> RGB PIL image."""
    if x.ndim == 4:
        x = x[0]
    a = ((x.detach().float().cpu().clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0)
    return Image.fromarray(a.numpy(), "RGB")


def save_png(im: Image.Image, path: str | Path, info: dict[str, str] | None = None) -> Path:
    """Write a PNG atomically (temp file, then rename), with optional text metadata."""
    meta = PngImagePlugin.PngInfo()
    for k, v in (info or {}).items():
        meta.add_text(k, v)
    with atomic_path(path, suffix=".png") as tmp:
        im.save(tmp, format="PNG", pnginfo=meta)
    return Path(path)
