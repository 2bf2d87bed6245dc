"""The result type: per-image instance detections as plain arrays, and their COCO form.

Box convention, everywhere in refseg: a box is ``x1, y1, x2, y2`` in pixels with ``x2, y2``
exclusive, the mask's exact extent (:func:`masks_to_boxes`). The paper's one-pixel-short box
exists only in COCO results files (:func:`coco_bboxes` with ``paper_box``, used by
:meth:`Detections.to_coco`).
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
import torch
from pycocotools import mask as mask_utils

from refseg.errors import CocoError, InvalidDetections

_RLE_CHUNK_PIXELS = 1 << 26  # full masks materialised at a time when compact masks are RLE-encoded


def annotation_mask(segmentation, height: int, width: int) -> np.ndarray | None:
    """COCO segmentation (polygons, RLE or uncompressed RLE) -> [H, W] bool; ``None`` for none at all."""
    if segmentation is None or (isinstance(segmentation, list) and len(segmentation) == 0):
        return None
    if isinstance(segmentation, list):  # polygons
        polys = [p for p in segmentation if len(p) >= 6]
        if not polys:
            raise CocoError("polygon with fewer than 3 points")
        rles = mask_utils.frPyObjects(polys, height, width)
        rle = mask_utils.merge(rles)
    elif isinstance(segmentation, dict) and "counts" in segmentation:
        size = [int(v) for v in segmentation.get("size", [height, width])]
        if size != [height, width]:
            raise CocoError(f"RLE size {size} does not match the image size {[height, width]}")
        if isinstance(segmentation["counts"], list):  # uncompressed
            rle = mask_utils.frPyObjects(segmentation, height, width)
        else:
            counts = segmentation["counts"]
            rle = {"size": size, "counts": counts.encode("ascii") if isinstance(counts, str) else counts}
    else:
        raise CocoError(f"unsupported segmentation of type {type(segmentation).__name__}")
    return mask_utils.decode(rle).astype(bool)


def masks_to_boxes(masks: np.ndarray) -> np.ndarray:
    """[N, H, W] bool -> [N, 4] int64 xyxy, ``x2, y2`` exclusive: each mask's exact extent.

    Empty masks give a zero box. The one place refseg derives a box from a mask
    (the paper's COCO box is made from this one by :func:`coco_bboxes`).
    """
    n = masks.shape[0]
    boxes = np.zeros((n, 4), dtype=np.int64)
    if masks.size == 0:  # no mask, or masks of no pixel
        return boxes
    rows = masks.any(axis=2)  # [N, H]
    cols = masks.any(axis=1)  # [N, W]
    nonempty = rows.any(axis=1)
    h, w = masks.shape[1:]
    boxes[:, 0] = cols.argmax(axis=1)
    boxes[:, 1] = rows.argmax(axis=1)
    boxes[:, 2] = w - cols[:, ::-1].argmax(axis=1)
    boxes[:, 3] = h - rows[:, ::-1].argmax(axis=1)
    boxes[~nonempty] = 0
    return boxes


def coco_bboxes(boxes: np.ndarray, paper_box: bool = False) -> np.ndarray:
    """Exact xyxy boxes [N, 4] -> COCO ``bbox`` [N, 4] float64 ``x, y, w, h``.

    ``paper_box=True`` gives the reference's box instead: made from inclusive pixel indices,
    one pixel short in width and height (never below 0). Its inverse is :func:`bboxes_to_xyxy`.
    """
    out = np.asarray(boxes, dtype=np.float64).reshape(-1, 4).copy()
    out[:, 2:] -= out[:, :2]
    if paper_box:
        out[:, 2:] = np.maximum(out[:, 2:] - 1, 0)
    return out


def bboxes_to_xyxy(bboxes, height: int, width: int) -> np.ndarray:
    """COCO ``bbox`` ``x, y, w, h`` rows -> xyxy float64 [N, 4], clipped to the image."""
    b = np.asarray(bboxes, dtype=np.float64).reshape(-1, 4)
    xyxy = np.concatenate([b[:, :2], b[:, :2] + b[:, 2:]], axis=1)
    return np.clip(xyxy, 0, [width, height, width, height])


class CompactMasks:
    """N binary masks of one ``H x W`` image held as tight boxes plus bit-packed crops.

    ``boxes`` [N, 4] int64 xyxy (exclusive; zeros for an empty mask) are each mask's exact
    extent; ``bits[i]`` is ``numpy.packbits`` of the mask's crop ``[y2 - y1, x2 - x1]``, row
    by row. Memory is the masks' bounding areas in bits, not ``N * H * W`` bytes.
    """

    def __init__(self, shape: tuple[int, int], boxes: np.ndarray, bits: Sequence[np.ndarray]):
        self.shape = (int(shape[0]), int(shape[1]))
        self.boxes = np.asarray(boxes, dtype=np.int64).reshape(-1, 4)
        self.bits = list(bits)
        if len(self.bits) != len(self.boxes):
            raise InvalidDetections("masks", f"{len(self.boxes)} crop boxes but {len(self.bits)} crops")
        h, w = self.shape
        x1, y1, x2, y2 = self.boxes.T
        if not ((0 <= x1) & (x1 <= x2) & (x2 <= w) & (0 <= y1) & (y1 <= y2) & (y2 <= h)).all():
            raise InvalidDetections("masks", f"a crop box is not inside the {h} x {w} image")
        for i, (b, (bx1, by1, bx2, by2)) in enumerate(zip(self.bits, self.boxes.tolist())):
            if b.dtype != np.uint8 or b.ndim != 1 or b.size != ((bx2 - bx1) * (by2 - by1) + 7) // 8:
                raise InvalidDetections("masks", f"crop {i} does not hold the bits of its box {[bx1, by1, bx2, by2]}")

    @classmethod
    def from_masks(cls, masks: np.ndarray) -> "CompactMasks":
        """Full [N, H, W] bool masks -> their compact form (boxes from :func:`masks_to_boxes`)."""
        boxes = masks_to_boxes(masks)
        bits = [np.packbits(m[y1:y2, x1:x2]) for m, (x1, y1, x2, y2) in zip(masks, boxes.tolist())]
        return cls(masks.shape[1:], boxes, bits)

    @classmethod
    def from_crops(cls, shape: tuple[int, int], windows, crops: Sequence) -> "CompactMasks":
        """Masks given inside windows: ``windows`` [N, 4] xyxy exclusive, ``crops[i]`` the bool mask
        ``[y2 - y1, x2 - x1]`` in window ``i`` (numpy or torch; None for an empty window). Each crop is
        tightened to its mask's exact extent; pixels outside the windows are False."""
        windows = np.asarray(windows, dtype=np.int64).reshape(-1, 4)
        if len(crops) != len(windows):
            raise InvalidDetections("masks", f"{len(windows)} windows but {len(crops)} crops")
        boxes = np.zeros((len(windows), 4), dtype=np.int64)
        bits = []
        for i, ((x1, y1, x2, y2), crop) in enumerate(zip(windows.tolist(), crops)):
            if crop is None:
                bits.append(np.zeros(0, dtype=np.uint8))
                continue
            crop = crop.cpu().numpy() if isinstance(crop, torch.Tensor) else np.asarray(crop)
            if crop.dtype != bool or crop.shape != (y2 - y1, x2 - x1):
                raise InvalidDetections("masks", f"crop {i} is {crop.dtype} {list(crop.shape)}, not the bool mask "
                                                 f"of its window {[x1, y1, x2, y2]}")
            cx1, cy1, cx2, cy2 = masks_to_boxes(crop[None])[0].tolist()
            bits.append(np.packbits(crop[cy1:cy2, cx1:cx2]))
            if cx2 > cx1:
                boxes[i] = [x1 + cx1, y1 + cy1, x1 + cx2, y1 + cy2]
        return cls(shape, boxes, bits)

    def __len__(self) -> int:
        return len(self.bits)

    def crop(self, i: int) -> np.ndarray:
        """Mask ``i`` inside its box: [y2 - y1, x2 - x1] bool."""
        x1, y1, x2, y2 = self.boxes[i].tolist()
        h, w = y2 - y1, x2 - x1
        return np.unpackbits(self.bits[i], count=h * w).view(bool).reshape(h, w)

    def dense(self) -> np.ndarray:
        """The full masks, [N, H, W] bool."""
        out = np.zeros((len(self), *self.shape), dtype=bool)
        for i, (x1, y1, x2, y2) in enumerate(self.boxes.tolist()):
            if x2 > x1:
                out[i, y1:y2, x1:x2] = self.crop(i)
        return out

    def __getitem__(self, index) -> "CompactMasks":
        """The masks selected by a boolean mask, an index array or a slice."""
        picked = np.arange(len(self))[index].reshape(-1)
        return CompactMasks(self.shape, self.boxes[picked], [self.bits[i] for i in picked.tolist()])

    def __repr__(self) -> str:
        return f"CompactMasks({len(self)} masks of {self.shape[0]} x {self.shape[1]})"


def _check_vector(name: str, value, n: int | None, kind: str) -> np.ndarray:
    """``value`` as a 1-d array of ``n`` numbers of ``kind`` ('real' finite or 'integer')."""
    arr = np.asarray(value)
    if arr.ndim != 1 or (n is not None and arr.shape[0] != n):
        raise InvalidDetections(name, f"expected shape [{'N' if n is None else n}], got {list(arr.shape)}")
    if kind == "integer":
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.integer):
            raise InvalidDetections(name, f"expected integers, got {arr.dtype}")
    else:
        if arr.dtype == bool or not np.issubdtype(arr.dtype, np.number) or np.iscomplexobj(arr):
            raise InvalidDetections(name, f"expected real numbers, got {arr.dtype}")
        if not np.isfinite(arr).all():
            raise InvalidDetections(name, f"not finite at index {int(np.flatnonzero(~np.isfinite(arr))[0])}")
    return arr


