"""Low-resolution mask logits -> thresholded masks at another resolution (bilinear).

SAM2 gives each proposal as logits on a 256 x 256 grid (METHOD.md section 2); the method
needs them as binary masks at the image size (soft merging in paper mode, the output
masks) or at ``merge.merge_resolution``. :func:`upsample_masks` computes
``bilinear_resize(logits) > threshold`` with PyTorch's ``align_corners=False`` sampling,
one formula with two schedules:

- ``dense``: the whole output of every mask, in chunks (GPU: few large kernels).
- ``cropped``: only the output window a mask can reach (CPU: most masks cover a small
  part of the image, so most of the work and memory traffic is skipped).

The window is exact, not a heuristic: a bilinear sample is a convex combination of its
2 x 2 source cells, so it can exceed the threshold only if one of those cells does
(for threshold 0 this holds bit for bit: nonnegative weights times nonpositive values
sum to a nonpositive value). Cells above the threshold lie in the mask's low-resolution
support box; :func:`output_window` maps that box to the output rows and columns whose
source cells touch it. Inside, both schedules evaluate the same expression in the same
order, so for threshold 0 (the method's) they give the same bits; for another threshold
they could differ only where four source cells all equal the threshold to within rounding.

Values agree with ``F.interpolate(..., mode="bilinear", align_corners=False)`` to float
rounding (a test checks 1e-5 absolute + 1e-6 relative), so a pixel's side of the
threshold can differ from it only where the interpolated logit is within rounding of it.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AxisSampling:
    """Where each output index along one axis samples the input: ``w0 * in[i0] + w1 * in[i1]``."""

    i0: torch.Tensor  # [n_out] long
    i1: torch.Tensor  # [n_out] long, i0 + 1 (or i0 at the last input index)
    w0: torch.Tensor  # [n_out] float32
    w1: torch.Tensor  # [n_out] float32

    def to(self, device: torch.device) -> "AxisSampling":
        return AxisSampling(self.i0.to(device), self.i1.to(device), self.w0.to(device), self.w1.to(device))


@functools.lru_cache(maxsize=64)
def _axis_sampling_cpu(n_in: int, n_out: int) -> AxisSampling:
    # PyTorch's source index for align_corners=False: scale * (dst + 0.5) - 0.5, clamped at 0
    scale = torch.tensor(n_in / n_out, dtype=torch.float32)
    src = (scale * (torch.arange(n_out, dtype=torch.float32) + 0.5) - 0.5).clamp(min=0)
    i0 = src.floor().long().clamp(max=n_in - 1)
    i1 = torch.where(i0 < n_in - 1, i0 + 1, i0)
    w1 = src - i0.to(torch.float32)
    return AxisSampling(i0, i1, 1.0 - w1, w1)


def axis_sampling(n_in: int, n_out: int, device: torch.device | str = "cpu") -> AxisSampling:
    return _axis_sampling_cpu(int(n_in), int(n_out)).to(torch.device(device))


def output_window(axis: AxisSampling, lo: torch.Tensor, hi: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Output indices [start, stop) whose source cells touch input indices [lo, hi] (inclusive, per row)."""
    start = torch.searchsorted(axis.i1, lo.contiguous())  # first output whose i1 >= lo
    stop = torch.searchsorted(axis.i0, hi.contiguous(), right=True)  # past the last output whose i0 <= hi
    return start, stop


