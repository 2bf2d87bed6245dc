"""Proposal features and their match against the memory bank (docs/method.md section 2, steps 2, 4, 5)."""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


@functools.lru_cache(maxsize=32)
def _interpolation_matrix_cpu(src: int, dst: int) -> torch.Tensor:
    # Interpolating the identity gives the weights of every output sample on every input sample.
    eye = torch.eye(src, dtype=torch.float64).unsqueeze(0)  # [1, src(channels), src]
    weights = F.interpolate(eye, size=dst, mode="linear", align_corners=False)  # [1, src, dst]
    return weights[0].T.contiguous()  # [dst, src]


def interpolation_matrix(src: int, dst: int, device: torch.device | str = "cpu",
                         dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """[dst, src] matrix R with ``R @ x`` == 1-D linear resize of x (align_corners=False).

    Bilinear 2-D resizing is separable: ``resize(T) = R_y @ T @ R_x.T``.
    """
    return _interpolation_matrix_cpu(src, dst).to(device=device, dtype=dtype)


def pool_features(masks: torch.Tensor, patch_features: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean of the bilinearly upsampled patch features inside each mask, L2-normalised.

    masks:          [N, h, w] bool (the proposals' low-resolution masks).
    patch_features: [g, g', D] dense features.
    Returns (features [N, D] unit-norm, valid [N] bool); masks with no pixel are invalid.

    Computed on the patch grid: the sum of upsampled features over a mask equals the
    patch features weighted by ``R_y.T @ mask @ R_x`` (the mask's area on each patch
    under bilinear weights), so the h x w feature map is never built.
    """
    n, h, w = masks.shape
    gy, gx, d = patch_features.shape
    if n == 0:
        return patch_features.new_zeros(0, d), torch.zeros(0, dtype=torch.bool, device=masks.device)
    ry = interpolation_matrix(gy, h, masks.device)  # [h, gy]
    rx = interpolation_matrix(gx, w, masks.device)  # [w, gx]
    m = masks.to(torch.float32)
    weights = ry.T @ (m @ rx)  # [N, gy, gx]
    pooled = weights.reshape(n, gy * gx) @ patch_features.reshape(gy * gx, d).to(torch.float32)  # [N, D]
    valid = masks.flatten(1).any(dim=1)
    return F.normalize(pooled, dim=1), valid


def match_to_prototypes(
    features: torch.Tensor,
    prototypes: torch.Tensor,
    negatives: torch.Tensor | None = None,
    negative_labels: torch.Tensor | None = None,
    negative_margin: float = 0.0,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Assign each proposal a class by cosine similarity.

    features [N, D] and prototypes [C, D] unit-norm (zero prototype rows never win).
    Returns (scores [N] = max(0, best cosine), labels [N] = argmax class,
    vetoed [N] bool). A proposal is vetoed (score set to 0) when a negative reference
    of its class is closer to it than the class prototype by more than ``negative_margin``.
    """
    sims = (features @ prototypes.T).clamp(min=0)  # [N, C]
    scores, labels = sims.max(dim=1)
    vetoed = torch.zeros_like(scores, dtype=torch.bool)
    if negatives is not None and negatives.shape[0] > 0 and features.shape[0] > 0:
        neg_sims = features @ F.normalize(negatives.to(features), dim=1).T  # [N, Q]
        same_class = negative_labels.to(labels.device).unsqueeze(0) == labels.unsqueeze(1)  # [N, Q]
        nearest_negative = neg_sims.masked_fill(~same_class, -2.0).max(dim=1).values
        vetoed = nearest_negative > scores + negative_margin
        scores = scores.masked_fill(vetoed, 0.0)
    return scores, labels, vetoed
