"""Reference instances -> embeddings -> memory bank (docs/method.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from refseg.method.config import ReferenceConfig
from refseg.method.interfaces import FeatureEncoder, ProposalGenerator
from refseg.method.memory_bank import MemoryBank
from refseg.method.precision import autocast
from refseg.method.preprocess import squash_to_square, to_tensor


class UnusableReference(ValueError):
    """A reference instance cannot give an embedding (empty or too thin a mask, bad box...)."""


@dataclass
class Reference:
    """One annotated instance: an RGB image with a mask and/or a box (xyxy pixels)."""

    image: np.ndarray  # [H, W, 3] uint8
    class_name: str
    mask: np.ndarray | None = None  # [H, W] bool
    box: Sequence[float] | None = None  # xyxy in pixels
    source: dict = field(default_factory=dict)


@dataclass
class BankReport:
    """What happened to each reference while building a bank."""

    used: dict[str, int] = field(default_factory=dict)
    skipped: list[tuple[dict, str, str]] = field(default_factory=list)  # (source, class, reason)

    def summary(self) -> str:
        lines = [f"{c}: {n} reference(s)" for c, n in self.used.items()]
        lines += [f"skipped {c} {s}: {r}" for s, c, r in self.skipped]
        return "\n".join(lines)


def crop_window(box: Sequence[float], height: int, width: int, context_scale: float) -> tuple[int, int, int, int]:
    """Square window of side ``context_scale * max(w, h)`` centred on the box, clipped to the image.

    Box corners are truncated to integers first, as the reference does. Returns xyxy
    (exclusive end), non-empty.
    """
    x1, y1, x2, y2 = (int(v) for v in box)
    side = context_scale * max(x2 - x1, y2 - y1, 1)
    cx, cy = (x1 + x2) / 2.0, (y1 + y2) / 2.0
    left, top = int(max(0, cx - side / 2)), int(max(0, cy - side / 2))
    right, bottom = int(min(width, cx + side / 2)), int(min(height, cy + side / 2))
    return left, top, max(right, left + 1), max(bottom, top + 1)


def box_problem(box: Sequence[float] | None, height: int | None = None, width: int | None = None) -> str | None:
    """Why ``box`` (xyxy pixels) cannot prompt a mask, or ``None`` when it can.

    Checked: four finite numbers, positive width and height, and (given the image
    size) some overlap with the image. Cheap, so callers check it before loading or
    running the proposal model.
    """
    try:
        x1, y1, x2, y2 = (float(v) for v in box)  # type: ignore[union-attr]
    except (TypeError, ValueError):
        return f"box {box!r} is not four numbers (x1, y1, x2, y2)"
    if not all(np.isfinite(v) for v in (x1, y1, x2, y2)):
        return f"box {[x1, y1, x2, y2]} holds a non-finite value"
    if x2 <= x1 or y2 <= y1:
        return (f"box {[x1, y1, x2, y2]} (xyxy) has zero or negative area "
                f"({x2 - x1:g} wide, {y2 - y1:g} high)")
    if height is not None and width is not None and (x2 <= 0 or y2 <= 0 or x1 >= width or y1 >= height):
        return f"box {[x1, y1, x2, y2]} (xyxy) lies outside the {width}x{height} image"
    return None


def mask_to_box(mask: np.ndarray) -> tuple[int, int, int, int]:
    """Tight xyxy box (exclusive end) of a non-empty mask."""
    ys, xs = np.nonzero(mask)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


class ReferenceEncoder:
    """Turns reference instances into embeddings with a feature encoder.

    Box-only references are first turned into masks with ``proposer.masks_from_boxes``
    (the best of SAM2's multimask outputs).
    """

    def __init__(self, encoder: FeatureEncoder, config: ReferenceConfig = ReferenceConfig(),
                 proposer: ProposalGenerator | None = None, proposal_image_size: int = 1024,
                 precision: str = "fp32"):
        self.encoder = encoder
        self.config = config
        self.proposer = proposer
        self.proposal_image_size = proposal_image_size
        self.precision = precision

    def mask_from_box(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """SAM2 box prompt -> [H, W] bool mask at the image's resolution."""
        if self.proposer is None:
            raise UnusableReference("reference has a box but no mask, and no proposal model was given to make one")
        h, w = image.shape[:2]
        s = self.proposal_image_size
        sq = squash_to_square(image, s).to(self.proposer.device)
        scale = torch.tensor([s / w, s / h, s / w, s / h])
        box_t = (torch.as_tensor(box, dtype=torch.float32) * scale).reshape(1, 4).to(self.proposer.device)
        with torch.inference_mode(), autocast(self.proposer.device, self.precision):
            logits = self.proposer.masks_from_boxes(sq, box_t)  # [1, h', w']
        full = F.interpolate(logits.float()[None], size=(h, w), mode="bilinear", align_corners=False)[0, 0]
        return (full > 0).cpu().numpy()

    def _prepare(self, ref: Reference) -> tuple[torch.Tensor, torch.Tensor]:
        """Crop around the instance -> (image [3, S, S] in [0, 1], patch weights [g, g])."""
        h, w = ref.image.shape[:2]
        mask = ref.mask
        if mask is None:
            if ref.box is None:
                raise UnusableReference("reference has neither a mask nor a box")
            problem = box_problem(ref.box, h, w)  # before the proposal model is asked for a mask
            if problem is not None:
                raise UnusableReference(f"unusable box: {problem}")
            mask = self.mask_from_box(ref.image, ref.box)
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != (h, w):
            raise UnusableReference(f"mask shape {mask.shape} does not match image shape {(h, w)}")
        if not mask.any():
            raise UnusableReference("empty mask")
        box = ref.box if ref.box is not None else mask_to_box(mask)
        x1, y1, x2, y2 = crop_window(box, h, w, self.config.context_scale)
        size, patch = self.encoder.input_size, self.encoder.patch_size
        crop = to_tensor(ref.image[y1:y2, x1:x2])[None]  # [1, 3, h, w]
        # bicubic overshoots [0, 1] near strong edges; the reference keeps it (no clamp)
        crop = F.interpolate(crop, size=(size, size), mode="bicubic", align_corners=False, antialias=False)[0]
        m = torch.from_numpy(mask[y1:y2, x1:x2].astype(np.float32))[None, None]
        soft = F.interpolate(m, size=(size, size), mode="bilinear", align_corners=False)[0, 0]
        grid = size // patch
        weights = soft[::patch, ::patch][:grid, :grid]  # each patch's top-left pixel
        if float(weights.sum()) < self.config.min_mask_weight:
            raise UnusableReference("mask too thin: it covers no patch corner of the feature grid")
        return crop, weights

    def embed(self, refs: Sequence[Reference], batch_size: int = 8) -> list[torch.Tensor | UnusableReference]:
        """One embedding [D] (or the reason it is unusable) per reference, in order."""
        out: list[torch.Tensor | UnusableReference | None] = [None] * len(refs)
        prepared: list[tuple[int, torch.Tensor, torch.Tensor]] = []
        for i, ref in enumerate(refs):
            try:
                crop, weights = self._prepare(ref)
                prepared.append((i, crop, weights))
            except UnusableReference as exc:
                out[i] = exc
        device = self.encoder.device
        for start in range(0, len(prepared), batch_size):
            chunk = prepared[start:start + batch_size]
            images = torch.stack([c for _, c, _ in chunk]).to(device)
            with torch.inference_mode(), autocast(device, self.precision):
                feats = self.encoder.encode(images).float()  # [B, g, g, D]
            for (i, _, weights), f in zip(chunk, feats):
                wts = weights.to(f.device)
                emb = (f * wts[..., None]).sum(dim=(0, 1)) / wts.sum()
                out[i] = emb.cpu()
        return out  # type: ignore[return-value]

    def build_bank(self, refs: Iterable[Reference], bank: MemoryBank | None = None, negative: bool = False,
                   batch_size: int = 8) -> tuple[MemoryBank, BankReport]:
        """Add every usable reference to ``bank`` (a new one by default); report what was skipped."""
        refs = list(refs)
        bank = bank if bank is not None else MemoryBank(self.encoder.settings())
        report = BankReport()
        for ref, result in zip(refs, self.embed(refs, batch_size)):
            if isinstance(result, UnusableReference):
                report.skipped.append((ref.source, ref.class_name, str(result)))
                continue
            bank.add(ref.class_name, result, negative=negative, source=ref.source)
            report.used[ref.class_name] = report.used.get(ref.class_name, 0) + 1
        return bank, report
