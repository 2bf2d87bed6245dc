"""SAM 2 as a :class:`~refseg.method.interfaces.ProposalGenerator`: masks from a grid of point prompts.

The model is Meta's official ``sam2`` package, built from its packaged Hydra
configs; the weights come from the official ``{"model": state_dict}`` checkpoints
(see :data:`SAM2_VARIANTS`). What this module adds is the prompting of
docs/method.md section 2, step 3: one image-encoder pass per image, a grid of single
positive points decoded in batches, the best of the three multimask outputs per
prompt, and a predicted-IoU threshold. With ``ProposalConfig.fast_decoder`` the
prompts are decoded by :class:`~refseg.models.sam2_fast_decoder.FastMaskDecoder`
(the same function, the prompt-independent work done once per image).
"""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from refseg.errors import InvalidInput, UnknownName
from refseg.method.config import ProposalConfig
from refseg.models.devices import select_device
from refseg.method.preprocess import IMAGENET_MEAN, IMAGENET_STD
from refseg.method.interfaces import Proposals
from refseg.models.checkpoints import (
    CheckpointError,
    CheckpointSpec,
    check_state_dict,
    load_state_dict_strict,
    load_torch_file,
    resolve_checkpoint,
)
from refseg.models.fingerprint import weights_fingerprint

if TYPE_CHECKING:
    from sam2.modeling.sam2_base import SAM2Base

MASK_STRIDE = 4  # SAM2's low-resolution mask logits are image_size / 4 on a side
_SIZE_MULTIPLE = 32  # Hiera's last stage runs at stride 32


@dataclass(frozen=True)
class SAM2Variant:
    """One official SAM 2 model: its packaged Hydra config and its checkpoint."""

    name: str
    config: str  # config name inside the sam2 package
    checkpoint: CheckpointSpec


_SAM2_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/072824/"
_SAM21_URL = "https://dl.fbaipublicfiles.com/segment_anything_2/092824/"


def _variant(name: str, config: str, base_url: str, filename: str) -> SAM2Variant:
    # No official sha256 is published for these files: trust on first use (see checkpoints.py).
    return SAM2Variant(name, config, CheckpointSpec(url=base_url + filename, filename=filename, sha256=None))


SAM2_VARIANTS: dict[str, SAM2Variant] = {
    v.name: v
    for v in (
        _variant("sam2_hiera_t", "configs/sam2/sam2_hiera_t.yaml", _SAM2_URL, "sam2_hiera_tiny.pt"),
        _variant("sam2_hiera_s", "configs/sam2/sam2_hiera_s.yaml", _SAM2_URL, "sam2_hiera_small.pt"),
        _variant("sam2_hiera_b+", "configs/sam2/sam2_hiera_b+.yaml", _SAM2_URL, "sam2_hiera_base_plus.pt"),
        _variant("sam2_hiera_l", "configs/sam2/sam2_hiera_l.yaml", _SAM2_URL, "sam2_hiera_large.pt"),
        _variant("sam2.1_hiera_t", "configs/sam2.1/sam2.1_hiera_t.yaml", _SAM21_URL, "sam2.1_hiera_tiny.pt"),
        _variant("sam2.1_hiera_s", "configs/sam2.1/sam2.1_hiera_s.yaml", _SAM21_URL, "sam2.1_hiera_small.pt"),
        _variant("sam2.1_hiera_b+", "configs/sam2.1/sam2.1_hiera_b+.yaml", _SAM21_URL, "sam2.1_hiera_base_plus.pt"),
        _variant("sam2.1_hiera_l", "configs/sam2.1/sam2.1_hiera_l.yaml", _SAM21_URL, "sam2.1_hiera_large.pt"),
    )
}
# The checkpoint file stems ("sam2_hiera_large", "sam2.1_hiera_tiny") are accepted as names too.
_SAM2_ALIASES = {os.path.splitext(v.checkpoint.filename)[0]: v.name for v in SAM2_VARIANTS.values()}


def sam2_variant(name: str) -> SAM2Variant:
    """Look up a SAM 2 variant by name (or checkpoint file stem) with a helpful error."""
    key = _SAM2_ALIASES.get(name, name)
    try:
        return SAM2_VARIANTS[key]
    except KeyError:
        raise UnknownName(f"unknown SAM2 model {name!r}; choose one of {', '.join(SAM2_VARIANTS)}") from None


