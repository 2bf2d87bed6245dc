"""Low-resolution mask logits -> thresholded masks at another resolution (docs/method.md, step 7).

SAM2 gives each proposal as logits on a 256 x 256 grid; the method needs them as binary
masks at the image size (soft merging in paper mode, the output masks) or at
``merge.merge_resolution``. The reference computation is, for every image size::

    F.interpolate(logits, size=(H, W), mode="bilinear", align_corners=False, antialias=True) > 0

and :func:`upsample_masks` gives exactly its bits. It never evaluates a bilinear formula of
its own: every value comes out of that very torch kernel, with two schedules:

- ``dense``: the call above on chunks of masks (GPU: few large kernels; the reference).
- ``cropped``: only the part of the output a mask can reach (CPU: most masks cover a small
  part of the image, so most of the work and memory traffic is skipped).

Why ``cropped`` gives the same bits. Torch's antialiased kernel is separable and runs its
passes in a fixed order: first along the width (every input row -> ``W`` values), then
along the height (every column of that -> ``H`` values); a dimension whose size does not
change is copied. Each output value is a sum, in a fixed order, of its input taps times
weights that depend only on (input size, output size, output index). So:

1. the width pass of a subset of rows equals those rows of the full width pass (rows are
   independent and the width geometry is unchanged): torch is called on the rows needed;
2. the height pass of a subset of columns equals those columns of the full height pass
   (the same argument along the other axis): torch is called on the columns needed, with
   the rows no wanted output row reads filled with zeros (they are multiplied by weights
   of output rows that are thrown away).

One exception: given a tensor one column wide, torch's height pass copies input row 0 into
every output row (its zero-stride path). The reference call meets that when W == 1, so such
outputs are computed densely, and a group of windows is never handed over one column wide.

A test checks the composition against the one-call reference bit for bit, on torch's
baseline CPU kernel and on the one the machine picks (``ATEN_CPU_CAPABILITY``), sizes above,
below and equal to 256, and 1-pixel sides.

The other way, evaluating the filter with our own arithmetic on the window alone (exact
weights read from the kernel, sums in the kernel's order), was measured and rejected: it
matches torch's baseline build bit for bit, but torch's AVX2/AVX-512 builds fuse the
multiply-adds, and with more than three taps (a side below about 180 px) they also sum in
another order; no formula of ours matched those on every size, so it would be exact on one
vector unit, not all.

Which part of the output a mask can reach (:func:`output_windows`). The filter's weights
are nonnegative, so an output value is positive only if one of its taps with a nonzero
weight is positive (nonnegative weights times nonpositive values sum to a nonpositive
value, in floating point too). The taps of every output index are read from the kernel
itself (:func:`filter_taps`: the kernel applied to the identity matrix returns its weight
matrix exactly), so the window holds whatever the filter's support is: two cells when
enlarging, several when shrinking (a side below 256 px), one when the size is equal.
For a threshold other than 0 the bound holds up to rounding of the weights' sum.

Cost: per mask, the width pass makes ``input rows x W`` values and the height pass
``H x window columns`` (instead of ``H x W``). Measured with ``benchmarks/stage2.py`` on a
2-core Xeon VM (600 SAM-like proposals, paper preset; README "Performance"): 640 x 480 as
fast as the plain-bilinear windows this replaced (0.96 -> 0.99 s, within this VM's noise);
a 12 MP photo 11.9 -> 16.8 s, peak memory 2.36 -> 2.43 GB, since the height pass makes every
output row of a window's columns. The dense schedule is the reference and is used on GPUs.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F


def _resize(x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Torch's antialiased bilinear resize of ``x`` [K, h, w] float32 -> [K, H, W] (the reference call)."""
    if tuple(x.shape[-2:]) == tuple(size):
        return x
    return F.interpolate(x[:, None], size=tuple(size), mode="bilinear", align_corners=False, antialias=True)[:, 0]


@functools.lru_cache(maxsize=64)
def _taps_cpu(n_in: int, n_out: int) -> tuple[torch.Tensor, torch.Tensor]:
    if n_in == n_out:
        idx = torch.arange(n_out)
        return idx, idx
    weights = _resize(torch.eye(n_in)[:, None, :], (1, n_out))[:, 0, :]  # [n_in, n_out]: row j = weights of input j
    nonzero = weights != 0
    idx = torch.arange(n_in)[:, None].expand(n_in, n_out)
    first = torch.where(nonzero, idx, n_in).amin(dim=0)
    last = torch.where(nonzero, idx, -1).amax(dim=0)
    if (first > last).any() or (first[1:] < first[:-1]).any() or (last[1:] < last[:-1]).any():
        raise RuntimeError(f"unexpected taps of torch's antialiased bilinear filter for {n_in} -> {n_out}")
    return first, last


