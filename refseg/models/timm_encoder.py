"""DINOv3 and C-RADIO as :class:`~refseg.method.interfaces.FeatureEncoder`: dense patch features through timm.

Both families are timm networks (timm >= 1.0.20): DINOv3 as timm's ``Eva`` with
DINOv3's rotary position embedding (``vit_*_patch16_dinov3``, and their ``_qkvb`` twins,
which keep the query / value biases of Meta's files; ``vit_tiny_patch16_dinov3_qkvb``
has no plain sibling and only Meta's EUPE weights, in timm releases since May 2026),
C-RADIO as timm's ``VisionTransformer`` (``vit_*_patch16_radio_v3`` / ``_v4``). The
refseg names are timm's architecture names; Meta's file stems (``dinov3_vits16``...)
are accepted for DINOv3 too (naming the plain variant, not the twin).

Dense features are the last block's patch tokens, after the final norm where the
network has one (DINOv3: LayerNorm; C-RADIO: none, its timm port has
``final_norm=False``), with the prefix tokens (class token + registers) dropped:
a ``[B, S/16, S/16, D]`` grid for an ``S`` px input.

Input size: 512 px by default for both (a 32 x 32 grid, 1024 patches, about the
compute of DINOv2's 518 px / 1369 patches at 14 px); 512 is C-RADIO's own
default in timm, and DINOv3's RoPE has no fixed grid, so any multiple of 16 works.

Normalisation: DINOv3 takes ImageNet mean/std (LVD-1689M weights). C-RADIO's own
model takes [0, 1] images and normalises inside (its "input conditioner", CLIP
mean/std); timm's port drops the conditioner, so the encoder applies those
statistics itself, and NVIDIA's files are checked to carry the same ones.

Checkpoints, each found in the cache or given as a local path (see
:mod:`refseg.models.checkpoints`; no official sha256 is known for any of them, so
they are trusted on first use):

- timm's published weights (Hugging Face ``timm/<arch>.<tag>``, ``model.safetensors``):
  timm's own layout, the default download;
- Meta's official DINOv3 files (``dinov3_vits16_pretrain_lvd1689m-<hash>.pth``):
  DINOv3's own key layout, converted at load by :func:`convert_meta_dinov3`. Meta
  hands out download links only after its licence is accepted, so they are never
  downloaded here: put the file in the cache or pass its path;
- NVIDIA's C-RADIO files (Hugging Face ``nvidia/C-RADIOv3-B``... ``model.safetensors``),
  converted by :func:`convert_nvidia_radio`.

Which layout a file has is read from its keys.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from refseg.errors import InvalidInput, UnknownName
from refseg.method.preprocess import IMAGENET_MEAN, IMAGENET_STD
from refseg.models.checkpoints import (
    CheckpointError,
    CheckpointSpec,
    check_state_dict,
    get_cache_dir,
    load_state_dict_strict,
    load_torch_file,
    resolve_checkpoint,
    verify_checkpoint,
)
from refseg.models.devices import select_device
from refseg.models.fingerprint import weights_fingerprint

if TYPE_CHECKING:
    from torch import nn

PATCH_SIZE = 16
DEFAULT_INPUT_SIZE = 512
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)  # C-RADIO's input conditioner (OpenAI CLIP statistics)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
DINOV3_ROPE_BASE = 100.0  # every released DINOv3 ViT

# layouts of checkpoint files
TIMM, META_DINOV3, NVIDIA_RADIO = "timm", "meta-dinov3", "nvidia-radio"


@dataclass(frozen=True)
class Source:
    """One place a variant's weights come from."""

    label: str  # shown by ``refseg models``
    layout: str  # TIMM, META_DINOV3 or NVIDIA_RADIO
    spec: CheckpointSpec
    downloadable: bool = True  # False: a page where the file is requested (Meta's licence form)


