"""Image reading: every mode, depth and orientation; clear errors for bad files."""

import io

import numpy as np
import pytest
from PIL import Image

from refseg import ImageLoadError, load_image
from refseg.io.images import image_size


def _save(tmp_path, img, name, **kw):
    path = tmp_path / name
    img.save(path, **kw)
    return path


def test_modes_become_rgb_uint8(tmp_path):
    rgb = np.random.default_rng(0).integers(0, 255, (12, 20, 3), dtype=np.uint8)
    gray = Image.fromarray(rgb[:, :, 0])
    out = load_image(_save(tmp_path, gray, "g.png"))
    assert out.shape == (12, 20, 3) and out.dtype == np.uint8 and (out[:, :, 1] == rgb[:, :, 0]).all()
    rgba = np.dstack([rgb, np.full((12, 20), 255, np.uint8)])
    assert (load_image(_save(tmp_path, Image.fromarray(rgba), "a.png")) == rgb).all()
    pal = Image.fromarray(rgb).convert("P")
    assert load_image(_save(tmp_path, pal, "p.png")).shape == (12, 20, 3)
    cmyk = Image.fromarray(rgb).convert("CMYK")
    assert load_image(_save(tmp_path, cmyk, "c.jpg")).shape == (12, 20, 3)


def test_sixteen_bit_images_are_rescaled(tmp_path):
    arr = np.full((6, 8), 65535, dtype=np.uint16)
    arr[:, :4] = 0
    img = Image.fromarray(arr)
    out = load_image(_save(tmp_path, img, "d.png"))
    assert out.shape == (6, 8, 3) and out[0, 0, 0] == 0 and out[0, 7, 0] == 255
    assert load_image(arr).max() == 255


def test_exif_orientation_is_applied(tmp_path):
    img = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = img.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise on display
    path = _save(tmp_path, img, "r.jpg", exif=exif)
    assert load_image(path).shape == (30, 10, 3)
    assert image_size(path) == (30, 10)


def test_missing_corrupt_and_truncated_files_raise_clear_errors(tmp_path):
    with pytest.raises(ImageLoadError, match="image not found: .*nope.jpg"):
        load_image(tmp_path / "nope.jpg")
    junk = tmp_path / "junk.jpg"
    junk.write_bytes(b"this is not an image")
    with pytest.raises(ImageLoadError, match="cannot read image .*junk.jpg"):
        load_image(junk)
    buf = io.BytesIO()
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(buf, format="PNG")
    trunc = tmp_path / "trunc.png"
    trunc.write_bytes(buf.getvalue()[: len(buf.getvalue()) // 2])
    with pytest.raises(ImageLoadError, match="trunc.png"):
        load_image(trunc)
    with pytest.raises(ImageLoadError, match="shape"):
        load_image(np.zeros((3, 4, 5, 6)))