def filter_taps(n_in: int, n_out: int, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
    """([n_out], [n_out]) long: the first and last input index with a nonzero weight, per output index,
    of torch's antialiased bilinear resize along one axis (both nondecreasing)."""
    first, last = _taps_cpu(int(n_in), int(n_out))
    return first.to(device), last.to(device)


def support_boxes(logits: torch.Tensor, threshold: float) -> torch.Tensor:
    """[K, 4] long (row_lo, row_hi, col_lo, col_hi), inclusive, of the cells above ``threshold``;
    row_hi = col_hi = -1 for a mask with none."""
    above = logits > threshold
    boxes = []
    for any_ in (above.any(dim=2), above.any(dim=1)):  # rows [K, h], columns [K, w]
        idx = torch.arange(any_.shape[1], device=any_.device)
        boxes += [torch.where(any_, idx, any_.shape[1]).amin(dim=1), torch.where(any_, idx, -1).amax(dim=1)]
    return torch.stack(boxes, dim=1)


def _axis_window(first: torch.Tensor, last: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor):
    """Output indices [start, stop) whose taps meet input indices [lo, hi] (inclusive, per mask)."""
    start = torch.searchsorted(last, lo.contiguous())  # first output whose last tap >= lo
    stop = torch.searchsorted(first, hi.contiguous(), right=True)  # past the last output whose first tap <= hi
    return start, stop


def output_windows(logits: torch.Tensor, size: tuple[int, int], threshold: float) -> torch.Tensor:
    """[K, 4] long (y0, y1, x0, x1), half-open: the part of the ``size`` output each mask can reach
    (all zeros for a mask with no cell above ``threshold``)."""
    _, h, w = logits.shape
    box = support_boxes(logits, threshold)
    y0, y1 = _axis_window(*filter_taps(h, size[0], logits.device), box[:, 0], box[:, 1])
    x0, x1 = _axis_window(*filter_taps(w, size[1], logits.device), box[:, 2], box[:, 3])
    windows = torch.stack([y0, y1, x0, x1], dim=1)
    return windows.masked_fill((box[:, 1] < 0)[:, None], 0)


def upsample_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0,
                   schedule: str = "auto", chunk: int = 32, windows: torch.Tensor | None = None,
                   region: tuple[int, int, int, int] | None = None,
                   chunk_values: int = 1 << 24) -> torch.Tensor:
    """``antialiased_bilinear_resize(logits [K, h, w], size) > threshold`` -> [K, H, W] bool on ``logits.device``.

    ``schedule``: ``"dense"``, ``"cropped"`` or ``"auto"`` (cropped on CPU, dense elsewhere);
    both give the bits of torch's call (module docstring). ``chunk`` bounds the dense
    schedule's float memory to ``chunk * H * W`` values, ``chunk_values`` the cropped one's
    intermediates. ``windows``: :func:`output_windows` of the same arguments, if already
    computed. ``region`` (y0, y1, x0, x1), half-open: only that part of the output,
    [K, y1 - y0, x1 - x0], the same values as the whole output cropped.
    """
    k, h, w = logits.shape
    height, width = int(size[0]), int(size[1])
    ry0, ry1, rx0, rx1 = region if region is not None else (0, height, 0, width)
    if not (0 <= ry0 <= ry1 <= height and 0 <= rx0 <= rx1 <= width):
        raise ValueError(f"region {region} is not inside the output size {size}")
    if schedule == "auto":
        schedule = "cropped" if logits.device.type == "cpu" else "dense"
    out = torch.zeros(k, ry1 - ry0, rx1 - rx0, dtype=torch.bool, device=logits.device)
    if schedule == "dense" and windows is None and k and out.numel():
        for start in range(0, k, chunk):
            values = _resize(logits[start:start + chunk].float(), (height, width))
            out[start:start + chunk] = values[:, ry0:ry1, rx0:rx1] > threshold
        return out
    def paste(i: int, y0: int, y1: int, x0: int, x1: int, crop: torch.Tensor) -> None:
        out[i, y0 - ry0:y1 - ry0, x0 - rx0:x1 - rx0] = crop

    for_each_window(logits, (height, width), paste, threshold, windows, region, chunk_values, schedule, chunk)
    return out


def window_masks(logits: torch.Tensor, size: tuple[int, int], threshold: float = 0.0,
                 windows: torch.Tensor | None = None, pack: bool = False) -> tuple[list[list[int]], list]:
    """:func:`upsample_masks` without the full-size output: per mask, its window as [y0, y1, x0, x1]
    and the mask inside it, [y1 - y0, x1 - x0] bool (None where the window is empty). Memory: the
    windows' areas, not K * H * W. ``pack``: each mask as ``numpy.packbits(mask, axis=1)`` instead
    (1 bit a pixel; CPU tensors only)."""
    boxes: list[list[int]] = [[0, 0, 0, 0] for _ in range(logits.shape[0])]
    crops: list = [None] * logits.shape[0]

    def keep(i: int, y0: int, y1: int, x0: int, x1: int, crop: torch.Tensor) -> None:
        boxes[i], crops[i] = [y0, y1, x0, x1], np.packbits(crop.numpy(), axis=1) if pack else crop

    for_each_window(logits, size, keep, threshold, windows)
    return boxes, crops