@dataclass(frozen=True)
class TimmVariant:
    """One registered timm backbone and how dense features are read from it."""

    name: str  # refseg name = timm architecture
    family: str  # "dinov3" or "c-radio"
    dim: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    features: str
    sources: tuple[Source, ...]
    input_size: int = DEFAULT_INPUT_SIZE
    pos_align_corners: bool = False  # C-RADIO: how its 128 x 128 position grid is resized (per release)
    aliases: tuple[str, ...] = field(default=())

    @property
    def checkpoint(self) -> CheckpointSpec:
        """The default download (the first downloadable source)."""
        return next(s.spec for s in self.sources if s.downloadable)


_HF = "https://huggingface.co"
_META_DINOV3_PAGE = "https://ai.meta.com/resources/models-and-libraries/dinov3-downloads/"


def _timm_source(arch: str, tag: str) -> Source:
    return Source("timm", TIMM, CheckpointSpec(url=f"{_HF}/timm/{arch}.{tag}/resolve/main/model.safetensors",
                                               filename=f"{arch}.{tag}.safetensors"))


def _dinov3(size: str, stem: str | None, dim: int, qkv_bias: bool = False, tag: str = "lvd1689m") -> TimmVariant:
    """DINOv3 ViT ``size``. ``qkv_bias``: timm's ``_qkvb`` twin, which keeps the query and value biases of Meta's
    files (the plain one takes a file only when they are zero); Meta's files fit both, so the twin has the same
    Meta source but no alias (Meta's ``stem`` names the plain one). ``stem`` None: Meta publishes no DINOv3 file
    of this size. ``tag``: timm's weights."""
    arch = f"vit_{size}_patch16_dinov3" + ("_qkvb" if qkv_bias else "")
    sources = [_timm_source(arch, tag)]
    if stem is not None:
        sources.append(Source("Meta (licence form)", META_DINOV3,
                              CheckpointSpec(url=_META_DINOV3_PAGE, filename=f"{stem}_pretrain_lvd1689m.pth"),
                              downloadable=False))
    return TimmVariant(name=arch, family="dinov3", dim=dim, mean=IMAGENET_MEAN, std=IMAGENET_STD,
                       features="last block patch tokens after final norm", sources=tuple(sources),
                       aliases=(stem,) if stem is not None and not qkv_bias else ())


def _radio(size: str, version: str, nvidia_repo: str, dim: int, align_corners: bool) -> TimmVariant:
    arch = f"vit_{size}_patch16_radio_{version}"
    nvidia = Source("NVIDIA", NVIDIA_RADIO,
                    CheckpointSpec(url=f"{_HF}/nvidia/{nvidia_repo}/resolve/main/model.safetensors",
                                   filename=f"{nvidia_repo}.safetensors"))
    return TimmVariant(name=arch, family="c-radio", dim=dim, mean=CLIP_MEAN, std=CLIP_STD,
                       features="last block patch tokens (no final norm)",
                       sources=(_timm_source(arch, "c_radio"), nvidia), pos_align_corners=align_corners)


TIMM_VARIANTS: dict[str, TimmVariant] = {
    v.name: v
    for v in (
        _dinov3("small", "dinov3_vits16", 384),
        _dinov3("small_plus", "dinov3_vits16plus", 384),
        _dinov3("base", "dinov3_vitb16", 768),
        _dinov3("large", "dinov3_vitl16", 1024),
        _dinov3("huge_plus", "dinov3_vith16plus", 1280),
        _dinov3("7b", "dinov3_vit7b16", 4096),
        # the _qkvb twins (timm has none of the 7B); the tiny one exists only so, with Meta's EUPE weights
        _dinov3("tiny", None, 192, qkv_bias=True, tag="eupe_lvd1689m"),
        _dinov3("small", "dinov3_vits16", 384, qkv_bias=True),
        _dinov3("small_plus", "dinov3_vits16plus", 384, qkv_bias=True),
        _dinov3("base", "dinov3_vitb16", 768, qkv_bias=True),
        _dinov3("large", "dinov3_vitl16", 1024, qkv_bias=True),
        _dinov3("huge_plus", "dinov3_vith16plus", 1280, qkv_bias=True),
        # C-RADIOv3-B/-H were released resizing position embeddings with align_corners=True, -L/-g and v4 with False
        _radio("base", "v3", "C-RADIOv3-B", 768, align_corners=True),
        _radio("large", "v3", "C-RADIOv3-L", 1024, align_corners=False),
        _radio("huge", "v3", "C-RADIOv3-H", 1280, align_corners=True),
        _radio("giant", "v3", "C-RADIOv3-g", 1536, align_corners=False),
        _radio("so400m", "v4", "C-RADIOv4-SO400M", 1152, align_corners=False),
        _radio("huge", "v4", "C-RADIOv4-H", 1280, align_corners=False),
    )
}
_ALIASES = {alias: v.name for v in TIMM_VARIANTS.values() for alias in v.aliases}