def load_sam2(
    name: str,
    checkpoint: str | os.PathLike | None = None,
    device: str | torch.device | None = None,
    image_size: int = 1024,
    cache_dir: str | os.PathLike | None = None,
    offline: bool | None = None,
    random_init: bool = False,
) -> "SAM2Base":
    """Build an official SAM 2 model in eval mode and load its weights.

    ``checkpoint`` is a local ``{"model": state_dict}`` file; without it the
    official checkpoint is taken from the cache or downloaded (see
    :func:`~refseg.models.checkpoints.resolve_checkpoint`). ``image_size`` other
    than 1024 (a multiple of 32) builds the same network for a smaller input
    (Hiera interpolates its position embeddings); ``random_init`` skips the
    weights (tests, timing) and cannot be combined with ``checkpoint``.
    """
    from sam2.build_sam import build_sam2  # heavy import (hydra); only when a model is built

    variant = sam2_variant(name)
    if random_init and checkpoint is not None:
        raise InvalidInput("give either a checkpoint or random_init=True, not both")
    if image_size <= 0 or image_size % _SIZE_MULTIPLE:
        raise InvalidInput(f"SAM2 image_size must be a positive multiple of {_SIZE_MULTIPLE}, got {image_size}")
    target = select_device(device)
    path = None if random_init else resolve_checkpoint(variant.checkpoint, checkpoint, cache_dir, offline)
    # apply_postprocessing only tunes single-mask outputs; proposals always use the multimask outputs.
    model = build_sam2(
        variant.config,
        ckpt_path=None,
        device="cpu",
        mode="eval",
        hydra_overrides_extra=[f"++model.image_size={int(image_size)}"],
        apply_postprocessing=False,
    )
    if path is not None:
        load_sam2_weights(model, path, what=f"SAM2 model {variant.name!r}")
    return model.to(target).eval()


def load_sam2_weights(model: torch.nn.Module, path: str | os.PathLike, what: str = "SAM2 model") -> None:
    """Load an official SAM 2 checkpoint (a dict with key ``"model"``) strictly into ``model``."""
    ckpt = load_torch_file(path, "SAM2")
    if not isinstance(ckpt, dict) or "model" not in ckpt:
        found = f"keys {sorted(map(str, ckpt))[:5]}" if isinstance(ckpt, dict) else type(ckpt).__name__
        raise CheckpointError(
            f"{path} is not a SAM2 checkpoint: expected a dict with key 'model' holding the state dict, got {found}"
        )
    state_dict = check_state_dict(ckpt["model"], path, "SAM2")
    load_state_dict_strict(model, state_dict, path, what)


def point_grid(points_per_side: int, image_size: int) -> torch.Tensor:
    """Point prompts ``[P, 2]`` as (x, y) pixel coordinates, P = points_per_side**2.

    Both axes take ``linspace(0, image_size - 1, points_per_side) + 0.5``. Order:
    x-major (point ``k`` has x index ``k // n`` and y index ``k % n``), the order
    of the reference implementation, which matters only for ties downstream.
    SAM's prompt encoder adds its own +0.5 pixel-centre shift on top.
    """
    if points_per_side < 1:
        raise InvalidInput(f"points_per_side must be >= 1, got {points_per_side}")
    side = torch.linspace(0, image_size - 1, points_per_side, dtype=torch.float32) + 0.5
    xs = side.repeat_interleave(points_per_side)
    ys = side.repeat(points_per_side)
    return torch.stack([xs, ys], dim=1)


