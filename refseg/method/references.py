"""Reference instances -> embeddings -> memory bank (docs/method.md section 1)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Iterable, Sequence

import numpy as np
import torch
import torch.nn.functional as F

from refseg.errors import RefsegError
from refseg.method.config import ReferenceConfig
from refseg.method.interfaces import FeatureEncoder, ProposalGenerator
from refseg.method.memory_bank import MemoryBank
from refseg.method.precision import autocast
from refseg.method.preprocess import squash_to_square, to_tensor


class UnusableReference(RefsegError, ValueError):
    """A reference instance cannot give an embedding (empty or too thin a mask, bad box...)."""


@dataclass
class Reference:
    """One annotated instance: an RGB image with a mask and/or a box (xyxy pixels)."""

    image: np.ndarray  # [H, W, 3] uint8
    class_name: str
    mask: np.ndarray | None = None  # [H, W] bool
    box: Sequence[float] | None = None  # xyxy in pixels
    source: dict = field(default_factory=dict)


NO_ANNOTATION = "no annotation of this class among the references"


@dataclass
class BankReport:
    """What happened to each reference while building a bank, per class.

    ``classes``: the classes the caller expected (e.g. every category of a COCO file,
    the classes declared on a FiftyOne field); one that never shows up among the
    references is reported too (:meth:`unannotated`), not silently left out.
    """

    used: dict[str, int] = field(default_factory=dict)  # class -> positive references added
    skipped: list[tuple[dict, str, str]] = field(default_factory=list)  # (source, class, reason)
    negatives: dict[str, int] = field(default_factory=dict)  # class -> negative references added
    classes: list[str] = field(default_factory=list)

    def skip(self, source: dict, class_name: str, reason: str) -> None:
        """Record a reference that could not be used (unreadable image, bad annotation...)."""
        self.skipped.append((source, class_name, reason))

    def all_classes(self) -> list[str]:
        """The expected classes, then any other class met, in order of appearance."""
        met = [*self.used, *self.negatives, *(c for _, c, _ in self.skipped if c is not None)]
        return list(dict.fromkeys([*self.classes, *met]))

    def added(self, class_name: str) -> int:
        """References (positive and negative) of ``class_name`` added to the bank."""
        return self.used.get(class_name, 0) + self.negatives.get(class_name, 0)

    def unannotated(self) -> list[str]:
        """Expected classes with no reference at all, neither used nor skipped."""
        seen = {c for _, c, _ in self.skipped}
        return [c for c in self.all_classes() if not self.added(c) and c not in seen]

    def unusable(self) -> list[str]:
        """Classes that had references, none of them usable."""
        seen = {c for _, c, _ in self.skipped}
        return [c for c in self.all_classes() if not self.added(c) and c in seen]

    def rows(self) -> list[dict]:
        """Per class: ``used``, ``negatives``, ``skipped`` counts and the distinct skip ``reasons``."""
        out = []
        for c in self.all_classes():
            reasons = list(dict.fromkeys(r for _, sc, r in self.skipped if sc == c))
            out.append({"class": c, "used": self.used.get(c, 0), "negatives": self.negatives.get(c, 0),
                        "skipped": sum(1 for _, sc, _ in self.skipped if sc == c),
                        "reasons": sorted(reasons) if reasons or self.added(c) else [NO_ANNOTATION]})
        return out

    def summary(self) -> str:
        lines = []
        for row in self.rows():
            counts = [f"{row['used']} reference(s)"] + ([f"{row['negatives']} negative(s)"] if row["negatives"] else [])
            if row["skipped"]:
                counts.append(f"{row['skipped']} skipped")
            lines.append(f"{row['class']}: " + (", ".join(counts) if row["used"] or row["negatives"] or row["skipped"]
                                                 else NO_ANNOTATION))
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


def masks_from_boxes(proposer: ProposalGenerator, image: np.ndarray, boxes: Sequence[Sequence[float]],
                     image_size: int = 1024, precision: str = "fp32") -> list[np.ndarray]:
    """SAM2 box prompts -> one [H, W] bool mask per box (xyxy pixels), at the image's resolution.

    The image is squashed to ``image_size`` squared (the proposer's input), the boxes
    scaled alike, and each box's mask logits are resized back and thresholded at 0.
    Check each box with :func:`box_problem` first: this runs the proposal model.
    """
    if len(boxes) == 0:
        return []
    h, w = image.shape[:2]
    s = image_size
    sq = squash_to_square(image, s).to(proposer.device)
    scale = torch.tensor([s / w, s / h, s / w, s / h])
    box_t = (torch.as_tensor(np.asarray(boxes, dtype=np.float32)).reshape(-1, 4) * scale).to(proposer.device)
    with torch.inference_mode(), autocast(proposer.device, precision):
        logits = proposer.masks_from_boxes(sq, box_t).float()  # [K, h', w']
    # one box at a time at full resolution: K float masks of a large image would not fit
    return [(F.interpolate(m[None, None], size=(h, w), mode="bilinear", align_corners=False)[0, 0] > 0).cpu().numpy()
            for m in logits]


class ReferenceEncoder:
    """Turns reference instances into embeddings with a feature encoder.

    Box-only references are first turned into masks with :func:`masks_from_boxes`
    (the best of SAM2's multimask outputs). ``proposer_factory`` (no arguments) builds
    the proposer the first time a box-only reference with a usable box needs it, so a
    bank of masks alone never loads the proposal model.
    """

    def __init__(self, encoder: FeatureEncoder, config: ReferenceConfig = ReferenceConfig(),
                 proposer: ProposalGenerator | None = None, proposal_image_size: int = 1024,
                 precision: str = "fp32", proposer_factory: Callable[[], ProposalGenerator] | None = None):
        self.encoder = encoder
        self.config = config
        self.proposer = proposer
        self.proposer_factory = proposer_factory
        self.proposal_image_size = proposal_image_size
        self.precision = precision

    def proposal_model(self) -> ProposalGenerator:
        """The proposer; built by ``proposer_factory`` on first use (a box-only reference with a usable box)."""
        if self.proposer is None and self.proposer_factory is not None:
            self.proposer = self.proposer_factory()
        if self.proposer is None:
            raise UnusableReference("reference has a box but no mask, and no proposal model was given to make one")
        return self.proposer

    def mask_from_box(self, image: np.ndarray, box: Sequence[float]) -> np.ndarray:
        """SAM2 box prompt -> [H, W] bool mask at the image's resolution."""
        return masks_from_boxes(self.proposal_model(), image, [box], self.proposal_image_size, self.precision)[0]

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
        builder = BankBuilder(self, bank, batch_size=batch_size)
        builder.add_all(refs, negative=negative)
        return builder.finish()


REFERENCE_CHUNK = 64  # references decoded and held at a time while building a bank (bounds memory)


class BankBuilder:
    """Adds references to a memory bank a bounded number at a time, with a per-class report.

    The one bank builder of refseg: ``refseg build-bank``, the FiftyOne plugin's
    ``build_memory_bank`` and ``update_memory_bank_from_review``, and
    :meth:`ReferenceEncoder.build_bank` all go through it. References handed to
    :meth:`add` are kept until ``chunk_size`` are waiting, then embedded ``batch_size``
    at a time and added (positive or negative); those that cannot give an embedding
    are recorded in :attr:`report` with the reason, as are those the caller rejects
    before decoding (:meth:`skip`). Give the proposer to ``ref_encoder`` as a
    ``proposer_factory`` to build it only if a box-only reference with a usable box
    comes (boxes are checked first, without it).
    """

    def __init__(self, ref_encoder: ReferenceEncoder, bank: MemoryBank | None = None, classes: Iterable[str] = (),
                 batch_size: int = 8, chunk_size: int = REFERENCE_CHUNK):
        if batch_size < 1 or chunk_size < 1:
            raise ValueError(f"batch_size and chunk_size must be at least 1, not {batch_size} and {chunk_size}")
        self.ref_encoder = ref_encoder
        self.bank = bank if bank is not None else MemoryBank(ref_encoder.encoder.settings())
        self.report = BankReport(classes=list(dict.fromkeys(classes)))
        self.batch_size, self.chunk_size = batch_size, chunk_size
        self._pending: list[tuple[Reference, bool]] = []

    def add(self, ref: Reference, negative: bool = False) -> None:
        """Queue one reference (embedded with the next full chunk, or by :meth:`finish`)."""
        self._pending.append((ref, negative))
        if len(self._pending) >= self.chunk_size:
            self.flush()

    def add_all(self, refs: Iterable[Reference], negative: bool = False) -> None:
        for ref in refs:
            self.add(ref, negative)

    def skip(self, source: dict, class_name: str, reason: str) -> None:
        """Record a reference the caller could not even make (unreadable image, bad annotation...)."""
        self.report.skip(source, class_name, reason)

    def flush(self) -> None:
        """Embed the queued references and add the usable ones to the bank."""
        pending, self._pending = self._pending, []
        if not pending:
            return
        results = self.ref_encoder.embed([ref for ref, _ in pending], self.batch_size)
        for (ref, negative), result in zip(pending, results):
            if isinstance(result, UnusableReference):
                self.report.skip(ref.source, ref.class_name, str(result))
                continue
            self.bank.add(ref.class_name, result, negative=negative, source=ref.source)
            counts = self.report.negatives if negative else self.report.used
            counts[ref.class_name] = counts.get(ref.class_name, 0) + 1

    def finish(self) -> tuple[MemoryBank, BankReport]:
        """Embed what is still queued; returns the bank and the report."""
        self.flush()
        return self.bank, self.report