def timm_variant(name: str) -> TimmVariant:
    """Look up a DINOv3 / C-RADIO variant by name (or Meta's DINOv3 stem) with a helpful error."""
    try:
        return TIMM_VARIANTS[_ALIASES.get(name, name)]
    except KeyError:
        raise UnknownName(f"unknown DINOv3 / C-RADIO model {name!r}; choose one of {', '.join(TIMM_VARIANTS)}") from None


def build_timm_network(variant: TimmVariant, input_size: int | None = None, **kwargs) -> "nn.Module":
    """The randomly initialised timm network of ``variant`` for square inputs (``kwargs`` go to timm)."""
    import timm  # heavy import; only when a model is built

    size = variant.input_size if input_size is None else int(input_size)
    if size <= 0 or size % PATCH_SIZE:
        raise InvalidInput(f"{variant.name} input_size must be a positive multiple of {PATCH_SIZE}, got {size}")
    if not timm.is_model(variant.name):
        raise UnknownName(f"{variant.name} is not in the installed timm {timm.__version__}: upgrade timm "
                          "(pip install -U timm)")
    return timm.create_model(variant.name, pretrained=False, img_size=size, num_classes=0, **kwargs)


# ---------------------------------------------------------------------------- checkpoint files


def cached_source(variant: TimmVariant, cache_dir: str | os.PathLike | None = None) -> tuple[Source, Path] | None:
    """The first source of ``variant`` whose file is in the cache (Meta's names may carry a ``-<hash>`` suffix)."""
    root = get_cache_dir(cache_dir)
    for source in variant.sources:
        target = root / source.spec.filename
        if target.is_file():
            return source, target
        if source.layout == META_DINOV3:
            stem, suffix = os.path.splitext(source.spec.filename)
            hashed = sorted(p for p in root.glob(f"{stem}-*{suffix}") if p.is_file())
            if hashed:
                return source, hashed[0]
    return None


def resolve_timm_checkpoint(variant: TimmVariant, path: str | os.PathLike | None = None,
                            cache_dir: str | os.PathLike | None = None, offline: bool | None = None) -> Path:
    """A local path (as is), else a cached file of any source (verified), else the default download."""
    if path is not None:
        return resolve_checkpoint(None, path)
    found = cached_source(variant, cache_dir)
    if found is not None:
        source, target = found
        verify_checkpoint(target, source.spec.sha256)
        return target
    try:
        return resolve_checkpoint(variant.checkpoint, None, cache_dir, offline)
    except FileNotFoundError as exc:
        others = "".join(f"\n  or {s.label}: {s.spec.url} saved as {get_cache_dir(cache_dir) / s.spec.filename}"
                         for s in variant.sources if s.spec is not variant.checkpoint)
        raise FileNotFoundError(f"{exc}{others}") from None


