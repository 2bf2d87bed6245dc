"""Mixed precision: one context manager for every network call."""

from __future__ import annotations

import contextlib

import torch

from refseg.errors import InvalidInput

DTYPES = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device: torch.device | str, precision: str):
    """``torch.autocast`` for bf16/fp16 on the device's type; a no-op for fp32."""
    if precision not in DTYPES:
        raise InvalidInput(f"unknown precision {precision!r}; choose one of {', '.join(DTYPES)}")
    dtype = DTYPES[precision]
    if dtype is None:
        return contextlib.nullcontext()
    device_type = torch.device(device).type
    if device_type == "cpu" and dtype == torch.float16:
        dtype = torch.bfloat16  # CPU autocast supports bf16 well; fp16 matmuls there are slow or missing
    return torch.autocast(device_type=device_type, dtype=dtype)
