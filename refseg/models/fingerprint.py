"""One identity for a network's weights: a hash of their content.

Runs, candidate caches and memory banks record it, so that a changed checkpoint (another
file, a fine-tune, another random initialisation) is noticed however it was loaded: the
path or the registry name of a checkpoint says nothing about what is in it.
"""

from __future__ import annotations

import hashlib

import torch


def weights_fingerprint(model: torch.nn.Module) -> str:
    """sha256 (first 16 hex digits) of every parameter's and buffer's name, shape, dtype and bytes,
    in name order. Independent of the device the model is on; about a second per GB on a CPU."""
    digest = hashlib.sha256()
    tensors = dict(model.named_parameters())
    tensors.update(dict(model.named_buffers()))
    with torch.no_grad():
        for name in sorted(tensors):
            t = tensors[name].detach()
            digest.update(f"{name}:{tuple(t.shape)}:{t.dtype}|".encode())
            if t.numel():
                digest.update(t.to("cpu").contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]