def read_state_dict(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """A state dict from a ``.safetensors`` or PyTorch file; a ``{"model": ...}`` wrapper is unwrapped."""
    if str(path).endswith(".safetensors"):
        from safetensors.torch import load_file

        try:
            raw: object = load_file(str(path), device="cpu")
        except Exception as exc:  # truncated header, not a safetensors file...
            raise CheckpointError(f"cannot read {what} checkpoint {path}: {type(exc).__name__}: {exc}. The file is "
                                  f"truncated or corrupt; if it was downloaded, delete it and download it again.") from exc
    else:
        raw = load_torch_file(path, what)
        if isinstance(raw, dict) and isinstance(raw.get("model"), dict):
            raw = raw["model"]
    return check_state_dict(raw, path, what)


def detect_layout(state_dict: dict[str, torch.Tensor]) -> str:
    """META_DINOV3 (``storage_tokens``), NVIDIA_RADIO (``radio_model.`` keys) or TIMM."""
    if "storage_tokens" in state_dict:
        return META_DINOV3
    if any(k.startswith("radio_model.") for k in state_dict):
        return NVIDIA_RADIO
    return TIMM


def dinov3_rope_periods(head_dim: int, base: float = DINOV3_ROPE_BASE) -> torch.Tensor:
    """DINOv3's RoPE periods ``base ** (2i / (head_dim / 2))``, i < head_dim / 4."""
    return base ** (2 * torch.arange(head_dim // 4, dtype=torch.float32) / (head_dim // 2))


def convert_meta_dinov3(state_dict: dict[str, torch.Tensor], model: "nn.Module",
                        source: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """Map an official DINOv3 state dict (Meta's repository layout) onto timm's ``Eva`` keys.

    - ``storage_tokens`` -> ``reg_token``; ``blocks.N.ls1/ls2.gamma`` -> ``blocks.N.gamma_1/gamma_2``;
    - SwiGLU ``mlp.w1 / w2 / w3`` (gate, value, out) -> ``mlp.fc1_g / fc1_x / fc2``;
    - ``attn.qkv.bias`` is applied through its ``bias_mask`` (which zeroes the key bias), as DINOv3 does;
      timm keeps the query and value parts (``q_bias`` / ``v_bias``) or, for models without qkv bias,
      requires the masked bias to be zero;
    - ``rope_embed.periods`` is checked against the periods timm computes (base 100), then dropped, with
      ``mask_token`` (training only), ``local_cls_norm`` (7B, local crops in training only) and
      ``projectors.*`` (the distillation heads of Meta's EUPE files, DINOv3's layout otherwise).
    """
    params = dict(model.named_parameters())
    head_dim = int(model.embed_dim) // int(model.blocks[0].attn.num_heads)
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if (key in ("mask_token",) or key.startswith(("local_cls_norm.", "projectors."))
                or key.endswith(".qkv.bias_mask")):
            continue
        if key == "rope_embed.periods":
            expected = dinov3_rope_periods(head_dim)
            if value.shape != expected.shape or not torch.allclose(value.float(), expected, rtol=1e-5, atol=0):
                raise CheckpointError(f"{source}: rope_embed.periods {tuple(value.shape)} differ from DINOv3's "
                                      f"base-{DINOV3_ROPE_BASE:g} periods for head dim {head_dim}")
            continue
        if key.endswith(".attn.qkv.bias"):
            mask = state_dict.get(key + "_mask")
            bias = value * mask.to(value.dtype) if mask is not None else value
            q, k, v = bias.chunk(3)
            prefix = key.removesuffix("qkv.bias")
            if prefix + "q_bias" in params:
                out[prefix + "q_bias"], out[prefix + "v_bias"] = q, v
            elif torch.count_nonzero(bias):
                raise CheckpointError(f"{source}: {key} is not zero but {type(model).__name__} has no qkv bias: "
                                      f"use the '_qkvb' timm architecture for this checkpoint")
            continue
        key = key.replace("storage_tokens", "reg_token").replace(".ls1.gamma", ".gamma_1")
        key = key.replace(".ls2.gamma", ".gamma_2")
        key = key.replace(".mlp.w1.", ".mlp.fc1_g.").replace(".mlp.w2.", ".mlp.fc1_x.").replace(".mlp.w3.", ".mlp.fc2.")
        out[key] = value
    return out


def resample_radio_pos_embed(pos: torch.Tensor, grid: int, align_corners: bool) -> torch.Tensor:
    """RADIO's inference-time resize of its square position grid ``[1, M*M, D]`` to ``[1, grid*grid, D]``
    (bilinear, no antialiasing; for a square input RADIO's crop keeps the whole resized grid)."""
    m = math.isqrt(pos.shape[1])
    if m * m != pos.shape[1]:
        raise ValueError(f"position embeddings of {pos.shape[1]} patches do not form a square grid")
    if m == grid:
        return pos
    x = pos.float().reshape(1, m, m, -1).permute(0, 3, 1, 2)
    x = F.interpolate(x, size=(grid, grid), mode="bilinear", align_corners=align_corners, antialias=False)
    return x.permute(0, 2, 3, 1).reshape(1, grid * grid, -1).to(pos.dtype)


def convert_nvidia_radio(state_dict: dict[str, torch.Tensor], model: "nn.Module", variant: TimmVariant,
                         source: str | os.PathLike = "checkpoint") -> dict[str, torch.Tensor]:
    """Map NVIDIA's C-RADIO file (``radio_model.model.*`` keys) onto timm's ``VisionTransformer`` keys.

    - ``patch_generator.embedder.weight`` ``[D, 3*p*p]`` (a bias-free linear map of (channel, row, column)
      flattened patches) -> ``patch_embed.proj`` conv weight with zero bias;
    - ``patch_generator.cls_token.token`` ``[1 + R, D]`` -> ``cls_token`` and the ``R`` registers ``reg_token``;
    - ``patch_generator.pos_embed`` resized to the model's grid (:func:`resample_radio_pos_embed`);
    - ``radio_model.input_conditioner.norm_mean / norm_std`` must be the variant's normalisation;
      summary indices and the teachers' adaptor heads are dropped. Keys not understood are kept, so that
      the strict load names them.
    """
    prefix = "radio_model.model."
    for stat, expected in (("norm_mean", variant.mean), ("norm_std", variant.std)):
        value = state_dict.get(f"radio_model.input_conditioner.{stat}")
        if value is not None and not torch.allclose(value.float().flatten(), torch.tensor(expected), atol=1e-6):
            raise CheckpointError(f"{source}: input conditioner {stat} {value.flatten().tolist()} is not "
                                  f"{list(expected)}, the normalisation of {variant.name}")
    out: dict[str, torch.Tensor] = {}
    for key, value in state_dict.items():
        if not key.startswith(prefix):
            continue
        key = key.removeprefix(prefix)
        if key == "patch_generator.embedder.weight":
            p = math.isqrt(value.shape[1] // 3)
            out["patch_embed.proj.weight"] = value.reshape(value.shape[0], 3, p, p)
            out["patch_embed.proj.bias"] = value.new_zeros(value.shape[0])
        elif key == "patch_generator.cls_token.token":
            out["cls_token"], out["reg_token"] = value[None, :1], value[None, 1:]
        elif key == "patch_generator.pos_embed":
            out["pos_embed"] = value
        else:
            out[key.replace(".grandma", ".gamma")] = value  # RADIO's name for LayerScale's parameter
    return out


def load_timm_weights(model: "nn.Module", variant: TimmVariant, path: str | os.PathLike) -> str:
    """Load a checkpoint of any known layout strictly into ``model``. Returns the layout."""
    what = f"{variant.family} ({variant.name})"
    raw = read_state_dict(path, what)
    layout = detect_layout(raw)
    wanted = {"dinov3": (TIMM, META_DINOV3), "c-radio": (TIMM, NVIDIA_RADIO)}[variant.family]
    if layout not in wanted:
        raise CheckpointError(f"{path} is a {layout} checkpoint, not one of {variant.name} ({', '.join(wanted)})")
    if layout == META_DINOV3:
        sd = convert_meta_dinov3(raw, model, source=path)
    elif layout == NVIDIA_RADIO:
        sd = convert_nvidia_radio(raw, model, variant, source=path)
    else:
        sd = raw
    if "pos_embed" in sd and getattr(model, "pos_embed", None) is not None:
        try:
            sd["pos_embed"] = resample_radio_pos_embed(sd["pos_embed"], model.patch_embed.grid_size[0],
                                                       variant.pos_align_corners)
        except ValueError as exc:
            raise CheckpointError(f"{path}: {exc}") from None
    load_state_dict_strict(model, sd, path, f"{variant.family} model {variant.name!r}")
    return layout


# ---------------------------------------------------------------------------- encoders


class DenseViTEncoder:
    """Last-block patch tokens of a timm ViT (after its final norm, if any) as a ``[B, g, g, D]`` grid.

    Images come in [0, 1] and are normalised with ``mean`` / ``std``; the ``model.num_prefix_tokens``
    leading tokens (class token, registers) are dropped.
    """

    family: str = "vit"
    features: str = "last block patch tokens after final norm"

    def __init__(self, model: "nn.Module", name: str, mean=IMAGENET_MEAN, std=IMAGENET_STD):
        self.model = model.eval()
        self.name = name
        self.input_size = int(model.patch_embed.img_size[0])
        self.patch_size = int(model.patch_embed.patch_size[0])
        self.dim = int(model.embed_dim)
        self.device = next(model.parameters()).device
        self._prefix = int(model.num_prefix_tokens)
        self.mean, self.std = tuple(mean), tuple(std)
        self._mean = torch.tensor(self.mean, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(self.std, device=self.device).view(1, 3, 1, 1)
        self._fingerprint = weights_fingerprint(model)

    @property
    def grid_size(self) -> int:
        """Patches per side of the output grid."""
        return self.input_size // self.patch_size

    @torch.no_grad()
    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """``[B, 3, input_size, input_size]`` in [0, 1] -> ``[B, g, g, dim]`` patch features."""
        s = self.input_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"expected images [B, 3, {s}, {s}] in [0, 1], got {tuple(images.shape)}")
        x = (images.to(self.device, torch.float32) - self._mean) / self._std
        tokens = self.model.forward_features(x)  # [B, prefix + g*g, D], final norm applied
        g = self.grid_size
        return tokens[:, self._prefix:].reshape(x.shape[0], g, g, self.dim)

    def settings(self) -> dict:
        """JSON-able identity of the features; a memory bank refuses an encoder whose settings differ."""
        return {
            "encoder": self.family,
            "name": self.name,
            "input_size": self.input_size,
            "patch_size": self.patch_size,
            "dim": self.dim,
            "features": self.features,
            "normalisation": {"mean": list(self.mean), "std": list(self.std)},
            "weights": self._fingerprint,
        }


class TimmEncoder(DenseViTEncoder):
    """A registered DINOv3 or C-RADIO backbone (see :data:`TIMM_VARIANTS`)."""

    def __init__(self, model: "nn.Module", variant: TimmVariant):
        super().__init__(model, variant.name, variant.mean, variant.std)
        self.variant = variant
        self.family = variant.family
        self.features = variant.features

    @classmethod
    def from_name(
        cls,
        name: str,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        input_size: int | None = None,
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
        random_init: bool = False,
    ) -> "TimmEncoder":
        """Build ``name`` with its weights: ``checkpoint`` (a local file of any known layout), else a cached
        file of any source, else timm's published file downloaded. ``input_size`` None is the variant's own."""
        variant = timm_variant(name)
        if random_init and checkpoint is not None:
            raise InvalidInput("give either a checkpoint or random_init=True, not both")
        target = select_device(device)
        path = None if random_init else resolve_timm_checkpoint(variant, checkpoint, cache_dir, offline)
        model = build_timm_network(variant, input_size)
        if path is not None:
            load_timm_weights(model, variant, path)
        return cls(model.to(target), variant)

    def settings(self) -> dict:
        return {**super().settings(), "timm_arch": self.variant.name, "prefix_tokens": self._prefix}
