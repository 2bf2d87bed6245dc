"""Reading images of any mode, depth and orientation into RGB uint8 arrays."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError


class ImageLoadError(RuntimeError):
    """An image could not be read (missing, corrupt or unsupported); names the file."""


def to_rgb_array(image: Image.Image) -> np.ndarray:
    """PIL image of any mode (L, LA, P, RGBA, I;16, I, F, CMYK...) -> [H, W, 3] uint8 RGB.

    EXIF orientation is applied; transparency is composited on black (what the
    pixels hold), 16-bit and float images are rescaled to their own range.
    """
    image = ImageOps.exif_transpose(image)
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        # 16-bit images keep their absolute scale when they use it; otherwise stretch
        if image.mode.startswith("I;16") or (lo >= 0 and hi > 255):
            scale = 65535.0 if hi > 255 else 255.0
            arr = arr / scale * 255.0
        elif hi > lo:
            arr = (arr - lo) / (hi - lo) * 255.0
        gray = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
        return np.repeat(gray[:, :, None], 3, axis=2)
    if image.mode == "P" and "transparency" in image.info:
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        image = image.convert("RGBA")
        arr = np.asarray(image, dtype=np.float32)
        rgb = arr[:, :, :3] * (arr[:, :, 3:4] / 255.0)
        return np.clip(np.rint(rgb), 0, 255).astype(np.uint8)
    return np.asarray(image.convert("RGB"), dtype=np.uint8).copy()


def load_image(source: str | os.PathLike | Image.Image | np.ndarray) -> np.ndarray:
    """Load an image path, PIL image or array as [H, W, 3] uint8 RGB.

    Raises :class:`ImageLoadError` with the file name for a missing, unreadable
    or truncated file.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return to_rgb_array(source)
    path = Path(source)
    if not path.exists():
        raise ImageLoadError(f"image not found: {path}")
    try:
        with Image.open(path) as im:
            im.load()
            return to_rgb_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as exc:
        raise ImageLoadError(f"cannot read image {path}: {exc}") from exc


def _array_to_rgb(arr: np.ndarray) -> np.ndarray:
    if arr.ndim == 2:
        arr = arr[:, :, None]
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ImageLoadError(f"expected an HxW, HxWx1, HxWx3 or HxWx4 array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        if np.issubdtype(arr.dtype, np.floating) and arr.max(initial=0) <= 1.0:
            arr = arr * 255.0
        elif arr.dtype == np.uint16:
            arr = arr / 65535.0 * 255.0
        arr = np.clip(np.rint(arr), 0, 255).astype(np.uint8)
    if arr.shape[2] == 1:
        arr = np.repeat(arr, 3, axis=2)
    elif arr.shape[2] == 4:
        alpha = arr[:, :, 3:4].astype(np.float32) / 255.0
        arr = np.clip(np.rint(arr[:, :, :3] * alpha), 0, 255).astype(np.uint8)
    return np.ascontiguousarray(arr)


def image_size(source: str | os.PathLike) -> tuple[int, int]:
    """(height, width) after EXIF rotation, reading only the header."""
    try:
        with Image.open(source) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (FileNotFoundError, UnidentifiedImageError, OSError) as exc:
        raise ImageLoadError(f"cannot read image {source}: {exc}") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