class Detections:
    """Instances found in one image, sorted by score (highest first). Checked on construction.

    masks:       [N, H, W] bool at the original image resolution, or a :class:`CompactMasks`
                 (then ``masks`` makes the full array on first use; ``compact`` gives the
                 compact form either way).
    boxes:       [N, 4] xyxy in pixels inside the image; ``x2, y2`` exclusive (the mask's true extent).
                 The paper's one-pixel-short box exists only in COCO results files
                 (:meth:`to_coco` with ``paper_box``).
    scores:      [N] finite float (in [0, 1] for the pipeline's).
    labels:      [N] int, index into ``class_names``.
    class_names: the memory bank's class names.
    pred_iou:    [N] finite float, the proposer's quality estimate (kept for inspection), or None.
    candidate_index: [N] int >= 0, the place of each detection's proposal in the
                 :class:`~refseg.method.pipeline.Candidates` it was labelled from (and so, with their
                 ``prompt_index``, its prompt), or None. Set by :meth:`refseg.Segmenter.label`; never
                 written out (COCO records and FiftyOne labels leave it out).

    Bad arrays raise :class:`refseg.errors.InvalidDetections` (a ``ValueError``) naming the field.
    """

    def __init__(self, masks, boxes, scores, labels, class_names: Sequence[str] | None = None,
                 pred_iou=None, candidate_index=None):
        self._masks: np.ndarray | None = None
        self._compact: CompactMasks | None = None
        if isinstance(masks, CompactMasks):
            self._compact = masks
            n, (h, w) = len(masks), masks.shape
        else:
            arr = np.asarray(masks)
            if arr.ndim != 3:
                raise InvalidDetections("masks", f"expected shape [N, H, W], got {list(arr.shape)}")
            if arr.dtype != bool:
                raise InvalidDetections("masks", f"expected bool, got {arr.dtype}")
            self._masks = arr
            n, h, w = arr.shape
        self.class_names = list(class_names or [])
        if not all(isinstance(c, str) for c in self.class_names):
            raise InvalidDetections("class_names", "expected a list of str")
        self.scores = _check_vector("scores", scores, n, "real")
        self.labels = _check_vector("labels", labels, n, "integer")
        self.pred_iou = None if pred_iou is None else _check_vector("pred_iou", pred_iou, n, "real")
        self.candidate_index = None
        if candidate_index is not None:
            self.candidate_index = _check_vector("candidate_index", candidate_index, n, "integer")
            if (self.candidate_index < 0).any():
                raise InvalidDetections("candidate_index", "expected indices >= 0")
        bad = (self.labels < 0) | (self.labels >= len(self.class_names))
        if bad.any():
            raise InvalidDetections("labels", f"label {int(self.labels[bad][0])} is not an index into the "
                                              f"{len(self.class_names)} class names")
        boxes = np.asarray(boxes)
        if boxes.shape != (n, 4):
            raise InvalidDetections("boxes", f"expected shape [{n}, 4], got {list(boxes.shape)}")
        if boxes.dtype == bool or not np.issubdtype(boxes.dtype, np.number) or not np.isfinite(boxes).all():
            raise InvalidDetections("boxes", "expected finite real numbers")
        x1, y1, x2, y2 = boxes.T
        for problem, wrong in (("x1 > x2", x1 > x2), ("y1 > y2", y1 > y2),
                               (f"outside the {h} x {w} image", (x1 < 0) | (y1 < 0) | (x2 > w) | (y2 > h))):
            if wrong.any():
                raise InvalidDetections("boxes", f"box {int(np.flatnonzero(wrong)[0])} has {problem}")
        self.boxes = boxes

    @classmethod
    def from_crops(cls, shape: tuple[int, int], windows, crops: Sequence, scores, labels,
                   class_names: Sequence[str] | None = None, pred_iou=None, candidate_index=None) -> "Detections":
        """Detections from masks given inside windows (:meth:`CompactMasks.from_crops`); the boxes
        are the masks' exact extents."""
        compact = CompactMasks.from_crops(shape, windows, crops)
        return cls(compact, compact.boxes.astype(np.float32), scores, labels, class_names, pred_iou, candidate_index)

    @classmethod
    def from_masks(cls, masks: np.ndarray, scores, labels, class_names: Sequence[str] | None = None,
                   pred_iou=None) -> "Detections":
        """Detections from full masks, with the masks' exact boxes."""
        return cls(masks, masks_to_boxes(np.asarray(masks)).astype(np.float32), scores, labels, class_names, pred_iou)

    @classmethod
    def from_coco(cls, records: Sequence[Mapping], height: int, width: int, class_names: Sequence[str],
                  category_ids: Mapping[str, int] | Sequence[int] | None = None) -> "Detections":
        """COCO result records of one image -> Detections, in record order (the inverse of :meth:`to_coco`).

        ``class_names`` and ``category_ids`` are read as :meth:`to_coco` writes them (by default
        category id = class index + 1). A record's mask is its ``segmentation`` (RLE, compressed or
        not, or polygons) and its box the mask's exact extent; a record without a segmentation (or
        with an empty one) keeps its ``bbox``, clipped to the image, and an empty mask. ``score``
        defaults to 1 (ground truth). Records that do not fit raise a
        :class:`refseg.errors.CocoError` naming the record.
        """
        class_names = list(class_names)
        if category_ids is None:
            index = {i + 1: i for i in range(len(class_names))}
        elif isinstance(category_ids, Mapping):
            index = {int(category_ids[name]): i for i, name in enumerate(class_names)}
        else:
            index = {int(cid): i for i, cid in enumerate(category_ids)}
        windows, crops, boxes, scores, labels = [], [], [], [], []
        for k, rec in enumerate(records):
            try:
                labels.append(index[int(rec["category_id"])])
                scores.append(float(rec.get("score", 1.0)))
                mask = annotation_mask(rec.get("segmentation"), height, width)
            except (KeyError, TypeError, ValueError) as exc:
                raise CocoError(f"result record [{k}] does not fit an image of {height} x {width} with "
                                f"categories {sorted(index)}: {exc.args[0] if exc.args else exc}") from None
            if mask is not None and mask.any():
                windows.append([0, 0, width, height])
                crops.append(mask)
                boxes.append(None)
            else:
                windows.append([0, 0, 0, 0])
                crops.append(None)
                boxes.append(bboxes_to_xyxy(rec["bbox"], height, width)[0] if rec.get("bbox") else np.zeros(4))
        compact = CompactMasks.from_crops((height, width), windows, crops)
        exact = np.array([compact.boxes[i] if b is None else b for i, b in enumerate(boxes)],
                         dtype=np.float64).reshape(-1, 4)
        return cls(compact, exact, np.array(scores, dtype=np.float64), np.array(labels, dtype=np.int64),
                   class_names)

    @classmethod
    def empty(cls, height: int, width: int, class_names: list[str] | None = None) -> "Detections":
        return cls(
            masks=np.zeros((0, height, width), dtype=bool),
            boxes=np.zeros((0, 4), dtype=np.float32),
            scores=np.zeros(0, dtype=np.float32),
            labels=np.zeros(0, dtype=np.int64),
            class_names=list(class_names or []),
            pred_iou=np.zeros(0, dtype=np.float32),
            candidate_index=np.zeros(0, dtype=np.int64),
        )

    @property
    def masks(self) -> np.ndarray:
        """[N, H, W] bool full masks (made from the compact form on first use)."""
        if self._masks is None:
            self._masks = self._compact.dense()
        return self._masks

    @property
    def compact(self) -> CompactMasks:
        """The masks as tight boxes plus bit-crops (made from the full masks on first use)."""
        if self._compact is None:
            self._compact = CompactMasks.from_masks(self._masks)
        return self._compact

    def __len__(self) -> int:
        return int(self.scores.shape[0])

    def __repr__(self) -> str:
        h, w = self.image_size
        return f"Detections({len(self)} in {h} x {w}, classes {self.class_names})"

    @property
    def image_size(self) -> tuple[int, int]:
        if self._masks is not None:
            return int(self._masks.shape[1]), int(self._masks.shape[2])
        return self._compact.shape

    @property
    def label_names(self) -> list[str]:
        return [self.class_names[i] for i in self.labels.tolist()]

    def __getitem__(self, index) -> "Detections":
        """Select detections by boolean mask, index array or slice."""
        masks = self._compact[index] if self._masks is None else self._masks[index]
        out = Detections(
            masks=masks,
            boxes=self.boxes[index],
            scores=self.scores[index],
            labels=self.labels[index],
            class_names=self.class_names,
            pred_iou=None if self.pred_iou is None else self.pred_iou[index],
            candidate_index=None if self.candidate_index is None else self.candidate_index[index],
        )
        if self._masks is not None and self._compact is not None:
            out._compact = self._compact[index]
        return out

    def rles(self) -> list[dict]:
        """COCO RLE of each mask (``counts`` as str, JSON-ready)."""
        if self._masks is not None:
            return encode_rles(self._masks)
        h, w = self.image_size
        step = max(1, _RLE_CHUNK_PIXELS // max(1, h * w))  # bounds the full masks made at a time
        return [rle for start in range(0, len(self), step)
                for rle in encode_rles(self._compact[start:start + step].dense())]

    def to_coco(self, image_id: int, category_ids: dict[str, int] | list[int] | None = None,
                paper_box: bool = False) -> list[dict]:
        """COCO result records: ``image_id, category_id, segmentation (RLE), bbox [x, y, w, h], score``.

        ``category_ids`` maps class name (or class index, as a list) to COCO category id;
        by default the class index + 1.

        The box rule, applied here and nowhere else: ``bbox`` is the mask's exact extent
        (``w`` = last column - first column + 1), what FiftyOne labels and ``Detections.boxes``
        carry too. ``paper_box=True`` (``refseg predict`` with the ``paper`` preset only,
        :attr:`refseg.method.config.OutputConfig.paper_box`) writes the reference's box instead: from
        inclusive pixel indices, one pixel short in width and height, to reproduce the
        published box AP (:func:`coco_bboxes`). The box is each mask's extent (its compact
        form's box), so it does not depend on how ``boxes`` were made.
        """
        rles = self.rles()
        if not rles:
            return []
        bboxes = coco_bboxes(self.compact.boxes, paper_box)  # zeros for an empty mask
        records = []
        for rle, bbox, score, label in zip(rles, bboxes.tolist(), self.scores, self.labels):
            label = int(label)
            if category_ids is None:
                cat = label + 1
            elif isinstance(category_ids, dict):
                cat = int(category_ids[self.class_names[label]])
            else:
                cat = int(category_ids[label])
            records.append(
                {
                    "image_id": int(image_id),
                    "category_id": cat,
                    "segmentation": rle,
                    "bbox": bbox,
                    "score": float(score),
                }
            )
        return records


def encode_rle(mask: np.ndarray) -> dict:
    """Binary [H, W] mask -> COCO RLE dict with ``counts`` decoded to str."""
    rle = mask_utils.encode(np.asfortranarray(mask.astype(np.uint8)))
    rle["counts"] = rle["counts"].decode("ascii")
    return rle


def encode_rles(masks: np.ndarray) -> list[dict]:
    """Binary [N, H, W] masks -> one COCO RLE dict each (as :func:`encode_rle`), in one pycocotools call.

    pycocotools reads [H, W, N] in column-major order, i.e. the bytes of a C-order [N, W, H]
    array: made with one blocked transpose (torch's), about twice as fast as numpy's per mask.
    """
    if len(masks) == 0:
        return []
    as_bytes = torch.from_numpy(np.ascontiguousarray(masks, dtype=bool).view(np.uint8))
    by_column = as_bytes.transpose(1, 2).contiguous().numpy()  # [N, W, H]
    rles = mask_utils.encode(np.asfortranarray(by_column.transpose(2, 1, 0)))  # a view: no copy
    for rle in rles:
        rle["counts"] = rle["counts"].decode("ascii")
    return rles


def decode_rle(rle: dict) -> np.ndarray:
    """COCO RLE (compressed str/bytes or uncompressed list counts) -> [H, W] bool."""
    if isinstance(rle.get("counts"), list):
        rle = mask_utils.frPyObjects(rle, *rle["size"])
    elif isinstance(rle.get("counts"), str):
        rle = {"size": rle["size"], "counts": rle["counts"].encode("ascii")}
    return mask_utils.decode(rle).astype(bool)
