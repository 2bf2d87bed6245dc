"""DINOv2 as a :class:`~refseg.method.interfaces.FeatureEncoder`: dense patch features.

The network is timm's DINOv2 ViT (the same architecture as Meta's DINOv2
repository); the weights are the official checkpoints, bare state dicts in the
layout of the DINOv2 repository (``blocks.N.attn.qkv.weight``, ``blocks.N.ls1.gamma``,
``mask_token``, ``pos_embed [1, 1370, D]``, ``register_tokens``, ViT-g's SwiGLU
``blocks.N.mlp.w12/w3``), converted at load time by
:func:`convert_official_state_dict`.

The conversion reproduces what DINOv2 itself computes at any input size: DINOv2
stores position embeddings for a 37 x 37 grid (518 px) and interpolates them
on every forward to the input's grid, with settings that differ between the
models without registers (bicubic, scale factor with a +0.1 offset, no
antialiasing) and with registers (bicubic to the exact size, antialiased). Here
the interpolation is done once at load time for the encoder's fixed input size,
with the same settings; at 518 px nothing is interpolated. (timm's own
``checkpoint_filter_fn`` maps the keys the same way but resamples with timm's
settings, which differ from DINOv2's below 518 px.)
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from refseg.errors import InvalidInput, UnknownName
from refseg.models.devices import select_device
from refseg.method.preprocess import IMAGENET_MEAN, IMAGENET_STD
from refseg.models.checkpoints import (
    CheckpointError,
    CheckpointSpec,
    check_state_dict,
    load_state_dict_strict,
    load_torch_file,
    resolve_checkpoint,
)
from refseg.models.timm_encoder import DenseViTEncoder

if TYPE_CHECKING:
    from timm.models.vision_transformer import VisionTransformer

PATCH_SIZE = 14
DEFAULT_INPUT_SIZE = 518  # DINOv2's training resolution: a 37 x 37 patch grid


@dataclass(frozen=True)
class DINOv2Variant:
    """One official DINOv2 backbone."""

    name: str
    timm_arch: str  # timm architecture with the same layers
    dim: int
    registers: int  # register tokens (0 or 4)
    checkpoint: CheckpointSpec
    # DINOv2's position-embedding interpolation for inputs other than 518 px (hub settings of each model)
    interpolate_offset: float
    interpolate_antialias: bool


_DINOV2_URL = "https://dl.fbaipublicfiles.com/dinov2"


def _variant(arch: str, timm_size: str, dim: int, registers: bool) -> DINOv2Variant:
    base = f"dinov2_{arch}14"
    full = base + ("_reg4" if registers else "")
    return DINOv2Variant(
        name=base + ("_reg" if registers else ""),
        timm_arch=f"vit_{timm_size}_patch14_{'reg4_' if registers else ''}dinov2",
        dim=dim,
        registers=4 if registers else 0,
        # No official sha256 is published for these files: trust on first use (see checkpoints.py).
        checkpoint=CheckpointSpec(url=f"{_DINOV2_URL}/{base}/{full}_pretrain.pth", filename=f"{full}_pretrain.pth"),
        interpolate_offset=0.0 if registers else 0.1,
        interpolate_antialias=registers,
    )


DINOV2_VARIANTS: dict[str, DINOv2Variant] = {
    v.name: v
    for v in (
        _variant("vits", "small", 384, registers=False),
        _variant("vitb", "base", 768, registers=False),
        _variant("vitl", "large", 1024, registers=False),
        _variant("vitg", "giant", 1536, registers=False),
        _variant("vits", "small", 384, registers=True),
        _variant("vitb", "base", 768, registers=True),
        _variant("vitl", "large", 1024, registers=True),
        _variant("vitg", "giant", 1536, registers=True),
    )
}
# The official file stems ("dinov2_vits14_reg4") are accepted as names too.
_DINOV2_ALIASES = {v.checkpoint.filename.removesuffix("_pretrain.pth"): v.name for v in DINOV2_VARIANTS.values()}


def dinov2_variant(name: str) -> DINOv2Variant:
    """Look up a DINOv2 variant by name with a helpful error."""
    key = _DINOV2_ALIASES.get(name, name)
    try:
        return DINOV2_VARIANTS[key]
    except KeyError:
        raise UnknownName(f"unknown DINOv2 model {name!r}; choose one of {', '.join(DINOV2_VARIANTS)}") from None


def build_dinov2(variant: DINOv2Variant, input_size: int = DEFAULT_INPUT_SIZE) -> "VisionTransformer":
    """The randomly initialised timm network of ``variant`` for square inputs of ``input_size``."""
    import timm  # heavy import; only when a model is built

    if input_size <= 0 or input_size % PATCH_SIZE:
        raise InvalidInput(f"DINOv2 input_size must be a positive multiple of {PATCH_SIZE}, got {input_size}")
    return timm.create_model(variant.timm_arch, pretrained=False, img_size=input_size, num_classes=0)


def resample_patch_pos_embed(pos: torch.Tensor, grid: int, offset: float, antialias: bool) -> torch.Tensor:
    """Interpolate patch position embeddings ``[1, M*M, D]`` to ``[1, grid*grid, D]`` as DINOv2 does."""
    n, dim = pos.shape[1], pos.shape[2]
    m = math.isqrt(n)
    if m * m != n:
        raise ValueError(f"position embeddings of {n} patches do not form a square grid")
    if m == grid:
        return pos
    x = pos.float().reshape(1, m, m, dim).permute(0, 3, 1, 2)  # [1, D, M, M]
    if offset:
        size_kw = {"scale_factor": ((grid + offset) / m, (grid + offset) / m)}
    else:
        size_kw = {"size": (grid, grid)}
    x = F.interpolate(x, mode="bicubic", antialias=antialias, **size_kw)
    if tuple(x.shape[-2:]) != (grid, grid):
        raise ValueError(f"position embedding interpolation gave {tuple(x.shape[-2:])}, expected {(grid, grid)}")
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, dim).to(pos.dtype)


def convert_official_state_dict(
    state_dict: dict[str, torch.Tensor],
    model: "VisionTransformer",
    interpolate_offset: float = 0.1,
    interpolate_antialias: bool = False,
    source: str | os.PathLike = "checkpoint",
) -> dict[str, torch.Tensor]:
    """Map an official DINOv2 state dict onto timm's ``VisionTransformer`` keys.

    - ``mask_token`` (used only in training) is dropped;
    - ViT-g's SwiGLU ``mlp.w12`` / ``mlp.w3`` become ``mlp.fc1`` / ``mlp.fc2``;
    - position embeddings are interpolated to the model's grid (see module docstring);
    - with registers, timm keeps no position embedding for prefix tokens: the class
      token's position embedding is added to the class token, and
      ``register_tokens`` become ``reg_token`` (DINOv2 gives registers none).
    """
    sd = dict(state_dict)
    sd.pop("mask_token", None)
    model_regs = int(getattr(model, "num_reg_tokens", 0) or 0)
    if "pos_embed" not in sd or "cls_token" not in sd:
        raise CheckpointError(
            f"{source} is not an official DINOv2 checkpoint: no 'pos_embed' / 'cls_token' "
            f"(first keys: {', '.join(list(sd)[:5])})"
        )
    ckpt_regs = int(sd["register_tokens"].shape[1]) if "register_tokens" in sd else 0
    if ckpt_regs != model_regs:
        hint = "use the '_reg' variant" if ckpt_regs else "use the variant without '_reg'"
        raise CheckpointError(
            f"{source} has {ckpt_regs} register token(s) but the model expects {model_regs}: {hint}"
        )
    pos = sd.pop("pos_embed")  # [1, 1 + M*M, D]: class token first, then the patch grid row by row
    if pos.ndim != 3 or pos.shape[0] != 1:
        raise CheckpointError(f"{source}: pos_embed has shape {tuple(pos.shape)}, expected [1, 1 + M*M, D]")
    grid = model.patch_embed.grid_size[0]
    try:
        patch_pos = resample_patch_pos_embed(pos[:, 1:], grid, interpolate_offset, interpolate_antialias)
    except ValueError as exc:
        raise CheckpointError(f"{source}: {exc}") from None
    if model_regs:
        sd["reg_token"] = sd.pop("register_tokens")
        sd["cls_token"] = sd["cls_token"] + pos[:, :1]
        sd["pos_embed"] = patch_pos
    else:
        sd["pos_embed"] = torch.cat([pos[:, :1], patch_pos], dim=1)
    out = {}
    for key, value in sd.items():
        key = key.replace(".mlp.w12.", ".mlp.fc1.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    return out


def load_dinov2_weights(model: "VisionTransformer", variant: DINOv2Variant, path: str | os.PathLike) -> None:
    """Load an official DINOv2 checkpoint (bare state dict) strictly into a timm model."""
    raw = check_state_dict(load_torch_file(path, "DINOv2"), path, "DINOv2")
    converted = convert_official_state_dict(raw, model, variant.interpolate_offset, variant.interpolate_antialias,
                                            source=path)
    load_state_dict_strict(model, converted, path, f"DINOv2 model {variant.name!r}")


class DINOv2Encoder(DenseViTEncoder):
    """Last-block patch tokens of DINOv2 after the final LayerNorm, as a ``[B, g, g, D]`` grid."""

    family = "dinov2"
    patch_size: int = PATCH_SIZE

    def __init__(self, model: "VisionTransformer", name: str = "dinov2"):
        super().__init__(model, name, IMAGENET_MEAN, IMAGENET_STD)

    @classmethod
    def from_name(
        cls,
        name: str,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        input_size: int = DEFAULT_INPUT_SIZE,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
        random_init: bool = False,
    ) -> "DINOv2Encoder":
        """Build a registry variant (``dinov2_vitl14``, ``dinov2_vits14_reg``...) with official weights.

        ``checkpoint`` is a local official-layout file; without it the official
        file is taken from the cache or downloaded. ``random_init`` skips weights (not with ``checkpoint``).
        """
        variant = dinov2_variant(name)
        if random_init and checkpoint is not None:
            raise InvalidInput("give either a checkpoint or random_init=True, not both")
        target = select_device(device)
        path = None if random_init else resolve_checkpoint(variant.checkpoint, checkpoint, cache_dir, offline)
        model = build_dinov2(variant, input_size)
        if path is not None:
            load_dinov2_weights(model, variant, path)
        return cls(model.to(target), name=variant.name)
