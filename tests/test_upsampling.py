"""Mask upsampling (refseg.method.upsampling): the bits of torch's antialiased bilinear call, and the
windowed intersection counts that use it."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from refseg.method.merging import intersections_by_class, soft_merge, upsampled_intersections
from refseg.method.upsampling import filter_taps, output_windows, support_boxes, upsample_masks

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


# (logit grid, output size): SAM's 256 grid onto larger, smaller, equal, non-square and 1-pixel sides
SIZES = [((256, 256), (480, 640)), ((256, 256), (240, 320)), ((256, 256), (180, 420)), ((256, 256), (256, 256)),
         ((256, 256), (255, 257)), ((256, 256), (1000, 750)), ((256, 256), (37, 1024)), ((256, 256), (1, 700)),
         ((256, 256), (700, 1)), ((256, 256), (1, 1)), ((64, 48), (100, 77)), ((10, 10), (7, 5)),
         ((32, 32), (32, 32)), ((5, 7), (300, 200)), ((1, 1), (4, 3))]


def reference(logits: torch.Tensor, size, threshold: float = 0.0) -> torch.Tensor:
    """The paper's call (docs/method.md, step 7)."""
    values = F.interpolate(logits[:, None], size=size, mode="bilinear", align_corners=False, antialias=True)[:, 0]
    return values > threshold


def sam_like(n: int, h: int, w: int, seed: int) -> torch.Tensor:
    logits = blobs(n, h, w, seed)
    logits[2] = 1.0 + torch.rand(h, w, generator=torch.Generator().manual_seed(seed))  # positive everywhere
    logits[3, :, : w // 2 + 1] = 2.0  # a half-plane
    return logits


@pytest.mark.parametrize("src,dst", SIZES)
def test_masks_are_the_bits_of_torchs_antialiased_call(src, dst):
    logits = sam_like(12, *src, seed=1)
    want = reference(logits, dst)
    for masks in (upsample_masks(logits, dst, schedule="dense", chunk=5),
                  upsample_masks(logits, dst, schedule="cropped"),
                  upsample_masks(logits, dst, schedule="cropped", chunk_values=1)):  # one mask per group
        assert masks.dtype == torch.bool and masks.shape == (12, *dst)
        assert torch.equal(masks, want)
    assert not want[0].any() and want[2].all()


_OTHER_KERNEL = """
import sys, torch
sys.path.insert(0, {tests!r})
from test_upsampling import SIZES, reference, sam_like
from refseg.method.upsampling import upsample_masks
for src, dst in SIZES:
    logits = sam_like(12, *src, seed=7)
    assert torch.equal(upsample_masks(logits, dst, schedule="cropped"), reference(logits, dst)), (src, dst)
print(torch.backends.cpu.get_cpu_capability())
"""


def test_bits_hold_on_torchs_baseline_cpu_kernel():
    """Torch compiles its CPU kernels per vector unit (baseline, AVX2, AVX-512), and the vector builds
    may fuse multiply-adds: the same bits under the baseline kernel as under the one this CPU picks."""
    env = dict(os.environ, ATEN_CPU_CAPABILITY="default")
    code = _OTHER_KERNEL.format(tests=str(Path(__file__).parent))
    run = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.split()[-1] == "DEFAULT"


@pytest.mark.parametrize("threshold", [0.7, -0.3])
def test_other_thresholds_agree_with_torch_up_to_rounding(threshold):
    """The window bound holds up to the rounding of the filter's weight sum away from threshold 0."""
    logits = sam_like(12, 256, 256, seed=2)
    values = F.interpolate(logits[:, None], size=(300, 410), mode="bilinear", align_corners=False,
                           antialias=True)[:, 0]
    for schedule in ("dense", "cropped"):
        differ = upsample_masks(logits, (300, 410), threshold, schedule=schedule) != (values > threshold)
        # a few float32 steps of values of this size (|logits| <= 30)
        assert (values[differ] - threshold).abs().le(64 * torch.finfo(torch.float32).eps * 30).all()


def test_filter_taps():
    first, last = filter_taps(256, 640)  # enlarging: two neighbouring cells (or one at the borders)
    assert (last - first).le(1).all() and first[0] == 0 and last[-1] == 255
    first, last = filter_taps(256, 100)  # shrinking: the filter widens to about 2 * 256 / 100 cells
    assert (last - first).max() >= 4 and (last - first).max() <= 6
    first, last = filter_taps(256, 256)
    assert torch.equal(first, torch.arange(256)) and torch.equal(last, torch.arange(256))
    for taps in (filter_taps(256, 37), filter_taps(7, 1000)):
        assert all((t[1:] >= t[:-1]).all() for t in taps)


@pytest.mark.parametrize("size", [(200, 130), (90, 60), (700, 3)])
def test_windows_contain_every_true_pixel(size):
    logits = sam_like(30, 64, 64, seed=2)
    masks = reference(logits, size)
    windows = output_windows(logits, size, 0.0)
    assert windows.shape == (30, 4) and windows[0].tolist() == [0, 0, 0, 0]
    for m, (y0, y1, x0, x1) in zip(masks, windows.tolist()):
        inside = torch.zeros_like(m)
        inside[y0:y1, x0:x1] = True
        assert not (m & ~inside).any()
    enlarged = reference(logits, (200, 130))
    for m, (y0, y1, x0, x1) in zip(enlarged, output_windows(logits, (200, 130), 0.0).tolist()):
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
