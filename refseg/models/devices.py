"""Choosing the torch device the networks run on."""

from __future__ import annotations

import torch

from refseg.errors import InvalidInput


def _mps_available() -> bool:
    mps = getattr(torch.backends, "mps", None)
    return bool(mps is not None and mps.is_available())


def select_device(name: str | torch.device | None = None) -> torch.device:
    """Return a usable device.

    ``None`` or ``"auto"`` picks CUDA, then Apple MPS, then the CPU. An explicit
    name (``"cpu"``, ``"cuda"``, ``"cuda:1"``, ``"mps"``) must be available here,
    else a :class:`ValueError` says what is available.
    """
    if name is None or (isinstance(name, str) and name.strip().lower() == "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        if _mps_available():
            return torch.device("mps")
        return torch.device("cpu")
    try:
        device = torch.device(name.strip() if isinstance(name, str) else name)
    except (RuntimeError, TypeError) as exc:
        raise InvalidInput(f"unknown device {name!r}; use 'auto', 'cpu', 'cuda', 'cuda:N' or 'mps'") from exc
    if device.type == "cpu":
        return device
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise InvalidInput(f"device {name!r} requested but CUDA is not available here; {_available()}")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise InvalidInput(
                f"device {name!r} requested but only {torch.cuda.device_count()} CUDA device(s) exist; {_available()}"
            )
        return device
    if device.type == "mps":
        if not _mps_available():
            raise InvalidInput(f"device {name!r} requested but MPS is not available here; {_available()}")
        return device
    try:  # other backends (xpu, ...): usable if a tensor can be made there
        torch.empty(0, device=device)
    except Exception as exc:
        raise InvalidInput(f"device {name!r} is not usable here ({exc}); {_available()}") from exc
    return device


def _available() -> str:
    names = ["cpu"]
    if torch.cuda.is_available():
        names += [f"cuda:{i}" for i in range(torch.cuda.device_count())]
    if _mps_available():
        names.append("mps")
    return "available: " + ", ".join(names)