def for_each_window(logits: torch.Tensor, size: tuple[int, int], sink, threshold: float = 0.0,
                    windows: torch.Tensor | None = None, region: tuple[int, int, int, int] | None = None,
                    chunk_values: int = 1 << 24, schedule: str = "auto", chunk: int = 32) -> None:
    """Compute each mask inside its window (clipped to ``region``) and hand it over as
    ``sink(i, y0, y1, x0, x1, mask [y1 - y0, x1 - x0] bool)``; masks with an empty window are
    skipped. ``schedule``, ``chunk``, ``chunk_values``: see :func:`upsample_masks`; masks are
    handed over group by group, so only one group's floats are held at a time."""
    k, h, w = logits.shape
    height, width = int(size[0]), int(size[1])
    ry0, ry1, rx0, rx1 = region if region is not None else (0, height, 0, width)
    if schedule not in ("auto", "dense", "cropped"):
        raise ValueError(f"schedule must be 'auto', 'dense' or 'cropped', not {schedule!r}")
    if schedule == "auto":
        schedule = "cropped" if logits.device.type == "cpu" else "dense"
    if width == 1 and w > 1:
        # torch's kernel then gives every output row the value of input row 0 (its height pass
        # of a one-column tensor), which no window describes: the reference call it is
        schedule, windows = "dense", torch.tensor([[0, height, 0, width]] * k, device=logits.device)
    logits = logits.float()
    if windows is None:
        windows = output_windows(logits, (height, width), threshold)
    lo = torch.tensor([ry0, ry0, rx0, rx0], device=windows.device)
    hi = torch.tensor([ry1, ry1, rx1, rx1], device=windows.device)
    boxes = torch.minimum(torch.maximum(windows, lo), hi).tolist()
    if schedule == "dense":
        for start in range(0, k, chunk):
            values = _resize(logits[start:start + chunk], (height, width))
            for i in range(start, min(k, start + chunk)):
                y0, y1, x0, x1 = boxes[i]
                if y1 > y0 and x1 > x0:
                    sink(i, y0, y1, x0, x1, values[i - start, y0:y1, x0:x1] > threshold)
        return
    first, last = (t.tolist() for t in filter_taps(h, height))
    group: list = []  # (mask, y0, y1, x0, x1, input rows r0..r1 inclusive)
    cost = 0  # floats the group's two passes hold
    for i, (y0, y1, x0, x1) in enumerate(boxes):
        if y1 <= y0 or x1 <= x0:
            continue
        r0, r1 = first[y0], last[y1 - 1]
        item_cost = (r1 - r0 + 1) * width + (h + height) * (x1 - x0)
        if group and cost + item_cost > chunk_values:
            _window_group(logits, group, (height, width), threshold, sink)
            group, cost = [], 0
        group.append((i, y0, y1, x0, x1, r0, r1))
        cost += item_cost
    if group:
        _window_group(logits, group, (height, width), threshold, sink)


def _window_group(logits: torch.Tensor, group: list, size: tuple[int, int], threshold: float, sink) -> None:
    """The windows of a group of masks, with one width pass and one height pass of torch's kernel.

    Width pass: the input rows each mask needs, stacked into one [sum rows, w] -> [sum rows, W].
    Height pass: each mask's window columns side by side in one [h, sum cols] (zeros in the rows
    that mask does not need) -> [H, sum cols]. Rows and columns are independent in their pass.
    """
    _, h, w = logits.shape
    height, width = size
    rows = torch.cat([logits[i, r0:r1 + 1] for i, _, _, _, _, r0, r1 in group])  # [sum rows, w]
    across = _resize(rows[None], (rows.shape[0], width))[0]  # [sum rows, W]
    total_cols = sum(x1 - x0 for _, _, _, x0, x1, _, _ in group)
    # torch's height pass of a tensor one column wide copies input row 0 into every output
    # row (upsample_masks sends W == 1 to the dense schedule); so ours is at least two wide
    columns = torch.zeros(h, max(total_cols, 2), dtype=across.dtype, device=across.device)
    row, col = 0, 0
    for _, _, _, x0, x1, r0, r1 in group:
        n = r1 - r0 + 1
        columns[r0:r1 + 1, col:col + x1 - x0] = across[row:row + n, x0:x1]
        row, col = row + n, col + x1 - x0
    down = _resize(columns[None], (height, columns.shape[1]))[0]  # [H, sum cols]
    col = 0
    for i, y0, y1, x0, x1, _, _ in group:
        sink(i, y0, y1, x0, x1, down[y0:y1, col:col + x1 - x0] > threshold)
        col += x1 - x0
