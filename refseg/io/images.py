"""Reading images of any mode, depth and orientation into RGB uint8 arrays.

Every problem with a file (missing, empty, corrupt, truncated, unsupported, or over
the pixel limit) is an :class:`ImageLoadError` naming the file, so that a run can
record it for that image and go on with the others.

Pixel limit: an image whose header declares more than :func:`max_image_pixels`
pixels (default: PIL's hard limit, ``2 * PIL.Image.MAX_IMAGE_PIXELS`` = 178,956,970,
e.g. 13400 x 13350) is refused before anything is decoded; one over half the limit
is read with a :class:`LargeImageWarning` naming it. Set ``REFSEG_MAX_IMAGE_PIXELS``
(a pixel count, or ``none`` for no limit) or pass ``max_pixels`` to change it; a limit
above PIL's own is honoured (PIL's check is lifted while refseg opens the file).
Images are always decoded at full resolution: masks and boxes are given in the
image's own pixels, so a reduced decode would change the results.
"""

from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from refseg.errors import InvalidInput, RefsegError

MAX_PIXELS_ENV = "REFSEG_MAX_IMAGE_PIXELS"
_FROM_SETTING = object()  # max_pixels default: $REFSEG_MAX_IMAGE_PIXELS, else PIL's hard limit
_OPEN_LOCK = threading.Lock()  # refseg's threads change warning filters / PIL's limit one at a time


class ImageLoadError(RefsegError, RuntimeError):
    """An image could not be read (missing, corrupt, unsupported or over the pixel limit); names the file."""


class LargeImageWarning(Image.DecompressionBombWarning):
    """An image is over half the pixel limit (PIL's decompression-bomb warning, with the file name)."""


def max_image_pixels() -> int | None:
    """The pixel limit in force: ``$REFSEG_MAX_IMAGE_PIXELS`` (a positive count, or ``none``: no limit),
    else PIL's hard limit ``2 * PIL.Image.MAX_IMAGE_PIXELS`` (``None`` if PIL's is lifted)."""
    text = os.environ.get(MAX_PIXELS_ENV, "").strip()
    if not text:
        return None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)
    if text.lower() in ("none", "off", "unlimited"):
        return None
    try:
        value = float(text.replace("_", ""))
    except ValueError:
        value = float("nan")
    if not (value >= 1 and value == int(value)):
        raise InvalidInput(f"{MAX_PIXELS_ENV} must be a positive whole number of pixels or 'none', got {text!r}")
    return int(value)


def _limit(max_pixels) -> int | None:
    if max_pixels is _FROM_SETTING:
        return max_image_pixels()
    if max_pixels is None:
        return None
    if isinstance(max_pixels, bool) or not isinstance(max_pixels, (int, np.integer)) or max_pixels < 1:
        raise InvalidInput(f"max_pixels must be a positive integer or None, got {max_pixels!r}")
    return int(max_pixels)


def _pil_open(path: Path, lift_pil_limit: bool) -> Image.Image:
    """``Image.open`` (header only) with PIL's decompression-bomb warnings held back (refseg emits its own,
    naming the file); warnings other threads raised meanwhile are passed on. ``lift_pil_limit`` lifts PIL's
    hard limit for this call (refseg's limit is checked by the caller)."""
    with _OPEN_LOCK:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            saved = Image.MAX_IMAGE_PIXELS
            if lift_pil_limit:
                Image.MAX_IMAGE_PIXELS = None
            try:
                im = Image.open(path)
            finally:
                Image.MAX_IMAGE_PIXELS = saved
    for w in caught:
        if not issubclass(w.category, Image.DecompressionBombWarning):
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno, source=w.source)
    return im


def _open_within_limit(path: Path, limit: int | None) -> Image.Image:
    """Open ``path`` lazily, refusing it (:class:`ImageLoadError`) when it declares more than ``limit`` pixels."""
    pil_hard = None if Image.MAX_IMAGE_PIXELS is None else 2 * int(Image.MAX_IMAGE_PIXELS)
    lift = pil_hard is not None and (limit is None or limit > pil_hard)
    try:
        im = _pil_open(path, lift)
    except Image.DecompressionBombError:  # over PIL's limit, hence over ours: reopen to name the size
        im = _pil_open(path, True)
    w, h = im.size
    pixels = max(1, w) * max(1, h)
    if limit is not None and pixels > limit:
        im.close()
        raise ImageLoadError(
            f"cannot read image {path}: it is {w}x{h} = {pixels:,} pixels, over the limit of {limit:,} "
            f"(set {MAX_PIXELS_ENV} to a larger pixel count, or 'none', to read it)")
    if limit is not None and pixels > limit // 2:
        warnings.warn(LargeImageWarning(
            f"{path}: large image, {w}x{h} = {pixels:,} pixels (over half the limit of {limit:,}, "
            f"{MAX_PIXELS_ENV}); reading it takes about {pixels * 7 // 2**20:,} MiB"), stacklevel=3)
    return im


def _check_file(path: Path) -> None:
    if not path.exists():
        raise ImageLoadError(f"image not found: {path}")
    if path.is_file() and path.stat().st_size == 0:
        raise ImageLoadError(f"cannot read image {path}: empty file (0 bytes)")


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


def load_image(source: str | os.PathLike | Image.Image | np.ndarray, max_pixels=_FROM_SETTING) -> np.ndarray:
    """Load an image path, PIL image or array as [H, W, 3] uint8 RGB.

    Raises :class:`ImageLoadError` with the file name for a missing, empty,
    unreadable or truncated file, and for one over ``max_pixels`` pixels (default
    :func:`max_image_pixels`: ``$REFSEG_MAX_IMAGE_PIXELS``, else PIL's hard limit;
    ``None``: no limit), checked on the header before decoding. An image over half
    the limit is read with a :class:`LargeImageWarning` naming it. Images within
    the limit are decoded as PIL decodes them, at full resolution.
    """
    if isinstance(source, np.ndarray):
        return _array_to_rgb(source)
    if isinstance(source, Image.Image):
        return to_rgb_array(source)
    limit = _limit(max_pixels)
    path = Path(source)
    _check_file(path)
    try:
        with _open_within_limit(path, limit) as im:
            im.load()
            return to_rgb_array(im)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
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


def image_size(source: str | os.PathLike, max_pixels=_FROM_SETTING) -> tuple[int, int]:
    """(height, width) after EXIF rotation, reading only the header.

    The same errors as :func:`load_image` (an image over the pixel limit is refused).
    """
    limit = _limit(max_pixels)
    path = Path(source)
    _check_file(path)
    try:
        with _open_within_limit(path, limit) as im:
            w, h = im.size
            orientation = im.getexif().get(0x0112, 1)
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError, Image.DecompressionBombError) as exc:
        raise ImageLoadError(f"cannot read image {source}: {exc}") from exc
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)