class SAM2ProposalGenerator:
    """Class-agnostic mask proposals from SAM 2 prompted with a regular point grid.

    ``propose`` returns per image the proposals in point-grid order (see
    :func:`point_grid`) whose best multimask output has predicted IoU above
    ``config.pred_iou_threshold``; logits are SAM2's raw low-resolution mask
    logits, ``image_size / 4`` on a side (256 for 1024), not clamped.
    """

    def __init__(self, model: "SAM2Base", config: ProposalConfig = ProposalConfig(), name: str = "sam2"):
        if int(model.image_size) != int(config.image_size):
            raise ValueError(
                f"SAM2 model was built for {model.image_size} px but config.image_size is {config.image_size}; "
                f"build it with load_sam2(..., image_size={config.image_size})"
            )
        self.model = model.eval()
        self.config = config
        self.name = name
        self.device = next(model.parameters()).device
        self._mean = torch.tensor(IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1)
        self._std = torch.tensor(IMAGENET_STD, device=self.device).view(1, 3, 1, 1)
        self._points = point_grid(config.points_per_side, config.image_size).to(self.device)  # [P, 2]
        self._fast = None
        if config.fast_decoder:
            from refseg.models.sam2_fast_decoder import FastMaskDecoder

            self._fast = FastMaskDecoder(model.sam_mask_decoder, model.sam_prompt_encoder)
        self._fingerprint = weights_fingerprint(model)

    @classmethod
    def from_name(
        cls,
        name: str,
        checkpoint: str | os.PathLike | None = None,
        device: str | torch.device | None = None,
        config: ProposalConfig = ProposalConfig(),
        cache_dir: str | os.PathLike | None = None,
        offline: bool | None = None,
        random_init: bool = False,
    ) -> "SAM2ProposalGenerator":
        """Build from a registry name (``sam2_hiera_l``, ``sam2.1_hiera_t``...), see :func:`load_sam2`."""
        variant = sam2_variant(name)
        model = load_sam2(variant.name, checkpoint=checkpoint, device=device, image_size=config.image_size,
                          cache_dir=cache_dir, offline=offline, random_init=random_init)
        return cls(model, config, name=variant.name)

    @property
    def image_size(self) -> int:
        """Side S of the square images ``propose`` takes."""
        return int(self.config.image_size)

    @property
    def mask_size(self) -> int:
        """Side of the returned logits."""
        return self.image_size // MASK_STRIDE

    # ------------------------------------------------------------------ encoder

    def settings(self) -> dict:
        """JSON-able identity of the proposals: the model, its weights' content and the proposal settings."""
        return {
            "proposer": "sam2",
            "name": self.name,
            "image_size": self.image_size,
            "mask_size": self.mask_size,
            "proposal": dataclasses.asdict(self.config),
            "weights": self._fingerprint,
        }

    def _check_images(self, images: torch.Tensor) -> torch.Tensor:
        s = self.image_size
        if images.ndim != 4 or images.shape[1] != 3 or images.shape[2] != s or images.shape[3] != s:
            raise ValueError(f"expected images [B, 3, {s}, {s}] in [0, 1], got {tuple(images.shape)}")
        return images.to(self.device, torch.float32)

    def _encode(self, images: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """Image embeddings ``[B, C, S/16, S/16]`` and high-res features ``[B, C0, S/4, S/4], [B, C1, S/8, S/8]``."""
        x = (images - self._mean) / self._std
        backbone_out = self.model.forward_image(x)
        _, feats, _, sizes = self.model._prepare_backbone_features(backbone_out)  # feats: [HW, B, C] per level
        if self.config.add_no_mem_embed:
            feats[-1] = feats[-1] + self.model.no_mem_embed
        maps = [f.permute(1, 2, 0).reshape(f.shape[1], f.shape[2], h, w) for f, (h, w) in zip(feats, sizes)]
        return maps[-1], maps[:-1]

    def _decode(self, embed: torch.Tensor, high_res: list[torch.Tensor], coords: torch.Tensor,
                labels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Best-of-three multimask logits ``[n, h, w]`` and predicted IoU ``[n]`` for ``n`` prompts of one image.

        ``embed`` ``[1, C, h', w']``; ``coords`` ``[n, k, 2]`` pixels; ``labels`` ``[n, k]``.
        """
        n = coords.shape[0]
        sparse, dense = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        masks, iou, _, _ = self.model.sam_mask_decoder(
            image_embeddings=embed.expand(n, -1, -1, -1),  # a view: the decoder adds the dense prompt anyway
            image_pe=self.model.sam_prompt_encoder.get_dense_pe(),
            sparse_prompt_embeddings=sparse,
            dense_prompt_embeddings=dense,
            multimask_output=True,  # tokens 1..3
            repeat_image=False,
            high_res_features=high_res,  # batch 1, broadcast over the prompts
        )  # masks [n, 3, h, w], iou [n, 3]
        best = iou.argmax(dim=1)
        rows = torch.arange(n, device=masks.device)
        return masks[rows, best].float(), iou[rows, best].float()

    # ------------------------------------------------------------------ interface

    @torch.no_grad()
    def propose(self, images: torch.Tensor) -> list[Proposals]:
        """Proposals for each image of ``[B, 3, S, S]`` in [0, 1] (S = ``config.image_size``)."""
        images = self._check_images(images)
        if images.shape[0] == 0:
            return []
        if self._fast is not None:
            return self._propose_fast(images)
        embeds, high_res = self._encode(images)
        coords = self._points[:, None, :]  # [P, 1, 2]: one positive point per prompt
        labels = torch.ones(coords.shape[:2], dtype=torch.int32, device=self.device)  # [P, 1]
        step = max(1, int(self.config.prompt_batch_size))
        out = []
        for b in range(images.shape[0]):
            embed = embeds[b : b + 1]
            feats = [f[b : b + 1] for f in high_res]
            kept_logits, kept_iou = [], []
            for start in range(0, coords.shape[0], step):
                logits, iou = self._decode(embed, feats, coords[start : start + step], labels[start : start + step])
                keep = iou > self.config.pred_iou_threshold
                kept_logits.append(logits[keep])
                kept_iou.append(iou[keep])
            out.append(Proposals(logits=torch.cat(kept_logits), pred_iou=torch.cat(kept_iou)))
        return out

    def _propose_fast(self, images: torch.Tensor) -> list[Proposals]:
        """``propose`` through :class:`~refseg.models.sam2_fast_decoder.FastMaskDecoder`.

        The same proposals as the paper path up to rounding: image-side decoder work once per
        image, and no host-device synchronisation inside the prompt loop (logits and IoU stay on
        the device; the threshold is one boolean index per image, after all prompt batches).
        """
        embeds, high_res = self._encode(images)
        n_prompts = self._points.shape[0]
        coords = self._points[:, None, :]  # [P, 1, 2]: one positive point per prompt
        labels = torch.ones(coords.shape[:2], dtype=torch.int32, device=self.device)  # [P, 1]
        with torch.autocast(self.device.type, enabled=False):  # positional encodings in fp32
            sparse, _ = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)  # [P, 2, C]
        step = max(1, int(self.config.prompt_batch_size))
        size = self.mask_size
        out = []
        for b in range(images.shape[0]):
            ctx = self._fast.prepare(embeds[b : b + 1], [f[b : b + 1] for f in high_res])
            logits = torch.empty(n_prompts, size, size, dtype=torch.float32, device=self.device)
            iou = torch.empty(n_prompts, dtype=torch.float32, device=self.device)
            for start in range(0, n_prompts, step):
                logits[start : start + step], iou[start : start + step] = self._fast.decode(
                    ctx, sparse[start : start + step])
            keep = torch.nonzero(iou > self.config.pred_iou_threshold).squeeze(1)  # the one sync per image
            out.append(Proposals(logits=logits.index_select(0, keep), pred_iou=iou.index_select(0, keep)))
        return out

    @torch.no_grad()
    def masks_from_boxes(self, image: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """Mask logits ``[K, S/4, S/4]`` for boxes ``[K, 4]`` (xyxy pixels of the S x S image ``[3, S, S]``).

        Boxes are prompted as SAM2's image predictor does (two corner points with
        labels 2 and 3); of the three multimask outputs the one with the highest
        predicted IoU is kept.
        """
        if image.ndim != 3:
            raise ValueError(f"expected one image [3, S, S], got {tuple(image.shape)}")
        boxes = torch.as_tensor(boxes, dtype=torch.float32, device=self.device)
        if boxes.ndim != 2 or boxes.shape[1] != 4:
            raise ValueError(f"expected boxes [K, 4] (x1, y1, x2, y2), got {tuple(boxes.shape)}")
        if boxes.shape[0] == 0:
            return torch.zeros(0, self.mask_size, self.mask_size, device=self.device)
        embed, high_res = self._encode(self._check_images(image[None]))
        coords = boxes.reshape(-1, 2, 2)  # [K, 2 corners, (x, y)]
        labels = torch.tensor([[2, 3]], dtype=torch.int32, device=self.device).expand(coords.shape[0], 2)
        logits, _ = self._decode(embed, high_res, coords, labels)
        return logits
