"""Image tensors for the networks: the square squash of the target and the encoder's resize."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

# ImageNet statistics, the input normalisation of both SAM2 and DINOv2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def to_tensor(rgb: np.ndarray) -> torch.Tensor:
    """[H, W, 3] uint8 -> [3, H, W] float32 in [0, 1]."""
    rgb = np.ascontiguousarray(rgb)
    if not rgb.flags.writeable:  # PIL-backed arrays are read-only; torch wants to own writable memory
        rgb = rgb.copy()
    return torch.from_numpy(rgb).permute(2, 0, 1).to(torch.float32).div_(255.0)


def squash_to_square(rgb: np.ndarray, size: int) -> torch.Tensor:
    """Resize to ``size x size`` with PIL bicubic, aspect ratio not kept, no padding -> [3, S, S] in [0, 1]."""
    resized = Image.fromarray(rgb).resize((size, size), resample=Image.BICUBIC)
    return to_tensor(np.asarray(resized))


def resize_for_encoder(images: torch.Tensor, size: int) -> torch.Tensor:
    """[B, 3, S, S] -> [B, 3, size, size] with torch bicubic, no antialias (as the reference)."""
    if images.shape[-1] == size and images.shape[-2] == size:
        return images
    return F.interpolate(images, size=(size, size), mode="bicubic", align_corners=False, antialias=False)
