"""Bilinear mask upsampling (refseg.upsampling) and the windowed intersection counts that use it."""

import pytest
import torch
import torch.nn.functional as F

from refseg.merging import intersections_by_class, soft_merge, upsampled_intersections
from refseg.upsampling import _resample, axis_sampling, output_windows, support_boxes, upsample_masks

SIZES = [((256, 256), (480, 640)), ((256, 256), (1000, 750)), ((64, 48), (100, 77)), ((10, 10), (7, 5)),
         ((32, 32), (32, 32)), ((5, 7), (300, 200)), ((1, 1), (4, 3))]


def blobs(n: int, h: int, w: int, seed: int = 0) -> torch.Tensor:
    """Mask logits like SAM's: small positive blobs on a negative background, some masks empty."""
    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.arange(h).float(), torch.arange(w).float(), indexing="ij")
    out = torch.empty(n, h, w)
    for i in range(n):
        cy, cx = (torch.rand(2, generator=g) * torch.tensor([h, w])).tolist()
        r = 0.5 + float(torch.rand(1, generator=g)) * max(h, w) / 4
        out[i] = (r - torch.sqrt((ys - cy) ** 2 + (xs - cx) ** 2)) + 0.3 * torch.randn(h, w, generator=g)
    out[0] = -1.0  # no cell above the threshold
    out[1] = torch.randn(h, w, generator=g)  # noise everywhere (random-weight networks)
    return out


@pytest.mark.parametrize("src,dst", SIZES)
def test_values_equal_torch_bilinear(src, dst):
    logits = blobs(12, *src)
    want = F.interpolate(logits[:, None], size=dst, mode="bilinear", align_corners=False)[:, 0]
    got = _resample(logits, axis_sampling(src[0], dst[0]), axis_sampling(src[1], dst[1]))
    assert got.shape == want.shape
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-6)


@pytest.mark.parametrize("src,dst", SIZES)
@pytest.mark.parametrize("threshold", [0.0, 0.7])
def test_cropped_and_dense_schedules_give_the_same_masks(src, dst, threshold):
    logits = blobs(12, *src, seed=1)
    dense = upsample_masks(logits, dst, threshold, schedule="dense", chunk=5)
    cropped = upsample_masks(logits, dst, threshold, schedule="cropped")
    assert dense.dtype == torch.bool and dense.shape == (12, *dst)
    assert torch.equal(dense, cropped)
    assert not dense[0].any()
    # and with torch's own resize: identical except where the value is within rounding of the threshold
    values = F.interpolate(logits[:, None], size=dst, mode="bilinear", align_corners=False)[:, 0]
    differ = dense != (values > threshold)
    assert (values[differ] - threshold).abs().le(1e-5).all()


def test_windows_contain_every_true_pixel_and_are_tight_to_a_cell():
    logits = blobs(30, 64, 64, seed=2)
    size = (200, 130)
    masks = upsample_masks(logits, size, 0.0, schedule="dense")
    windows = output_windows(logits, size, 0.0)
    assert windows.shape == (30, 4) and windows[0].tolist() == [0, 0, 0, 0]
    for m, (y0, y1, x0, x1) in zip(masks, windows.tolist()):
        inside = torch.zeros_like(m)
        inside[y0:y1, x0:x1] = True
        assert not (m & ~inside).any()
        if m.any():  # at most one source cell (about 200/64 output pixels) of slack on each side
            rows, cols = m.any(1).nonzero().squeeze(1), m.any(0).nonzero().squeeze(1)
            assert rows[0] - y0 <= 4 and y1 - 1 - rows[-1] <= 4 and cols[0] - x0 <= 3 and x1 - 1 - cols[-1] <= 3


def test_support_boxes():
    logits = torch.full((3, 6, 8), -1.0)
    logits[1, 2, 3] = 1.0
    logits[1, 4, 6] = 2.0
    logits[2] = 1.0
    assert support_boxes(logits, 0.0).tolist() == [[6, -1, 8, -1], [2, 4, 3, 6], [0, 5, 0, 7]]


def test_empty_input_and_bad_schedule():
    assert upsample_masks(torch.zeros(0, 8, 8), (16, 16)).shape == (0, 16, 16)
    with pytest.raises(ValueError, match="schedule"):
        upsample_masks(torch.zeros(1, 8, 8), (16, 16), schedule="fast")


def test_windowed_intersections_equal_full_image_counts():
    logits = blobs(40, 64, 64, seed=3)
    size = (150, 170)
    masks = upsample_masks(logits, size, 0.0)
    labels = torch.randint(0, 3, (40,), generator=torch.Generator().manual_seed(0))
    plain = intersections_by_class(masks, labels)
    windowed = intersections_by_class(masks, labels, output_windows(logits, size, 0.0))
    assert torch.equal(plain, windowed)
    flat = masks.reshape(40, -1).double()
    same = labels[:, None] == labels[None, :]
    assert torch.equal(plain, (flat @ flat.T) * same)
    scores, ranking = torch.rand(40), torch.rand(40)
    feats = F.normalize(torch.randn(40, 16), dim=1)
    assert torch.equal(soft_merge(masks, scores, labels, ranking, feats),
                       soft_merge(masks, scores, labels, ranking, feats, output_windows(logits, size, 0.0)))


@pytest.mark.parametrize("schedule", ["dense", "cropped"])
def test_region_is_the_whole_output_cropped(schedule):
    logits = blobs(10, 40, 50, seed=4)
    whole = upsample_masks(logits, (97, 131), 0.0, schedule="dense")
    for region in [(0, 97, 0, 131), (10, 30, 0, 131), (50, 97, 20, 21), (5, 5, 0, 131)]:
        y0, y1, x0, x1 = region
        part = upsample_masks(logits, (97, 131), 0.0, schedule=schedule, region=region)
        assert torch.equal(part, whole[:, y0:y1, x0:x1])
    with pytest.raises(ValueError, match="region"):
        upsample_masks(logits, (97, 131), region=(0, 98, 0, 10))


@pytest.mark.parametrize("band_bytes", [1, 40 * 170 * 7, 1 << 30])
def test_banded_intersections_equal_all_masks_at_once(band_bytes):
    """Row bands of any height (1 row, a few, all) give the counts of the whole masks, areas included."""
    logits = blobs(40, 64, 64, seed=5)
    labels = torch.randint(0, 4, (40,), generator=torch.Generator().manual_seed(1))
    labels[7] = 9  # a class of one: its area is still on the diagonal
    size = (150, 170)
    masks = upsample_masks(logits, size, 0.0)
    got = upsampled_intersections(logits, labels, size, 0.0, band_bytes=band_bytes)
    want = intersections_by_class(masks, labels)
    assert torch.equal(got, want)
    assert torch.equal(got.diagonal(), masks.reshape(40, -1).sum(1).double())
