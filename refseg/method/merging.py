"""Duplicate removal and re-scoring: class-aware NMS, semantic-aware soft merging, top-k
(docs/method.md section 2, steps 6, 8, 9)."""

from __future__ import annotations

import numpy as np
import torch
from torchvision.ops import batched_nms, masks_to_boxes

from refseg.method.upsampling import output_windows, window_masks

BAND_BYTES = 256 << 20  # upsampled_intersections: masks held at once


def mask_boxes(masks: torch.Tensor) -> torch.Tensor:
    """[N, h, w] bool (non-empty) -> [N, 4] xyxy boxes from inclusive pixel indices."""
    if masks.shape[0] == 0:
        return torch.zeros(0, 4, device=masks.device)
    return masks_to_boxes(masks).to(torch.float32)


def class_aware_nms(boxes: torch.Tensor, ranking: torch.Tensor, labels: torch.Tensor, iou_threshold: float,
                    max_keep: int) -> torch.Tensor:
    """Indices kept by per-class box NMS, ordered by ``ranking`` (descending), at most ``max_keep``."""
    if boxes.shape[0] == 0:
        return torch.zeros(0, dtype=torch.long, device=boxes.device)
    keep = batched_nms(boxes.float(), ranking.float(), labels, iou_threshold)
    return keep[:max_keep]


def intersections_by_class(masks: torch.Tensor, labels: torch.Tensor, windows: torch.Tensor | None = None,
                           chunk_pixels: int = 1 << 20) -> torch.Tensor:
    """[N, N] pixel counts |M_i ∩ M_j| for pairs of the same class (0 across classes).

    masks [N, H, W] bool. Without ``windows``: matmuls over pixel chunks, one class at a
    time, so memory stays bounded and no pair of different classes costs anything.
    ``windows`` [N, 4] (y0, y1, x0, x1), half-open, bound where each mask can be True
    (:func:`refseg.method.upsampling.output_windows`): then, on the CPU, each mask is counted
    against the same-class masks whose windows meet its own, inside its window only, so
    the work follows the masks' areas rather than the image's (the counts are the same).
    Elsewhere (a GPU) the few large matmuls are faster than one small step per mask.
    """
    n = masks.shape[0]
    inter = torch.zeros(n, n, dtype=torch.float64, device=masks.device)
    for cls in labels.unique():
        idx = (labels == cls).nonzero().squeeze(1)
        if idx.numel() == 1:  # only its area
            inter[idx, idx] = masks[idx].sum().to(torch.float64)
            continue
        if windows is None or masks.device.type != "cpu":
            acc = _gram_counts(masks[idx].reshape(idx.numel(), -1), chunk_pixels)
        else:
            acc = _windowed_counts(masks[idx], windows[idx].to(masks.device))
        inter[idx.unsqueeze(1), idx.unsqueeze(0)] = acc
    return inter


def _gram_counts(flat: torch.Tensor, chunk_pixels: int) -> torch.Tensor:
    """flat [n, P] bool -> [n, n] float64 |row_i ∩ row_j|."""
    acc = torch.zeros(flat.shape[0], flat.shape[0], dtype=torch.float64, device=flat.device)
    # bf16/fp16 would round counts; fp32 sums of 0/1 are exact per chunk below 2**24 pixels
    for start in range(0, flat.shape[1], chunk_pixels):
        part = flat[:, start:start + chunk_pixels].to(torch.float32)
        acc += (part @ part.T).to(torch.float64)
    return acc


def _windowed_counts(masks: torch.Tensor, windows: torch.Tensor) -> torch.Tensor:
    """masks [n, H, W] bool, windows [n, 4] -> [n, n] float64 intersection counts (symmetric)."""
    n = masks.shape[0]
    y0, y1, x0, x1 = windows.unbind(1)
    meets = (y0[:, None] < y1[None, :]) & (y0[None, :] < y1[:, None]) & \
            (x0[:, None] < x1[None, :]) & (x0[None, :] < x1[:, None])
    acc = torch.zeros(n, n, dtype=torch.float64, device=masks.device)
    for i, (a, b, c, d) in enumerate(windows.tolist()):
        js = meets[i].nonzero().squeeze(1)
        js = js[js >= i]  # the lower triangle is mirrored below
        if js.numel() == 0:
            continue
        own = masks[i, a:b, c:d]
        counts = (masks[js, a:b, c:d] & own).reshape(js.numel(), -1).sum(dim=1)
        acc[i, js] = counts.to(torch.float64)
    return torch.maximum(acc, acc.T)