def support_boxes(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """[K, 4] long (row_lo, row_hi, col_lo, col_hi), inclusive, of the cells above ``threshold``;
    row_hi = col_hi = -1 for a mask with none."""
    above = logits > threshold
    boxes = []
    for any_ in (above.any(dim=2), above.any(dim=1)):  # rows [K, h], columns [K, w]
        idx = torch.arange(any_.shape[1], device=any_.device)
        boxes += [torch.where(any_, idx, any_.shape[1]).amin(dim=1), torch.where(any_, idx, -1).amax(dim=1)]
    return torch.stack(boxes, dim=1)


def output_windows(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """[K, 4] long (y0, y1, x0, x1), half-open: the part of the ``size`` output each mask can reach
    (all zeros for a mask with no cell above ``threshold``)."""
    _, h, w = logits.shape
    ys, xs = axis_sampling(h, size[0], logits.device), axis_sampling(w, size[1], logits.device)
    box = support_boxes(logits, threshold)
    y0, y1 = output_window(ys, box[:, 0], box[:, 1])
    x0, x1 = output_window(xs, box[:, 2], box[:, 3])
    windows = torch.stack([y0, y1, x0, x1], dim=1)
    return windows.masked_fill((box[:, 1] < 0)[:, None], 0)


def _resample(block: torch.Tensor, ys: AxisSampling, xs: AxisSampling, row0: int = 0) -> torch.Tensor:
    """Bilinear samples of ``block`` [..., r, w] (input rows from ``row0``) at the outputs ``ys`` x ``xs``."""
    block = block.float()
    cols = block[..., xs.i0] * xs.w0 + block[..., xs.i1] * xs.w1  # [..., r, nx]
    return cols[..., ys.i0 - row0, :] * ys.w0[:, None] + cols[..., ys.i1 - row0, :] * ys.w1[:, None]


def _select(axis: AxisSampling, start: int, stop: int) -> AxisSampling:
    return AxisSampling(axis.i0[start:stop], axis.i1[start:stop], axis.w0[start:stop], axis.w1[start:stop])


def upsample_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0,
                   schedule: str = "auto", chunk: int = 32, windows: torch.Tensor | None = None,
                   region: tuple[int, int, int, int] | None = None) -> torch.Tensor:
    """``bilinear_resize(logits [K, h, w], size) > threshold`` -> [K, H, W] bool on ``logits.device``.

    ``schedule``: ``"dense"``, ``"cropped"`` or ``"auto"`` (cropped on CPU, dense elsewhere);
    both give the same masks. ``chunk`` bounds the dense schedule's float memory to
    ``chunk * H * W`` values. ``windows``: :func:`output_windows` of the same arguments, if
    already computed. ``region`` (y0, y1, x0, x1), half-open: only that part of the output,
    [K, y1 - y0, x1 - x0], the same values as the whole output cropped.
    """
    if schedule == "auto":
        schedule = "cropped" if logits.device.type == "cpu" else "dense"
    if schedule not in ("dense", "cropped"):
        raise ValueError(f"schedule must be 'auto', 'dense' or 'cropped', not {schedule!r}")
    k, h, w = logits.shape
    height, width = int(size[0]), int(size[1])
    ry0, ry1, rx0, rx1 = region if region is not None else (0, height, 0, width)
    if not (0 <= ry0 <= ry1 <= height and 0 <= rx0 <= rx1 <= width):
        raise ValueError(f"region {region} is not inside the output size {size}")
    out = torch.zeros(k, ry1 - ry0, rx1 - rx0, dtype=torch.bool, device=logits.device)
    if k == 0 or out.numel() == 0:
        return out
    ys, xs = axis_sampling(h, height, logits.device), axis_sampling(w, width, logits.device)
    if schedule == "dense":
        ys, xs = _select(ys, ry0, ry1), _select(xs, rx0, rx1)
        for start in range(0, k, chunk):
            out[start:start + chunk] = _resample(logits[start:start + chunk], ys, xs) > threshold
        return out
    if windows is None:
        windows = output_windows(logits, (height, width), threshold)
    lo = torch.tensor([ry0, ry0, rx0, rx0], device=windows.device)
    hi = torch.tensor([ry1, ry1, rx1, rx1], device=windows.device)
    for i, (y0, y1, x0, x1) in enumerate(torch.minimum(torch.maximum(windows, lo), hi).tolist()):
        if y1 <= y0 or x1 <= x0:
            continue
        wy, wx = _select(ys, y0, y1), _select(xs, x0, x1)
        row0, row1 = int(wy.i0[0]), int(wy.i1[-1]) + 1
        out[i, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = _resample(logits[i, row0:row1], wy, wx, row0) > threshold
    return out
