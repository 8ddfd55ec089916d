"""Reading images from disk and the few transforms convlens needs (Pillow + torch only)."""
from __future__ import annotations

import os
import stat
import warnings
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Iterable

import numpy as np
import torch
from PIL import Image, ImageOps

from ..errors import ConvlensError
from ..io import check_input_file, display, file_kind, stat_input

MAX_IMAGE_PIXELS = 64_000_000  # decompression-bomb limit
IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm", ".pgm"}


@dataclass
class LoadedImage:
    path: Path
    image: Image.Image  # RGB or L, EXIF-oriented


def package_photos_dir() -> Path:
    return Path(str(resources.files("convlens.data") / "files" / "photos"))


def sample_photo_paths() -> list[Path]:
    """The shipped photos plus matplotlib's grace_hopper.jpg when available."""
    paths = sorted(p for p in package_photos_dir().iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    try:
        import matplotlib.cbook as cbook
        hopper = Path(cbook.get_sample_data("grace_hopper.jpg", asfileobj=False))
        if hopper.is_file():
            paths.append(hopper)
    except Exception:  # noqa: BLE001 - matplotlib without sample data: ship without it
        pass
    return paths


def to_mode(img: Image.Image, mode: str) -> Image.Image:
    """Convert any Pillow mode (palette, RGBA, 16-bit, float…) to 'RGB' or 'L'."""
    if img.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(img, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        scale = 255.0 / (hi - lo) if hi > lo else 0.0
        img = Image.fromarray(((arr - lo) * scale).astype(np.uint8), "L")
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        img = img.convert("RGBA")
        background = Image.new("RGBA", img.size, (255, 255, 255, 255))
        img = Image.alpha_composite(background, img)
    return img.convert(mode)


def open_image(path: str | os.PathLike, mode: str = "RGB") -> Image.Image:
    """Open an image file, apply its EXIF orientation and convert it to ``mode``.

    Refused with one clear error: what is not a regular file (checked before opening: a named
    pipe would block), more than MAX_IMAGE_PIXELS, a PNG too short for the size its header
    claims (refused before decoding), and NaN or infinite pixels in float images.
    """
    path = check_input_file(path, "image file")
    name = display(path)
    old_limit = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = MAX_IMAGE_PIXELS
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(path) as img:
                check_png_size(img, path.stat().st_size, name)
                img.load()
                img = ImageOps.exif_transpose(img)
                check_finite(img, name)
                return to_mode(img, mode)
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise ConvlensError(f"{name}: image too large (over {MAX_IMAGE_PIXELS:,} pixels)") from None
    except FileNotFoundError:
        raise ConvlensError(f"{name}: no such file or folder") from None
    except ConvlensError:
        raise
    except (OSError, ValueError, SyntaxError) as exc:
        raise ConvlensError(f"{name}: not a readable image ({display(str(exc))})") from None
    finally:
        Image.MAX_IMAGE_PIXELS = old_limit


DEFLATE_MAX_RATIO = 1032  # deflate cannot compress better than about 1032:1


def check_png_size(img: Image.Image, file_bytes: int, name: str) -> None:
    """A PNG holds at least height × ⌈width/8⌉ bytes of deflated pixel rows, so a file smaller than
    that / 1032 is truncated or lying about its size: refused before a big buffer is allocated."""
    if img.format != "PNG":
        return
    width, height = img.size
    least_raw = height * (1 + (width + 7) // 8)
    if file_bytes * DEFLATE_MAX_RATIO < least_raw:
        raise ConvlensError(f"{name}: truncated or corrupt PNG (header says {width}×{height} pixels, "
                            f"the file has only {file_bytes:,} bytes)")


def check_finite(img: Image.Image, name: str) -> None:
    if img.mode == "F":
        arr = np.asarray(img)
        if not np.isfinite(arr).all():
            bad = int((~np.isfinite(arr)).sum())
            raise ConvlensError(f"{name}: {bad:,} pixel(s) are NaN or infinite")


def expand_image_paths(items: Iterable[str | os.PathLike]) -> list[Path]:
    """Files as given, folders expanded to their regular image files (sorted; sub-folders not entered).

    A given path that is neither a folder nor a regular file (a pipe, a device) is an error.
    """
    paths: list[Path] = []
    for item in items:
        p = Path(item)
        st = stat_input(p)
        if stat.S_ISDIR(st.st_mode):
            own = sorted(q for q in p.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            if not own:  # a labelled folder: the images of its class sub-folders
                own = sorted(q for d in sorted(p.iterdir()) if d.is_dir() and not d.name.startswith(".")
                             for q in d.iterdir() if q.is_file() and q.suffix.lower() in IMAGE_SUFFIXES)
            paths += own
        elif stat.S_ISREG(st.st_mode):
            paths.append(p)
        else:
            raise ConvlensError(f"{display(p)}: is {file_kind(st.st_mode)}, not an image file or folder")
    if not paths:
        raise ConvlensError("no image files given")
    return paths


def center_crop_resize(img: Image.Image, size: int, crop_fraction: float = 0.875,
                       resample=Image.BICUBIC) -> Image.Image:
    """Central square crop of ``crop_fraction`` of the short side, resized to ``size``×``size``."""
    w, h = img.size
    side = max(1, int(round(min(w, h) * crop_fraction)))
    left, top = (w - side) // 2, (h - side) // 2
    return img.crop((left, top, left + side, top + side)).resize((size, size), resample)


def imagenet_preprocess(img: Image.Image, size: int = 224) -> torch.Tensor:
    """EfficientNet-Lite preprocessing: RGB, centre crop 0.875, bicubic resize, (x − 127)/128; (3, H, W)."""
    arr = np.asarray(center_crop_resize(to_mode(img, "RGB"), size), dtype=np.float32)
    return torch.from_numpy((arr - 127.0) / 128.0).permute(2, 0, 1).contiguous()


def imagenet_deprocess(x: torch.Tensor) -> np.ndarray:
    """Inverse of :func:`imagenet_preprocess` for display: (H, W, 3) floats in [0, 1]."""
    arr = x.detach().cpu().float().permute(1, 2, 0).numpy() * 128.0 + 127.0
    return np.clip(arr / 255.0, 0.0, 1.0)


def mnist_preprocess(img: Image.Image) -> torch.Tensor:
    """Any image to a 28×28 MNIST-like tensor in [0, 1]: grayscale, white digit on black."""
    gray = to_mode(img, "L")
    arr = np.asarray(gray, dtype=np.float32) / 255.0
    if arr.mean() > 0.5:  # dark digit on a light background: invert
        arr = 1.0 - arr
    small = Image.fromarray((arr * 255).astype(np.uint8), "L").resize((28, 28), Image.BILINEAR)
    return torch.from_numpy(np.asarray(small, dtype=np.float32) / 255.0).unsqueeze(0)


def mnist_deprocess(x: torch.Tensor) -> np.ndarray:
    """(1, 28, 28) tensor → (28, 28) array in [0, 1]."""
    return np.clip(x.detach().cpu().float()[0].numpy(), 0.0, 1.0)
