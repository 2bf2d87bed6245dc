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


def prompt_batches(n_prompts: int, step: int, keep: torch.Tensor | None = None) -> list[tuple[torch.Tensor, int]]:
    """The decoder batches of one image: ``(prompt indices [n], real)`` pairs; the first ``real`` are decoded
    for their output, the rest repeat the last one to fill the batch (their outputs are dropped).

    Without ``keep`` (``[P]`` bool): the grid in order, ``step`` prompts per batch (the last one shorter),
    as the paper decodes them. With ``keep``: the kept prompts in grid order, each decoded in a batch of
    the size its paper batch has, so that its output is bit-identical to the paper's: a prompt's SAM2
    output does not depend on the other prompts of its batch or on its place in it, but it does depend on
    the batch size (BLAS picks its kernels by matrix shape: on a CPU, batches of 1, 2, 3, 5... prompts
    differ from a batch of 64 in the last bits). So the kept prompts of the full paper batches are packed
    into batches of ``step``, those of the last, shorter paper batch into one batch of its size, and a
    packed batch short of its size is filled up: the saving comes in steps of ``step`` prompts.
    """
    order = torch.arange(n_prompts)
    if keep is None:
        return [(order[s : s + step], min(step, n_prompts - s)) for s in range(0, n_prompts, step)]
    keep = torch.as_tensor(keep, dtype=torch.bool).reshape(-1)
    full = (n_prompts // step) * step  # prompts in full paper batches
    groups = [(order[:full][keep[:full]], step), (order[full:][keep[full:]], n_prompts - full)]
    batches = []
    for kept, size in groups:
        if size == 0:  # no shorter last batch: the prompts are a multiple of step
            continue
        for s in range(0, kept.numel(), size):
            chunk = kept[s : s + size]
            pad = chunk[-1:].expand(size - chunk.numel())
            batches.append((torch.cat([chunk, pad]), int(chunk.numel())))
    return batches


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
            # prompt selection is the pipeline's (a prompt_mask per call): not part of the proposer's identity
            "proposal": {k: v for k, v in dataclasses.asdict(self.config).items() if k != "prompt_similarity"},
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

    @property
    def prompt_points(self) -> torch.Tensor:
        """The grid prompts ``[P, 2]`` (x, y) in pixels of the S x S frame (see :func:`point_grid`)."""
        return self._points

    @torch.no_grad()
    def propose(self, images: torch.Tensor, prompt_mask: torch.Tensor | None = None) -> list[Proposals]:
        """Proposals for each image of ``[B, 3, S, S]`` in [0, 1] (S = ``config.image_size``).

        ``prompt_mask`` ``[B, P]`` bool: decode only those prompts of each image (None: all). A decoded
        prompt's output is bit-identical to its output without the mask, because it is decoded in a
        batch of the size it has without the mask (see :func:`prompt_batches`). Each proposal reports
        its prompt (``Proposals.prompt_index``).
        """
        images = self._check_images(images)
        if images.shape[0] == 0:
            return []
        n_prompts = self._points.shape[0]
        if prompt_mask is not None:
            prompt_mask = torch.as_tensor(prompt_mask, dtype=torch.bool)
            if tuple(prompt_mask.shape) != (images.shape[0], n_prompts):
                raise ValueError(f"expected prompt_mask [{images.shape[0]}, {n_prompts}] bool, "
                                 f"got {tuple(prompt_mask.shape)}")
            prompt_mask = prompt_mask.cpu()
        embeds, high_res = self._encode(images)
        coords = self._points[:, None, :]  # [P, 1, 2]: one positive point per prompt
        labels = torch.ones(coords.shape[:2], dtype=torch.int32, device=self.device)  # [P, 1]
        step = max(1, int(self.config.prompt_batch_size))
        if self._fast is not None:
            with torch.autocast(self.device.type, enabled=False):  # positional encodings in fp32
                sparse, _ = self.model.sam_prompt_encoder(points=(coords, labels), boxes=None, masks=None)
        out = []
        for b in range(images.shape[0]):
            batches = prompt_batches(n_prompts, step, None if prompt_mask is None else prompt_mask[b])
            if self._fast is not None:
                ctx = self._fast.prepare(embeds[b : b + 1], [f[b : b + 1] for f in high_res])
                out.append(self._decode_batches(batches, lambda idx: self._fast.decode(ctx, sparse[idx]), sync=False))
            else:
                embed, feats = embeds[b : b + 1], [f[b : b + 1] for f in high_res]
                out.append(self._decode_batches(
                    batches, lambda idx: self._decode(embed, feats, coords[idx], labels[idx]), sync=True))
        return out

    def _decode_batches(self, batches: list[tuple[torch.Tensor, int]], decode, sync: bool) -> Proposals:
        """Decode ``batches`` (:func:`prompt_batches`) with ``decode(index) -> (logits, iou)`` and keep the
        real prompts' proposals above the IoU threshold.

        ``sync``: threshold each batch as it comes (the paper path); else (the fast decoder) fill logits and
        IoU on the device and threshold once per image, the one host-device synchronisation.
        """
        threshold, size = self.config.pred_iou_threshold, self.mask_size
        if not batches:  # every prompt skipped
            return Proposals(torch.zeros(0, size, size, device=self.device), torch.zeros(0, device=self.device),
                             torch.zeros(0, dtype=torch.int64, device=self.device))
        if sync:
            logits_parts, iou_parts, index_parts = [], [], []
            for idx, real in batches:
                logits, iou = decode(idx.to(self.device))
                keep = iou[:real] > threshold
                logits_parts.append(logits[:real][keep])
                iou_parts.append(iou[:real][keep])
                index_parts.append(idx[:real].to(self.device)[keep])
            return Proposals(torch.cat(logits_parts), torch.cat(iou_parts), torch.cat(index_parts))
        index = torch.cat([idx[:real] for idx, real in batches]).to(self.device)
        logits = torch.empty(index.numel(), size, size, dtype=torch.float32, device=self.device)
        iou = torch.empty(index.numel(), dtype=torch.float32, device=self.device)
        start = 0
        for idx, real in batches:
            batch_logits, batch_iou = decode(idx.to(self.device))
            logits[start : start + real], iou[start : start + real] = batch_logits[:real], batch_iou[:real]
            start += real
        keep = torch.nonzero(iou > threshold).squeeze(1)  # the one sync per image
        return Proposals(logits.index_select(0, keep), iou.index_select(0, keep), index.index_select(0, keep))

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