def upsampled_intersections(logits: torch.Tensor, labels: torch.Tensor, size: tuple[int, int], threshold: float,
                            band_bytes: int = BAND_BYTES) -> torch.Tensor:
    """:func:`intersections_by_class` of ``upsample_masks(logits, size, threshold)``, without holding them all.

    Each mask is upsampled once, inside its window only (:func:`refseg.method.upsampling.window_masks`,
    kept at 1 bit a pixel on the CPU);
    the counts are then taken one band of rows at a time, the band holding at most
    ``band_bytes`` of full-width masks (counts add up over bands), so memory stays bounded
    for any image size: 800 masks of a 12 MP photo would take 9.6 GB at once. Only the
    masks that reach a band are placed in it.
    """
    n = logits.shape[0]
    height, width = int(size[0]), int(size[1])
    inter = torch.zeros(n, n, dtype=torch.float64, device=logits.device)
    windows = output_windows(logits, (height, width), threshold)
    pack = logits.device.type == "cpu"  # 1 bit a pixel while waiting for their bands
    boxes, crops = window_masks(logits, (height, width), threshold, windows, pack=pack)
    rows = max(1, band_bytes // max(1, n * width))
    for r0 in range(0, height, rows):
        r1 = min(height, r0 + rows)
        inside = ((windows[:, 0] < r1) & (windows[:, 1] > r0) & (windows[:, 2] < windows[:, 3])).nonzero().squeeze(1)
        if inside.numel() == 0:
            continue
        masks = torch.zeros(inside.numel(), r1 - r0, width, dtype=torch.bool, device=logits.device)
        for slot, i in enumerate(inside.tolist()):
            y0, y1, x0, x1 = boxes[i]
            a, b = max(y0, r0), min(y1, r1)
            part = crops[i][a - y0:b - y0]
            if pack:
                part = torch.from_numpy(np.unpackbits(part, axis=1, count=x1 - x0).view(np.bool_))
            masks[slot, a - r0:b - r0, x0:x1] = part
        local = windows[inside].clone()
        local[:, :2] = local[:, :2].clamp(r0, r1) - r0
        inter[inside[:, None], inside[None, :]] += intersections_by_class(masks, labels[inside], local)
    return inter


def soft_merge(masks: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, ranking: torch.Tensor,
               features: torch.Tensor, windows: torch.Tensor | None = None) -> torch.Tensor:
    """Semantic-aware soft merging of ``masks`` [N, H, W] bool; returns the decayed scores.

    ``windows``: see :func:`intersections_by_class` (a speed-up only; the result is the same).
    """
    return soft_merge_scores(intersections_by_class(masks, labels, windows), scores, labels, ranking, features)


def soft_merge_scores(inter: torch.Tensor, scores: torch.Tensor, labels: torch.Tensor, ranking: torch.Tensor,
                      features: torch.Tensor) -> torch.Tensor:
    """Semantic-aware soft merging from the masks' same-class intersection counts ``inter`` [N, N]
    (areas on the diagonal); returns the decayed scores.

    Within each class, masks are ranked by ``ranking`` (the proposer's predicted IoU).
    For mask i, ``d_i = max over higher-ranked j of IoS(i, j) * max(0, f_i . f_j)``
    with ``IoS(i, j) = |M_i ∩ M_j| / |M_i|``, and ``score_i * sqrt(1 - d_i)``.
    Every decay uses the original scores (not sequential like Soft-NMS).
    """
    if scores.shape[0] < 2:
        return scores.clone()
    decay = overlap_edges(inter, labels, ranking, features).max(dim=1).values.clamp(0.0, 1.0)
    return scores * torch.sqrt(1.0 - decay)


def overlap_edges(inter: torch.Tensor, labels: torch.Tensor, ranking: torch.Tensor,
                  features: torch.Tensor | None) -> torch.Tensor:
    """[N, N] float32 ``IoS(i, j) * max(0, f_i . f_j)`` where j outranks i within i's class, else 0.

    ``IoS(i, j) = |M_i ∩ M_j| / |M_i|`` from the same-class intersection counts ``inter``
    (areas on the diagonal). j outranks i when its ``ranking`` is higher, ties broken by
    position (a stable order). ``features`` None leaves out the semantic factor.
    """
    n = labels.shape[0]
    area = inter.diagonal().clamp(min=1)
    edges = (inter / area.unsqueeze(1)).to(torch.float32)  # row i: fraction of M_i covered by M_j
    if features is not None:
        edges = edges * (features @ features.T).clamp(min=0)
    order = torch.argsort(ranking, descending=True, stable=True)
    rank = torch.empty_like(order)
    rank[order] = torch.arange(n, device=order.device)
    higher = rank.unsqueeze(0) < rank.unsqueeze(1)  # [i, j]: j ranked above i
    same = labels.unsqueeze(0) == labels.unsqueeze(1)
    return edges.masked_fill(~(higher & same), 0.0)


def top_k(scores: torch.Tensor, k: int, min_score: float = 0.0) -> torch.Tensor:
    """Indices of the ``k`` best scores at or above ``min_score``, best first."""
    order = torch.argsort(scores, descending=True, stable=True)
    order = order[scores[order] >= min_score]
    return order[:k]
